"""Claim: checking every chunk against its checksums while training reads a store costs little.

Builds a synthetic store through the real writer (``LabelStore.create`` + ``write_chunk``, random
arrays in the store's dtypes, probabilities sorted like a refinery's top-k), then times, in
interleaved rounds on the same warm store: the whole-store read training does without the check
(``read_crops(verify=False)``), the same read with it (``read_crops(verify=True)``, the default),
the hashing alone on one thread (``array_checksum`` over every chunk of arrays already in memory;
the checked read spreads it over up to 8 threads), the cheap checks on opening
(``require_intact``: layout, attribute digest, labels), and ``refine verify``'s chunk-by-chunk
pass (``verify_store``). The order of the cases is reversed every other round, so
neither read always comes first.

  python benchmarks/checksum_cost.py --images 1281167 -K 40 --top-k 10 --rounds 5 \\
      --tag checksum_cost_cpu
"""
import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import markdown_table, write_results

from refinery_pipeline.labelling.precompute import software_versions
from refinery_pipeline.store.encoding import array_checksum
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import StoreLayout, default_chunk_size
from refinery_pipeline.store.store_tools import verify_store

CLASSES = 1000


def make_store(path: Path, images: int, K: int, top_k: int) -> float:
    """Write the store chunk by chunk; returns the seconds it took."""
    layout = StoreLayout(images, K, top_k, default_chunk_size(K, top_k))
    attrs = {"plan": {"seed": 0, "crops_per_image": K, "scale": [0.08, 1.0],
                      "ratio": [0.75, 4 / 3], "flip": True},
             "refinery": {"arch": "resnet50", "weights_sha256": "0" * 64, "bn_mode": "train",
                          "temperature": 1.0, "input_size": 224,
                          "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
             "dataset": {"num_images": images, "classes": [str(c) for c in range(CLASSES)],
                         "image_bytes_sha256": "0" * 64, "labels_sha256": None},
             "batching": {"crop_batch": 512, "images_per_batch": 8},
             "software": software_versions()}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    store = LabelStore.create(path, layout, attrs, labels=rng.integers(0, CLASSES, images),
                              image_sizes=rng.integers(200, 500, (images, 2)))
    for c in range(layout.num_chunks):
        n = len(layout.chunk_range(c))
        mass = rng.exponential(1.0, (n, K, top_k)) ** 3  # a few confident classes per crop
        probs = -np.sort(-mass / (mass.sum(-1, keepdims=True) * 1.05), axis=-1)
        store.write_chunk(c, {"boxes": rng.integers(0, 500, (n, K, 4), dtype=np.uint16),
                              "flips": rng.integers(0, 2, (n, K), dtype=np.uint8),
                              "topk_indices": rng.integers(0, CLASSES, (n, K, top_k),
                                                           dtype=np.uint16),
                              "topk_probs": probs.astype(np.float16)})
    store.finalize()
    return time.perf_counter() - start


def hash_all(store: LabelStore, arrays: dict):
    """What the check adds to a read: every chunk's SHA-256 of every array read."""
    shapes = store.layout.shapes()
    for c in range(store.layout.num_chunks):
        rows = store.layout.chunk_range(c)
        for name, values in arrays.items():
            array_checksum(name, shapes[name][1], values[rows.start:rows.stop])


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=128117)
    p.add_argument("-K", type=int, default=40)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale-to", type=int, default=None,
                   help="also extrapolate the times linearly to this many images")
    p.add_argument("--dir", default=None, help="where to build the store [default: a temp dir]")
    p.add_argument("--tag", default="checksum_cost")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    path = work / "s.zarr"
    try:
        write_seconds = make_store(path, args.images, args.K, args.top_k)
        store_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        store = LabelStore.open(path)
        in_memory = store.read_crops(verify=False).arrays()
        cases = {
            "read for training, unchecked": lambda: LabelStore.open(
                path, check=False).read_crops(verify=False),
            "read for training, checked (default)": lambda: LabelStore.open(path).read_crops(),
            "hashing alone, one thread (arrays in memory)": lambda: hash_all(store, in_memory),
            "checks on opening (require_intact)": lambda: LabelStore.open(
                path, check=False).require_intact(),
            "refine verify (verify_store)": lambda: verify_store(path),
        }
        times = {name: [] for name in cases}
        for r in range(args.rounds):
            for name in list(cases)[::-1 if r % 2 else 1]:
                times[name].append(timed(cases[name]))
        del in_memory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scale = (args.scale_to or args.images) / args.images
    unchecked = statistics.median(times["read for training, unchecked"])
    rows = [{"case": name, "median_seconds": statistics.median(t), "all": t,
             "extrapolated_seconds": statistics.median(t) * scale,
             "relative_to_unchecked": statistics.median(t) / unchecked}
            for name, t in times.items()]
    crops = args.images * args.K
    result = {"args": vars(args), "store_bytes": store_bytes, "write_seconds": write_seconds,
              "crops": crops, "scale": scale, "software": software_versions(), "rows": rows}
    extrapolated = args.scale_to and args.scale_to != args.images
    lines = [f"# The cost of checking a label store's checksums while reading it: `{args.tag}`", "",
             f"{args.images:,} images × K={args.K} × top-{args.top_k} ({crops:,} crops, "
             f"{store_bytes / 1e6:,.0f} MB on disk, chunks of "
             f"{default_chunk_size(args.K, args.top_k)} "
             f"images), written through `LabelStore.create` + `write_chunk` in "
             f"{write_seconds:.0f} s; median of {args.rounds} interleaved rounds (order reversed "
             "every other round) on the same warm store (in the page cache), each opening the "
             "store anew.", ""]
    header = ["case", "seconds", "relative to unchecked read"]
    if extrapolated:
        header.insert(2, f"extrapolated to {args.scale_to:,} images (×{scale:.2f}, linear)")
    lines += markdown_table(header, [
        [r["case"], f"{r['median_seconds']:.2f}"]
        + ([f"{r['extrapolated_seconds']:.1f}"] if extrapolated else [])
        + [f"{r['relative_to_unchecked']:.2f}×"] for r in rows])
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
