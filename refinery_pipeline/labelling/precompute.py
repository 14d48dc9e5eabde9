"""``refine precompute``: label every planned crop once and write the label store chunk by chunk.

Data path: ``.beton`` -> :func:`replay.multi_crop_loader` (one decode per image, all K crops cut
by the same code the student's loader uses) -> seeded shuffle of the crops within each loader
batch (BatchNorm in train mode needs mixed batches) -> refinery forward -> top-k -> chunk buffer
-> store (data first, then the chunk's ``chunk_done`` flag).

Work is split by chunks: rank r of W handles chunks ``c % W == r`` and only chunks not yet done,
so a rerun of the same command resumes, and ranks never touch each other's chunks. Processes
sharing a store claim one chunk at a time (:class:`ChunkClaims`), so any number of them split
its chunks. :class:`ChunkLabeller` labels one chunk, the same code on every engine (this
process, torchrun ranks, the Ray actors of :mod:`.ray_engine`). Loader batches never straddle
chunks (:meth:`.Batching.units`) and each batch's composition is a function of (seed, chunk,
batch start), so the labels do not depend on the rank or process count, the engine, the chunk
size's divisors, or interruptions.
"""
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.distributed import barrier, init_from_env, is_main
from ..core.errors import DataSetError, RefineryError, StoreMismatchError
from ..core.progress import progress_bar
from ..loaders.crop_batch import NOT_STORED, as_numpy_indices
from ..loaders.crop_table import TABLE_FIELDS, crop_table
from ..loaders.recipe_ops import planned_crops
from ..loaders.replay import multi_crop_loader, usable_workers
from ..plan.crop_plan import (CropPlan, boxes_at, centre_square, flips_at, sample_boxes,
                              sample_flips)
from ..plan.recipe import plan_augment
from ..store.label_store import (DEFAULT_PROB_BITS, DEFAULT_TOP_K, Batching, LabelStore,
                                 StoreLayout, default_chunk_size)
from ..store.remote_storage import chunk_marker, is_remote


@dataclass
class PrecomputeSummary:
    crops: int = 0
    seconds: float = 0.0
    chunks_written: int = 0
    chunks_skipped: int = 0
    warmup_seconds: float = 0.0  # start until the first loader batch is labelled (compilation)
    warmup_crops: int = 0
    chunks_claimed_elsewhere: int = 0  # being written by another process on this host
    store_bytes: int = 0
    bytes_per_crop: float = 0.0

    @property
    def crops_per_second(self) -> float:
        return self.crops / self.seconds if self.seconds else 0.0

    @property
    def steady_crops_per_second(self) -> float:
        """Throughput after the first loader batch, i.e. without one-off compilation."""
        seconds = self.seconds - self.warmup_seconds
        return (self.crops - self.warmup_crops) / seconds if seconds > 0 else 0.0


def software_versions() -> dict:
    import numcodecs
    import torch
    import torchvision
    import zarr
    return {"refinery": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__}


def store_attributes(dataset, refinery, plan: CropPlan, batching: Batching) -> dict:
    return {"plan": plan.to_dict(), "refinery": refinery.describe(),
            "dataset": {**dataset.fingerprint(), "source": dataset.source()},
            "batching": batching.__dict__, "software": software_versions()}


def check_options(location, plan: CropPlan, top_k: int, crop_batch: int, chunk_size=None):
    """Refuse counts that cannot describe a store, before anything is created or computed.

    The CLI's option types check ranges too; this keeps the library's own callers (and any
    front end) from writing a store that later commands cannot read.
    """
    for option, value in (("--crops-per-image/-K", plan.crops_per_image), ("--top-k", top_k),
                          ("--batch-size", crop_batch), ("--chunk-size", chunk_size)):
        if value is None and option == "--chunk-size":
            continue  # the default chunking
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise RefineryError(f"{location}: {option} must be a whole number >= 1 (got "
                                f"{value!r}); pass a positive {option.split('/')[0]}")


def check_same_images(store: LabelStore, dataset):
    """A resumed store goes on with the images it was made from, by name too: the same kind
    of source and, where the store is keyed, the same keys in the same order (the fingerprint
    compared the bytes and labels already)."""
    recorded, ours = store.dataset.source or {}, dataset.source() or {}
    if recorded.get("kind") != ours.get("kind"):
        raise StoreMismatchError(f"{store.location}: made from a {recorded.get('kind')} source, "
                                 f"and this data is a {ours.get('kind')} source; resume with the "
                                 "data the store was made from, or write a new store")
    if store.keyed and store.read_keys() != dataset.keys():
        raise StoreMismatchError(f"{store.location}: its images are named otherwise than this "
                                 "data's (the same bytes under other keys); resume with the data "
                                 "the store was made from, or write a new store")


