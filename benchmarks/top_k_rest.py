"""Claim: how many classes a store keeps per crop (``--top-k``), and where the dropped mass goes
(``refine train --rest``), decide how close cached students come to an online refinery.

For each ``--top-ks`` value this precomputes one store (K crops per image, plan seed 0) and
trains students on it with ``--rest uniform`` (the mass outside the top k spread evenly over the
other classes, the default) and ``--rest renormalize`` (the top k scaled up to sum to 1); when
top-k covers every class the two are the same target and one row is trained. Students of the
online refinery (fresh crops, BN train, the paper's setting) are the target. ``--slot-policy
cycle`` throughout, so with K = epochs each stored crop is shown once.

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

from _results import markdown_table, write_results
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
    p.add_argument("--tag", default="top_k_rest")
    return p.parse_args()


def stores(args) -> dict[int, Path]:
    """One store per top-k, made once (``refine precompute``)."""
    work, made = Path(args.work), {}
    for top_k in args.top_ks:
        store = work / f"labels_K{args.crops_per_image}_top{top_k}.zarr"
        precompute_once(work, store, [
            args.data, "--weights", args.refinery, "-K", str(args.crops_per_image),
            "--top-k", str(top_k), "--input-size", str(args.res), "--workers", str(args.workers)])
        made[top_k] = store
    return made


def label_settings(made: dict[int, Path], teacher: str, num_classes: int) -> list[dict]:
    """(name, top-k, rest, `refine train` options) for the online target and each store."""
    rows = [{"name": ONLINE, "top_k": None, "rest": None, "options": ["--teacher", teacher]}]
    for top_k, store in made.items():
        rests = ["uniform"] if top_k >= num_classes else ["uniform", "renormalize"]
        rows += [{"name": f"cached top-{top_k}, rest {rest}", "top_k": top_k, "rest": rest,
                  "options": ["--labels", str(store), "--rest", rest, "--slot-policy", "cycle"]}
                 for rest in rests]
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
    return "\n".join(lines) + "\n"


def main():
    args = get_args()
    work = Path(args.work)
    refinery_metrics = final_metrics(Path(args.refinery).parent)
    num_classes = len(refinery_metrics["val_per_class"])
    settings = label_settings(stores(args), args.refinery, num_classes)
    rows = StudentRuns.from_args(args).train_all(
        [{**setting, "seed": seed} for seed in args.seeds for setting in settings])
    result = {"args": vars(args), "device": recorded_device(work, collect_only=False),
              "refinery_val_top1": refinery_metrics["val_top1"], "num_classes": num_classes,
              "students": rows, "summary": summarise(rows)}
    write_results(args.tag, result, to_markdown(result))


if __name__ == "__main__":
    main()
