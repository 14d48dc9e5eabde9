"""Label the crops of one chunk: the crop table, the loader cutting it, the refinery's top-k.

One code path on every engine (this process, torchrun ranks, the Ray actors of
:mod:`.ray_engine`) and for every reader that relabels stored crops (``refine audit``,
``refine check-copy``): each loader batch's crops are cut by the replay loader's own decoder
(:func:`.replay.multi_crop_loader`), shuffled with a seed of (plan seed, chunk, first image) and
labelled in near-equal forward batches, so a crop's label is a function of the plan, the
refinery and its chunk alone. :mod:`.precompute` decides which chunks a process labels and
writes them.
"""
import functools

import numpy as np

from ..loaders.crop_batch import NOT_STORED, as_numpy_indices
from ..loaders.replay import TABLE_FIELDS, multi_crop_loader, usable_workers
from ..loaders.crop_table import crop_table
from ..plan.recipe import plan_augment
from ..loaders.recipe_ops import planned_crops
from ..plan.crop_plan import (CropPlan, boxes_at, centre_square, flips_at, sample_boxes,
                              sample_flips)


def build_crop_table(dataset, plan: CropPlan, ids: np.ndarray, soft_static: bool,
                     recipe=None) -> np.ndarray:
    """Crop table ``(N, K [+K] [+1], 7)`` for images ``ids``: the plan's boxes and flips; with a
    mixing ``recipe`` (:class:`.augment.PlanAugment`), then each slot's partner crop (m, j);
    last, the centred square when soft-static labels are wanted (same decode, ~1/K cost)."""
    K = plan.crops_per_image
    mixes = recipe is not None and recipe.recipe.mixes
    slots = K * (2 if mixes else 1) + int(soft_static)
    table = np.zeros((dataset.num_images, slots, TABLE_FIELDS), np.int32)
    h, w = dataset.heights[ids], dataset.widths[ids]
    table[ids, :K] = crop_table(sample_boxes(plan, ids, h, w), sample_flips(plan, ids))
    if mixes:  # partners of slots (n, k): their own boxes (m, j), cut from image m
        n, k = np.repeat(ids, K), np.tile(np.arange(K), len(ids))
        m, j = recipe.partners(n, k)
        boxes = boxes_at(plan, m, j, dataset.heights[m], dataset.widths[m])
        table[ids, K:2 * K] = crop_table(boxes.reshape(len(ids), K, 4),
                                         flips_at(plan, m, j).reshape(len(ids), K),
                                         j.reshape(len(ids), K), m.reshape(len(ids), K))
    if soft_static:
        table[ids, -1, :4] = centre_square(h, w)
        table[ids, -1, 5] = NOT_STORED
    return table


DEVICE_STAGING_BYTES = 2 << 30  # larger loader batches (big crops) are shuffled on the host


