"""Claim: bytes per crop of the same labels (same crops, same top-k) in our store and in the
anchors' own record formats, side by side in one run; and what each encoding choice of ours
costs or saves.

From each store given (``--stores``; ``--top-k`` also measures the first k ranks of a store, the
same labels a top-k store of the same refinery and plan holds) it writes and measures:

* **ours as written**: the store itself, array by array (indices, probabilities, boxes, flips,
  checksums and flags, labels and image sizes, ``zarr.json`` metadata);
* **ours, rewritten** through the real writer (``LabelStore.create`` + ``write_chunk``, the
  current format) at several ``prob_bits`` (probabilities as multiples of 2^-bits, still float16);
* **FKD** (szq0214/FKD, ``FKD/FKD_SLG/generate_soft_label.py`` with ``--use_fp16``): one
  ``torch.save`` file per image of ``[np.float16(coords), flip_status, np.float16(output)]``,
  coords the ``(i/H, j/W, h/H, w/W)`` fractions of ``FKD/FKD_SLG/utils.py``
  (``RandomResizedCropWithCoords``), flips numpy bool, output ``(K, 2, k)``: indices stacked on
  values (``label_quantization``), both fp16. Boxes come back lossy: the largest error in pixels is
  reported;
* **TinyViT** (microsoft/Cream, ``TinyViT/data/augmentation/dataset_wrapper.py`` and
  ``manager.py``): per epoch a ``rank0-values.bin`` of fixed records ``int32 seed + k int16
  indices + k fp16 values`` and a ``rank0-keys.txt`` (one key per line; the default key is the
  image index). A seed replaces box and flip: TinyViT replays its augmentation RNG;
* **ImageNet+** (apple/ml-dr, ``reinforce.py`` with ``configs/imagenet/reinforce/cropflip.yaml``:
  ``compress``, ``gzip``): one ``torch.save((id, [{"params": [(i, j, h, w), flip], "prob":
  (values, ids)}, ...]), pickle_protocol=4)`` file per image (``dr/utils.py`` ``sparsify``: Python
  floats and ints), the directory then ``tar czf``'d.

The anchors get our float16 values widened to their types, so their float32 files compress at
least as well as they would with a refinery's float32 outputs.

``--codecs`` adds a table of codec and ordering candidates per array (bare Zarr arrays in the
store's chunking), and ``--reduced STORE`` compares that store's labels with the first store's
(the float16 reference): index agreement and the probability error. ``--runs NAME=DIR`` adds the
final validation accuracy of ``refine train`` runs.

  python benchmarks/label_bytes.py --stores /tmp/tin/stores/labels_K8_top10.zarr --top-k 5 10 \\
      --codecs --tag label_bytes_cpu
"""
import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import markdown_table, write_results
from _stores import rewrite_store

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import (CHECKSUMS, DONE_FLAGS, IMAGE_SIZES, LABELS,
                                            CropRecords, StoreLayout, round_probabilities)
from refinery_pipeline.labelling.precompute import software_versions

GROUPS = {"topk_indices": "indices", "topk_probs": "probabilities", "boxes": "boxes",
          "flips": "flips", CHECKSUMS: "checksums + flags", DONE_FLAGS: "checksums + flags",
          LABELS: "labels + image sizes", IMAGE_SIZES: "labels + image sizes"}
REWRITE_BITS = (0, 11, 10, 9, 8)


def load(path, top_k: int = None) -> dict:
    """The store's labels (checked against their checksums), cut to the first ``top_k`` ranks."""
    store = LabelStore.open(path)
    records = store.read_crops()
    k = top_k or store.layout.top_k
    return {"store": store, "k": k, "boxes": records.boxes, "flips": records.flips,
            "indices": records.topk_indices[..., :k], "probs": records.topk_probs[..., :k],
            "sizes": store.read_image_sizes(), "labels": store.read_labels()}


def files_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def store_breakdown(path: Path, crops: int) -> dict:
    """Bytes per crop of a store directory by group: each array's chunks, and all metadata."""
    out = {"metadata (zarr.json)": 0}
    for f in Path(path).rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(path).parts
        group = "metadata (zarr.json)" if f.name == "zarr.json" else GROUPS.get(rel[0], rel[0])
        out[group] = out.get(group, 0) + f.stat().st_size
    out = {name: size / crops for name, size in out.items()}
    out["total"] = sum(out.values())
    return out


