"""Writing a .beton: from any source, in a seeded order that mixes classes, atomically, with pages sized for the largest sample and a disk checked for room first; a failed write ends in one line, never a hang."""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..core.errors import DataSetError, storage_error_message
from .dataset import (DIGESTS_SUFFIX, KEYS_FIELD, META_SUFFIX, BetonOptions, _atomic_save,
                      _atomic_write_text, store_order)


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
