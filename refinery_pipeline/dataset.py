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
import shutil
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import DataSetError, storage_error_message

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BETON_ORDER_SEED = 0  # fixed so that one tree always converts to the same image order
META_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class BetonOptions:
    """How an ImageFolder tree is written to a .beton (part of the cache key).

    ``max_resolution`` caps each image's longer side (FFCV's writer: INTER_AREA, sizes floored):
    the stored frame every crop box is drawn in. It bounds the loaders' decode scratch, which
    is decoding threads x the largest stored image (``docs/design.md``, bounded memory).
    """

    max_resolution: int = 0  # 0 keeps the stored size; else the longer side is capped (INTER_AREA)
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # 'jpg' or 'raw' (FFCV's 'proportion' mode is unseeded: not offered)

    def recorded(self) -> dict:
        """The options that differ from the defaults (what a store records of a conversion)."""
        default = BetonOptions()
        return {k: v for k, v in self.__dict__.items() if getattr(default, k) != v}


def check_cap_applies(data, max_resolution: int = None):
    """``--max-resolution`` converts a tree; a ``.beton``'s sizes were fixed when it was written."""
    if max_resolution is not None and not Path(data).is_dir():
        raise DataSetError(f"--max-resolution {max_resolution}: {data} is a .beton, whose image "
                           "sizes were fixed when it was written; pass its ImageFolder tree, or "
                           "omit the option (`refine convert --max-resolution` writes capped "
                           ".beton files)")


def conversion_options(source=None, max_resolution: int = None) -> BetonOptions:
    """How to convert a tree for a label store: as recorded in its ``dataset.source``
    (``conversion``; absent: the defaults), so the tree converts to the very ``.beton`` the labels
    were made on; ``max_resolution`` (``--max-resolution``) must then agree with the record.
    Without a store (``source`` None), the defaults with ``max_resolution`` if given."""
    try:
        recorded = BetonOptions(**((source or {}).get("conversion") or {}))
    except TypeError:
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
    """A ``.beton`` with an image field ``image`` and an int field ``label``, plus a JSON sidecar.

    The sidecar ``<file>.meta.json`` holds the class names, the source files in stored order, and a
    cached fingerprint (re-hashed only when the .beton's size or mtime changes).
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
                               "with `refine precompute` from the ImageFolder tree") from None
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
        return self.reader.metadata[self.label_field].astype(np.int64)

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
    def max_size(self) -> tuple:
        return int(self.heights.max()), int(self.widths.max())

    def fingerprint(self) -> dict:
        """Identity of the stored data: count, classes and a hash of every image's stored bytes."""
        stat = self.path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = self.meta.get("fingerprint")
        if cached and self.meta.get("fingerprint_stamp") == stamp:
            return cached
        fp = {"num_images": self.num_images, "classes": self.classes,
              "image_bytes_sha256": self._hash_image_bytes(), "labels_sha256": _sha(self.labels)}
        self._update_meta(fingerprint=fp, fingerprint_stamp=stamp)
        return fp

    def source(self):
        """The ImageFolder tree this ``.beton`` was converted from, as a label store records it
        (None for a ``.beton`` written otherwise): a reader of the original files checks it with
        :func:`source_fingerprint` over the files in store order, without this ``.beton``."""
        files = self.meta.get("files")
        if not files:
            return None
        root = self.meta.get("root") or _common_root(files, self.classes)
        record = source_fingerprint(root, files)
        conversion = BetonOptions(**self.meta.get("options", {})).recorded()
        return {**record, "conversion": conversion} if conversion else record

    def image_byte_spans(self) -> tuple:
        """``(offsets, lengths)``, int64 ``(N,)``: where each image's encoded bytes lie in the
        file, in sample order (the allocation table's ``size`` of each image's ``data_ptr``)."""
        table = self.reader.alloc_table
        order = np.argsort(table["ptr"])
        offsets = self.reader.metadata[self.image_field]["data_ptr"].astype(np.int64)
        where = np.searchsorted(table["ptr"][order], offsets)
        return offsets, table["size"][order][where].astype(np.int64)

    def _hash_image_bytes(self) -> str:
        """SHA-256 over each image's encoded bytes in sample order (independent of page layout)."""
        blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        h = hashlib.sha256()
        for start, length in zip(*(a.tolist() for a in self.image_byte_spans())):
            h.update(blob[start:start + length])
        return h.hexdigest()

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


# --------------------------------------------------------------------------- writing .beton files

