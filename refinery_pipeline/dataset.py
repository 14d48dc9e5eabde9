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
import re
import shutil
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ArgumentError, DataSetError, storage_error_message

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

class ArraySource:
    """An indexable ``(HWC uint8 image, label)`` source for :func:`write_beton`."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def largest_image(self) -> int:
        """Index of the image with the most pixels (it sizes the ``.beton``'s pages)."""
        return int(np.argmax([np.shape(image)[0] * np.shape(image)[1] for image in self.images]))

    def __getitem__(self, i):
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


def _raise_logged_errors(error_log: Path):
    if not error_log.is_file():
        return
    lines = error_log.read_text().splitlines()
    error_log.unlink()
    if lines:
        more = f" (and {len(lines) - 1} more files)" if len(lines) > 1 else ""
        raise DataSetError(lines[0] + more)


FFCV_PAGE_SIZE = 8 << 20  # DatasetWriter's default page


def page_size_for(largest_sample: int, exact: bool = False, largest_bytes: int = 0) -> int:
    """A ``.beton`` page for the sample of the image with the most pixels, ``largest_sample``
    bytes as stored (``exact``: raw pixels or bytes passed through, so no other sample of that
    many pixels is larger), and for the largest encoded item, ``largest_bytes`` (a JPEG passed
    through keeps its size, metadata and all).

    FFCV writes every sample within one page (8 MiB by default): a larger one made its writer
    process raise and FFCV's main process wait forever (a 12,000 x 9,000 photo re-encodes to
    ~20 MB). Every page is written whole, so pages are not made larger than needed: the sample
    (twice it when re-encoded, as a JPEG's size also follows the content: one that still does
    not fit fails the write in one line naming it) or the largest item, plus 1 MiB, a power of
    two as FFCV requires, never below FFCV's default.
    """
    need = max((1 if exact else 2) * largest_sample, largest_bytes) + (1 << 20)
    return max(FFCV_PAGE_SIZE, 1 << (need - 1).bit_length())


def page_size_of(samples, options) -> int:
    """The page for ``samples`` (:class:`.conversion.BetonSamples`): its image with the most
    pixels stored exactly as the writer will store it (passed through, or resized and
    re-encoded), and its largest encoded item, where the source knows them without reading
    every image (:func:`.conversion.largest_items`)."""
    from .conversion import largest_items
    largest, largest_bytes = largest_items(samples.source)
    if largest is None:
        return page_size_for(0, largest_bytes=largest_bytes)
    try:
        sample = samples.prepare(largest)
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the write
        return page_size_for(0, largest_bytes=largest_bytes)
    exact = options.write_mode == "raw" or sample.unchanged
    return page_size_for(len(sample.data), exact, largest_bytes)


SIZE_SAMPLE = 16  # images encoded to estimate a .beton's size before writing it
FREE_SPACE_FIX = "free space there or choose another folder (--cache-dir for a converted tree)"


def estimated_beton_bytes(samples, num_workers: int, page_size: int) -> int:
    """Bytes a .beton of ``samples`` (:class:`.conversion.BetonSamples`) will take: a few
    evenly spaced images stored exactly as the writer will (passed through, or resized and
    re-encoded), scaled to the whole set, plus each writer process's last, partly filled page.
    Images that cannot be read are skipped here (the write names them)."""
    picks = np.unique(np.linspace(0, len(samples) - 1, min(SIZE_SAMPLE, len(samples))).astype(int))
    sizes = []
    for n in picks:
        try:
            sizes.append(len(samples.prepare(int(n)).data))
        except Exception:  # noqa: BLE001 - an unreadable image is reported by the write
            continue
    per_image = np.mean(sizes) if sizes else 0
    return int(per_image * len(samples)) + num_workers * page_size


def _check_free_space(folder: Path, needed: int):
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataSetError(f"{folder}: not enough free space to write the .beton (needs about "
                           f"{needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB free); {FREE_SPACE_FIX}")


def _guarded_allocator(failure_log: str):
    """FFCV's ``MemoryAllocator`` with a guarded page write and a guarded allocation.

    It wraps FFCV's page writer so a failing write (a full disk) cannot hang the conversion,
    nor a sample larger than a page (see :func:`page_size_for`).

    FFCV's writer processes write pages in turn and its main process waits for every sample;
    a process that dies on ``ENOSPC`` leaves the others waiting for its turn and the main
    process waiting forever. Here the failure is logged, the turn passed on, and every later
    page skipped, so all processes finish quickly and :func:`write_beton` reports the log.
    """
    from ffcv.memory_allocator import MemoryAllocator

    class GuardedAllocator(MemoryAllocator):
        def malloc(self, size):
            if size <= self.page_size:
                return super().malloc(size)
            with open(failure_log, "a") as log:  # FFCV would raise here, and hang
                log.write(f"{OVERSIZE}\tan image encodes to {size:,} bytes, more than the "
                          f".beton's {self.page_size:,}-byte page\n")
            return 0, np.empty(size, np.uint8)  # discarded: the write fails

        def flush_page(self):
            if self.my_page < 0:
                return
            try:
                if not os.path.exists(failure_log):
                    return super().flush_page()
            except OSError as exc:
                with open(failure_log, "a") as log:
                    log.write(f"{exc.errno}\t{exc.strerror or exc}\n")
            while self.next_page_written.value != self.my_page:  # our turn, then pass it on
                time.sleep(0.001)
            with self.next_page_written.get_lock():
                self.next_page_written.value += 1
    return GuardedAllocator


OVERSIZE = "oversize"  # the failure log's code for a sample larger than a page


def _raise_write_failure(failure_log: Path, path: Path):
    if not failure_log.is_file():
        return
    code, reason = failure_log.read_text().splitlines()[0].split("\t", 1)
    failure_log.unlink()
    fix = ("convert with a smaller --max-resolution" if code == OVERSIZE else FREE_SPACE_FIX)
    raise DataSetError(f"{path.parent}: writing {path.name} failed ({reason}); {fix}")


def write_beton(source, path, options: BetonOptions = BetonOptions(), classes=None,
                num_workers: int = 2, shuffle: bool = True):
    """Write ``source`` to ``path`` (atomically) in a seeded random order; returns the order used.

    ``source`` is an :class:`.sources.ImageSource` (any form :func:`.sources.open_source`
    opens: a tree, a flat folder, a list of paths, WebDataset shards, a Hugging Face table, a
    mapped data set) or an indexable of ``(image, label)`` pairs (:class:`ArraySource`). Each
    JPEG is stored as its own bytes or re-encoded, as ``options.jpeg`` says (:mod:`.conversion`).
    The sidecar records the class names (``classes``, else the source's), the images' keys
    (for files: the files and their root), the source's record, the options and how many
    images passed through; ``<path>.sha256.npy`` each image's SHA-256. Position ``n`` of the
    file holds source item ``order[n]``: the order mixes classes, so every run of consecutive
    images (a store chunk, a labelling batch) does (train-mode BatchNorm needs mixed batches).

    A disk too full for the estimated size is refused before writing, and a write that fails
    anyway (the disk filled up meanwhile) ends in a :class:`DataSetError`, never a hang; either
    way no partial file is left."""
    from unittest import mock

    import ffcv.writer
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    from .conversion import DIGEST_BYTES, BetonSamples, image_field

    if len(source) == 0:
        raise DataSetError(f"{path}: the data set has no images")
    order = store_order(len(source)) if shuffle else np.arange(len(source))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataSetError(storage_error_message(exc, path.parent)) from None
    tmp = path.with_name(path.name + f".{os.getpid()}.partial")
    logs = {name: tmp.with_name(f"{tmp.name}.{name}") for name in ("errors", "write-failed",
                                                                    "scratch.npy")}
    samples = BetonSamples(source, order, options, page_size=None,
                           failure_log=str(logs["write-failed"]))
    writer = DatasetWriter(str(tmp), {"image": image_field(), "label": IntField()},
                           num_workers=max(1, num_workers),
                           page_size=page_size_of(samples, options))
    samples.page_size = writer.page_size
    _check_free_space(path.parent, estimated_beton_bytes(samples, writer.num_workers,
                                                         writer.page_size))
    samples.error_log, samples.scratch = str(logs["errors"]), str(logs["scratch.npy"])
    try:
        np.lib.format.open_memmap(logs["scratch.npy"], "w+", np.uint8,
                                  (len(order), DIGEST_BYTES + 1)).flush()  # rows: BetonSamples
        with mock.patch.object(ffcv.writer, "MemoryAllocator",
                               _guarded_allocator(str(logs["write-failed"]))):
            writer.from_indexed_dataset(samples)
        _raise_write_failure(logs["write-failed"], path)
        _raise_logged_errors(logs["errors"])
        scratch = np.load(logs["scratch.npy"])
        stamp = [tmp.stat().st_size, tmp.stat().st_mtime_ns]  # kept by the rename below
        _atomic_save(Path(str(path) + DIGESTS_SUFFIX), np.ascontiguousarray(scratch[:, :-1]))
        meta = {**_described_source(source, order, classes), "options": options.__dict__,
                "passed_through": int(scratch[:, -1].sum()), "digests_stamp": stamp}
        _atomic_write_text(Path(str(path) + META_SUFFIX), json.dumps(meta, indent=1))
        os.replace(tmp, path)
    except BaseException as exc:
        for leftover in (tmp, logs["write-failed"], logs["errors"]):
            leftover.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the header, tables or sidecar, written by this process
            raise DataSetError(storage_error_message(exc, path.parent)) from None
        raise
    finally:
        logs["scratch.npy"].unlink(missing_ok=True)
    return order


def _described_source(source, order, classes) -> dict:
    """The sidecar's account of ``source`` in stored order: class names, whether it has
    labels, its record, and its images' names (files and their root, or keys)."""
    from .conversion import is_image_source
    if not is_image_source(source):
        return {"classes": list(classes) if classes is not None else None, "labelled": True}
    names = classes if classes is not None else source.classes
    described = {"classes": list(names) if names is not None else None,
                 "labelled": source.labels() is not None, "source": source.record()}
    files = getattr(source, "files", None)
    if files is not None:  # keys are their paths relative to the root (sources.files)
        return {**described, "files": [str(files[i]) for i in order], "root": str(source.root)}
    keys = source.keys()
    return {**described, KEYS_FIELD: [keys[i] for i in order]}


def scan_image_folder(root) -> tuple:
    """``(classes, files, labels)`` of a torchvision-style ImageFolder tree, with clear errors."""
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"{root}: not a directory; pass an ImageFolder tree (one folder per "
                           "class) or a .beton file")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSetError(f"{root}: no class folders; expected {root}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DataSetError(f"{root / name}: class folder holds no images; add images or "
                               "remove the folder")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _tree_key(root: Path, files, settings: dict) -> str:
    h = hashlib.sha256(json.dumps([str(root.resolve()), settings]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery"))


def split_dir(data, split: str) -> Path:
    """``DATA/<split>`` when it exists (torchvision reference layout), else ``DATA`` itself."""
    data = Path(data)
    return data / split if (data / split).is_dir() else data


def is_beton(data) -> bool:
    """Whether ``data`` names a ``.beton`` file, used as it is, rather than images to convert."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    path = Path(data)
    if path.suffix.lower() == ".beton":
        return True
    if not path.is_file():
        return False
    from .sources import source_kind
    try:
        return source_kind(str(path)) == "beton"
    except DataSetError:
        return True  # a file of no kind the sources read: FFCV's reader says what it is


SPLIT_KINDS = ("image_folder", "hf_dataset")  # the sources whose data holds splits
CACHING_KINDS = ("webdataset", "hf_dataset")  # keep a shard index or a table cache


def open_data_source(data, split: str = "train", cache_dir=None, **options):
    """``data`` as an :class:`.sources.ImageSource` (:func:`.sources.open_source`): its split
    ``split`` where the kind has splits (a tree's ``train/``, a ``DatasetDict``'s split), its
    shard index or table cache under ``cache_dir`` where the kind keeps one."""
    from .sources import ImageSource, open_source, source_kind
    if isinstance(data, ImageSource):
        return open_source(data, **options)
    kind = options.pop("kind", None) or source_kind(data)
    if kind in SPLIT_KINDS:
        options = {"split": split, **options}
    if kind in CACHING_KINDS and cache_dir is not None:
        options = {"cache_dir": cache_dir, **options}
    return open_source(data, kind, **options)


def require_labels(source):
    """Refuse a source without labels in one line: a label store records each image's class
    as its ground truth (and ground-truth training needs it)."""
    if source.labels() is None:
        raise DataSetError(f"{source.location}: names no class for its images (a "
                           f"{source.kind} source without labels), and a label store records "
                           "each image's class; pass the data with its classes: class folders, "
                           "a CSV with a label column (label_column / --label-column), shards "
                           "with cls members, or a table with a label column")


def open_dataset(data, split: str = "train", cache_dir=None,
                 options: BetonOptions = BetonOptions(), num_workers: int = 2, *,
                 labels_required: bool = True, **source_options) -> ImageDataset:
    """Open ``data`` as an :class:`ImageDataset`, converting it once (cached) unless it is a
    ``.beton``.

    Parameters
    ----------
    data : str, os.PathLike or object
        A ``.beton``, or anything :func:`.sources.open_source` opens: an ImageFolder tree
        (``DATA/<split>/<class>/*`` or ``DATA/<class>/*``), a flat folder, a list of paths,
        WebDataset shards (local, brace patterns, URLs), a Hugging Face table, a mapped data
        set (with ``key_fn=``), or an :class:`.sources.ImageSource`.
    split : str
        The split of a tree or a ``DatasetDict``.
    cache_dir : str or os.PathLike, optional
        Where converted files are kept (default: ``$REFINERY_CACHE``, else
        ``~/.cache/refinery``), named by the source's identity (files' sizes and mtimes,
        shards' stamps, a table's fingerprint) and ``options``, so precompute and train share
        one file. A mapped data set cannot tell whether it changed: it is converted each time.
    options : BetonOptions
        How images are written (passthrough or re-encoded JPEGs, a capped resolution).
    num_workers : int
        Processes converting the images.
    labels_required : bool
        Refuse, before converting, a source without labels (a flat folder); False converts it
        with label ``-1`` throughout, for readers that take labels from a store.
    **source_options
        The options of the source's kind (``key_column=``, ``label_column=``, ...).

    Raises
    ------
    DataSetError
        The data cannot be opened or converted (the message names it and the fix).
    """
    if is_beton(data):
        if source_options:
            raise ArgumentError(f"{', '.join(source_options)}: {data} is a .beton, which takes "
                                "no source options; leave them out")
        return ImageDataset(data)
    source = open_data_source(data, split, cache_dir, **source_options)
    if labels_required:
        require_labels(source)
    return ImageDataset(converted(source, cache_dir, options, num_workers))


def converted(source, cache_dir=None, options: BetonOptions = BetonOptions(),
              num_workers: int = 2) -> Path:
    """The cached ``.beton`` of ``source`` under ``options``, written first if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{_cache_name(source, options)}.beton"
    if source.stamp() is None or not path.is_file():
        write_beton(source, path, options, num_workers=num_workers)
    return path


def _cache_name(source, options: BetonOptions) -> str:
    """``<name>-<key>``: a tree converted with ``reencode`` keeps the name it had before other
    sources and passthrough existed (so old stores find their ``.beton``); any other source
    and conversion is keyed by everything that makes its file."""
    if source.kind == "image_folder" and options.jpeg == "reencode":
        root = source.root
        legacy = {k: v for k, v in options.__dict__.items() if k != "jpeg"}
        return f"{root.parent.name}-{root.name}-{_tree_key(root, source.files, legacy)}"
    identity = {"record": source.record(), "options": options.__dict__,
                "stamp": source.stamp(), "classes": source.classes,
                "keys": hashlib.sha256("\n".join(source.keys()).encode()).hexdigest(),
                "labels": None if source.labels() is None else _sha(source.labels())}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{data_name(source)}-{key[:16]}"


def data_name(source) -> str:
    """A short file-name form of where ``source`` came from: ``data-train`` for a tree's split,
    the shards' or table's stem otherwise."""
    location = Path(source.location.split("{")[0].rstrip("/-_."))
    name = (f"{location.parent.name}-{location.name}" if source.kind == "image_folder"
            else location.stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:48] or source.kind


def find_cached_beton(fingerprint: dict, cache_dir=None):
    """The ``.beton`` in the cache whose recorded fingerprint (its sidecar's, still current) is
    ``fingerprint``'s images and labels, or None: where a store's exact pixels are, found
    without the tree (``refine inspect``). Only sidecars are read, never a ``.beton``'s bytes."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    keys = ("image_bytes_sha256", "labels_sha256")
    for sidecar in sorted(cache.glob(f"*.beton{META_SUFFIX}")):
        beton = sidecar.with_name(sidecar.name[:-len(META_SUFFIX)])
        try:
            meta, stat = json.loads(sidecar.read_text()), beton.stat()
        except (OSError, ValueError):
            continue
        recorded = meta.get("fingerprint") or {}
        current = meta.get("fingerprint_stamp") == [stat.st_size, stat.st_mtime_ns]
        if current and all(recorded.get(k) == fingerprint.get(k) for k in keys):
            return beton
    return None


SPLITS = ("train", "val")


def convert_data(data, out_dir, options: BetonOptions = BetonOptions(), num_workers: int = 2,
                 split: str = None, **source_options) -> list:
    """Write ``data`` to ``.beton`` files in ``out_dir``; returns their paths.

    An ImageFolder tree gives ``<name>_train.beton`` and ``<name>_val.beton`` (from
    ``DATA/train`` and ``DATA/val``; a bare class tree as train; only ``split`` if given), the
    pair ``refine train`` takes; any other data set (:func:`open_data_source`: shards, tables,
    lists, flat folders) gives ``<name>.beton``, keyed by its images' names. The explicit form
    of what :func:`open_dataset` caches, for the options a large data set wants (FFCV's
    ImageNet recipe caps the longer side at 256 to 512 px) and for a file to share. Existing
    files are never overwritten: label stores are fingerprinted against them.
    """
    from .sources import source_kind
    out_dir = Path(out_dir)
    if is_beton(data):
        raise DataSetError(f"{data}: already a .beton; pass the images it was made from")
    if source_kind(data) == "image_folder" and isinstance(data, (str, os.PathLike)):
        splits = [split] if split else [s for s in SPLITS if (Path(data) / s).is_dir()] or ["train"]
        sources = {s: open_data_source(data, s, **source_options) for s in splits}  # errors first
        if len({tuple(source.classes) for source in sources.values()}) > 1:
            raise DataSetError(f"{data}: train and val hold different class folders; give both "
                               "splits the same classes")
        name = Path(data).resolve().name
        targets = {out_dir / f"{name}_{s}.beton": source for s, source in sources.items()}
    else:
        source = open_data_source(data, split or "train", **source_options)
        targets = {out_dir / f"{data_name(source)}.beton": source}
    for path in targets:
        if path.exists():
            raise DataSetError(f"{path}: already exists (label stores may be fingerprinted "
                               "against it); remove it or choose another output folder")
    for path, source in targets.items():
        write_beton(source, path, options, num_workers=num_workers)
    return list(targets)
