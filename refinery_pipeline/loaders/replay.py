"""The one pixel path: FFCV decode -> crop a planned box -> resize -> optional flip.

Precompute and training both run :class:`PlannedCropDecoder`, so a stored label describes exactly
the pixels the student is later shown (the test suite asserts byte equality).

The decoder reads its boxes from a *crop table*, an int32 array ``(N, S, 7)`` of
``(y, x, h, w, flip, slot, source)`` per image and slot (``slot`` is the stored slot the row
replays, or ``NOT_STORED``; ``source`` is 0 for a crop of the row's own image and m + 1 for a
crop of image m, the partner a mixing recipe pairs with), and the label pipeline copies each
sample's slots from the same table into its batch (:class:`.crop_batch.CropBatch`):

* precompute uses the whole plan (``S = K``) and cuts all K crops from one decode of each image;
* training uses ``S = 1`` (``S = 2`` with a mixing recipe: the crop and its partner) and rewrites
  the table in place before every epoch with that epoch's crop per image (a replayed slot, or a
  fresh random box for ground-truth/online modes).

A recipe (:mod:`.augment`) then runs on the cut crops, after the loader and before the batch is
handed on (:class:`CropBatches`), with parameters drawn from each crop's own (n, k).

numba freezes small captured arrays into compiled code, so the table is reached through its raw
address (``carray`` over an ``inttoptr``), never captured as an array; the loader keeps it alive
and only ever writes it in place.
"""
import contextlib
import queue
import warnings
from dataclasses import replace
from typing import Callable

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import ToTensor
from numba import types
from numba.extending import intrinsic

from ..core.errors import RefineryWarning
from ..plan.crop_plan import (DEFAULT_SLOT_POLICY, SLOT_POLICIES, CropPlan, SlotSchedule,
                              centre_square, sample_boxes, sample_flips)
from ..sources.pixels import boxes_in_frames
from .crop_batch import NOT_STORED, CropBatch, batch_from_rows
from .epoch_reads import CUT_ARRAYS, LABEL_ARRAYS, ArraySlots, EpochCrops, EpochReader, read_epoch

TABLE_FIELDS = 7  # y, x, h, w, flip, slot, source (0: the row's image; m + 1: image m)
SOURCE = 6
BATCHES_AHEAD = 2  # FFCV keeps BATCHES_AHEAD + 2 batches of output buffers


def usable_workers(requested: int) -> int:
    """FFCV decodes with numba threads, and numba refuses more threads than this machine has
    (a ValueError deep inside the loader); cap the request there and say so once."""
    available = numba.config.NUMBA_NUM_THREADS
    if requested > available:  # reported once per loader kind (one warning location each)
        warnings.warn(f"--workers {requested}: this machine runs at most {available} decoding "
                      f"threads; using {available}", RefineryWarning, stacklevel=2)
        return available
    return max(1, requested)


def _pointer_intrinsic(item):
    """A compiled ``address -> item*`` cast: numba freezes small captured arrays into the code,
    so arrays rewritten or allocated later are reached through their address instead."""
    @intrinsic
    def pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(item)))
        return types.CPointer(item)(types.int64), codegen
    return pointer


_int32_pointer = _pointer_intrinsic(types.int32)
_uint8_pointer = _pointer_intrinsic(types.uint8)


def crop_table(boxes: np.ndarray, flips: np.ndarray, slots: np.ndarray = None,
               sources: np.ndarray = None) -> np.ndarray:
    """Pack boxes ``(N, S, 4)``, flips ``(N, S)``, slots ``(N, S)`` (default: column s is
    slot s, i.e. all of an image's stored crops in order) and source images ``(N, S)``
    (default: each row's own) into a C-contiguous int32 table ``(N, S, 7)``."""
    if slots is None:
        slots = np.broadcast_to(np.arange(flips.shape[1]), flips.shape)
    source = np.zeros(flips.shape, np.int32) if sources is None else np.asarray(sources) + 1
    return np.ascontiguousarray(np.concatenate(
        [boxes.astype(np.int32), flips.astype(np.int32)[..., None],
         np.asarray(slots).astype(np.int32)[..., None], source.astype(np.int32)[..., None]],
        axis=-1))