class ArraySource:
    """An indexable ``(HWC uint8 image, label)`` source for :func:`write_beton`."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def largest_image(self) -> int:
        """Index of the image with the most pixels."""
        return int(np.argmax([np.shape(image)[0] * np.shape(image)[1] for image in self.images]))

    def __getitem__(self, i):
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


class FileSource:
    """Reads image files as ``(H, W, 3)`` uint8 RGB by :func:`.pixels.open_image_file`'s rule
    (every PIL mode: 16-bit, palette, CMYK, alpha, grayscale; the first frame).

    FFCV's writer waits forever if a worker process raises, so a file that cannot be decoded is
    recorded in ``error_log`` and replaced by a 1x1 placeholder; :func:`write_beton` then fails
    with a message naming the file, and the partial ``.beton`` is discarded.
    """

    def __init__(self, files, labels):
        self.files, self.labels = files, labels
        self.error_log = None

    def __len__(self):
        return len(self.files)

    def largest_image(self) -> int:
        """Index of the file with the most pixels, from the headers alone (files PIL cannot
        read count as empty: the conversion names them)."""
        from .pixels import image_file_size
        return int(np.argmax([np.prod(image_file_size(f) or (0, 0)) for f in self.files]))

    def __getitem__(self, i):
        from .pixels import open_image_file
        try:
            return open_image_file(self.files[i]), int(self.labels[i])
        except Exception as exc:
            message = _unreadable_message(self.files[i], exc)
            if self.error_log is None:
                raise DataSetError(message) from None
            with open(self.error_log, "a") as log:
                log.write(message.replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), int(self.labels[i])


def _unreadable_message(path, exc: Exception) -> str:
    """Ours (a :class:`DataSetError` names the file and the fix), or PIL's reason in one line."""
    if isinstance(exc, DataSetError):
        return str(exc)
    return (f"{path}: cannot be read as an image ({str(exc).splitlines()[0]}); delete or "
            "replace the file")


def _raise_logged_errors(error_log: Path):
    if not error_log.is_file():
        return
    lines = error_log.read_text().splitlines()
    error_log.unlink()
    if lines:
        more = f" (and {len(lines) - 1} more files)" if len(lines) > 1 else ""
        raise DataSetError(lines[0] + more)


class _Reordered:
    """``source`` in ``order``; once a write has failed (``failure_log`` exists) every image is
    a 1x1 placeholder, so the writer processes run out quickly instead of decoding the rest."""

    def __init__(self, source, order, failure_log=None):
        self.source, self.order, self.failure_log = source, order, failure_log

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if self.failure_log is not None and os.path.exists(self.failure_log):
            return np.zeros((1, 1, 3), np.uint8), 0
        return self.source[int(self.order[i])]


FFCV_PAGE_SIZE = 8 << 20  # DatasetWriter's default page


def page_size_for(largest_sample: int, exact: bool = False) -> int:
    """A ``.beton`` page for the sample of the image with the most pixels, ``largest_sample``
    bytes (``exact``: raw pixels, so no other sample is larger).

    FFCV writes every sample within one page (8 MiB by default): a larger one made its writer
    process raise and FFCV's main process wait forever (a 12,000 x 9,000 photo re-encodes to
    ~20 MB). Every page is written whole, so pages are not made larger than needed: the sample
    (twice it for JPEG, whose size also follows the content: one that still does not fit fails
    the write in one line) plus 1 MiB, a power of two as FFCV requires, never below FFCV's
    default.
    """
    need = (1 if exact else 2) * largest_sample + (1 << 20)
    return max(FFCV_PAGE_SIZE, 1 << (need - 1).bit_length())


def encoded_bytes(image_field, image) -> int:
    """Bytes the writer stores for ``image`` (resized, re-encoded as ``image_field`` does)."""
    sizes = []

    def measure(nbytes):  # FFCV's allocator interface: (file offset, buffer to fill)
        sizes.append(nbytes)
        return 0, np.empty(nbytes, np.uint8)

    image_field.encode(np.zeros(1, image_field.metadata_type)[0], image, measure)
    return sum(sizes)


def largest_sample_bytes(source, image_field) -> int:
    """The stored bytes of ``source``'s image with the most pixels (0 if it cannot be read:
    the write names it)."""
    if not hasattr(source, "largest_image"):
        return 0
    try:
        return encoded_bytes(image_field, source[source.largest_image()][0])
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the write
        return 0


SIZE_SAMPLE = 16  # images encoded to estimate a .beton's size before writing it
FREE_SPACE_FIX = "free space there or choose another folder (--cache-dir for a converted tree)"


