"""The one pixel path: FFCV decode -> crop a planned box -> resize -> optional flip.

Precompute and training both run :class:`PlannedCropDecoder`, so a stored label describes exactly
the pixels the student is later shown (the test suite asserts byte equality).

The decoder reads its boxes from a *crop table*, an int32 array ``(N, S, 6)`` of
``(y, x, h, w, flip, slot)`` per image and slot (``slot`` is the stored slot the row replays, or
``NOT_STORED``), and the label pipeline copies each sample's slots from the same table into its
batch (:class:`.crop_batch.CropBatch`):

* precompute uses the whole plan (``S = K``) and cuts all K crops from one decode of each image;
* training uses ``S = 1`` and rewrites the table in place before every epoch with that epoch's
  crop per image (a replayed slot, or a fresh random box for ground-truth/online modes).

numba freezes small captured arrays into compiled code, so the table is reached through its raw
address (``carray`` over an ``inttoptr``), never captured as an array; the loader keeps it alive
and only ever writes it in place.
"""
import warnings
from dataclasses import replace
from typing import Callable

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import ToTensor

from .crop_batch import NOT_STORED, CropBatch, batch_from_rows, sparse_labels
from .crop_plan import (DEFAULT_SLOT_POLICY, CropPlan, centre_square, cycle_order, epoch_slots,
                        sample_boxes, sample_flips)
from .errors import RefineryWarning

TABLE_FIELDS = 6  # y, x, h, w, flip, slot


def usable_workers(requested: int) -> int:
    """FFCV decodes with numba threads, and numba refuses more threads than this machine has
    (a ValueError deep inside the loader); cap the request there and say so once."""
    available = numba.config.NUMBA_NUM_THREADS
    if requested > available:  # reported once per loader kind (one warning location each)
        warnings.warn(f"--workers {requested}: this machine runs at most {available} decoding "
                      f"threads; using {available}", RefineryWarning, stacklevel=2)
        return available
    return max(1, requested)


