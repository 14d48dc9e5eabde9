"""A ``.beton`` written by ``refine``: its stored bytes, keyed by the files it was written from."""
from pathlib import Path

import numpy as np

from ..dataset import KEYS_FIELD  # noqa: F401 - where a keyed .beton's sidecar lists its keys
from ..errors import DataSetError
from .base import ImageSource, decode_image

FFCV_JPEG_MODE = 0  # FFCV's IMAGE_MODES["jpg"]: the sample's bytes are a JPEG file


class BetonSource(ImageSource):
    """The images of a ``.beton`` in sample order, keyed by its sidecar.

    Keys come from the sidecar's ``keys`` (a keyed ``.beton``), else from the source files it
    lists (``files``, relative to ``root``); a ``.beton`` with neither has no keys and is
    refused in one line. :meth:`encoded` gives the stored JPEG bytes (what the refinery
    decoded); images stored raw (``write_mode='raw'``) have only :meth:`image`.
    """

    kind = "beton"
    key_rule = "the .beton sidecar's keys, or its source files relative to their split folder"

    def __init__(self, path):
        from ..dataset import ImageDataset
        dataset = ImageDataset(path)  # one-line errors for foreign or missing files
        self.path = Path(path).resolve()
        self.pointers, self.nbytes = dataset.image_byte_spans()
        self.modes = dataset.reader.metadata[dataset.image_field]["mode"].astype(np.int64)
        self.sizes = np.stack([dataset.heights, dataset.widths], -1)
        self._labels = dataset.labels if dataset.has_labels else None
        self._blob = None
        keys = dataset.keys()
        if keys is None:
            raise DataSetError(f"{self.path}: has no image keys (its sidecar lists no source "
                               "files); convert the original images again with `refine convert`, "
                               "or open it by position as before")
        if len(keys) != len(self.pointers):
            raise DataSetError(f"{self.path}: its sidecar lists {len(keys)} keys for "
                               f"{len(self.pointers)} images; the sidecar belongs to another "
                               "file: convert the original images again")
        super().__init__(self.path, keys, dataset.classes if dataset.has_labels else None)

    def __getstate__(self):
        return dict(self.__dict__, _blob=None)  # each process maps the file itself

    @property
    def has_bytes(self) -> bool:
        return bool(np.all(self.modes == FFCV_JPEG_MODE))

    def labels(self):
        return self._labels

    def _stored(self, i: int) -> np.ndarray:
        if self._blob is None:
            self._blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._blob[self.pointers[i]:self.pointers[i] + self.nbytes[i]]

    def encoded(self, i: int) -> bytes:
        if self.modes[i] != FFCV_JPEG_MODE:
            raise DataSetError(f"{self.describe(i)}: stored as raw pixels, not encoded bytes; "
                               "read it with image(i)")
        return self._stored(i).tobytes()

    def image(self, i: int) -> np.ndarray:
        if self.modes[i] == FFCV_JPEG_MODE:
            return decode_image(self.encoded(i), self.describe(i))
        h, w = self.sizes[i]
        return np.asarray(self._stored(i)[:h * w * 3]).reshape(h, w, 3)

    def digests(self) -> np.ndarray:
        """``(N, 32)`` uint8: SHA-256 of each image's stored bytes, in sample order (what a
        label store made from this ``.beton`` records as ``image_digests``): the ones its write
        kept beside it, computed and kept once for a ``.beton`` without them."""
        from ..dataset import ImageDataset
        return ImageDataset(self.path).image_digests()

    def describe(self, i: int) -> str:
        return f"{self.path} image {i}"
