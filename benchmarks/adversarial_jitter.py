"""Claim (paper Table 3): adversarial jittering improves students beyond the refinery alone.

Trains one student per seed on ground truth, on the online refinery (fresh crops, BN train: the
paper's setting), and on the online refinery with adversarial twins for each ``--etas`` step
(``refine train --teacher R --adversarial-eta ETA``). Twins cannot be cached, so every row but
ground truth runs the refinery in the loop. Reports mean val top-1 over seeds, each seed, how far
the twins moved in the last epoch (``adv_rms``, pixel values 0-255) and the wall time, which shows
the mode's cost: two student passes and two refinery passes per step.

Run names match ``refined_vs_ground_truth.py``'s, so with the same ``--work`` and settings its
ground-truth and online students are reused, not trained again.

GPU:
  python benchmarks/adversarial_jitter.py DATA --refinery runs/refinery/model.pt --res 96 \
      --epochs 40 --batch-size 256 --lr 0.4 --etas 8 64 --seeds 0 1 --tag adversarial_gpu
CPU at reduced scale (what a session without a GPU can run):
  python benchmarks/adversarial_jitter.py DATA --refinery /tmp/rvg/refinery/model.pt \
      --work /tmp/rvg --res 32 --epochs 8 --batch-size 128 --lr 0.2 --etas 1 8 --seeds 0 1 \
      --jobs 2 --workers 1 --tag adversarial_cpu32
"""
import argparse
import statistics
from pathlib import Path

from _results import markdown_table, write_results
from _runs import (GROUND_TRUTH, ONLINE, StudentRuns, add_student_arguments, describe_students,
                   final_metrics, recorded_device, runs_by_name)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder tree with train/ and val/")
    p.add_argument("--refinery", required=True, help="refinery checkpoint (model.pt)")
    add_student_arguments(p, work="runs/adversarial", epochs=8)
    p.add_argument("--etas", type=float, nargs="+", default=[1.0, 8.0],
                   help="adversarial step sizes, one row each")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tag", default="adversarial")
    return p.parse_args()


def modes(teacher: str, etas: list[float]) -> list[tuple[str, list[str]]]:
    online = ["--teacher", teacher]
    return [(GROUND_TRUTH, []), (ONLINE, online)] + [
        (f"online + adversarial, eta {eta:g}", online + ["--adversarial-eta", str(eta)])
        for eta in etas]


def summarise(rows: list[dict]) -> list[dict]:
    """One line per mode: mean over seeds, the seeds' values, twins' movement, mean wall time."""
    by_mode = runs_by_name(rows)
    ground_truth = statistics.mean(r["val_top1"] for r in by_mode[GROUND_TRUTH])
    summary = []
    for name, runs in by_mode.items():
        mean = statistics.mean(r["val_top1"] for r in runs)
        rms = [r["adv_rms"] for r in runs if "adv_rms" in r]
        summary.append({"mode": name, "mean_val_top1": mean, "vs_ground_truth": mean - ground_truth,
                        "per_seed": [r["val_top1"] for r in runs],
                        "adv_rms": statistics.mean(rms) if rms else None,
                        "mean_seconds": statistics.mean(r["seconds"] for r in runs)})
    return summary


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Adversarial jittering: `{a['tag']}`", "",
             f"Device: {result['device']}. Data `{a['data']}` at {a['res']} px. Refinery "
             f"`{a['refinery']}` (val top-1 {result['refinery_val_top1']:.2f}). Students "
             f"{describe_students(a)}, seeds {a['seeds']}.", ""]
    lines += markdown_table(
        ["student labels", "mean val top-1", "vs ground truth", "per seed",
         "twins moved (RMS, 0-255)", "wall time per run (s)"],
        [[s["mode"], f"{s['mean_val_top1']:.2f}", f"{s['vs_ground_truth']:+.2f}",
          ", ".join(f"{v:.2f}" for v in s["per_seed"]),
          "" if s["adv_rms"] is None else f"{s['adv_rms']:.2f}", f"{s['mean_seconds']:.0f}"]
         for s in result["summary"]])
    return "\n".join(lines) + "\n"


def main():
    args = get_args()
    work = Path(args.work)
    students = StudentRuns.from_args(args)
    rows = students.train_all([{"name": name, "seed": seed, "options": options}
                               for seed in args.seeds
                               for name, options in modes(args.refinery, args.etas)])
    result = {"args": vars(args), "device": recorded_device(work, collect_only=False),
              "refinery_val_top1": final_metrics(Path(args.refinery).parent)["val_top1"],
              "students": rows, "summary": summarise(rows)}
    write_results(args.tag, result, to_markdown(result))


if __name__ == "__main__":
    main()