@intrinsic
def _int32_pointer(typingctx, address):
    """Turn an integer address into an ``int32*`` inside compiled code."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int32)))
    return types.CPointer(types.int32)(types.int64), codegen


def crop_table(boxes: np.ndarray, flips: np.ndarray, slots: np.ndarray = None) -> np.ndarray:
    """Pack boxes ``(N, S, 4)``, flips ``(N, S)`` and slots ``(N, S)`` (default: column s is
    slot s, i.e. all of an image's stored crops in order) into a C-contiguous int32 table
    ``(N, S, 6)``."""
    if slots is None:
        slots = np.broadcast_to(np.arange(flips.shape[1]), flips.shape)
    return np.ascontiguousarray(np.concatenate(
        [boxes.astype(np.int32), flips.astype(np.int32)[..., None],
         np.asarray(slots).astype(np.int32)[..., None]], axis=-1))


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
    """Decode each image once and cut the S crops listed for it in a crop table.

    Output per sample: ``(H, W, 3)`` uint8 when ``S == 1``, else ``(S, H, W, 3)``. Subclassing
    FFCV's resized-crop decoder keeps it the pipeline's decoder (``PipelineSpec`` checks that) and
    reuses its scratch buffer for the decoded image.
    """

    def __init__(self, table: np.ndarray, output_size):
        super().__init__(tuple(output_size))
        assert table.dtype == np.int32 and table.flags.c_contiguous and table.ndim == 3
        self.table = table

    @property
    def get_crop_generator(self):  # required by the abstract base; boxes come from the table
        raise NotImplementedError

    def declare_state_and_memory(self, previous_state):
        state, (out, scratch) = super().declare_state_and_memory(previous_state)
        slots = self.table.shape[1]
        if slots == 1:
            return state, (out, scratch)
        shape = (slots,) + tuple(out.shape)
        return replace(state, shape=shape), (AllocationQuery(shape, out.dtype), scratch)

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = compile_for_loader(imdecode)
        cut = crop_cutter()
        address, (num_images, slots, _) = self.table.ctypes.data, self.table.shape
        table_ref = self.table
        enabled = Compiler.is_enabled

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            if enabled:
                table = numba.carray(_int32_pointer(address), (num_images, slots, TABLE_FIELDS))
            else:
                table = table_ref
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    image = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for s in range(slots):
                    row = table[source_ix, s]
                    out = destination[dst_ix] if slots == 1 else destination[dst_ix, s]
                    cut(image, row[0], row[1], row[2], row[3], row[4], out)
            return destination[:len(batch_indices)]

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

class ReplayedCrops:
    """Each epoch, every image replays one of its stored slots (chosen by ``slot_policy``)."""

    def __init__(self, boxes, flips, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY):
        self.boxes, self.flips = boxes, flips
        self.seed, self.slot_policy = seed, slot_policy
        self.slots = np.zeros(len(boxes), dtype=np.int64)  # the last filled epoch's (for tests)
        self._round = (None, None)  # (cycle, its slot order): one draw serves K epochs

    def fill(self, table: np.ndarray, epoch: int):
        self.slots[:] = self.epoch_slots(epoch)
        rows = np.arange(len(self.boxes))
        table[:, 0, :4] = self.boxes[rows, self.slots]
        table[:, 0, 4] = self.flips[rows, self.slots]
        table[:, 0, 5] = self.slots

    def epoch_slots(self, epoch: int) -> np.ndarray:
        """:func:`.crop_plan.epoch_slots` of every image, the ``cycle`` order kept for its round
        (the per-epoch table rewrite at ImageNet size: 3.1 s drawing each epoch, ~0.1 s so)."""
        n, k = self.boxes.shape[:2]
        if self.slot_policy != "cycle":
            return epoch_slots(self.seed, epoch, n, k, self.slot_policy)
        cycle, position = divmod(epoch, k)
        if self._round[0] != cycle:
            self._round = (cycle, cycle_order(self.seed, cycle, np.arange(n), k))
        return self._round[1][:, position]


class FreshCrops:
    """Each epoch, a new seeded random box and flip per image (ground-truth and online modes)."""

    def __init__(self, plan: CropPlan, heights, widths):
        self.plan, self.heights, self.widths = plan, heights, widths
        self.slots = None

    def fill(self, table: np.ndarray, epoch: int):
        plan = replace(self.plan, seed=self.plan.seed * 1_000_003 + epoch + 1, crops_per_image=1)
        ids = np.arange(len(self.heights))
        table[:, 0, :4] = sample_boxes(plan, ids, self.heights, self.widths)[:, 0]
        table[:, 0, 4] = sample_flips(plan, ids)[:, 0]
        table[:, 0, 5] = NOT_STORED


class FixedCrops:
    """The same crop every epoch: used for evaluation (the centred square of each image)."""

    def __init__(self, heights, widths):
        self.boxes = centre_square(heights, widths)
        self.slots = None

    def fill(self, table: np.ndarray, epoch: int):
        table[:, 0, :4] = self.boxes
        table[:, 0, 4] = 0
        table[:, 0, 5] = NOT_STORED


class CropBatches:
    """One epoch of an FFCV loader as :class:`.crop_batch.CropBatch` es (the loader contract),
    with each crop's stored label attached when ``records`` (the store's) are given.

    ``close()`` stops FFCV's decoding thread when an epoch is abandoned early (precise BN).
    """

    def __init__(self, epoch, records=None):
        self.epoch, self.records = epoch, records

    def __iter__(self):
        return self

    def __next__(self) -> CropBatch:
        images, rows = next(self.epoch)
        batch = batch_from_rows(images, rows)
        if self.records is None:
            return batch
        return batch._replace(targets=sparse_labels(self.records.topk_indices,
                                                    self.records.topk_probs, batch.indices,
                                                    batch.slots))

    def __len__(self):
        return len(self.epoch)

    def close(self):
        self.epoch.close()


class TableLoader(Loader):
    """An FFCV ``Loader`` over a crop table, yielding :class:`.crop_batch.CropBatch` es."""

    records = None  # the store's records, to attach each crop's stored label

    def __iter__(self):
        return CropBatches(super().__iter__(), self.records)


class CropLoader(TableLoader):
    """A :class:`TableLoader` whose crop table is refreshed from ``crops.fill`` before each epoch.

    FFCV starts decoding inside ``__iter__``, so the table must be written *before* calling the
    parent. Set ``next_epoch`` to resume at a given epoch.
    """

    def __init__(self, path, crops, table, **kwargs):
        self.crops, self.table = crops, table
        super().__init__(path, **kwargs)

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s crops on the next iteration (as ``StoreCropDataset.set_epoch``)."""
        self.next_epoch = int(epoch)

    def __iter__(self):
        self.crops.fill(self.table, self.next_epoch)
        return super().__iter__()


