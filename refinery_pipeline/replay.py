"""The one pixel path: FFCV decode -> crop a planned box -> resize -> optional flip.

Precompute and training both run :class:`PlannedCropDecoder`, so a stored label describes exactly
the pixels the student is later shown (the test suite asserts byte equality).

The decoder reads its boxes from a *crop table*, an int32 array ``(N, S, 5)`` of
``(y, x, h, w, flip)`` per image and slot:

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

from .crop_plan import (DEFAULT_SLOT_POLICY, CropPlan, centre_square, epoch_slots, sample_boxes,
                        sample_flips)
from .errors import RefineryWarning

TABLE_FIELDS = 5  # y, x, h, w, flip


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


def crop_table(boxes: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Pack boxes ``(N, S, 4)`` and flips ``(N, S)`` into a C-contiguous int32 table ``(N, S, 5)``."""
    return np.ascontiguousarray(np.concatenate(
        [boxes.astype(np.int32), flips.astype(np.int32)[..., None]], axis=-1))


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


class WithSampleIndex(Operation):
    """Label-side op: turn each integer label into ``[label, sample index]`` (int64)."""

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()

        def with_index(labels, destination, indices):
            for i in my_range(labels.shape[0]):
                destination[i, 0] = labels[i, 0] if labels.ndim == 2 else labels[i]
                destination[i, 1] = indices[i]
            return destination[:labels.shape[0]]

        with_index.is_parallel = True
        with_index.with_indices = True
        return with_index

    def declare_state_and_memory(self, previous_state):
        return (replace(previous_state, jit_mode=True, shape=(2,), dtype=np.dtype("int64")),
                AllocationQuery((2,), np.dtype("int64")))


# --------------------------------------------------------------------------- per-epoch crop sources

class ReplayedCrops:
    """Each epoch, every image replays one of its stored slots (chosen by ``slot_policy``)."""

    def __init__(self, boxes, flips, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY):
        self.boxes, self.flips = boxes, flips
        self.seed, self.slot_policy = seed, slot_policy
        self.slots = np.zeros(len(boxes), dtype=np.int64)
        self.fills = 0  # bumped whenever ``slots`` changes, so copies of it know to refresh

    def fill(self, table: np.ndarray, epoch: int):
        n, k = self.boxes.shape[:2]
        self.slots[:] = epoch_slots(self.seed, epoch, n, k, self.slot_policy)
        self.fills += 1
        rows = np.arange(n)
        table[:, 0, :4] = self.boxes[rows, self.slots]
        table[:, 0, 4] = self.flips[rows, self.slots]


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


class FixedCrops:
    """The same crop every epoch: used for evaluation (the centred square of each image)."""

    def __init__(self, heights, widths):
        self.boxes = centre_square(heights, widths)
        self.slots = None

    def fill(self, table: np.ndarray, epoch: int):
        table[:, 0, :4] = self.boxes
        table[:, 0, 4] = 0


class CropLoader(Loader):
    """An FFCV ``Loader`` whose crop table is refreshed from ``crops.fill`` before each epoch.

    FFCV starts decoding inside ``__iter__``, so the table must be written *before* calling the
    parent. Set ``next_epoch`` to resume at a given epoch.
    """

    def __init__(self, path, crops, table, **kwargs):
        self.crops, self.table = crops, table
        super().__init__(path, **kwargs)

    def __iter__(self):
        self.crops.fill(self.table, self.next_epoch)
        return super().__iter__()


def make_loader(dataset, crops, output_size, batch_size: int, num_workers: int = 2,
                train: bool = True, seed: int = 0, distributed: bool = False,
                indices=None) -> CropLoader:
    """A loader yielding ``(uint8 NHWC crops, int64 [label, index] rows)`` for ``crops``."""
    table = np.zeros((dataset.num_images, 1, TABLE_FIELDS), dtype=np.int32)
    pipelines = {
        "image": [PlannedCropDecoder(table, output_size), ToTensor()],
        "label": [IntDecoder(), WithSampleIndex(), ToTensor()],
    }
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    return CropLoader(str(dataset.path), crops, table, batch_size=batch_size,
                      num_workers=usable_workers(num_workers), order=order, seed=seed,
                      drop_last=train,
                      distributed=distributed, indices=indices, pipelines=pipelines,
                      batches_ahead=2)


def multi_crop_loader(dataset, table: np.ndarray, output_size, images_per_batch: int,
                      indices, num_workers: int = 2) -> Loader:
    """Sequential loader over ``indices`` yielding ``(B, K, H, W, 3)`` crops of the full plan."""
    pipelines = {
        "image": [PlannedCropDecoder(table, output_size), ToTensor()],
        "label": [IntDecoder(), WithSampleIndex(), ToTensor()],
    }
    return Loader(str(dataset.path), batch_size=images_per_batch,
                  num_workers=usable_workers(num_workers),
                  order=OrderOption.SEQUENTIAL, indices=np.asarray(indices), drop_last=False,
                  pipelines=pipelines, batches_ahead=2)
