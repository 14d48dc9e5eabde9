"""FFCV imported without compiling a numba typed dict that nothing compiled ever reads.

``ffcv.fields.rgb_image`` builds ``IMAGE_MODES = numba.typed.Dict()`` when it is imported: a map
of two image modes (``{"jpg": 0, "raw": 1}``) that FFCV reads only from Python (its decoders
copy the two integers into locals before compiling their pipeline; its writer stores them as
plain integers). Creating and filling a typed dict compiles its methods with numba: 3.4 s of
every process that imports FFCV on a 2-core CPU, ~90% of ``import ffcv`` (0.3 s without it),
paid by each ``refine`` command, each torchrun rank and each Ray actor, none of which can reuse
another's (numba caches no typed-dict code on disk).

:func:`install` (run by ``import refinery_pipeline``) adds an import hook that runs that one
module with ``numba.typed.Dict`` standing for Python's ``dict``, then puts numba's back: the
module's ``IMAGE_MODES`` is a plain dict of the same items, and nothing else changes (the swap
lasts only while that module runs, under the import lock; a thread of the user's that built a
typed dict in those milliseconds would get a ``dict``). The hook imports nothing until FFCV
itself is imported (importing a torch-free part stays free of numba), and a process that
imported FFCV before ``refinery_pipeline`` keeps FFCV's own (slower) import.
"""
import importlib.abc
import importlib.machinery
import sys

TYPED_DICT_MODULE = "ffcv.fields.rgb_image"  # the one FFCV module that builds a typed dict


class _PlainDictFinder(importlib.abc.MetaPathFinder):
    """Finds :data:`TYPED_DICT_MODULE` as the normal path finder does, with a loader that runs
    it with :class:`_PlainDictLoader`; every other module is left to the next finder."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TYPED_DICT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # an unusual install (a zip, a frozen app): FFCV's own import
        spec.loader = _PlainDictLoader(spec.loader.name, spec.loader.path)
        return spec


class _PlainDictLoader(importlib.machinery.SourceFileLoader):
    """The module's own source loader (bytecode cache, tracebacks and all), run with plain
    dicts."""

    def exec_module(self, module):
        import numba.typed
        namespace = vars(numba.typed)
        had, original = "Dict" in namespace, namespace.get("Dict")
        numba.typed.Dict = dict
        try:
            super().exec_module(module)
        finally:  # numba's own again (its Dict is loaded lazily: an absent name stays absent)
            if had:
                numba.typed.Dict = original
            else:
                del numba.typed.Dict


def install():
    """Add the hook once per process (first, so that it sees FFCV's module before the path
    finder does)."""
    if not any(isinstance(finder, _PlainDictFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PlainDictFinder())