def estimated_beton_bytes(source, image_field, num_workers: int, page_size: int) -> int:
    """Bytes a .beton of ``source`` will take: a few evenly spaced images encoded exactly as
    the writer will (resized, re-encoded), scaled to the whole set, plus each writer
    process's last, partly filled page. Images that cannot be read are skipped here (the
    write names them)."""
    picks = np.unique(np.linspace(0, len(source) - 1, min(SIZE_SAMPLE, len(source))).astype(int))
    sizes = []
    for i in picks:
        try:
            sizes.append(encoded_bytes(image_field, source[int(i)][0]))
        except Exception:  # noqa: BLE001 - an unreadable image is reported by the write
            continue
    per_image = np.mean(sizes) if sizes else 0
    return int(per_image * len(source)) + num_workers * page_size


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
                files=None, num_workers: int = 2, shuffle: bool = True, root=None):
    """Write ``source`` to ``path`` (atomically) in a seeded random order; returns the order used.

    ``files`` and their split ``root`` go into the sidecar, so the store can name its source.
    A disk too full for the estimated size is refused before writing, and a write that fails
    anyway (the disk filled up meanwhile) ends in a :class:`DataSetError`, never a hang; either
    way no partial file is left."""
    from unittest import mock

    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if len(source) == 0:
        raise DataSetError(f"{path}: the data set has no images")
    order = store_order(len(source)) if shuffle else np.arange(len(source))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataSetError(storage_error_message(exc, path.parent)) from None
    tmp = path.with_name(path.name + f".{os.getpid()}.partial")
    image_field = RGBImageField(write_mode=options.write_mode, jpeg_quality=options.jpeg_quality,
                                max_resolution=options.max_resolution or None)
    writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()},
                           num_workers=max(1, num_workers),
                           page_size=page_size_for(largest_sample_bytes(source, image_field),
                                                   exact=options.write_mode == "raw"))
    _check_free_space(path.parent, estimated_beton_bytes(source, image_field, writer.num_workers,
                                                         writer.page_size))
    error_log = tmp.with_name(tmp.name + ".errors")
    failure_log = tmp.with_name(tmp.name + ".write-failed")
    if hasattr(source, "error_log"):
        source.error_log = str(error_log)
    try:
        with mock.patch.object(ffcv.writer, "MemoryAllocator",
                               _guarded_allocator(str(failure_log))):
            writer.from_indexed_dataset(_Reordered(source, order, failure_log))
        _raise_write_failure(failure_log, path)
        _raise_logged_errors(error_log)
        meta = {"classes": list(classes) if classes is not None else None,
                "files": [str(files[i]) for i in order] if files is not None else None,
                "root": str(root) if root is not None else None, "options": options.__dict__}
        _atomic_write_text(Path(str(path) + META_SUFFIX), json.dumps(meta, indent=1))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failure_log.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the header, tables or sidecar, written by this process
            raise DataSetError(storage_error_message(exc, path.parent)) from None
        raise
    return order


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


def _tree_key(root: Path, files, options: BetonOptions) -> str:
    h = hashlib.sha256(json.dumps([str(root.resolve()), options.__dict__]).encode())
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


def open_dataset(data, split: str = "train", cache_dir=None,
                 options: BetonOptions = BetonOptions(), num_workers: int = 2) -> ImageDataset:
    """Open ``data`` as an :class:`ImageDataset`, converting an ImageFolder tree once if needed.

    ``data`` is a ``.beton`` file, or an ImageFolder tree (``DATA/<split>/<class>/*`` or
    ``DATA/<class>/*``). Converted files are cached under ``cache_dir`` keyed by the tree's file
    list, sizes, mtimes and ``options``, so precompute and train share one file.
    """
    data = Path(data)
    if data.suffix == ".beton" or data.is_file():
        return ImageDataset(data)
    root = split_dir(data, split)
    classes, files, labels = scan_image_folder(root)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    beton = cache / f"{root.parent.name}-{root.name}-{_tree_key(root, files, options)}.beton"
    if not beton.is_file():
        write_beton(FileSource(files, labels), beton, options, classes=classes, files=files,
                    num_workers=num_workers, root=root)
    return ImageDataset(beton)


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


def convert_tree(data, out_dir, options: BetonOptions = BetonOptions(),
                 num_workers: int = 2) -> list:
    """Write ``DATA/train`` and ``DATA/val`` (or a bare class tree, as train) to
    ``out_dir/<name>_<split>.beton``, the pair ``refine train`` takes, with their class names.

    The explicit form of what :func:`open_dataset` caches, for the options a large data set
    wants (FFCV's ImageNet recipe caps the longer side at 256 to 512 px). Existing files are never
    overwritten: label stores are fingerprinted against them.
    """
    data, out_dir = Path(data), Path(out_dir)
    splits = [s for s in SPLITS if (data / s).is_dir()] or ["train"]
    targets = {s: out_dir / f"{data.resolve().name}_{s}.beton" for s in splits}
    for path in targets.values():
        if path.exists():
            raise DataSetError(f"{path}: already exists (label stores may be fingerprinted "
                               "against it); remove it or choose another output folder")
    scanned = {s: scan_image_folder(split_dir(data, s)) for s in splits}  # all errors first
    if len({tuple(c) for c, _, _ in scanned.values()}) > 1:
        raise DataSetError(f"{data}: train and val hold different class folders; give both "
                           "splits the same classes")
    for split, (classes, files, labels) in scanned.items():
        write_beton(FileSource(files, labels), targets[split], options, classes=classes,
                    files=files, num_workers=num_workers, root=split_dir(data, split))
    return list(targets.values())
