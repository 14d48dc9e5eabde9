"""How ``store_v2.zarr`` was made: run once with the format-2 writer (refinery at commit 987f28f,
``python3 tests/data/make_store_v2.py``). Later writers make newer formats, so the checked-in
store, not this script, is the fixture; tests/test_store_encoding.py checks it still reads to
exactly these values."""
import sys
from pathlib import Path

import numpy as np

from refinery_pipeline.plan.crop_plan import CropPlan, sample_boxes, sample_flips
from refinery_pipeline.store.encoding import values_sha256
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import FORMAT_VERSION, CropRecords, StoreLayout

N, K, TOP_K, CLASSES, CHUNK = 10, 3, 4, ["a", "b", "c", "d", "e", "f"], 4


def expected_values():
    """Boxes and flips drawn by the plan (so verify's redraw check holds); labels whose
    probabilities use every float16 mantissa bit, so a reader that rounded them would show."""
    plan = CropPlan(seed=3, crops_per_image=K)
    ids = np.arange(N)
    heights, widths = 40 + ids, 50 + 2 * ids
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, K, len(CLASSES)))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :TOP_K]
    static = np.argsort(-probs[:, 0], axis=-1, kind="stable")[:, :TOP_K]
    return plan, {
        "boxes": sample_boxes(plan, ids, heights, widths).astype(np.uint16),
        "flips": sample_flips(plan, ids).astype(np.uint8),
        "topk_indices": order.astype(np.uint16),
        "topk_probs": np.take_along_axis(probs, order, -1).astype(np.float16),
        "static_indices": static.astype(np.uint16),
        "static_probs": np.take_along_axis(probs[:, 0], static, -1).astype(np.float16),
    }, np.stack([heights, widths], -1), ids % len(CLASSES)


def main(path):
    assert FORMAT_VERSION == 2, "run with the format-2 writer"
    plan, arrays, sizes, labels = expected_values()
    layout = StoreLayout(N, K, TOP_K, CHUNK, soft_static=True)
    attrs = {"plan": plan.to_dict(),
             "refinery": {"arch": "resnet18", "weights_sha256": "0" * 64, "bn_mode": "eval",
                          "temperature": 1.0, "input_size": 32,
                          "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
             "dataset": {"num_images": N, "classes": CLASSES, "image_bytes_sha256": "1" * 64,
                         "labels_sha256": values_sha256(labels.astype(np.int64)),
                         "source": None},
             "batching": {"crop_batch": 8, "images_per_batch": 4},
             "software": {"refinery": "0.1.0"}}
    store = LabelStore.create(path, layout, attrs, labels=labels, image_sizes=sizes)
    for c in range(layout.num_chunks):
        rows = layout.chunk_range(c)
        store.write_chunk(c, CropRecords(**{k: v[rows.start:rows.stop] for k, v in arrays.items()}))
    store.finalize()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "store_v2.zarr")
