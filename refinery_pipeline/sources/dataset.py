"""Image data sets as FFCV ``.beton`` files: conversion from ImageFolder trees, metadata, fingerprints.

The ``.beton`` is the pixel source of truth. Crop boxes are drawn in its stored frame and both the
refinery and the student decode its bytes with FFCV's own decoder, so we convert an ImageFolder
tree once (cached) and always work from the file.

ImageFolder trees list images class by class. We write them in a seeded random order, so any run of
consecutive images (a store chunk, a precompute batch) mixes classes: the refinery's BatchNorm in
train mode needs randomly composed batches, and class-sorted batches ruin its labels.
"""
import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ..core.errors import ArgumentError, DataSetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BETON_ORDER_SEED = 0  # fixed so that one tree always converts to the same image order
META_SUFFIX = ".meta.json"
DIGESTS_SUFFIX = ".sha256.npy"  # each image's SHA-256, beside the .beton
KEYS_FIELD = "keys"  # the sidecar entry a keyed .beton lists its keys in, in sample order


@dataclass(frozen=True)
class BetonOptions:
    """How a data set is written to a .beton (part of the cache key; a store records it).

    ``max_resolution`` caps each image's longer side (FFCV's writer: INTER_AREA, sizes floored):
    the stored frame every crop box is drawn in. It bounds the loaders' decode scratch, which
    is decoding threads x the largest stored image (``docs/design.md``, bounded memory).
    ``jpeg``: ``passthrough`` stores a JPEG's own bytes wherever FFCV decodes them exactly as
    refinery reads the original (:mod:`.conversion`), so the original files and every
    byte-identical copy give exactly the labelled pixels; ``reencode`` decodes and re-encodes
    every image at ``jpeg_quality``, as every conversion did before the option existed.
    """

    max_resolution: int = 0  # 0 keeps the stored size; else the longer side is capped (INTER_AREA)
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # 'jpg' or 'raw' (FFCV's 'proportion' mode is unseeded: not offered)
    jpeg: str = "passthrough"  # JPEG sources: their own bytes, or 'reencode' (older conversions)

    def __post_init__(self):
        from .conversion import JPEG_MODES
        if self.jpeg not in JPEG_MODES:
            raise ArgumentError(f"jpeg={self.jpeg!r}: choose one of {', '.join(JPEG_MODES)}")

    @classmethod
    def from_record(cls, record) -> "BetonOptions":
        """The options a store's ``dataset.source.conversion`` or a sidecar's ``options``
        records. One without ``jpeg`` was written before the option existed: ``reencode``."""
        return cls(**{"jpeg": "reencode", **(record or {})})

    def recorded(self) -> dict:
        """What a store records of a conversion: the options that differ from the defaults,
        and ``jpeg`` always (records without it mean ``reencode``: :meth:`from_record`)."""
        default = BetonOptions()
        return {k: v for k, v in self.__dict__.items()
                if k == "jpeg" or getattr(default, k) != v}


def check_cap_applies(data, max_resolution: int = None):
    """``--max-resolution`` converts a data set; a ``.beton``'s sizes were fixed when it was
    written."""
    if max_resolution is not None and is_beton(data):
        raise DataSetError(f"--max-resolution {max_resolution}: {data} is a .beton, whose image "
                           "sizes were fixed when it was written; pass its ImageFolder tree, or "
                           "omit the option (`refine convert --max-resolution` writes capped "
                           ".beton files)")


def conversion_options(source=None, max_resolution: int = None) -> BetonOptions:
    """How to convert a data set for a label store: as recorded in its ``dataset.source``
    (``conversion``; absent, in stores from before passthrough: ``reencode`` with the other
    defaults), so the data converts to the very ``.beton`` the labels were made on;
    ``max_resolution`` (``--max-resolution``) must then agree with the record. Without a store
    (``source`` None), the defaults (passthrough) with ``max_resolution`` if given."""
    try:
        recorded = (BetonOptions() if source is None
                    else BetonOptions.from_record(source.get("conversion")))
    except (TypeError, ArgumentError):
        raise DataSetError(f"the store records an unknown conversion {source['conversion']}; "
                           "read it with the refinery version that wrote it") from None
    if max_resolution is None or max_resolution == recorded.max_resolution:
        return recorded
    if source is not None:
        raise DataSetError(f"--max-resolution {max_resolution}: the store's labels were made on "
                           f"images converted with --max-resolution {recorded.max_resolution}; "
                           "pass that value, or omit the option")
    return replace(recorded, max_resolution=int(max_resolution))


