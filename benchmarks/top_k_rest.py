"""Claim: how many classes a store keeps per crop (``--top-k``), and where the dropped mass goes
(``refine train --rest``), decide how close cached students come to an online refinery.

For each ``--top-ks`` value this precomputes one store (K crops per image, plan seed 0) and
trains students on it with ``--rest uniform`` (the mass outside the top k spread evenly over the
other classes, the default) and ``--rest renormalize`` (the top k scaled up to sum to 1); when
top-k covers every class the two are the same target and one row is trained. Students of the
online refinery (fresh crops, BN train, the paper's setting) are the target. ``--slot-policy
cycle`` throughout, so with K = epochs each stored crop is shown once.

Give the number of classes as one of ``--top-ks`` and that store holds every class's probability
(the refinery's whole distribution, to float16): the targets of every other (top-k, rest) pair
are then compared with it on the same crops (``target_distortion``), at no training cost: the
mass each drops, how far it moves the target (total variation), and how often it changes the
target's top-1 class. Its students are the cached students of an untruncated refinery.

Many classes (Tiny-ImageNet-200 on the CPU, 100 training images per class; reduced scale):
  python benchmarks/top_k_rest.py /tmp/tin100 --refinery /tmp/tin/refinery/model.pt \
      --work /tmp/tin --res 32 --epochs 6 --batch-size 128 --lr 0.2 -K 6 \
      --top-ks 1 5 10 20 200 --seeds 0 1 --workers 2 --tag top_k_rest_tin200_cpu32

Run names match ``adversarial_jitter.py``'s and ``refined_vs_ground_truth.py``'s for the online
students, so with the same ``--work`` and settings those are reused.

CPU at reduced scale:
  python benchmarks/top_k_rest.py DATA --refinery /tmp/rvg/refinery/model.pt --work /tmp/rvg \
      --res 32 --epochs 8 --batch-size 128 --lr 0.2 -K 8 --top-ks 2 5 10 --seeds 0 1 --jobs 2 \
      --workers 1 --tag top_k_rest_cpu32
GPU:
  python benchmarks/top_k_rest.py DATA --refinery runs/refinery/model.pt --res 96 --epochs 40 \
      --batch-size 256 --lr 0.4 -K 40 --top-ks 2 5 10 --seeds 0 1 --jobs 4 --workers 4 \
      --tag top_k_rest_gpu
"""
import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from _results import RESULTS, markdown_table, write_results
from _stores import rewrite_store
from _runs import (ONLINE, StudentRuns, add_student_arguments, describe_students, final_metrics,
                   precompute_once, recorded_device, runs_by_name)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder tree with train/ and val/")
    p.add_argument("--refinery", required=True, help="refinery checkpoint (model.pt)")
    add_student_arguments(p, work="runs/top_k_rest", epochs=8)
    p.add_argument("-K", "--crops-per-image", type=int, default=8)
    p.add_argument("--top-ks", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--derive", action="store_true",
                   help="precompute only the largest --top-ks store; truncate it for the others")
    p.add_argument("--check-derive", action="store_true",
                   help="also precompute the smallest top-k and compare it with the derived one")
    p.add_argument("--collect-only", action="store_true",
                   help="report the finished students, train none")
    p.add_argument("--distortion-images", type=int, default=4096,
                   help="images whose crops the target comparison reads (needs a top-C store)")
    p.add_argument("--tag", default="top_k_rest")
    return p.parse_args()


def stores(args) -> dict[int, Path]:
    """One store per top-k, made once: by ``refine precompute``, or, with ``--derive``, by
    precomputing only the largest top-k and truncating it (:func:`truncated_store`)."""
    work, made = Path(args.work), {}
    top_ks = sorted(args.top_ks, reverse=True)
    for top_k in top_ks[:1] if args.derive else top_ks:
        made[top_k] = store_path(args, top_k)
        precompute_once(work, made[top_k], [
            args.data, "--weights", args.refinery, "-K", str(args.crops_per_image),
            "--top-k", str(top_k), "--input-size", str(args.res), "--workers", str(args.workers)])
    for top_k in top_ks[1:] if args.derive else []:
        made[top_k] = truncated_store(made[top_ks[0]], top_k, store_path(args, top_k))
    return made