def rewrite(labels: dict, path: Path, prob_bits: int) -> float:
    """The labels through the real writer at ``prob_bits``; returns the seconds it took."""
    src = labels["store"]
    N, K = labels["flips"].shape
    layout = StoreLayout(N, K, labels["k"], src.layout.chunk_size, prob_bits=prob_bits)

    def chunk(c: int) -> CropRecords:
        rows = slice(layout.chunk_range(c).start, layout.chunk_range(c).stop)
        return CropRecords(labels["boxes"][rows], labels["flips"][rows],
                           labels["indices"][rows], labels["probs"][rows])
    start = time.perf_counter()
    rewrite_store(src, path, layout, chunk)
    return time.perf_counter() - start


def fkd_files(labels: dict, root: Path) -> dict:
    """FKD's per-image soft-label files, ``--use_fp16``: bytes per crop and the box error."""
    import torch
    heights, widths = labels["sizes"][:, 0], labels["sizes"][:, 1]
    frame = np.stack([heights, widths, heights, widths], -1)[:, None, :].astype(np.float32)
    coords = np.float16(labels["boxes"].astype(np.float32) / frame)
    output = np.float16(np.stack([labels["indices"].astype(np.float32),
                                  labels["probs"].astype(np.float32)], axis=2))  # (N, K, 2, k)
    root.mkdir()
    for n in range(len(coords)):
        torch.save([coords[n], labels["flips"][n].astype(bool), output[n]], root / f"{n}.tar")
    back = coords.astype(np.float32) * frame  # FKD_SLG/utils.py: i = coords[0] * img.size[1]
    K = coords.shape[1]
    return {"bytes_per_crop": files_bytes(root) / (len(coords) * K),
            "payload_bytes_per_crop": 8 + 1 + 4 * labels["k"],
            "max_box_error_px": float(np.abs(back - labels["boxes"]).max())}


def tinyvit_files(labels: dict, root: Path) -> dict:
    """TinyViT's fixed records, one keys/values pair per epoch (here: per slot)."""
    N, K, k = labels["indices"].shape
    seeds = np.random.default_rng(0).integers(0, 1 << 31, (N, K)).astype(np.int32)
    for slot in range(K):
        folder = root / f"logits_top{k}_epoch{slot}"
        folder.mkdir(parents=True)
        record = np.empty(N, [("seed", "<i4"), ("index", "<i2", k), ("value", "<f2", k)])
        record["seed"], record["index"] = seeds[:, slot], labels["indices"][:, slot]
        record["value"] = labels["probs"][:, slot]
        (folder / "rank0-values.bin").write_bytes(record.tobytes())
        (folder / "rank0-keys.txt").write_text("".join(f"{n}\n" for n in range(N)))
    return {"bytes_per_crop": files_bytes(root) / (N * K), "payload_bytes_per_crop": 4 + 4 * k}


def imagenet_plus_files(labels: dict, root: Path) -> dict:
    """ImageNet+'s per-image files (RRC + flip, compressed params), tar'd with gzip."""
    import torch
    folder = root / "reinforced_data"
    folder.mkdir(parents=True)
    N, K, k = labels["indices"].shape
    for n in range(N):
        samples = [{"params": [tuple(int(v) for v in labels["boxes"][n, s]),
                               bool(labels["flips"][n, s])],
                    "prob": (labels["probs"][n, s].astype(np.float32).tolist(),
                             labels["indices"][n, s].astype(np.int64).tolist())}
                   for s in range(K)]
        torch.save((n, samples), folder / f"{n}.pth.tar", pickle_protocol=4)
    archive = root / "reinforced_data.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(root), "reinforced_data"], check=True)
    return {"bytes_per_crop": archive.stat().st_size / (N * K),
            "files_bytes_per_crop": files_bytes(folder) / (N * K)}


