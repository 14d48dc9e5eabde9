"""``refine precompute``: label every planned crop once and write the label store chunk by chunk.

Data path: ``.beton`` -> :func:`replay.multi_crop_loader` (one decode per image, all K crops cut
by the same code the student's loader uses) -> seeded shuffle of the crops within each loader
batch (BatchNorm in train mode needs mixed batches) -> refinery forward -> top-k -> chunk buffer
-> store (data first, then the chunk's ``chunk_done`` flag).

Work is split by chunks: rank r of W handles chunks ``c % W == r`` and only chunks not yet done,
so a rerun of the same command resumes, and ranks never touch each other's chunks. Processes
sharing a store claim one chunk at a time (:class:`ChunkClaims`), so any number of them split
its chunks. :class:`.chunk_labeller.ChunkLabeller` labels one chunk, the same code on every
engine (this process, torchrun ranks, the Ray actors of :mod:`.ray_engine`). Loader batches
never straddle chunks (:meth:`.Batching.units`) and each batch's composition is a function of
(seed, chunk, batch start), so the labels do not depend on the rank or process count, the
engine, the chunk size's divisors, or interruptions.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.distributed import barrier, init_from_env, is_main
from ..core.errors import DataSetError, RefineryError, StoreMismatchError
from ..core.object_storage import is_remote
from ..core.progress import progress_bar
from ..plan.crop_plan import CropPlan
from ..store.label_store import LabelStore
from ..store.remote_storage import chunk_marker
from ..store.schema import (DEFAULT_PROB_BITS, DEFAULT_TOP_K, Batching, StoreLayout,
                            default_chunk_size)
from .chunk_labeller import ChunkLabeller


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