def store_path(args, top_k: int, suffix: str = "") -> Path:
    return Path(args.work) / f"labels_K{args.crops_per_image}_top{top_k}{suffix}.zarr"


def truncated_store(source: Path, top_k: int, out: Path) -> Path:
    """The store ``refine precompute --top-k top_k`` would write, from a store of the same run
    with a larger top-k: the same crops, refinery batches and probabilities, each crop's
    classes cut to its ``top_k`` most probable (they come first, sorted). It saves one refinery
    pass per top-k; `--check-derive` compares one against a real precompute."""
    from dataclasses import replace
    from refinery_pipeline.store.label_store import LabelStore
    if out.exists():
        return out
    full = LabelStore.open(source)

    def cut(c: int):
        records = full.read_crops(np.asarray(full.layout.chunk_range(c)), full.layout.soft_static)
        records.topk_indices = records.topk_indices[..., :top_k].copy()
        records.topk_probs = records.topk_probs[..., :top_k].copy()
        return records
    rewrite_store(full, out, replace(full.layout, top_k=top_k), cut)
    return out


def check_derivation(args, made: dict[int, Path]):
    """A real ``refine precompute`` at the smallest derived top-k: its arrays must equal the
    derived store's (the claim :func:`truncated_store` rests on)."""
    import refinery_pipeline as refinery
    top_k = min(made)
    real = store_path(args, top_k, "_precomputed")
    precompute_once(Path(args.work), real, [
        args.data, "--weights", args.refinery, "-K", str(args.crops_per_image), "--top-k",
        str(top_k), "--input-size", str(args.res), "--workers", str(args.workers)])
    a, b = (refinery.open_store(s).read_crops() for s in (real, made[top_k]))
    same = {name: bool(np.array_equal(x, b.arrays()[name])) for name, x in a.arrays().items()}
    print(f"derived top-{top_k} store equals a precomputed one: {same}", flush=True)
    return {"top_k": top_k, "arrays_equal": same}


def label_settings(made: dict[int, Path], teacher: str, num_classes: int) -> list[dict]:
    """(name, top-k, rest, `refine train` options) for the online target and each store."""
    rows = [{"name": ONLINE, "top_k": None, "rest": None, "options": ["--teacher", teacher]}]
    for top_k, store in made.items():
        rests = ["uniform"] if top_k >= num_classes else ["uniform", "renormalize"]
        rows += [{"name": f"cached top-{top_k}, rest {rest}", "top_k": top_k, "rest": rest,
                  "options": ["--labels", str(store), "--rest", rest, "--slot-policy", "cycle"]}
                 for rest in rests]
    return rows


