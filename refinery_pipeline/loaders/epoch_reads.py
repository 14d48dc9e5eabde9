"""What an epoch replays, read for that epoch alone: one stored slot per image, of the images
this process replays.

An epoch replays one slot of each image (:func:`.crop_plan.epoch_slots`), and a rank of a
distributed run only its share of the images, so neither needs the store's whole crop table
(every slot of every image: 2.5 GB decoded at ImageNet-1k, K = 40, top-10; ~28 GB at
ImageNet-21k). For each epoch a process reads the chunks holding its rows, a span of chunks at
a time, checks each against its checksums as every read does, and keeps only the crops it
replays: host memory for crops and labels grows with the rows replayed, not with K.

Chunks hold all K slots of C images and are decoded whole, so a process whose rows are spread
over the store (a shuffled shard) still decodes every chunk: the read costs time in proportion
to the store, memory in proportion to the rows. :class:`EpochReader` therefore reads the next
epoch in a background thread while the current one trains.

No torch at import, no FFCV.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..core.errors import RefineryError

CUT_ARRAYS = ("boxes", "flips")  # what cutting a crop needs
LABEL_ARRAYS = ("topk_indices", "topk_probs")  # a crop's stored label
CHUNKS_PER_READ = 4  # chunks per read of an array: ~32 MB decoded at K = 40, top-10
READ_THREADS = 4  # spans read at once (decoding and hashing release the GIL)


class StoreSlots:
    """Crops ``(row, slot)`` of a label store, read span of chunks by span of chunks.

    Parameters
    ----------
    store : LabelStore
        An opened store.
    verify : bool
        Check every chunk read against its checksums (and the store once, as every reader
        does); False only after a passing ``refine verify`` of the same bytes.
    threads : int, optional
        Spans read at once; default :data:`READ_THREADS`, at most the CPUs.
    """

    def __init__(self, store, verify: bool = True, threads: Optional[int] = None):
        self.store, self.verify = store, verify
        self.threads = max(1, min(threads or READ_THREADS, os.cpu_count() or 1))
        self.num_images = store.layout.num_images
        self.crops_per_image = store.layout.crops_per_image

    def read(self, rows, slots, names) -> dict:
        """Arrays ``names`` of crops ``(rows[i], slots[i])``, ``(len(rows), ...)`` each in the
        given order (any order, repeats allowed): each chunk holding any of the rows is read
        once, and only the chosen slot of each row is kept."""
        rows, slots = np.asarray(rows, np.int64).reshape(-1), np.asarray(slots, np.int64)
        shapes = self.store.layout.shapes()
        out = {name: np.empty((len(rows),) + shapes[name][0][2:], shapes[name][1])
               for name in names}
        if not len(rows) or not names:
            return out
        if self.verify:
            self.store.require_intact()
        checks = self.store.chunk_checks() if self.verify else None
        size = self.store.layout.chunk_size
        order = np.argsort(rows // size, kind="stable")
        chunk_of = rows[order] // size

        def read_span(span: range):
            arrays = self.store.read_chunk_span(span, names, self.verify, checks)
            lo, hi = np.searchsorted(chunk_of, [span.start, span.stop])
            items = order[lo:hi]
            local = rows[items] - span.start * size
            for name in names:
                out[name][items] = arrays[name][local, slots[items]]

        with ThreadPoolExecutor(self.threads) as pool:
            for _ in pool.map(read_span, chunk_spans(np.unique(chunk_of), CHUNKS_PER_READ)):
                pass  # the lowest span's error first, as a whole read reports it
        return out


class ArraySlots:
    """Crops ``(row, slot)`` of whole arrays ``(N, K, ...)`` held in memory (e.g. a store's
    ``read_crops().arrays()``, or boxes and flips of a plan)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.num_images, self.crops_per_image = np.shape(arrays["flips"])[:2]

    def read(self, rows, slots, names) -> dict:
        rows, slots = np.asarray(rows, np.int64), np.asarray(slots, np.int64)
        return {name: np.asarray(self.arrays[name])[rows, slots] for name in names}


def chunk_spans(chunks: np.ndarray, most: int) -> list:
    """Sorted chunk ids as ranges of consecutive ids, each of at most ``most`` chunks."""
    spans = []
    for run in np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1):
        spans += [range(int(run[i]), int(run[min(i + most, len(run)) - 1]) + 1)
                  for i in range(0, len(run), most)]
    return spans