def _pipelines(table: np.ndarray, output_size) -> dict:
    """Image and label pipelines over one crop table: the decoder cuts its rows, the label op
    copies their slots into each sample's row."""
    return {"image": [PlannedCropDecoder(table, output_size), ToTensor()],
            "label": [IntDecoder(), WithIndexAndSlots(table), ToTensor()]}


def make_loader(dataset, crops, output_size, batch_size: int, num_workers: int = 2,
                train: bool = True, seed: int = 0, distributed: bool = False,
                indices=None, drop_last: bool = None) -> CropLoader:
    """A loader of one crop per image from ``crops``, yielding :class:`.crop_batch.CropBatch` es
    of uint8 NHWC crops."""
    table = np.zeros((dataset.num_images, 1, TABLE_FIELDS), dtype=np.int32)
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    return CropLoader(str(dataset.path), crops, table, batch_size=batch_size,
                      num_workers=usable_workers(num_workers), order=order, seed=seed,
                      drop_last=train if drop_last is None else drop_last,
                      distributed=distributed, indices=indices,
                      pipelines=_pipelines(table, output_size), batches_ahead=2)


def multi_crop_loader(dataset, table: np.ndarray, output_size, images_per_batch: int,
                      indices, num_workers: int = 2) -> TableLoader:
    """Sequential loader over ``indices`` yielding :class:`.crop_batch.CropBatch` es of all the
    table's crops per image, ``(B, S, H, W, 3)`` (``(B, H, W, 3)`` when S is 1)."""
    return TableLoader(str(dataset.path), batch_size=images_per_batch,
                       num_workers=usable_workers(num_workers), order=OrderOption.SEQUENTIAL,
                       indices=np.asarray(indices), drop_last=False,
                       pipelines=_pipelines(table, output_size), batches_ahead=2)


def replay_loader(store, data, batch_size: int, num_workers: int = 2, *, seed: int = 0,
                  slot_policy: str = DEFAULT_SLOT_POLICY, size: int = None,
                  distributed: bool = False, drop_last: bool = True, cache_dir=None) -> CropLoader:
    """The FFCV backend for any training loop: a store's crops replayed with their labels.

    Parameters
    ----------
    store : LabelStore or str
        The label store (or its location).
    data : str or os.PathLike
        Its data set: the ``.beton``, or the ImageFolder tree (converted once, cached).
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

    Returns
    -------
    CropLoader
        Iterating it yields :class:`~refinery_pipeline.CropBatch` es of uint8 ``(B, S, S, 3)``
        crops with :class:`~refinery_pipeline.SparseLabels` targets; epochs count from 0
        (``loader.set_epoch(e)`` picks one). Slot ``(epoch, n)`` is
        :func:`~refinery_pipeline.slot_of`'s, the same as in :class:`StoreCropDataset`.
    """
    from .dataset import open_dataset
    from .label_store import LabelStore
    store = store if isinstance(store, LabelStore) else LabelStore.open(store)
    store.require_complete()
    dataset = open_dataset(data, "train", cache_dir)
    store.check_matches(dataset.fingerprint())
    records = store.read_crops()
    crops = ReplayedCrops(records.boxes, records.flips, seed, slot_policy)
    size = size or store.refinery.input_size
    loader = make_loader(dataset, crops, (size, size), batch_size, num_workers, train=True,
                         seed=seed, distributed=distributed, drop_last=drop_last)
    loader.records = records
    return loader
