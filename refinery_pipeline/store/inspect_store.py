"""``refine inspect``: what a label store holds, read from the store alone.

``refine show`` also decodes a few images' stored crops, which needs the loaders and the
labelling stage: that part lives above them, in :mod:`..labelling.shown_crops`.
"""
import numpy as np

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