@dataclass(frozen=True)
class EpochCrops:
    """One epoch's crops of some store rows: ``rows`` (sorted, distinct), the slot each
    replays, and what was read of that crop (``arrays[name][i]`` is crop ``(rows[i],
    slots[i])``'s). Under a mixing recipe, each crop's partner ``(partner_rows[i],
    partner_slots[i])`` with its box and flip (``partner_arrays``)."""

    epoch: int
    rows: np.ndarray
    slots: np.ndarray
    arrays: dict
    partner_rows: Optional[np.ndarray] = None
    partner_slots: Optional[np.ndarray] = None
    partner_arrays: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        held = [self.rows, self.slots, self.partner_rows, self.partner_slots,
                *self.arrays.values(), *self.partner_arrays.values()]
        return sum(a.nbytes for a in held if a is not None)

    def positions(self, images, slots) -> np.ndarray:
        """Where crops ``(images[i], slots[i])`` are in these arrays; refused for a crop this
        epoch does not replay (a batch of another epoch, or of rows another process reads)."""
        images, slots = np.asarray(images, np.int64), np.asarray(slots, np.int64)
        where = np.minimum(np.searchsorted(self.rows, images), max(len(self.rows) - 1, 0))
        found = (self.rows[where] == images) & (self.slots[where] == slots) if len(self.rows) \
            else np.zeros(images.shape, bool)
        if not found.all():
            i = int(np.argmin(found))
            raise RefineryError(f"crop (image {int(images.flat[i])}, slot {int(slots.flat[i])}) "
                                f"is not one epoch {self.epoch} replays here; look labels up "
                                "with the loader of the epoch the batch came from")
        return where

    def sparse_labels(self, images, slots):
        """The stored top-k labels of crops ``(images[i], slots[i])`` as a
        :class:`~refinery_pipeline.SparseLabels` batch (indices int64, probabilities float16),
        what :func:`.crop_batch.sparse_labels` gives from whole arrays."""
        import torch

        from .crop_batch import SparseLabels
        where = self.positions(images, slots)
        return SparseLabels(
            torch.from_numpy(self.arrays["topk_indices"][where].astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(self.arrays["topk_probs"][where])))


def read_epoch(source, epoch: int, rows, slots_of: Callable, names=CUT_ARRAYS + LABEL_ARRAYS,
               partners: Optional[Callable] = None) -> EpochCrops:
    """The crops ``rows`` replay in ``epoch`` from ``source`` (:class:`StoreSlots` or
    :class:`ArraySlots`): ``slots_of(epoch, rows)`` chooses each row's slot, ``names`` are the
    arrays kept, and ``partners(rows, slots) -> (m, j)`` (a mixing recipe's) adds each crop's
    partner's box and flip. Boxes and flips of crops and partners come in one pass, so a chunk
    is decoded once for both."""
    rows = np.unique(np.asarray(rows, np.int64))
    slots = np.asarray(slots_of(epoch, rows), np.int64)
    labels = tuple(name for name in names if name not in CUT_ARRAYS)
    cut = tuple(name for name in names if name in CUT_ARRAYS)
    arrays = source.read(rows, slots, labels)
    if partners is None:
        return EpochCrops(epoch, rows, slots, {**source.read(rows, slots, cut), **arrays})
    m, j = (np.asarray(a, np.int64) for a in partners(rows, slots))
    both = source.read(np.concatenate([rows, m]), np.concatenate([slots, j]), CUT_ARRAYS)
    own = {name: values[:len(rows)] for name, values in both.items() if name in cut}
    partner = {name: values[len(rows):] for name, values in both.items()}
    return EpochCrops(epoch, rows, slots, {**own, **arrays}, m, j, partner)


