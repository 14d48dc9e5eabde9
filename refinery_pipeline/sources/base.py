"""The one interface every image source offers, and what the implementations share."""
from typing import Iterator, Optional

import numpy as np

from ..errors import ArgumentError, DataSetError, storage_error_message
from ..keys import normalize_keys
from ..pixels import decode_image  # the one rule for encoded bytes; re-exported here


class ImageSource:
    """Images of a data set, each with a key, in the source's own order.

    Readers join a label store's keys with :meth:`keys` (:func:`refinery_pipeline.keys.join`)
    and read the matched items by index, so the order, layout and completeness of a copy do
    not matter. Sources pickle cheaply (files and connections open lazily in each process), so
    they can go into ``DataLoader`` workers.

    Attributes
    ----------
    kind : str
        ``image_folder``, ``paths``, ``beton``, ``webdataset``, ``hf_dataset`` or ``mapped``.
    location : str
        What the images were opened from (a path, URL or a description of an object), for
        messages and :meth:`record`.
    classes : list of str or None
        Class names, indexed by :meth:`labels`; None where the source names none.
    has_bytes : bool
        Whether :meth:`encoded` gives the items' encoded bytes (else only :meth:`image`).
    key_rule : str
        How the keys were made, in words (recorded with the store).
    """

    kind = ""
    key_rule = ""
    has_bytes = True

    def __init__(self, location: str, keys, classes=None):
        self.location = str(location)
        self.classes = None if classes is None else [str(c) for c in classes]
        self._keys = self._checked_keys(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {len(self)} images)"

    def keys(self) -> list:
        """Each item's key (normalized, unique), in the source's order; reads no image. The
        list is the source's own: do not modify it."""
        return self._keys

    def labels(self) -> Optional[np.ndarray]:
        """``(N,)`` int64 class of each item (an index into :attr:`classes` where named), or
        None for a source without labels."""
        return None

    def encoded(self, i: int) -> bytes:
        """Item ``i``'s encoded image, byte for byte as the source stores it (a JPEG file's
        bytes, a tar member, a table cell)."""
        raise DataSetError(f"{self.location}: holds decoded images, not their encoded bytes; "
                           "read them with image(i)")

    def image(self, i: int) -> np.ndarray:
        """Item ``i`` decoded to ``(H, W, 3)`` uint8 RGB by :func:`.pixels.decode_image`: JPEGs
        exactly as FFCV decodes them (simplejpeg, fast DCT), anything else by PIL and the one
        pixel-mode rule of :mod:`.pixels`."""
        return decode_image(self.encoded(i), self.describe(i))

    def iter_encoded(self, indices=None) -> Iterator[bytes]:
        """:meth:`encoded` of each of ``indices`` (default: all, in order); sources that read
        faster in sequence (remote shards) override it."""
        for i in range(len(self)) if indices is None else indices:
            yield self.encoded(int(i))

    def describe(self, i: int) -> str:
        """Where item ``i`` lives, for messages (a file path, a shard and key, a row)."""
        return f"{self.location} item {i}"

    def record(self) -> dict:
        """What a label store records as ``dataset.source``: ``kind``, ``location``,
        ``num_images``, ``key_rule``, and what the kind adds (``split``, shard list, columns)."""
        return {"kind": self.kind, "location": self.location, "num_images": len(self),
                "key_rule": self.key_rule, **self._record_details()}

    def _record_details(self) -> dict:
        return {}

    def stamp(self):
        """What changes when the images do, found without reading them (files' sizes and
        modification times, shards' ETags, a table's fingerprint): part of the cache key of a
        ``.beton`` converted from the source. None where the source cannot tell (a mapped
        data set): nothing converted from it is reused."""
        return None

    def _checked_keys(self, keys) -> list:
        """Normalized keys, refused in one line where a key is unusable or names two items."""
        keys = list(keys)
        if not keys:
            raise DataSetError(f"{self.location}: holds no images; pass a data set with images")
        try:
            keys = normalize_keys(keys)
        except ArgumentError as exc:
            raise DataSetError(f"{self.location}: {exc}") from None
        first = dict(zip(keys, range(len(keys))))
        if len(first) < len(keys):
            i = next(i for i, k in enumerate(keys) if first[k] != i)
            j = first[keys[i]]
            raise DataSetError(f"{self.location}: the key {keys[i]!r} names two images "
                               f"({self.describe(j)} and {self.describe(i)}); every image needs "
                               "its own key: remove or rename one")
        return keys


def read_file_bytes(path) -> bytes:
    """A local file's bytes; a failing read is a one-line :class:`DataSetError`."""
    try:
        with open(path, "rb") as file:  # no Path object per read: ~15 us of a ~300 us item
            return file.read()
    except OSError as exc:
        raise DataSetError(storage_error_message(exc, path)) from None


def as_labels(values, classes, location: str) -> np.ndarray:
    """Integer labels, checked against the number of ``classes`` where named."""
    labels = np.asarray(values, dtype=np.int64)
    if classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(labels[(labels < 0) | (labels >= len(classes))][0])
        raise DataSetError(f"{location}: label {bad} is outside the {len(classes)} named "
                           "classes; name every class (classes=[...]) or fix the labels")
    return labels