class ImageDataset:
    """A ``.beton`` with an image field ``image`` and an int field ``label``, plus sidecars.

    The sidecar ``<file>.meta.json`` holds the class names, the images' keys (a list, or the
    source files in stored order), the source's record, the conversion options and a cached
    fingerprint (re-hashed only when the .beton's size or mtime changes); ``<file>.sha256.npy``
    each image's SHA-256 (:meth:`image_digests`).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataSetError(f"{self.path}: no such .beton file; pass an ImageFolder tree or an "
                               "existing FFCV .beton")
        try:
            from ffcv.reader import Reader
            self.reader = Reader(str(self.path))
        except Exception as exc:  # FFCV raises AssertionError/ValueError on foreign files
            raise DataSetError(f"{self.path}: not a readable FFCV .beton ({exc}); rewrite it "
                               "with `refine convert` from the original images") from None
        names = self.reader.field_names
        if "image" not in names or "label" not in names:
            raise DataSetError(f"{self.path}: needs fields 'image' and 'label', found {names}")
        self.image_field = f"f{names.index('image')}"
        self.label_field = f"f{names.index('label')}"

    @property
    def num_images(self) -> int:
        return int(self.reader.num_samples)

    @property
    def heights(self) -> np.ndarray:
        return self.reader.metadata[self.image_field]["height"].astype(np.int64)

    @property
    def widths(self) -> np.ndarray:
        return self.reader.metadata[self.image_field]["width"].astype(np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Each image's class; ``-1`` throughout where the source had no labels."""
        return self.reader.metadata[self.label_field].astype(np.int64)

    @property
    def has_labels(self) -> bool:
        """Whether the source named each image's class (a flat folder of images does not)."""
        return bool(self.meta.get("labelled", True))

    @cached_property
    def meta(self) -> dict:
        sidecar = Path(str(self.path) + META_SUFFIX)
        return json.loads(sidecar.read_text()) if sidecar.is_file() else {}

    @property
    def classes(self) -> list:
        if self.meta.get("classes") is not None:  # written without names: null in the sidecar
            return list(self.meta["classes"])
        return [str(c) for c in range(int(self.labels.max()) + 1)]

    @property
    def options(self) -> BetonOptions:
        """How the ``.beton`` was written (a sidecar without options: FFCV's defaults as
        refinery used them, ``reencode``)."""
        return BetonOptions.from_record(self.meta.get("options"))

    @property
    def max_size(self) -> tuple:
        return int(self.heights.max()), int(self.widths.max())

    def keys(self):
        """Each image's key (:func:`.keys.normalize_key`) in sample order, or None for a
        ``.beton`` whose sidecar names no images: the listed keys, or the source files'
        paths relative to their split folder."""
        from .keys import normalize_keys
        meta = self.meta
        names = meta.get(KEYS_FIELD)
        if names is None and meta.get("files"):
            root = Path(meta.get("root") or _common_root(meta["files"], self.classes))
            names = [Path(f).relative_to(root).as_posix() for f in meta["files"]]
        try:
            return None if names is None else normalize_keys(names)
        except (ArgumentError, ValueError) as exc:
            raise DataSetError(f"{self.path}: its sidecar names an image unusably ({exc}); "
                               "convert the original images again") from None

    def fingerprint(self) -> dict:
        """Identity of the stored data: count, classes and a hash of every image's stored bytes."""
        stamp = self._stamp()
        cached = self.meta.get("fingerprint")
        if cached and self.meta.get("fingerprint_stamp") == stamp:
            return cached
        h = hashlib.sha256()
        for data in self._each_image_bytes():
            h.update(data)
        fp = {"num_images": self.num_images, "classes": self.classes,
              "image_bytes_sha256": h.hexdigest(), "labels_sha256": _sha(self.labels)}
        self._update_meta(fingerprint=fp, fingerprint_stamp=stamp)
        return fp

    def image_digests(self) -> np.ndarray:
        """``(N, 32)`` uint8: the SHA-256 of each image's stored bytes, in sample order (what a
        label store records as ``image_digests``). Made by the write (``<file>.sha256.npy``);
        for a ``.beton`` written otherwise, or changed since, computed once and kept there
        while the file's size and mtime stay the same."""
        stamp, path = self._stamp(), Path(str(self.path) + DIGESTS_SUFFIX)
        if self.meta.get("digests_stamp") == stamp and path.is_file():
            try:
                values = np.load(path, allow_pickle=False)
                if values.shape == (self.num_images, 32) and values.dtype == np.uint8:
                    return values
            except (OSError, ValueError):
                pass  # a damaged sidecar is computed again
        values = np.stack([np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
                           for data in self._each_image_bytes()])
        try:
            _atomic_save(path, values)
            self._update_meta(digests_stamp=stamp)
        except OSError:
            pass  # a read-only data set still works; the digests are just not cached
        return values

    def source(self):
        """What a label store records as ``dataset.source`` (None for a ``.beton`` written
        from arrays, which names no source): the source's record (kind, location, key rule,
        split...) and the conversion (``conversion``: :meth:`BetonOptions.recorded`); for
        image files, also the files' identity in store order (:func:`source_fingerprint`),
        which a reader checks without this ``.beton``."""
        record, files = self.meta.get("source"), self.meta.get("files")
        if record is None and not files:
            return None
        if files:
            root = self.meta.get("root") or _common_root(files, self.classes)
            record = {**source_fingerprint(root, files), **(record or {})}
        conversion = self.options.recorded()
        return {**record, "conversion": conversion} if conversion else record

    def image_byte_spans(self) -> tuple:
        """``(offsets, lengths)``, int64 ``(N,)``: where each image's encoded bytes lie in the
        file, in sample order (the allocation table's ``size`` of each image's ``data_ptr``)."""
        table = self.reader.alloc_table
        order = np.argsort(table["ptr"])
        offsets = self.reader.metadata[self.image_field]["data_ptr"].astype(np.int64)
        where = np.searchsorted(table["ptr"][order], offsets)
        return offsets, table["size"][order][where].astype(np.int64)

    def _each_image_bytes(self):
        """Each image's stored bytes in sample order (independent of page layout)."""
        blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        for start, length in zip(*(a.tolist() for a in self.image_byte_spans())):
            yield blob[start:start + length]

    def _stamp(self) -> list:
        stat = self.path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _update_meta(self, **entries):
        meta = {**self.meta, **entries}
        sidecar = Path(str(self.path) + META_SUFFIX)
        try:
            _atomic_write_text(sidecar, json.dumps(meta, indent=1))
            self.__dict__["meta"] = meta
        except OSError:
            pass  # a read-only data set still works; the fingerprint is just not cached