class EpochReader:
    """Reads epochs with ``read(epoch, rows) -> EpochCrops``, the next one in a background
    thread (:meth:`prefetch`) while this one trains, so an epoch boundary waits only for what
    the read has not finished. ``rows`` None lets ``read`` find the epoch's rows itself (in
    the background too). A read that failed raises when its epoch is asked for. With
    ``keep``, the epoch last given is kept, so iterating an epoch again (a second
    ``iter(loader)``) reads nothing and leaves the read ahead running; a caller that copies
    each epoch elsewhere (shared memory) passes False and holds no second copy."""

    def __init__(self, read: Callable, keep: bool = True):
        self._read, self._keep = read, keep
        self._ahead = None  # (epoch, rows, _Background)
        self._last = None  # (epoch, rows, EpochCrops) last given, with keep

    def __call__(self, epoch: int, rows=None) -> EpochCrops:
        last = self._last
        if last is not None and last[0] == epoch and _same(last[1], rows):
            return last[2]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch and _same(ahead[1], rows):
            crops = ahead[2].result()
        else:
            crops = self._read(epoch, rows)
        if self._keep:
            self._last = (epoch, rows, crops)
        return crops

    def prefetch(self, epoch: int, rows=None):
        """Start reading ``epoch``'s crops (in a daemon thread: a process that ends does not
        wait for a read nobody will use); a read of it already under way goes on."""
        ahead = self._ahead
        if ahead is None or ahead[0] != epoch or not _same(ahead[1], rows):
            self._ahead = (epoch, rows, _Background(self._read, epoch, rows))

    def wait(self):
        """Let a read under way finish (e.g. before this process forks)."""
        if self._ahead is not None:
            self._ahead[2].join()

    def __getstate__(self):
        return dict(self.__dict__, _ahead=None, _last=None)  # a copy reads for itself


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and
                                         np.array_equal(a, b))


class _Background(threading.Thread):
    def __init__(self, function: Callable, *args):
        super().__init__(name="refinery-epoch-read", daemon=True)
        self._call, self._value, self._error = (lambda: function(*args)), None, None
        self.start()

    def run(self):
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


class SharedEpoch:
    """One epoch's crops (:class:`EpochCrops`) of up to ``capacity`` rows in shared memory:
    written by the process that sets the epoch, read where ``DataLoader`` workers (forked or
    spawned, persistent or not) look crops up, as they saw the epoch's slots before.

    ``top_k``: labels per crop; ``partners``: hold each crop's mixing partner too.
    """

    def __init__(self, capacity: int, top_k: int, partners: bool = False):
        import torch
        self.capacity = int(capacity)
        self.fields = {"rows": ((), np.int64), "slots": ((), np.int64),
                       "boxes": ((4,), np.uint16), "flips": ((), np.uint8),
                       "topk_indices": ((top_k,), np.uint16),
                       "topk_probs": ((top_k,), np.float16)}
        if partners:
            self.fields.update(partner_rows=((), np.int64), partner_slots=((), np.int64),
                               partner_boxes=((4,), np.uint16), partner_flips=((), np.uint8))
        self._buffers = {name: torch.zeros(self.capacity * int(np.prod(shape, dtype=np.int64)) *
                                           np.dtype(dtype).itemsize,
                                           dtype=torch.uint8).share_memory_()
                         for name, (shape, dtype) in self.fields.items()}
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._views = None  # numpy views of the buffers in this process

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def write(self, crops: EpochCrops):
        """Hold ``crops`` from now on (``refused`` beyond ``capacity`` rows)."""
        count = len(crops.rows)
        if count > self.capacity:
            raise RefineryError(f"epoch {crops.epoch} replays {count:,} rows here, more than "
                                f"the {self.capacity:,} this reader was made for; pass at most "
                                "as many items each epoch as the first time")
        values = {"rows": crops.rows, "slots": crops.slots, **crops.arrays}
        if "partner_rows" in self.fields:
            values.update(partner_rows=crops.partner_rows, partner_slots=crops.partner_slots,
                          **{f"partner_{name}": v for name, v in crops.partner_arrays.items()})
        views = self.arrays(self.capacity)
        for name, array in views.items():
            array[:count] = values[name]
        self._count[0] = count

    def arrays(self, count: Optional[int] = None) -> dict:
        """Name -> the held values, ``count`` rows (default: those written)."""
        count = int(self._count[0]) if count is None else count
        return {name: view[:count] for name, view in self._mapped().items()}

    def position(self, row: int) -> int:
        """Where store row ``row`` is held, -1 where it is not."""
        rows = self._mapped()["rows"][:int(self._count[0])]
        where = int(np.searchsorted(rows, row))
        return where if where < len(rows) and rows[where] == row else -1

    def crop_of(self, row: int) -> Optional[dict]:
        """Name -> store row ``row``'s held value (its slot, box, flip, label, partner), or
        None where it is not held: one lookup per item of a reader."""
        where = self.position(row)
        return None if where < 0 else {name: view[where] for name, view in self._mapped().items()}

    def _mapped(self) -> dict:
        if self._views is None:
            self._views = {name: buffer.numpy().view(dtype).reshape((self.capacity,) + shape)
                           for (name, (shape, dtype)), buffer in
                           zip(self.fields.items(), self._buffers.values())}
        return self._views

    def __getstate__(self):
        return dict(self.__dict__, _views=None)  # views of this process's mapping