# numba 0.68 corrupts a dispatcher's overload table when compiled helpers such as FFCV's
# ``imdecode`` are shared by several loaders (KeyError on the next compile), and the same corruption
# makes the dispatcher's finaliser print KeyError noise when it is garbage collected. So, as FFCV
# does, every loader compiles its own helpers, and we keep them alive: numba skips finalisers at
# interpreter shutdown.
_KEEP_ALIVE = []


def compile_for_loader(function: Callable) -> Callable:
    """``Compiler.compile`` a helper for one loader and pin it for the life of the process."""
    compiled = Compiler.compile(function)
    _KEEP_ALIVE.append(compiled)
    return compiled


def crop_cutter() -> Callable:
    """Compiled ``cut(image, y, x, h, w, flip, out)``: INTER_AREA resize of a box, then mirror."""
    resize_crop_c = compile_for_loader(resize_crop)

    def cut(image, y, x, h, w, flip, out):
        resize_crop_c(image, y, y + h, x, x + w, out)
        if flip:
            width = out.shape[1]
            for r in range(out.shape[0]):
                for c in range(width // 2):
                    for ch in range(3):
                        tmp = out[r, c, ch]
                        out[r, c, ch] = out[r, width - 1 - c, ch]
                        out[r, width - 1 - c, ch] = tmp

    return compile_for_loader(cut)


class PlannedCropDecoder(ResizedCropRGBImageDecoder):
    """Decode each image once and cut the S crops listed for it in a crop table; a slot whose
    ``source`` names another image (a mixing partner) decodes that image too (FFCV's OS-cache
    reader maps the whole file, so any image's bytes can be read).

    Output per sample: ``(H, W, 3)`` uint8 when ``S == 1``, else ``(S, H, W, 3)``. Subclassing
    FFCV's resized-crop decoder keeps it the pipeline's decoder (``PipelineSpec`` checks that).

    Memory: FFCV's base class declares its decode scratch per *sample*, and FFCV allocates every
    declared buffer ``batch size x (batches ahead + 2)`` times, so one 6000 x 4000 image in the
    data set cost 72 MB x 256 x 4 = 74 GB. Here the scratch belongs to the decoding *threads*:
    ``threads`` buffers of the largest stored image, allocated once per loader (its pages are
    touched only as far as the images decoded need), each thread decoding an interleaved share
    of every batch into its own buffer. The loader runs one epoch at a time
    (:meth:`TableLoader.__iter__`), so no two batches share a buffer.
    """

    def __init__(self, table: np.ndarray, output_size, threads: int = 1):
        super().__init__(tuple(output_size))
        assert table.dtype == np.int32 and table.flags.c_contiguous and table.ndim == 3
        self.table, self.threads = table, max(1, int(threads))
        self.scratch = None  # (threads, largest image bytes) uint8, made with the code

    @property
    def get_crop_generator(self):  # required by the abstract base; boxes come from the table
        raise NotImplementedError

    def declare_state_and_memory(self, previous_state):
        state, (out, _per_sample_scratch) = super().declare_state_and_memory(previous_state)
        slots = self.table.shape[1]
        if slots > 1:
            out = AllocationQuery((slots,) + tuple(out.shape), out.dtype)
        return replace(state, shape=out.shape), out

    @property
    def scratch_bytes(self) -> int:
        """Bytes of decode scratch this decoder holds: threads x the largest stored image."""
        return self.threads * int(self.max_height) * int(self.max_width) * 3

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = compile_for_loader(imdecode)
        cut = crop_cutter()
        address, (num_images, slots, _) = self.table.ctypes.data, self.table.shape
        table_ref = self.table
        threads, image_bytes = self.threads, self.scratch_bytes // self.threads
        if self.scratch is None or self.scratch.shape != (threads, image_bytes):
            self.scratch = np.empty((threads, image_bytes), np.uint8)  # one per loader
        scratch_ref, scratch_address = self.scratch, self.scratch.ctypes.data
        enabled = Compiler.is_enabled

        def decode(batch_indices, destination, metadata, storage_state):
            if enabled:
                table = numba.carray(_int32_pointer(address), (num_images, slots, TABLE_FIELDS))
                scratch = numba.carray(_uint8_pointer(scratch_address), (threads, image_bytes))
            else:
                table, scratch = table_ref, scratch_ref
            count = len(batch_indices)
            for thread in my_range(threads):
                temp = scratch[thread]
                for dst_ix in range(thread, count, threads):
                    source_ix = batch_indices[dst_ix]
                    decoded = np.int64(-1)
                    image = temp[:3].reshape(1, 1, 3)
                    for s in range(slots):
                        row = table[source_ix, s]
                        wanted = np.int64(source_ix) if row[6] == 0 else np.int64(row[6]) - 1
                        if wanted != decoded:  # each image once per sample, however many slots
                            field = metadata[wanted]
                            image_data = mem_read(field["data_ptr"], storage_state)
                            height, width = np.uint32(field["height"]), np.uint32(field["width"])
                            if field["mode"] == jpg:
                                imdecode_c(image_data, temp, height, width, height, width, 0, 0,
                                           1, 1, False, False)
                                image = temp[:3 * height * width].reshape(height, width, 3)
                            else:
                                image = image_data.reshape(height, width, 3)
                            decoded = wanted
                        out = destination[dst_ix] if slots == 1 else destination[dst_ix, s]
                        cut(image, row[0], row[1], row[2], row[3], row[4], out)
            return destination[:count]

        decode.is_parallel = True
        return decode


class WithIndexAndSlots(Operation):
    """Label-side op: each integer label becomes ``[label, sample index, slot_0 .. slot_S-1]``
    (int64), the slots read from the same crop table the image decoder cuts from, so every
    sample carries the slots of exactly the crops it was given."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = table

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        address, (num_images, slots, _) = self.table.ctypes.data, self.table.shape
        table_ref = self.table
        enabled = Compiler.is_enabled

        def with_index_and_slots(labels, destination, indices):
            if enabled:
                table = numba.carray(_int32_pointer(address), (num_images, slots, TABLE_FIELDS))
            else:
                table = table_ref
            for i in my_range(labels.shape[0]):
                destination[i, 0] = labels[i, 0] if labels.ndim == 2 else labels[i]
                destination[i, 1] = indices[i]
                for s in range(slots):
                    destination[i, 2 + s] = table[indices[i], s, 5]
            return destination[:labels.shape[0]]

        with_index_and_slots.is_parallel = True
        with_index_and_slots.with_indices = True
        return with_index_and_slots

    def declare_state_and_memory(self, previous_state):
        width = 2 + self.table.shape[1]
        return (replace(previous_state, jit_mode=True, shape=(width,), dtype=np.dtype("int64")),
                AllocationQuery((width,), np.dtype("int64")))


# --------------------------------------------------------------------------- per-epoch crop sources

class _RecipeCrops:
    """What the crop sources share about a recipe: a mixing recipe needs a second table column
    (the partner crop), and every batch goes through the recipe (:class:`.augment.BatchRecipe`)."""

    recipe = None  # PlanAugment of the epoch's crops, or None: crop and flip only
    recipe_threads = 1  # threads running the recipe on each batch (make_loader: its workers)

    @property
    def table_slots(self) -> int:
        return 2 if self.recipe is not None and self.recipe.recipe.mixes else 1

    def batch_recipe(self, epoch: int):
        return None

    @staticmethod
    def _fill_partners(table, boxes, flips, images, slots, items=slice(None)):
        """Column 1 of table rows ``items`` (default all): the partner crop of each, cut from
        table image ``images`` (its box and flip as given); ``slots`` is what the batch
        reports for it."""
        table[items, 1, :4], table[items, 1, 4] = boxes, flips
        table[items, 1, 5], table[items, 1, SOURCE] = slots, np.asarray(images) + 1


class ReplayedCrops(_RecipeCrops):
    """Each epoch, every image replays one of its stored slots (chosen by ``slot_policy``); with
    the store's recipe (``recipe``, a :class:`.augment.PlanAugment`), each crop goes through it
    as it was labelled, its partner (m, j) the stored crop j of image m.

    ``boxes`` and ``flips`` are the store's ``(N, K, ...)`` arrays (:meth:`reading` reads a
    store's instead, epoch by epoch), ``labels`` its classes, per store row. ``copy`` (a
    :class:`.copies.CopyJoin`) says which ``.beton`` item holds each store row; without it,
    row n is item n (the store's own ``.beton``). Slots and recipe draws are always of store
    rows, so a copy in any order replays the same crops; a mixing partner the copy lacks moves
    the slot (:func:`.copies.replayable_slot`). ``frames``: ``(stored, copy's)`` ``(N, 2)``
    frames of each row where the copy's images are rescaled, whose boxes are carried over.

    Before each epoch :meth:`fill` writes the crop table's rows of the items the loader
    decodes in it (``items_of(epoch)``; all of them by default), reading just those rows' slot
    of the epoch (:mod:`.epoch_reads`), and starts reading the next epoch's."""

    def __init__(self, boxes, flips, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY,
                 recipe=None, labels=None, copy=None):
        self._setup(ArraySlots({"boxes": boxes, "flips": flips}), seed, slot_policy, recipe,
                    labels, copy)

    @classmethod
    def reading(cls, source, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY, recipe=None,
                labels=None, copy=None, frames=None, stored_labels: bool = True):
        """Crops read from ``source`` (:class:`.epoch_reads.StoreSlots`) epoch by epoch, with
        their stored labels (``stored_labels``) for :meth:`sparse_labels`."""
        crops = cls.__new__(cls)
        crops._setup(source, seed, slot_policy, recipe, labels, copy, frames, stored_labels)
        return crops

    def _setup(self, source, seed, slot_policy, recipe, labels, copy, frames=None,
               stored_labels=False):
        self.source, self.seed, self.slot_policy = source, seed, slot_policy
        self.recipe, self.labels, self.copy, self.frames = recipe, labels, copy, frames
        self.schedule = SlotSchedule(seed, source.num_images, source.crops_per_image,
                                     slot_policy)
        self.names = CUT_ARRAYS + (LABEL_ARRAYS if stored_labels else ())
        self.reader = EpochReader(self._read)
        self.current = None  # the last filled epoch's EpochCrops
        self.items_of = None  # the loader's items of an epoch (CropLoader.epoch_items)
        if copy is not None:  # the store row each .beton item holds (-1: none replayed)
            self._row_of_item = np.full(int(copy.copy_index.max(initial=-1)) + 1, -1, np.int64)
            self._row_of_item[copy.copy_index[copy.rows]] = copy.rows

    @property
    def slots(self) -> np.ndarray:
        """``(N,)`` the slot each store row replayed in the last filled epoch (-1: not
        replayed here)."""
        slots = np.full(self.source.num_images, -1, np.int64)
        if self.current is not None:
            slots[self.current.rows] = self.current.slots
        return slots

    def fill(self, table: np.ndarray, epoch: int):
        crops = self.current = self.reader(epoch)
        self.reader.prefetch(epoch + 1)
        items = crops.rows if self.copy is None else self.copy.copy_index[crops.rows]
        table[items, 0, :4] = self._in_frames(crops.arrays["boxes"], crops.rows)
        table[items, 0, 4] = crops.arrays["flips"]
        table[items, 0, 5] = crops.slots
        if self.table_slots == 2:
            m = crops.partner_rows
            where = m if self.copy is None else self.copy.item[m]
            self._fill_partners(table, self._in_frames(crops.partner_arrays["boxes"], m),
                                crops.partner_arrays["flips"], where, crops.partner_slots, items)

    def _rows(self, epoch: int) -> np.ndarray:
        """The store rows replayed in ``epoch`` here: those of the loader's items that epoch
        (every replayed row when the loader does not say)."""
        if self.items_of is None:
            return np.arange(self.source.num_images) if self.copy is None else self.copy.rows
        items = np.asarray(self.items_of(epoch), np.int64)
        if self.copy is None:
            return items
        rows = self._row_of_item[items[items < len(self._row_of_item)]]
        return rows[rows >= 0]  # items holding no replayed row are never decoded

    def _read(self, epoch: int, rows=None) -> EpochCrops:
        rows = self._rows(epoch) if rows is None else rows
        partners = self.recipe.partners if self.table_slots == 2 else None
        return read_epoch(self.source, epoch, rows, self.epoch_slots, self.names, partners)

    def _in_frames(self, boxes, rows):
        """Stored boxes of ``rows`` carried into the copy's frames (as they are without one)."""
        if self.frames is None:
            return boxes
        stored, actual = self.frames
        return boxes_in_frames(boxes, stored[rows], actual[rows])

    def sparse_labels(self, images, slots):
        """The stored labels of crops ``(images[i], slots[i])`` of the last filled epoch
        (:meth:`.epoch_reads.EpochCrops.sparse_labels`): what the loader attaches to each
        batch."""
        return self.current.sparse_labels(images, slots)

    def batch_recipe(self, epoch: int):
        if self.recipe is None:
            return None
        from ..plan.augment import BatchRecipe
        return BatchRecipe(self.recipe, self.labels, threads=self.recipe_threads)

    def epoch_slots(self, epoch: int, rows=None) -> np.ndarray:
        """:func:`.crop_plan.epoch_slots` of every image (or of store rows ``rows``), the
        ``cycle`` order kept for its round where every row is replayed
        (:class:`.crop_plan.SlotSchedule`), each moved where a copy lacks its mixing
        partner (:meth:`.copies.CopyJoin.slots`)."""
        slots = np.asarray(self.schedule(epoch, rows), np.int64)
        if self.copy is None:
            return slots
        rows = np.arange(self.source.num_images) if rows is None else rows
        return self.copy.slots(rows, slots)


class FreshCrops(_RecipeCrops):
    """Each epoch, a new seeded random box and flip per image (ground-truth and online modes),
    through ``recipe`` (:class:`.augment.Recipe`, on ``size``-pixel crops) when given, with fresh
    parameters too: the epoch's plan has K = 1, and a crop's partner is image m's crop of the
    same epoch. ``labels`` (the images' classes) give mixed crops their ground-truth shares."""

    def __init__(self, plan: CropPlan, heights, widths, recipe=None, labels=None,
                 size: int = None):
        self.plan, self.heights, self.widths = plan, heights, widths
        self.recipe_spec, self.labels, self.size = recipe, labels, size
        self.slots = None
        self.recipe = self._epoch_recipe(0)

    def epoch_plan(self, epoch: int) -> CropPlan:
        return replace(self.plan, seed=self.plan.seed * 1_000_003 + epoch + 1, crops_per_image=1)

    def _epoch_recipe(self, epoch: int):
        if not self.recipe_spec:
            return None
        from ..plan.augment import PlanAugment
        return PlanAugment(self.recipe_spec, self.epoch_plan(epoch).seed, len(self.heights), 1,
                           self.size)

    def fill(self, table: np.ndarray, epoch: int):
        plan = self.epoch_plan(epoch)
        ids = np.arange(len(self.heights))
        boxes = sample_boxes(plan, ids, self.heights, self.widths)[:, 0]
        flips = sample_flips(plan, ids)[:, 0]
        table[:, 0, :4], table[:, 0, 4], table[:, 0, 5] = boxes, flips, NOT_STORED
        self.recipe = self._epoch_recipe(epoch)
        if self.table_slots == 2:
            m, _ = self.recipe.partners(ids, np.zeros(len(ids)))
            self._fill_partners(table, boxes[m], flips[m], m, NOT_STORED)

    def batch_recipe(self, epoch: int):
        if self.recipe is None:
            return None
        from ..plan.augment import BatchRecipe
        return BatchRecipe(self._epoch_recipe(epoch), self.labels, fresh=True,
                           threads=self.recipe_threads)


class FixedCrops(_RecipeCrops):
    """The same crop every epoch: used for evaluation (the centred square of each image)."""

    def __init__(self, heights, widths):
        self.boxes = centre_square(heights, widths)
        self.slots = None

    def fill(self, table: np.ndarray, epoch: int):
        table[:, 0, :4] = self.boxes
        table[:, 0, 4] = 0
        table[:, 0, 5] = NOT_STORED


class StoreRows:
    """What the batches of a loader over a ``.beton`` replaying a store carry about each item:
    its store row as ``indices`` (a copy holds them in another order), the store's class as
    ``labels`` (a copy may number classes otherwise; the store's are the truth) and whether
    the item's bytes are the refinery's (``exact``). Run on each batch before the recipe, which
    draws from store rows."""

    def __init__(self, row_of_item: np.ndarray, labels: np.ndarray, exact: np.ndarray):
        self.row_of_item, self.labels, self.exact = row_of_item, labels, exact

    @classmethod
    def of(cls, copy, num_items: int, labels) -> "StoreRows":
        """From a :class:`.copies.CopyJoin` of a ``.beton`` of ``num_items`` items."""
        rows = copy.rows
        row_of_item = np.full(num_items, -1, np.int64)
        row_of_item[copy.copy_index[rows]] = rows
        exact = copy.exact if copy.exact is not None else np.zeros(copy.num_rows, bool)
        return cls(row_of_item, np.asarray(labels, np.int64), exact)

    def __call__(self, batch: CropBatch) -> CropBatch:
        rows = self.row_of_item[batch.indices.numpy()]
        return batch._replace(indices=torch.from_numpy(rows),
                              labels=torch.from_numpy(self.labels[rows]),
                              exact=torch.from_numpy(self.exact[rows]))


class ClassMap:
    """Batches whose ``labels`` number the classes otherwise than the model does (a copy's
    validation split): each label through ``table`` (copy class -> the model's class)."""

    def __init__(self, table):
        self.table = np.asarray(table, np.int64)

    def __call__(self, batch: CropBatch) -> CropBatch:
        return batch._replace(labels=torch.from_numpy(self.table[batch.labels.numpy()]))


class CropBatches:
    """One epoch of an FFCV loader as :class:`.crop_batch.CropBatch` es (the loader contract),
    each first through ``relabel`` (:class:`StoreRows` or :class:`ClassMap`) where given, with
    each crop's stored label attached when ``records`` are given (anything with
    ``sparse_labels(images, slots)``: :class:`ReplayedCrops`, the epoch's labels).

    ``close()`` stops FFCV's decoding thread when an epoch is abandoned early (precise BN).
    """

    def __init__(self, epoch, records=None, recipe=None, relabel=None):
        self.epoch, self.records, self.recipe, self.relabel = epoch, records, recipe, relabel

    def __iter__(self):
        return self

    def __next__(self) -> CropBatch:
        images, rows = next(self.epoch)
        batch = batch_from_rows(images, rows)
        if self.relabel is not None:
            batch = self.relabel(batch)
        if self.recipe is not None:  # .augment.BatchRecipe: the crops as labelled
            batch = self.recipe(batch)
        if self.records is None:
            return batch
        return batch._replace(targets=self.records.sparse_labels(batch.indices.numpy(),
                                                                 batch.slots.numpy()))

    def __len__(self):
        return len(self.epoch)

    def close(self):
        self.epoch.close()


class TableLoader(Loader):
    """An FFCV ``Loader`` over a crop table, yielding :class:`.crop_batch.CropBatch` es.

    One epoch decodes at a time: the crop table and the decoder's per-thread scratch belong to
    the loader, so an epoch abandoned without ``close()`` (a ``break``) is stopped, and its
    thread awaited, before the next one starts; FFCV alone would let both decode at once.
    """

    records = None  # sparse_labels(images, slots): each crop's stored label, attached
    relabel = None  # StoreRows or ClassMap: run on each batch first
    _running = None  # FFCV's EpochIterator (a thread) of the latest epoch

    def __iter__(self):
        self._stop_running_epoch()
        self._prepare_epoch()
        recipe = self._batch_recipe()  # before FFCV's __iter__ moves next_epoch on
        self._running = super().__iter__()
        return CropBatches(self._running, self.records, recipe, self.relabel)

    def _stop_running_epoch(self):
        """Stop the latest epoch's decoding thread and wait for it. FFCV's ``close()`` only
        asks it to stop once its queue is full; with no batches left it ends at once, after
        handing over (here: dropping) what it had decoded."""
        running = self._running
        if running is None or not running.is_alive():
            return
        running.close()
        running.iter_ixes = iter(())  # FFCV 1.0.2 reads its next batch from this iterator
        while running.is_alive():
            with contextlib.suppress(queue.Empty):
                running.output_queue.get_nowait()
            running.join(0.01)

    def _prepare_epoch(self):
        pass

    def _batch_recipe(self):
        return None


class CropLoader(TableLoader):
    """A :class:`TableLoader` whose crop table is refreshed from ``crops.fill`` before each epoch.

    FFCV starts decoding inside ``__iter__``, so the table must be written *before* calling the
    parent. Set ``next_epoch`` to resume at a given epoch.
    """

    def __init__(self, path, crops, table, **kwargs):
        self.crops, self.table = crops, table
        super().__init__(path, **kwargs)

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s crops on the next iteration (as ``StoreCropDataset.set_epoch``);
        epochs count from 0."""
        from ..core.validators import whole_number
        self.next_epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")

    def epoch_items(self, epoch: int) -> np.ndarray:
        """The items this process decodes in ``epoch``, in any order: all of the loader's, or
        with ``distributed=True`` this rank's share, which FFCV draws afresh every epoch
        (``DistributedSampler``); a sampler of its own, so it may run in another thread."""
        if not self.distributed:
            return self.indices
        return type(self.traversal_order)(self).sample_order(epoch)

    def _prepare_epoch(self):
        self.crops.fill(self.table, self.next_epoch)

    def _batch_recipe(self):
        return self.crops.batch_recipe(self.next_epoch)


def _pipelines(table: np.ndarray, output_size, threads: int) -> dict:
    """Image and label pipelines over one crop table: the decoder cuts its rows (decoding with
    ``threads`` threads), the label op copies their slots into each sample's row."""
    return {"image": [PlannedCropDecoder(table, output_size, threads), ToTensor()],
            "label": [IntDecoder(), WithIndexAndSlots(table), ToTensor()]}


def make_loader(dataset, crops, output_size, batch_size: int, num_workers: int = 2,
                train: bool = True, seed: int = 0, distributed: bool = False,
                indices=None, drop_last: bool = None) -> CropLoader:
    """A loader of one crop per image from ``crops``, yielding :class:`.crop_batch.CropBatch` es
    of uint8 NHWC crops."""
    table = np.zeros((dataset.num_images, crops.table_slots, TABLE_FIELDS), dtype=np.int32)
    threads = usable_workers(num_workers)
    crops.recipe_threads = threads  # the recipe runs as wide as decoding
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    loader = CropLoader(str(dataset.path), crops, table, batch_size=batch_size,
                        num_workers=threads, order=order, seed=seed,
                        drop_last=train if drop_last is None else drop_last,
                        distributed=distributed, indices=indices,
                        pipelines=_pipelines(table, output_size, threads),
                        batches_ahead=BATCHES_AHEAD)
    crops.items_of = loader.epoch_items  # a replaying source reads only these items' rows
    return loader


def multi_crop_loader(dataset, table: np.ndarray, output_size, images_per_batch: int,
                      indices, num_workers: int = 2) -> TableLoader:
    """Sequential loader over ``indices`` yielding :class:`.crop_batch.CropBatch` es of all the
    table's crops per image, ``(B, S, H, W, 3)`` (``(B, H, W, 3)`` when S is 1)."""
    threads = usable_workers(num_workers)
    return TableLoader(str(dataset.path), batch_size=images_per_batch, num_workers=threads,
                       order=OrderOption.SEQUENTIAL, indices=np.asarray(indices),
                       drop_last=False, pipelines=_pipelines(table, output_size, threads),
                       batches_ahead=BATCHES_AHEAD)


def replay_loader(store, data, batch_size: int, num_workers: int = 2, *, seed: int = 0,
                  slot_policy: str = DEFAULT_SLOT_POLICY, size: int = None,
                  distributed: bool = False, drop_last: bool = True, cache_dir=None,
                  allow_missing: bool = False) -> CropLoader:
    """The FFCV backend for any training loop: a store's crops replayed with their labels.

    Parameters
    ----------
    store : LabelStore or str
        The label store (or its location).
    data : str or os.PathLike
        Its data set: a ``.beton``, or an ImageFolder tree (converted once, cached, as the
        store records it was: see :func:`~refinery_pipeline.beton_path`). For a store that
        names its images (format 5), any copy that is converted to a keyed ``.beton``: another
        order, a subset (with ``allow_missing``), a flat copy, a resized one; joined by key.
    batch_size, num_workers : int
        As FFCV's ``Loader`` (``num_workers`` decoding threads).
    seed : int
        Shuffling and slot-choice seed (``refine train --seed``).
    slot_policy : {"cycle", "random"}
        Which slot each epoch replays.
    size : int, optional
        Crop side; defaults to the size the refinery labelled.
    distributed : bool
        Shard images over ``torch.distributed`` ranks (FFCV's ``distributed=True``).
    drop_last : bool
        Drop the last incomplete batch, as training does.
    cache_dir : str, optional
        Where a converted tree's ``.beton`` is cached.
    allow_missing : bool
        Skip the store images the copy cannot give (missing, reframed, or, under a mixing
        recipe, without a slot whose partner it holds) instead of refusing it; ``loader.join``
        counts them.

    Returns
    -------
    CropLoader
        Iterating it yields :class:`~refinery_pipeline.CropBatch` es of uint8 ``(B, S, S, 3)``
        crops (after the store's recipe, if it has one, as they were labelled) with
        :class:`~refinery_pipeline.SparseLabels` targets, ``mix`` where the recipe mixes, and
        ``exact``; ``indices`` are store rows and ``labels`` the store's classes, whatever the
        copy's order or numbering. Epochs count from 0 (``loader.set_epoch(e)`` picks one).
        Slot ``(epoch, n)`` is :func:`~refinery_pipeline.slot_of`'s, the same as in
        :class:`StoreCropDataset`. ``loader.join`` is the :class:`~refinery_pipeline.CopyJoin`.

    Raises
    ------
    StoreCorruptError
        The store fails the checks ``refine verify`` and ``refine train`` run.
    StoreMismatchError
        ``data`` is not the store's data set (nor, for a keyed store, a copy of it).
    MissingImagesError
        The copy lacks store images and ``allow_missing`` is False.
    ArgumentError
        An argument of the wrong kind or range.

    Notes
    -----
    FFCV reuses its batch buffers: a batch's tensors (``images``, ``labels``, ``indices``,
    ``slots``) are overwritten a few batches later. Use them within the step, or keep a copy
    (``batch.images[i].clone()``); a kept view shows other crops' pixels.
    """
    from ..core.validators import flag, one_of, optional_whole_number, path_like, whole_number
    from ..sources.data_cache import open_dataset
    from ..sources.dataset import conversion_options
    from ..store.label_store import open_for_reading
    batch_size = whole_number("batch_size", batch_size, 1, "pass a positive batch size")
    num_workers = whole_number("num_workers", num_workers, 1, "pass 1 or more decoding threads")
    seed = whole_number("seed", seed)
    one_of("slot_policy", slot_policy, SLOT_POLICIES)
    size = optional_whole_number("size", size, 1, "pass a crop side in pixels, or None for the "
                                 "size the refinery labelled")
    flag("distributed", distributed)
    flag("drop_last", drop_last)
    flag("allow_missing", allow_missing)
    path_like("data", data, ".beton or ImageFolder tree")
    if cache_dir is not None:
        path_like("cache_dir", cache_dir, "cache directory")
    store = open_for_reading(store)
    dataset = open_dataset(data, "train", cache_dir, conversion_options(store.dataset.source))
    size = size or store.refinery.input_size
    crops, copy = replayed_crops(store, dataset, seed, slot_policy, size, allow_missing)
    loader = make_loader(dataset, crops, (size, size), batch_size, num_workers, train=True,
                         seed=seed, distributed=distributed, drop_last=drop_last,
                         indices=copy.copy_index[copy.rows] if copy.keys is not None else None)
    loader.records = crops  # each batch's labels, of the epoch's crops
    loader.relabel = StoreRows.of(copy, dataset.num_images, crops.labels)
    loader.join = copy
    return loader


def replayed_crops(store, dataset, seed: int, slot_policy: str, size: int,
                   allow_missing: bool = False, copy=None, stored_labels: bool = True,
                   verify: bool = True) -> tuple:
    """``(ReplayedCrops, CopyJoin)``: the store's crops over ``dataset`` (an ``ImageDataset``:
    the store's own ``.beton`` or a keyed copy, joined by :func:`.copies.join_beton` unless
    ``copy`` is that join already), boxes carried into the copy's frames, read epoch by epoch
    (each chunk checked against its checksums unless ``verify`` is False), with the crops'
    stored labels where ``stored_labels``."""
    from ..plan.augment import plan_augment
    from .copies import join_beton
    from .epoch_reads import StoreSlots
    recipe = plan_augment(store.plan, store.layout.num_images, size)
    if copy is None:
        copy = join_beton(store, dataset, recipe=recipe, allow_missing=allow_missing)
    keyed, frames = copy.keys is not None, None
    if keyed:
        stored = store.read_image_sizes()
        frames = (stored, np.where((copy.item >= 0)[:, None],  # rows the copy lacks keep theirs
                                   np.stack([dataset.heights, dataset.widths], -1)[copy.item],
                                   stored))
    crops = ReplayedCrops.reading(StoreSlots(store, verify), seed, slot_policy, recipe,
                                  store.read_labels(), copy if keyed else None, frames,
                                  stored_labels)
    return crops, copy
