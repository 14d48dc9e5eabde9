"""``refine inspect`` and ``refine show``: what a label store holds.

``inspect`` reads the store alone; ``show`` also decodes a few images' stored crops through the
replay decoder, so the pixels shown are the ones the refinery labelled and a student is shown.
"""
from dataclasses import dataclass

import numpy as np

from ..core.errors import RefineryError, StoreMismatchError
from .label_store import LabelStore


def describe_store(location, cache_dir=None) -> dict:
    """What ``refine inspect`` prints: layout, plan, refinery, data set, size, labels, and
    ``beton``, the cached ``.beton`` holding the store's exact pixels (None when the cache holds
    no converted copy of its data: ``refinery.beton_path(DATA)`` makes and names one)."""
    from ..sources.data_cache import find_cached_beton
    store = LabelStore.open(location)
    lay, attrs = store.layout, store.attrs
    done = store.done_chunks()
    beton = find_cached_beton(attrs["dataset"], cache_dir)
    summary = {
        "location": str(location), "format_version": attrs["format_version"],
        "images": lay.num_images, "crops_per_image": lay.crops_per_image, "top_k": lay.top_k,
        "chunk_size": lay.chunk_size, "soft_static": lay.soft_static,
        "prob_bits": lay.prob_bits,  # probabilities are multiples of 2**-prob_bits (0: float16)
        "chunks_done": f"{int(done.sum())}/{len(done)}",
        "complete": bool(done.all()), "plan": attrs["plan"], "refinery": attrs["refinery"],
        "dataset": {k: v for k, v in attrs["dataset"].items() if k != "classes"},
        "classes": len(attrs["dataset"]["classes"]),
        "images_named": _naming(store),
        "beton": str(beton) if beton is not None else None,
        "batching": attrs.get("batching", {}),
        "software": attrs.get("software", {}),
    }
    size = store.nbytes_on_disk()
    if size:
        summary["bytes_on_disk"] = size
        summary["bytes_per_crop"] = round(size / (lay.num_images * lay.crops_per_image), 2)
    if done.any():
        summary["labels"] = label_statistics(store)
    return summary


def _naming(store: LabelStore) -> str:
    """How a copy of the data finds its labels: by key (a keyed store, format 5, and its
    source's kind) or by position (older stores, or images without names)."""
    kind = (store.dataset.source or {}).get("kind")
    made_from = f" from a {kind} source" if kind else ""
    if store.keyed:
        return (f"keyed{made_from}: any copy (another order, form or subset) is joined by "
                "image key")
    return (f"not keyed{made_from}: only the data set it was made from, in its order, finds "
            "its labels")


def label_statistics(store: LabelStore) -> dict:
    """Mean top-1 probability, mean top-k mass and agreement with ground truth (done chunks)."""
    rows = store.done_images()
    records = store.read_crops()
    idx, probs = records.topk_indices[rows], records.topk_probs[rows].astype(np.float64)
    gt = store.read_labels()[rows][:, None]
    return {"mean_top1_probability": round(float(probs[..., 0].mean()), 4),
            "mean_topk_mass": round(float(probs.sum(-1).mean()), 4),
            "top1_agrees_with_ground_truth": round(float((idx[..., 0] == gt).mean()), 4),
            "ground_truth_in_topk": round(float((idx == gt[..., None]).any(-1).mean()), 4)}


def format_summary(s: dict, indent: int = 0) -> str:
    lines = []
    for key, value in s.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(format_summary(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


@dataclass
class StoredCrops:
    """A sample of images' stored crops as the student sees them, with their stored labels."""

    images: np.ndarray        # (n,) image indices in the data set
    pixels: np.ndarray        # (n, K, H, W, 3) uint8 crops
    topk_indices: np.ndarray  # (n, K, k)
    topk_probs: np.ndarray    # (n, K, k) float32
    labels: np.ndarray        # (n,) ground truth
    classes: list


def compared_labels(location, crops: StoredCrops, reference) -> tuple:
    """Another store's labels ``(topk_indices, topk_probs)`` of the crops in ``crops`` (sampled
    from the store at ``reference``), e.g. a later generation's refinery on the same crops (the
    paper's Figs. 7-8). Its crops must be the same: same data set, plan and K."""
    other, base = LabelStore.open(location), LabelStore.open(reference)
    for what in ("plan", "dataset"):
        if other.attrs[what] != base.attrs[what]:
            raise StoreMismatchError(f"{location}: its {what} differs from {reference}'s, so its "
                                     "labels are of other crops; compare stores precomputed with "
                                     "the same --seed and -K on the same data")
    if not other.done_images()[crops.images].all():
        raise RefineryError(f"{location}: has not labelled all the images shown yet; finish "
                            "its precompute first")
    records = other.read_crops(crops.images)
    return records.topk_indices, records.topk_probs.astype(np.float32)


def sample_stored_crops(dataset, location, num_images: int = 6, seed: int = 0,
                        num_workers: int = 2) -> StoredCrops:
    """Decode ``num_images`` randomly chosen (finished) images' stored boxes and flips."""
    from ..labelling.chunk_labeller import build_crop_table
    from ..loaders.crop_table import TABLE_FIELDS, crop_table
    from ..loaders.recipe_ops import planned_crops
    from ..loaders.replay import multi_crop_loader
    from ..plan.recipe import plan_augment
    store = LabelStore.open(location)
    store.check_matches(dataset.fingerprint())
    done = np.flatnonzero(store.done_images())
    if len(done) == 0:
        raise RefineryError(f"{location}: no finished chunk yet; show it once precompute has "
                            "written one")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(done, min(num_images, len(done)), replace=False))
    records = store.read_crops(ids)
    size, K = store.refinery.input_size, store.layout.crops_per_image
    recipe = plan_augment(store.plan, dataset.num_images, size)
    if recipe is None:  # the stored boxes as they are
        table = np.zeros((dataset.num_images, K, TABLE_FIELDS), np.int32)
        table[ids] = crop_table(records.boxes, records.flips)
    else:  # partners too: the plan's boxes, which `refine verify` checks equal the stored ones
        table = build_crop_table(dataset, store.plan, ids, False, recipe)
    loader = multi_crop_loader(dataset, table, (size, size), len(ids), ids, num_workers)
    pixels = np.concatenate([(batch.images if recipe is None else
                              planned_crops(recipe, batch.images, batch.indices.numpy(), K)
                              ).numpy().copy() for batch in loader])
    pixels = pixels.reshape(len(ids), -1, size, size, 3)  # K = 1 comes without the slot axis
    return StoredCrops(ids, pixels, records.topk_indices, records.topk_probs.astype(np.float32),
                       store.read_labels(ids), store.classes)