def check_labelled(dataset):
    """Refuse images without classes before anything is created: a store records each image's
    class as its ground truth."""
    if not dataset.has_labels:
        raise DataSetError(f"{dataset.path}: its images have no classes (converted from a "
                           "source without labels), and a label store records each image's "
                           "class; precompute from the data with its classes: class folders, "
                           "a CSV with a label column, shards with cls members, or a table "
                           "with a label column")


def open_or_create_store(location, dataset, refinery, plan: CropPlan, top_k: int,
                         crop_batch: int, chunk_size: int = None,
                         soft_static: bool = False,
                         prob_bits: int = DEFAULT_PROB_BITS) -> LabelStore:
    """Create the store, or reopen it to resume after checking it was made for this very run.

    A store another process created first (the loser of a creation race) is checked the same
    way as one found on disk."""
    check_options(location, plan, top_k, crop_batch, chunk_size)
    layout = StoreLayout(dataset.num_images, plan.crops_per_image, top_k,
                         chunk_size if chunk_size is not None
                         else default_chunk_size(plan.crops_per_image, top_k), soft_static,
                         prob_bits)
    store = LabelStore.open_to_extend(location)
    if store is not None:
        layout.chunk_size = store.layout.chunk_size  # a resume keeps the store's chunking
    attrs = store_attributes(dataset, refinery, plan, Batching.for_layout(layout, crop_batch))
    if store is None:
        store = LabelStore.create(location, layout, attrs, labels=dataset.labels,
                                  image_sizes=np.stack([dataset.heights, dataset.widths], -1),
                                  keys=dataset.keys(), digests=dataset.image_digests())
    store.check_matches(attrs["dataset"], plan=attrs["plan"], refinery=attrs["refinery"])
    check_same_images(store, dataset)
    for key in ("top_k", "crops_per_image", "soft_static", "prob_bits"):
        if getattr(store.layout, key) != getattr(layout, key):
            raise StoreMismatchError(f"{location}: {key} mismatch (store: "
                                     f"{getattr(store.layout, key)}, this run: "
                                     f"{getattr(layout, key)}); use the store's settings or a new "
                                     "store")
    if store.attrs["batching"]["crop_batch"] != crop_batch:
        raise StoreMismatchError(f"{location}: batch size mismatch (store: "
                                 f"{store.attrs['batching']['crop_batch']}, this run: {crop_batch})"
                                 f"; resume with --batch-size {store.attrs['batching']['crop_batch']}"
                                 " (batch composition shapes train-mode BN labels)")
    return store