SOURCE_ORDER_RULE = "numpy.random.default_rng(seed).permutation(num_files) of the sorted scan"


def source_fingerprint(root, files) -> dict:
    """Identity of an ImageFolder tree's files in store order: the SHA-256 over each file's path
    relative to the split root (POSIX, one per line), plus how that order follows from the tree.

    It names the files and their order, not their contents; the content's identity is the
    ``.beton``'s image hash."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).relative_to(root).as_posix().encode() + b"\n")
    return {"kind": "image_folder", "num_files": len(files), "files_sha256": h.hexdigest(),
            "order": SOURCE_ORDER_RULE, "order_seed": BETON_ORDER_SEED}


def store_order(num_files: int) -> np.ndarray:
    """The order :func:`write_beton` writes a scanned tree in: position n holds scan index
    ``store_order(N)[n]``."""
    return np.random.default_rng(BETON_ORDER_SEED).permutation(num_files)


def _common_root(files, classes) -> str:
    """The split root of files listed before sidecars recorded it: the common folder of files
    from two or more classes, else the folder above the single class."""
    common = Path(os.path.commonpath([str(f) for f in files]))
    if len(classes) > 1:
        return str(common)
    return str(next(p for p in [common, *common.parents] if p.name == classes[0]).parent)


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(path: Path, values: np.ndarray):
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, values)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- writing .beton files


def is_beton(data) -> bool:
    """Whether ``data`` names a ``.beton`` file, used as it is, rather than images to convert."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    path = Path(data)
    if path.suffix.lower() == ".beton":
        return True
    if not path.is_file():
        return False
    from . import source_kind
    try:
        return source_kind(str(path)) == "beton"
    except DataSetError:
        return True  # a file of no kind the sources read: FFCV's reader says what it is