def probability_errors(reference: np.ndarray, values: np.ndarray) -> dict:
    error = np.abs(values.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def codec_candidates(labels: dict, root: Path) -> list:
    """Bytes per crop of one array under each candidate encoding (bare arrays, store chunking)."""
    import zarr
    from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec
    chunk = labels["store"].layout.chunk_size
    crops = labels["flips"].size

    def size(values, filters=(), compressor=None) -> float:
        path = root / f"a{len(list(root.iterdir()))}"
        array = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype,
                                  chunks=(min(chunk, len(values)),) + values.shape[1:],
                                  fill_value=0, filters=list(filters), compressors=[compressor])
        array[:] = values
        nbytes = files_bytes(path / "c")
        shutil.rmtree(path)
        return nbytes / crops

    blosc = lambda shuffle, level=5: BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)
    orders = {"as is": (), "transpose (0,2,1): slots side by side": (TransposeCodec(order=(0, 2, 1)),),
              "transpose (2,0,1): rank-major": (TransposeCodec(order=(2, 0, 1)),)}
    compressors = {"blosc zstd5 shuffle": blosc("shuffle"), "blosc zstd5 bitshuffle":
                   blosc("bitshuffle"), "blosc zstd5 noshuffle": blosc("noshuffle"),
                   "blosc zstd9 shuffle": blosc("shuffle", 9), "zstd 19": ZstdCodec(level=19)}
    arrays = {f"probabilities, prob_bits {b}": round_probabilities(labels["probs"], b)
              for b in (0, 11, 10)}
    arrays["indices, uint16"] = labels["indices"]
    if labels["indices"].max() < 256:
        arrays["indices, uint8"] = labels["indices"].astype(np.uint8)
    rows = []
    for what, values in arrays.items():
        for order, filters in orders.items():
            for name, compressor in compressors.items():
                rows.append({"array": what, "order": order, "codec": name,
                             "bytes_per_crop": size(values, filters, compressor)})
    return rows


def student_runs(runs: list) -> list:
    """``NAME=DIR``: the last epoch's validation accuracy of each ``refine train`` run."""
    rows = []
    for item in runs:
        name, folder = item.split("=", 1)
        lines = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text()
                 .splitlines() if line.strip()]
        last = lines[-1]
        rows.append({"run": name, "dir": folder, "epochs": len(lines),
                     "val_top1": last.get("val_top1"), "val_top5": last.get("val_top5"),
                     "seconds": sum(line.get("epoch_seconds", 0) for line in lines)})
    return rows


def measure(path: str, top_k: int, work: Path, codecs: bool) -> dict:
    labels = load(path, top_k)
    N, K = labels["flips"].shape
    crops, k = N * K, labels["k"]
    result = {"store": str(path), "images": N, "K": K, "top_k": k,
              "classes": labels["store"].num_classes,
              "store_format_version": labels["store"].format_version,
              "store_prob_bits": labels["store"].layout.prob_bits}
    if top_k is None or top_k == labels["store"].layout.top_k:
        result["as_written"] = store_breakdown(Path(path), crops)
    result["rewritten"] = {}
    for bits in REWRITE_BITS:
        target = work / f"ours_{k}_{bits}.zarr"
        seconds = rewrite(labels, target, bits)
        result["rewritten"][bits] = {**store_breakdown(target, crops), "write_seconds": seconds,
                                     **probability_errors(labels["probs"], round_probabilities(
                                         labels["probs"], bits))}
        shutil.rmtree(target)
    for name, fn in (("FKD", fkd_files), ("TinyViT", tinyvit_files),
                     ("ImageNet+", imagenet_plus_files)):
        folder = work / f"{name}_{k}"
        result[name] = fn(labels, folder)
        shutil.rmtree(folder)
    if codecs:
        folder = work / f"codecs_{k}"
        folder.mkdir()
        result["codecs"] = codec_candidates(labels, folder)
        shutil.rmtree(folder)
    return result


def compare(reference: str, reduced: str) -> dict:
    """The reduced store's labels against the float16 reference store's (same crops)."""
    import torch
    from refinery_pipeline.loaders.dense_targets import dense_targets
    a, b = load(reference), load(reduced)
    same = a["indices"] == b["indices"]
    out = {"reference": reference, "reduced": reduced,
           "reduced_prob_bits": b["store"].layout.prob_bits,
           "indices_identical": float(same.all(-1).mean()),
           **probability_errors(a["probs"], b["probs"])}
    if same.all():
        C = a["store"].num_classes
        flat = lambda d: (torch.from_numpy(d["indices"].reshape(-1, a["k"]).astype(np.int64)),
                          torch.from_numpy(d["probs"].reshape(-1, a["k"])))
        ta, tb = (dense_targets(flat(d), C) for d in (a, b))
        out["target_max_abs_error"] = float((ta - tb).abs().max())
        out["target_mean_l1"] = float((ta - tb).abs().sum(1).mean())
    return out