class ChunkClaims:
    """Cooperative chunk locks for several processes (or Ray actors) writing one store.

    Local stores: ``flock``-based lock files beside the store (``<store>.locks/``), never inside
    it, which the kernel drops when a process dies, even by ``kill -9``. Object stores have no
    locks: there a claim is a create-only marker object with an owner and an expiry
    (:func:`.remote_storage.chunk_marker`), which a dead writer holds until it expires. Each
    process claims one chunk at a time, just before labelling it, and releases it once
    written, so N processes started together split the chunks. A chunk claimed by another
    process is skipped; rerunning after it finishes (or dies) picks up whatever is left.
    ``owner`` names the claimant on an object store (default: this process): the actors of one
    Ray run share their driver's, so an actor restarted after a crash takes its chunk back.
    """

    def __init__(self, location, owner: str = None):
        self.locks, self.location, self.owner = {}, location, owner
        self.remote = is_remote(location)
        self.directory = None if self.remote else Path(str(location) + ".locks")

    def claim(self, c: int) -> bool:
        if self.remote:
            marker = chunk_marker(self.location, c, self.owner)
            if not marker.claim():
                return False
            self.locks[c] = marker
            return True
        from filelock import FileLock, Timeout
        self.directory.mkdir(exist_ok=True)
        lock = FileLock(str(self.directory / f"{c}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self.locks[c] = lock
        return True

    def claim_unfinished(self, c: int, store: LabelStore) -> bool:
        """Claim chunk ``c`` if no other process holds it and none has finished it meanwhile
        (re-read after claiming: a flag set before our claim is always seen)."""
        if not self.claim(c):
            return False
        if store.chunk_done(c):
            self.release(c)
            return False
        return True

    def release(self, c: int):
        lock = self.locks.pop(c, None)
        if lock is not None:
            lock.release()

    def release_all(self):
        for c in list(self.locks):
            self.release(c)


def build_crop_table(dataset, plan: CropPlan, ids: np.ndarray, soft_static: bool,
                     recipe=None) -> np.ndarray:
    """Crop table ``(N, K [+K] [+1], 7)`` for images ``ids``: the plan's boxes and flips; with a
    mixing ``recipe`` (:class:`..plan.recipe.PlanAugment`), then each slot's partner crop (m, j);
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


def precompute(dataset, location, refinery, plan: CropPlan, top_k: int = DEFAULT_TOP_K,
               crop_batch: int = 512, chunk_size: int = None, num_workers: int = 2,
               progress: bool = True, soft_static: bool = False,
               only_chunks=None, prob_bits: int = DEFAULT_PROB_BITS,
               ray_options=None) -> PrecomputeSummary:
    """Fill the label store at ``location`` (creating or resuming it); see the module docstring.

    ``top_k`` is capped at the number of classes (top-5 of a 2-class problem stores 2).
    ``only_chunks`` restricts this call to some chunks (benchmarks, manual sharding); the store
    stays resumable and completes when a later call covers the rest. ``prob_bits``: probabilities
    are stored as multiples of ``2**-prob_bits`` (0: unrounded float16; see ``label_store``).
    ``ray_options`` (a :class:`.ray_engine.RayOptions`): label on a pool of Ray actors instead
    of this process (or these torchrun ranks); the same store, byte for byte.
    """
    if ray_options is not None:
        from .ray_engine import precompute_on_ray
        return precompute_on_ray(dataset, location, refinery, plan, top_k, crop_batch,
                                 chunk_size, num_workers, progress, soft_static, only_chunks,
                                 prob_bits, ray_options)
    check_options(location, plan, top_k, crop_batch, chunk_size)  # before anything is created
    check_labelled(dataset)
    top_k = min(top_k, len(dataset.classes))
    rank, world = init_from_env(refinery.device)
    args = (location, dataset, refinery, plan, top_k, crop_batch, chunk_size, soft_static,
            prob_bits)
    store = open_or_create_store(*args) if is_main() else None
    barrier()  # rank 0 creates; the others open what it made
    store = store or open_or_create_store(*args)
    lay = store.layout
    done = store.done_chunks()
    wanted = range(lay.num_chunks) if only_chunks is None else only_chunks
    todo = [c for c in wanted if c % world == rank and not done[c]]
    summary = PrecomputeSummary(chunks_skipped=int(done.sum()))
    start_time = time.perf_counter()
    claims = ChunkClaims(location)
    try:
        if todo:
            _run_chunks(dataset, store, refinery, plan, todo, claims, num_workers,
                        progress and is_main(), summary)
    finally:
        claims.release_all()
    barrier()
    summary.seconds = time.perf_counter() - start_time
    if is_main():
        store.finalize()
        summary.store_bytes = store.nbytes_on_disk()
        total = lay.num_images * lay.crops_per_image
        summary.bytes_per_crop = summary.store_bytes / total if summary.store_bytes else 0.0
    return summary


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


def _run_chunks(dataset, store, refinery, plan, chunks, claims, num_workers, show, summary):
    """Label ``chunks`` one at a time: claim, label, write (overlapping the next chunk), release.

    A chunk another process holds or finished meanwhile is skipped. The loader decodes only
    claimed chunks, so processes sharing a store share the decoding too.
    """
    started = time.perf_counter()
    lay = store.layout
    label_chunk = ChunkLabeller(dataset, lay, store.batching, refinery, plan, chunks,
                                num_workers)
    K = lay.crops_per_image
    total = sum(len(lay.chunk_range(c)) for c in chunks) * K
    bar = progress_bar(total=total, enabled=show, unit="crop", unit_scale=True,
                       desc="labelling crops", smoothing=0.05)

    def labelled(crops: int):
        summary.crops += crops
        if not summary.warmup_crops:
            summary.warmup_crops = summary.crops
            summary.warmup_seconds = time.perf_counter() - started
        bar.update(crops)

    # the bar closes (ending its line) even when a write fails; writes overlap the next chunk
    with bar, ThreadPoolExecutor(max_workers=1) as writer:
        writes = {}  # chunk -> its write, released (from this thread) once done
        for c in chunks:
            for w in [w for w in writes if writes[w].done()]:
                writes.pop(w).result()  # surface write errors
                claims.release(w)
            if not claims.claim_unfinished(c, store):
                summary.chunks_claimed_elsewhere += 1
                bar.total -= len(lay.chunk_range(c)) * K
                continue
            writes[c] = writer.submit(store.write_chunk, c, label_chunk(c, labelled))
            summary.chunks_written += 1
        for c, w in writes.items():
            w.result()