def target_distortion(full_store: Path, top_ks: list[int], num_classes: int,
                      sample: int = 4096, seed: int = 0) -> list[dict]:
    """How each (top-k, rest) target differs from the refinery's whole distribution, on the
    crops of ``sample`` images (every slot), built as training builds them
    (``refinery_pipeline.dense_targets``): mean mass outside the top k, mean total variation
    distance, and the share of crops whose target's top-1 class changes (ties aside, never:
    truncation keeps the largest classes)."""
    import refinery_pipeline as refinery
    store = refinery.open_store(full_store)
    images = np.sort(np.random.default_rng(seed).choice(
        store.layout.num_images, min(sample, store.layout.num_images), replace=False))
    crops = store.read_crops(images)
    indices = torch.from_numpy(crops.topk_indices.reshape(-1, num_classes).astype(np.int64))
    probs = torch.from_numpy(crops.topk_probs.reshape(-1, num_classes).astype(np.float32))
    full = refinery.dense_targets((indices, probs), num_classes)
    rows = []
    for top_k in sorted(k for k in top_ks if k < num_classes):
        for rest in ("uniform", "renormalize"):
            target = refinery.dense_targets((indices[:, :top_k], probs[:, :top_k]), num_classes,
                                            rest)
            rows.append({"top_k": top_k, "rest": rest,
                         "mass_outside": float(1 - probs[:, :top_k].sum(1).clamp(max=1).mean()),
                         "total_variation": float(0.5 * (target - full).abs().sum(1).mean()),
                         "top1_changed": float((target.argmax(1) != full.argmax(1))
                                               .float().mean())})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One line per setting: mean over seeds, each seed, and the gap to the online students."""
    by_name = runs_by_name(rows)
    means = {name: statistics.mean(r["val_top1"] for r in runs) for name, runs in by_name.items()}
    return [{"name": name, "top_k": runs[0]["top_k"], "rest": runs[0]["rest"],
             "mean_val_top1": means[name], "vs_online": means[name] - means[ONLINE],
             "per_seed": [r["val_top1"] for r in runs]} for name, runs in by_name.items()]


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Stored classes per crop and the rest policy: `{a['tag']}`", "",
             f"Device: {result['device']}. Data `{a['data']}`, {result['num_classes']} classes. "
             f"Refinery `{a['refinery']}` (val top-1 {result['refinery_val_top1']:.2f}), stores "
             f"of K = {a['crops_per_image']} crops per image. Students {describe_students(a)}, "
             f"seeds {a['seeds']}, slot policy cycle.", ""]
    lines += markdown_table(["student labels", "mean val top-1", "vs online", "per seed"],
                            [[s["name"], f"{s['mean_val_top1']:.2f}", f"{s['vs_online']:+.2f}",
                              ", ".join(f"{v:.2f}" for v in s["per_seed"])]
                             for s in result["summary"]])
    if result.get("distortion"):
        lines += ["", f"Targets against the refinery's whole distribution (the top-"
                  f"{result['num_classes']} store) on the crops of "
                  f"{result['distortion_images']:,} images:", ""]
        lines += markdown_table(
            ["top-k", "rest", "mass outside top-k", "total variation to full", "top-1 changed"],
            [[d["top_k"], d["rest"], f"{d['mass_outside']:.3f}", f"{d['total_variation']:.3f}",
              f"{100 * d['top1_changed']:.2f}%"] for d in result["distortion"]])
    return "\n".join(lines) + "\n"


def plot_results(result: dict, path: Path):
    """Mean val top-1 against top-k, one line per rest policy, the online students' mean as a
    horizontal line and each seed as a dot (written beside the results as ``<tag>.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    online = next(s for s in result["summary"] if s["name"] == ONLINE)
    ax.axhline(online["mean_val_top1"], color="grey", ls="--", label="online refinery")
    for rest, colour in (("uniform", "tab:red"), ("renormalize", "tab:blue")):
        rows = sorted((s for s in result["summary"] if s["top_k"]  # all classes: both lines
                       and (s["rest"] == rest or s["top_k"] >= result["num_classes"])),
                      key=lambda s: s["top_k"])
        ks = [s["top_k"] for s in rows]
        ax.plot(ks, [s["mean_val_top1"] for s in rows], "o-", color=colour, label=f"rest {rest}")
        for k, s in zip(ks, rows):
            ax.scatter([k] * len(s["per_seed"]), s["per_seed"], color=colour, s=8, alpha=0.5)
    ax.set(xscale="log", xlabel="classes stored per crop (top-k)", ylabel="val top-1 (%)",
           title=f"{result['num_classes']} classes: cached students against top-k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = get_args()
    work = Path(args.work)
    refinery_metrics = final_metrics(Path(args.refinery).parent)
    num_classes = len(refinery_metrics["val_per_class"])
    made = stores(args)
    settings = label_settings(made, args.refinery, num_classes)
    distortion = (target_distortion(made[num_classes], args.top_ks, num_classes,
                                    args.distortion_images) if num_classes in made else [])
    derivation = check_derivation(args, made) if args.derive and args.check_derive else None
    rows = StudentRuns.from_args(args, args.collect_only).train_all(
        [{**setting, "seed": seed} for seed in args.seeds for setting in settings])
    result = {"args": vars(args), "device": recorded_device(work, args.collect_only),
              "refinery_val_top1": refinery_metrics["val_top1"], "num_classes": num_classes,
              "students": rows, "summary": summarise(rows), "distortion": distortion,
              "distortion_images": args.distortion_images, "derivation": derivation}
    write_results(args.tag, result, to_markdown(result))
    plot_results(result, RESULTS / f"{args.tag}.png")


if __name__ == "__main__":
    main()