def label_loader_batch(refinery, images, crop_batch: int, top_k: int, seed: int, chunk: int,
                       start: int):
    """Top-k labels ``(B, S, k)`` for a loader batch of crops ``(B, S, H, W, 3)``.

    The B*S crops are shuffled with a seed of (plan seed, chunk, first image) and split into
    near-equal forward batches: every batch mixes images (train-mode BN needs that) and its
    composition never depends on rank count, resumption or timing. The loader batch goes to the
    device in one copy (asynchronous: FFCV pins its batch buffers when CUDA is present) and the
    shuffle is a gather there, so the host does not gather and re-pin every forward batch while
    FFCV's decoding threads need its cores; a batch over ``DEVICE_STAGING_BYTES`` (crops of
    ~300 px and more at 16k crops per batch) is gathered on the host instead, same labels.
    Results stay on the device until the whole loader batch is done: one host sync per loader
    batch, not per forward pass.
    """
    import torch
    if images.ndim == 4:  # one slot per image (K = 1): the decoder emits plain (B, H, W, 3) crops
        images = images[:, None]
    B, S = images.shape[:2]
    device = refinery.device
    crops = images.reshape((B * S,) + tuple(images.shape[2:]))
    order = torch.from_numpy(np.random.default_rng([seed, chunk, start]).permutation(B * S))
    if crops.nbytes <= DEVICE_STAGING_BYTES:
        crops, order = crops.to(device, non_blocking=True), order.to(device)
    indices, probs = [], []
    for part in torch.tensor_split(order, max(1, -(-(B * S) // crop_batch))):
        batch = crops.index_select(0, part)
        if batch.device != device and device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy to the device run asynchronously
        values, classes = refinery.probabilities(batch).topk(top_k, dim=1)
        indices.append(classes)
        probs.append(values)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(B * S, device=order.device))
    inverse = inverse.to(device)
    classes, values = torch.cat(indices)[inverse], torch.cat(probs)[inverse]
    return (classes.to(torch.int32).cpu().numpy().astype(np.uint16).reshape(B, S, top_k),
            values.cpu().numpy().astype(np.float16).reshape(B, S, top_k))


def padded_order(units, images_per_batch: int) -> np.ndarray:
    """Image ids of the loader batches ``units`` in order, each padded to ``images_per_batch``
    by repeating its last image: FFCV's batches all have one size, so the padding lines each
    loader batch up with one unit, whatever the chunk size. The repeats are decoded and
    dropped (none when the batch size divides the chunk size, as for powers of two)."""
    return np.concatenate([np.concatenate([np.arange(u.start, u.stop, dtype=np.int64),
                                           np.full(images_per_batch - len(u), u.stop - 1)])
                           for u in units])


class UnitLoader:
    """One FFCV loader over a crop table that yields any sequence of loader batches (units).

    FFCV compiles a loader's pipeline when the loader is made (seconds), so precompute keeps
    one loader and starts one pass per chunk: each pass sets the order it traverses (a subset
    of ``units``, the order it was made with, which bounds every pass) and reuses the batch
    buffers of the previous pass (pinned ones are costly to allocate on a GPU host).
    """

    def __init__(self, dataset, table, size, images_per_batch: int, units, num_workers: int,
                 recipe=None, crops_per_image: int = None):
        self.images_per_batch = images_per_batch
        self.recipe, self.crops_per_image = recipe, crops_per_image
        self.threads = usable_workers(num_workers)  # the recipe runs as wide as decoding
        self.loader = multi_crop_loader(dataset, table, size, images_per_batch,
                                        padded_order(units, images_per_batch), num_workers)
        graph = self.loader.graph  # safe to share: a pass is consumed whole before the next
        graph.allocate_memory = functools.lru_cache(maxsize=1)(graph.allocate_memory)

    def __call__(self, units):
        """Yield ``(unit, batch)`` per unit, the batch's images cut to the unit's images."""
        self.loader.traversal_order.indices = padded_order(units, self.images_per_batch)
        for batch, unit in zip(self.loader, units):  # loader first: its pass ends and closes
            index = as_numpy_indices(batch)[:len(unit)]
            assert index[0] == unit.start and index[-1] == unit.stop - 1, (index, unit)
            images = batch.images[:len(unit)]
            if self.recipe is not None:
                images = planned_crops(self.recipe, images, np.arange(unit.start, unit.stop),
                                       self.crops_per_image, self.threads)
            yield unit, images


class ChunkLabeller:
    """Labels whole chunks of one store, one at a time, the same way on every engine.

    Made once per process (the local path, a torchrun rank, a Ray actor) for the chunks it may
    be given: the crop table and the FFCV loader (compiled when made, seconds) cover those
    chunks, and each call labels one of them into a fresh chunk buffer. A chunk's labels are a
    function of (plan, refinery, chunk) alone, so which process labels it, and in which
    order, never changes the bytes written.
    """

    def __init__(self, dataset, layout, batching, refinery, plan: CropPlan, chunks,
                 num_workers: int):
        self.layout, self.batching, self.refinery, self.plan = layout, batching, refinery, plan
        ids = np.concatenate([np.arange(r.start, r.stop) for r in map(layout.chunk_range, chunks)])
        recipe = plan_augment(plan, dataset.num_images, refinery.input_size)
        self.table = build_crop_table(dataset, plan, ids, layout.soft_static, recipe)
        size = (refinery.input_size, refinery.input_size)
        self.loader = UnitLoader(dataset, self.table, size, batching.images_per_batch,
                                 [u for c in chunks for u in batching.units(layout, c)],
                                 num_workers, recipe, plan.crops_per_image)

    def __call__(self, c: int, on_batch=None):
        """Chunk ``c``'s records (``layout.empty_chunk``), labelled loader batch by loader batch;
        ``on_batch(crops)`` is called after each (progress, throughput)."""
        lay, K, table = self.layout, self.layout.crops_per_image, self.table
        buf = lay.empty_chunk(c)
        first = lay.chunk_range(c).start
        for unit, images in self.loader(self.batching.units(lay, c)):
            classes, probs = label_loader_batch(self.refinery, images, self.batching.crop_batch,
                                                lay.top_k, self.plan.seed, c, unit.start)
            local = slice(unit.start - first, unit.stop - first)
            index = np.arange(unit.start, unit.stop)
            buf.topk_indices[local], buf.topk_probs[local] = classes[:, :K], probs[:, :K]
            buf.boxes[local] = table[index, :K, :4]
            buf.flips[local] = table[index, :K, 4]
            if lay.soft_static:
                buf.static_indices[local], buf.static_probs[local] = classes[:, K], probs[:, K]
            if on_batch is not None:
                on_batch(len(unit) * K)
        return buf
