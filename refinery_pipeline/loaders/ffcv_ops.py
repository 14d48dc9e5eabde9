"""The FFCV pipeline operations of the one pixel path: decode -> crop a planned box -> resize ->
optional flip.

Precompute and training both run :class:`PlannedCropDecoder`, so a stored label describes exactly
the pixels the student is later shown (the test suite asserts byte equality). It reads its boxes
from a crop table (:mod:`.crop_table`), and :class:`WithIndexAndSlots` copies each sample's slots
from the same table into its batch row (:class:`.crop_batch.CropBatch`).

numba freezes small captured arrays into compiled code, so the table is reached through its raw
address (``carray`` over an ``inttoptr``), never captured as an array; the loader keeps it alive
and only ever writes it in place.
"""
from dataclasses import replace
from typing import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import types
from numba.extending import intrinsic

from .crop_table import TABLE_FIELDS


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