def to_markdown(result: dict) -> str:
    lines = [f"# Bytes per crop against the anchors ({result['date']})", "",
             f"Device: {result['device']}. Software: zarr {result['software']['zarr']}, numpy "
             f"{result['software']['numpy']}, torch {result['software']['torch']}.", ""]
    for m in result["measured"]:
        lines += [f"## {m['store']}: top-{m['top_k']} of {m['classes']} classes, "
                  f"{m['images']:,} images × K = {m['K']}", ""]
        header = ["format", "bytes / crop", "exact boxes", "notes"]
        rows = []
        if "as_written" in m:
            rows.append([f"ours as written (format {m['store_format_version']}, prob_bits "
                         f"{m['store_prob_bits']})", f"{m['as_written']['total']:.2f}", "yes", ""])
        for bits, r in m["rewritten"].items():
            rows.append([f"ours rewritten, prob_bits {bits}", f"{r['total']:.2f}", "yes",
                         f"probability error max {r['max_abs_error']:.1e}, mean "
                         f"{r['mean_abs_error']:.1e}; written in {r['write_seconds']:.1f} s"])
        rows.append(["FKD (`--use_fp16`, torch.save per image)",
                     f"{m['FKD']['bytes_per_crop']:.2f}", "no",
                     f"payload {m['FKD']['payload_bytes_per_crop']} B; boxes off by up to "
                     f"{m['FKD']['max_box_error_px']:.2f} px"])
        rows.append(["TinyViT (fixed records + keys)", f"{m['TinyViT']['bytes_per_crop']:.2f}",
                     "no (a seed)", f"payload {m['TinyViT']['payload_bytes_per_crop']} B"])
        rows.append(["ImageNet+ (per-image torch.save, tar.gz)",
                     f"{m['ImageNet+']['bytes_per_crop']:.2f}", "yes",
                     f"{m['ImageNet+']['files_bytes_per_crop']:.1f} B before gzip"])
        lines += markdown_table(header, rows) + [""]
        parts = ["indices", "probabilities", "boxes", "flips", "checksums + flags",
                 "labels + image sizes", "metadata (zarr.json)", "total"]
        shown = ({"as written": m["as_written"]} if "as_written" in m else {})
        shown.update({f"prob_bits {b}": r for b, r in m["rewritten"].items()})
        lines += ["Ours, per array (bytes per crop):", ""]
        lines += markdown_table(["store"] + parts, [[name] + [f"{r.get(p, 0):.2f}" for p in parts]
                                                    for name, r in shown.items()]) + [""]
        if m.get("codecs"):
            lines += ["Codec candidates (bare arrays in the store's chunking, bytes per crop):", ""]
            lines += markdown_table(["array", "order", "codec", "bytes / crop"],
                                    [[r["array"], r["order"], r["codec"],
                                      f"{r['bytes_per_crop']:.2f}"] for r in m["codecs"]]) + [""]
    if result.get("comparison"):
        c = result["comparison"]
        lines += ["## Reduced labels against float16 labels", "",
                  f"`{c['reduced']}` (prob_bits {c['reduced_prob_bits']}) against `{c['reference']}`: "
                  f"indices identical for {100 * c['indices_identical']:.3f}% of crops; probability "
                  f"error max {c['max_abs_error']:.2e}, mean {c['mean_abs_error']:.2e}"
                  + (f"; dense targets (uniform rest) differ by at most "
                     f"{c['target_max_abs_error']:.2e} per class, {c['target_mean_l1']:.2e} in L1 "
                     "per crop on average" if "target_max_abs_error" in c else "") + ".", ""]
    if result.get("students"):
        lines += ["## Students", ""]
        lines += markdown_table(["run", "epochs", "val top-1 %", "val top-5 %", "seconds"],
                                [[r["run"], r["epochs"], f"{r['val_top1']:.2f}",
                                  f"{r['val_top5']:.2f}", f"{r['seconds']:.0f}"]
                                 for r in result["students"]]) + [""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stores", nargs="+", required=True, help="label stores to measure")
    p.add_argument("--top-k", type=int, nargs="*", default=[None],
                   help="also measure the first k ranks of each store [default: its own top-k]")
    p.add_argument("--codecs", action="store_true", help="add the codec candidates table")
    p.add_argument("--reduced", default=None,
                   help="a store of the same crops to compare with the first (float16) store")
    p.add_argument("--runs", nargs="*", default=[], help="NAME=DIR of `refine train` runs")
    p.add_argument("--dir", default=None, help="scratch space [default: a temp dir]")
    p.add_argument("--device", default="2-core shared CPU, no GPU")
    p.add_argument("--tag", default="label_bytes")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        measured = [measure(path, k, work, args.codecs) for path in args.stores
                    for k in args.top_k]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": args.device,
              "software": software_versions(), "measured": measured,
              "comparison": compare(args.stores[0], args.reduced) if args.reduced else None,
              "students": student_runs(args.runs)}
    write_results(args.tag, json.loads(json.dumps(result, default=str)), to_markdown(result))


if __name__ == "__main__":
    main()
