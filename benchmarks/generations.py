"""Claim: a refined student refines the next one (the paper's chained refineries, Table 2).

Generation 0 is a student trained on ground truth. Generation g labels a store with generation
g - 1 as its refinery (``refine precompute --weights gen_{g-1}/model.pt``, K = one crop per
student epoch) and trains the next student, same architecture and schedule, on it. One chain per
seed; chains run side by side (``--jobs``), generations in order. Every step is a ``refine``
command and finished steps are skipped, so an interrupted run resumes; with the ``--work`` and
settings of refined_vs_ground_truth.py or top_k_rest.py, their ground-truth students are reused as
generation 0. Writes a table, JSON and a plot to benchmarks/results/.

CPU at reduced scale:
  python benchmarks/generations.py DATA --work /tmp/rvg --res 32 --epochs 8 --batch-size 128 \
      --lr 0.2 --generations 3 --seeds 0 1 --jobs 2 --workers 1 --tag generations_cpu32
GPU:
  python benchmarks/generations.py DATA --res 96 --epochs 40 --batch-size 256 --lr 0.4 \
      --generations 3 --seeds 0 1 --workers 8 --tag generations_gpu
"""
import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refinery_pipeline.label_store import DEFAULT_TOP_K

from _results import RESULTS, markdown_table, write_results
from _runs import (GROUND_TRUTH, StudentRuns, add_student_arguments, describe_students,
                   precompute_once, recorded_device)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    add_student_arguments(p, work="runs/generations", epochs=8)
    p.add_argument("--generations", type=int, default=3, help="refined generations after gen 0")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tag", default="generations")
    return p.parse_args()


def generation_name(g: int) -> str:
    return GROUND_TRUTH if g == 0 else f"generation {g}"


def run_chain(args, students: StudentRuns, seed: int) -> list[dict]:
    """Generation 0 on ground truth, then each generation on a store labelled by the one before."""
    rows = [{**students.train({"name": generation_name(0), "seed": seed, "options": []}),
             "generation": 0}]
    for g in range(1, args.generations + 1):
        refinery = students.run_dir({"name": generation_name(g - 1), "seed": seed}) / "model.pt"
        store = students.work / "stores" / f"generation{g}_seed{seed}.zarr"
        store.parent.mkdir(parents=True, exist_ok=True)
        seconds = precompute_once(students.work, store, [
            args.data, "--weights", str(refinery), "-K", str(args.epochs), "--top-k",
            str(args.top_k), "--input-size", str(args.res), "--seed", str(seed),
            "--workers", str(args.workers)], threads=students.threads)
        row = students.train({"name": generation_name(g), "seed": seed,
                              "options": ["--labels", str(store)]})
        rows.append({**row, "generation": g, "precompute_seconds": seconds})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    by_generation = {}
    for row in rows:
        by_generation.setdefault(row["generation"], []).append(row)
    base = statistics.mean(r["val_top1"] for r in by_generation[0])
    return [{"generation": g, "name": generation_name(g), "seeds": [r["seed"] for r in runs],
             "val_top1": [r["val_top1"] for r in runs],
             "mean": statistics.mean(r["val_top1"] for r in runs),
             "vs_generation_0": statistics.mean(r["val_top1"] for r in runs) - base}
            for g, runs in sorted(by_generation.items())]


def plot(summary: list[dict], path: Path, title: str):
    import os
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    xs = [s["generation"] for s in summary]
    for i, seed in enumerate(summary[0]["seeds"]):
        ax.plot(xs, [s["val_top1"][i] for s in summary], marker=".", alpha=0.4,
                label=f"seed {seed}")
    ax.plot(xs, [s["mean"] for s in summary], marker="o", color="black", label="mean")
    ax.set(xlabel="generation (0: ground truth)", ylabel="val top-1 (%)", xticks=xs, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Chained refineries: `{a['tag']}`", "",
             f"![accuracy by generation]({a['tag']}.png)", "",
             f"Device: {result['device']}. Data `{a['data']}`. Students (every generation): "
             f"{describe_students(a)}. Generation g > 0 trains on a store of K = {a['epochs']} "
             f"crops per image, top-{a['top_k']}, labelled by generation g - 1 (BN train mode, "
             f"plan seed = the chain's seed). Seeds {a['seeds']}, one chain each.", ""]
    lines += markdown_table(
        ["generation", "labels from", "mean val top-1", "vs generation 0", "per seed"],
        [[s["generation"], "ground truth" if s["generation"] == 0 else f"generation "
          f"{s['generation'] - 1}", f"{s['mean']:.2f}", f"{s['vs_generation_0']:+.2f}",
          ", ".join(f"{v:.2f}" for v in s["val_top1"])] for s in result["summary"]])
    return "\n".join(lines) + "\n"


def main():
    args = get_args()
    device = recorded_device(Path(args.work), collect_only=False)
    students = StudentRuns.from_args(args)  # threads per step: the cores / --jobs
    with ThreadPoolExecutor(args.jobs) as pool:
        chains = list(pool.map(lambda seed: run_chain(args, students, seed), args.seeds))
    rows = [row for chain in chains for row in chain]
    summary = summarise(rows)
    result = {"args": vars(args), "device": device, "students": rows, "summary": summary}
    write_results(args.tag, result, to_markdown(result))
    plot(summary, RESULTS / f"{args.tag}.png", f"chained refineries, {args.arch} @ {args.res} px")


if __name__ == "__main__":
    main()
