"""``refine precompute``: label every planned crop once and write the label store chunk by chunk.

Data path: ``.beton`` -> :func:`replay.multi_crop_loader` (one decode per image, all K crops cut
by the same code the student's loader uses) -> seeded shuffle of the crops within each loader
batch (BatchNorm in train mode needs mixed batches) -> refinery forward -> top-k -> chunk buffer
-> store (data first, then the chunk's ``chunk_done`` flag).

Work is split by chunks: rank r of W handles chunks ``c % W == r`` and only chunks not yet done,
so a rerun of the same command resumes, and ranks never touch each other's chunks. Batches never
straddle chunks and each batch's composition is a function of (seed, chunk, batch start), so the
labels do not depend on the rank count or on interruptions.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .crop_plan import CropPlan, sample_boxes, sample_flips
from .distributed import barrier, init_from_env, is_main
from .label_store import LabelStore, StoreLayout, default_chunk_size
from .replay import crop_table, multi_crop_loader


@dataclass
class PrecomputeSummary:
    crops: int = 0
    seconds: float = 0.0
    chunks_written: int = 0
    chunks_skipped: int = 0
    store_bytes: int = 0
    bytes_per_crop: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def crops_per_second(self) -> float:
        return self.crops / self.seconds if self.seconds else 0.0


def software_versions() -> dict:
    import numcodecs, torch, torchvision, zarr
    return {"refinery": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__}


def store_attributes(dataset, refinery, plan: CropPlan) -> dict:
    return {"plan": plan.to_dict(), "refinery": refinery.describe(),
            "dataset": dataset.fingerprint(), "software": software_versions()}


def open_or_create_store(location, dataset, refinery, plan: CropPlan, top_k: int,
                         chunk_size: int = None) -> LabelStore:
    """Create the store, or reopen it to resume after checking it was made for this very run."""
    from pathlib import Path
    attrs = store_attributes(dataset, refinery, plan)
    if "://" not in str(location) and Path(location).exists():
        store = LabelStore.open(location, mode="r+")
        store.check_matches(attrs["dataset"], plan=attrs["plan"], refinery=attrs["refinery"])
        lay = store.layout
        expected = {"top_k": top_k, "crops_per_image": plan.crops_per_image}
        for key, value in expected.items():
            if getattr(lay, key) != value:
                from .errors import StoreMismatchError
                raise StoreMismatchError(f"{location}: {key} mismatch (store: {getattr(lay, key)}, "
                                         f"this run: {value}); use the store's settings or a new "
                                         "store")
        return store
    layout = StoreLayout(dataset.num_images, plan.crops_per_image, top_k,
                         chunk_size or default_chunk_size(plan.crops_per_image))
    return LabelStore.create(location, layout, attrs, labels=dataset.labels)


def images_per_loader_batch(chunk_size: int, crop_batch: int, crops_per_image: int) -> int:
    """A power of two that divides the chunk size, holding about one crop batch per slot."""
    target = max(1, min(crop_batch, 16384 // crops_per_image, chunk_size))
    return 1 << (target.bit_length() - 1)


def label_crops(refinery, crops: np.ndarray, crop_batch: int, top_k: int, seed: int,
                chunk: int, start: int):
    """Label ``crops`` (M, H, W, 3) in seeded random batches; return labels in input order."""
    import torch
    order = np.random.default_rng([seed, chunk, start]).permutation(len(crops))
    indices = np.empty((len(crops), top_k), np.uint16)
    probs = np.empty((len(crops), top_k), np.float16)
    for part in np.array_split(order, max(1, -(-len(crops) // crop_batch))):
        indices[part], probs[part] = refinery.top_k(torch.from_numpy(crops[part]), top_k)
    return indices, probs


def precompute(dataset, location, refinery, plan: CropPlan, top_k: int = 5,
               crop_batch: int = 512, chunk_size: int = None, num_workers: int = 2,
               progress: bool = True) -> PrecomputeSummary:
    """Fill the label store at ``location`` (creating or resuming it); see the module docstring.

    ``top_k`` is capped at the number of classes (top-5 of a 2-class problem stores 2).
    """
    from tqdm import tqdm

    top_k = min(top_k, len(dataset.classes))

    rank, world = init_from_env(refinery.device)
    if is_main():
        store = open_or_create_store(location, dataset, refinery, plan, top_k, chunk_size)
    barrier()
    if not is_main():
        store = open_or_create_store(location, dataset, refinery, plan, top_k, chunk_size)
    lay = store.layout
    done = store.done_chunks()
    mine = [c for c in range(lay.num_chunks) if c % world == rank and not done[c]]
    summary = PrecomputeSummary(chunks_skipped=int(done.sum()))
    start_time = time.perf_counter()
    if mine:
        _run_chunks(dataset, store, refinery, plan, mine, crop_batch, num_workers,
                    progress and is_main(), summary, tqdm)
    barrier()
    summary.seconds = time.perf_counter() - start_time
    if is_main():
        store.finalize()
        summary.store_bytes = store.nbytes_on_disk()
        total = lay.num_images * lay.crops_per_image
        summary.bytes_per_crop = summary.store_bytes / total if summary.store_bytes else 0.0
    return summary


def _run_chunks(dataset, store, refinery, plan, chunks, crop_batch, num_workers, show, summary,
                tqdm):
    lay = store.layout
    ids = np.concatenate([np.arange(r.start, r.stop) for r in map(lay.chunk_range, chunks)])
    table = np.zeros((dataset.num_images, plan.crops_per_image, 5), np.int32)
    boxes = sample_boxes(plan, ids, dataset.heights[ids], dataset.widths[ids])
    flips = sample_flips(plan, ids)
    table[ids] = crop_table(boxes, flips)
    per_batch = images_per_loader_batch(lay.chunk_size, crop_batch, plan.crops_per_image)
    size = (refinery.input_size, refinery.input_size)
    loader = multi_crop_loader(dataset, table, size, per_batch, ids, num_workers)
    pending = {}  # chunk -> buffers being filled
    bar = tqdm(total=len(ids) * plan.crops_per_image, unit="crop", unit_scale=True,
               disable=not show, desc="labelling crops", smoothing=0.05)
    with ThreadPoolExecutor(max_workers=1) as writer:
        writes = []
        for images, rows in loader:
            index = rows[:, 1].numpy()
            c = int(index[0]) // lay.chunk_size
            B, K = images.shape[:2]
            crops = images.numpy().reshape((B * K,) + tuple(images.shape[2:]))
            top_idx, top_p = label_crops(refinery, crops, crop_batch, lay.top_k, plan.seed, c,
                                         int(index[0]))
            buf = pending.setdefault(c, _chunk_buffers(lay, c))
            local = index - lay.chunk_range(c).start
            buf["topk_indices"][local] = top_idx.reshape(B, K, -1)
            buf["topk_probs"][local] = top_p.reshape(B, K, -1)
            buf["boxes"][local] = table[index, :, :4]
            buf["flips"][local] = table[index, :, 4]
            buf["filled"] += B
            if buf["filled"] == len(lay.chunk_range(c)):
                writes.append(writer.submit(store.write_chunk, c, pending.pop(c)))
                summary.chunks_written += 1
            summary.crops += B * K
            bar.update(B * K)
        for w in writes:
            w.result()  # surface write errors
    bar.close()


def _chunk_buffers(lay: StoreLayout, c: int) -> dict:
    n = len(lay.chunk_range(c))
    return {"boxes": np.zeros((n, lay.crops_per_image, 4), np.uint16),
            "flips": np.zeros((n, lay.crops_per_image), np.uint8),
            "topk_indices": np.zeros((n, lay.crops_per_image, lay.top_k), np.uint16),
            "topk_probs": np.zeros((n, lay.crops_per_image, lay.top_k), np.float16),
            "filled": 0}
