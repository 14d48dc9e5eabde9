"""FFCV imported through refinery_pipeline's hook (core/ffcv_import.py): its image modes are a
plain dict of the same items, numba's typed dict is numba's own again, and nothing else is
touched."""
import subprocess
import sys

from refinery_pipeline.core.ffcv_import import TYPED_DICT_MODULE, _PlainDictFinder

PROBE = f"""
import refinery_pipeline, numba.typed
import {TYPED_DICT_MODULE} as rgb_image
print(type(rgb_image.IMAGE_MODES).__name__, sorted(rgb_image.IMAGE_MODES.items()),
      numba.typed.Dict.__module__, type(rgb_image.__loader__).__name__)
"""


def test_ffcv_is_imported_with_plain_image_modes_and_numba_is_left_as_it_was():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split("\n")[0] == ("dict [('jpg', 0), ('raw', 1)] "
                                            "numba.typed.typeddict _PlainDictLoader")


def test_the_hook_finds_only_ffcvs_image_module():
    finder = _PlainDictFinder()
    assert finder.find_spec("ffcv.fields.basics", None) is None
    assert finder.find_spec("json", None) is None
