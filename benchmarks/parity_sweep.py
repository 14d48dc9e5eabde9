"""Claim: a cached store with K crops per image trains students as well as an online refinery.

Issue 4's parity sweep. For every K, slot policy (random slot per epoch, or each slot once
before any repeats) and seed, precompute a store with ``refine precompute`` and train a student
with ``refine train``; train the same student with the refinery online on fresh crops (the
paper's exact behaviour) and on ground truth. The cheapest K whose mean accuracy (over seeds)
is within ``--tolerance`` points of the online mean is the recommended default.

Every run goes through the CLI exactly as a user would type it, and is skipped when its
``model.pt`` already exists, so an interrupted sweep continues where it stopped. ``--jobs``
runs several trainings side by side with the cores split between them (on a small CPU two
single-threaded runs with ``--workers 1`` finish sooner than one run on two threads; on one GPU
keep ``--jobs 1``).

Each seed gets its own store (crop plan seed = student seed): the randomness of *which* K crops
were drawn is exactly what K controls, so it belongs in the spread.

GPU (the issue's setting; reference teacher ResNet-50 81.9%):
  python benchmarks/parity_sweep.py DATA --refinery runs/refinery/model.pt --res 96 \
      --epochs 40 --batch-size 256 --lr 0.4 -K 5 10 20 40 --jobs 4 --workers 4 \
      --precompute-jobs 4 --tag parity_gpu_top10
CPU at reduced scale (what a session without a GPU can run; K scaled with the epochs so that
epochs / K spans the same 8 ... 1 views per slot as K = 5 ... 40 over 40 epochs):
  python benchmarks/parity_sweep.py DATA --refinery /tmp/rvg/refinery/model.pt --res 32 \
      --epochs 16 --batch-size 128 --lr 0.2 -K 2 4 8 16 --jobs 2 --workers 1 --no-ground-truth --tag parity_cpu32
"""
import argparse
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refinery_pipeline.store.schema import DEFAULT_TOP_K

from _results import RESULTS, markdown_table, write_results
from _runs import (StudentRuns, add_student_arguments, describe_students, precompute_once,
                   precompute_seconds, recorded_device, runs_by_name, threads_per_job)

# Matplotlib without a display: the plot is a file.
os.environ.setdefault("MPLBACKEND", "Agg")


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder tree with train/ and val/")
    p.add_argument("--refinery", required=True, help="refinery checkpoint (model.pt)")
    add_student_arguments(p, work="runs/parity_sweep", epochs=16)
    p.add_argument("-K", "--crops-per-image", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--policies", nargs="+", default=["random", "cycle"],
                   choices=["random", "cycle"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--tolerance", type=float, default=0.2,
                   help="points of val top-1 below the online mean that still count as parity")
    p.add_argument("--no-ground-truth", action="store_true", help="skip ground-truth students")
    p.add_argument("--precompute-workers", type=int, default=os.cpu_count() or 1,
                   help="loader workers for precompute, split between its jobs "
                        "[default: all cores]")
    p.add_argument("--precompute-jobs", type=int, default=1,
                   help="stores made side by side (process start-up dominates a small store's "
                        "time, so on a GPU several at once finish sooner)")
    p.add_argument("--tag", default="parity")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--precompute-only", action="store_true",
                       help="make every store, train nothing (e.g. to time other benchmarks on "
                            "them before the students start)")
    stage.add_argument("--collect-only", action="store_true",
                       help="train nothing; summarise the students finished so far (a sweep cut "
                            "short by a time limit, or run directories copied back)")
    return p.parse_args()


def sweep_runs(args, store) -> list[dict]:
    """Every student to train: online per seed, cached per (K, policy, seed), ground truth."""
    runs = [{"name": "online", "seed": seed,
             "options": ["--teacher", args.refinery, "--teacher-crops", "fresh"]}
            for seed in args.seeds]
    for seed in args.seeds:
        for k in args.crops_per_image:
            for policy in args.policies:
                runs.append({"name": f"K={k} {policy}", "K": k, "policy": policy, "seed": seed,
                             "options": ["--labels", str(store(k, seed)),
                                         "--slot-policy", policy]})
    if not args.no_ground_truth:  # last: the sweep's question does not depend on it
        runs += [{"name": "ground truth", "seed": seed, "options": []} for seed in args.seeds]
    return runs


def summarise(rows: list[dict], tolerance: float) -> dict:
    """Mean and spread per setting, and the cheapest cached setting within tolerance of online."""
    settings = {}
    for name, group in runs_by_name(rows).items():
        accs = [r["val_top1"] for r in group]
        settings[name] = {"K": group[0].get("K"), "policy": group[0].get("policy"),
                          "mean": statistics.fmean(accs), "min": min(accs), "max": max(accs),
                          "seeds": {r["seed"]: r["val_top1"] for r in group},
                          "train_seconds": statistics.fmean(r["seconds"] for r in group)}
    online = settings["online"]["mean"] if "online" in settings else None
    cached = sorted((s for s in settings.values() if s["K"] is not None),
                    key=lambda s: (s["K"], -s["mean"]))
    within = [s for s in cached if online is not None and s["mean"] >= online - tolerance]
    choice = within[0] if within else None
    return {"settings": settings, "online_mean": online, "tolerance": tolerance,
            "choice": None if choice is None else {"K": choice["K"], "policy": choice["policy"],
                                                   "mean": choice["mean"]}}


def plot(summary: dict, ks: list[int], policies: list[str], path: Path, title: str):
    """Accuracy against K per slot policy, seeds as dots, online and ground truth as bands."""
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for offset, policy in zip((-0.04, 0.04), policies):
        done = [k for k in ks if f"K={k} {policy}" in settings]  # a cut-short sweep lacks some
        xs = [k * 2 ** offset for k in done]
        means = [settings[f"K={k} {policy}"]["mean"] for k in done]
        line, = ax.plot(xs, means, marker="o", label=f"cached, {policy} slot per epoch"
                        if policy == "random" else "cached, each slot once before repeats")
        for x, k in zip(xs, done):
            seeds = settings[f"K={k} {policy}"]["seeds"].values()
            ax.scatter([x] * len(seeds), list(seeds), s=12, color=line.get_color(), alpha=0.5)
    online = summary["online_mean"]
    if online is not None:
        ax.axhline(online, color="black", label="online refinery (fresh crops)")
        ax.axhspan(online - summary["tolerance"], online, color="black", alpha=0.1,
                   label=f"within {summary['tolerance']} points of online")
    if "ground truth" in settings:
        ax.axhline(settings["ground truth"]["mean"], color="grey", linestyle="--",
                   label="ground truth")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K, crops per image in the store")
    ax.set_ylabel("student val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(result: dict) -> str:
    a, s = result["args"], result["summary"]
    lines = [f"# Cached vs online parity sweep: `{a['tag']}`", "",
             f"Students: {describe_students(a)}, seeds {a['seeds']} (store crop-plan seed = "
             f"student seed). Refinery `{a['refinery']}`, BN train mode, top-{a['top_k']}. "
             f"Device: {result['device']}.", "",
             f"![accuracy vs K]({a['tag']}.png)", ""]
    pre = {(p["K"], p["seed"]): p["seconds"] for p in result["precompute"]}
    online = s["online_mean"]
    rows = []
    for name, st in s["settings"].items():
        k = st["K"]
        times = [pre[(k, seed)] for seed in st["seeds"] if (k, seed) in pre]
        rows.append([name if k is None else "cached soft", k or "", st["policy"] or "",
                     f"{a['epochs'] / k:.1f}" if k is not None else "", f"{st['mean']:.2f}",
                     ", ".join(f"{v:.2f}" for v in st["seeds"].values()),
                     f"{st['mean'] - online:+.2f}" if online is not None else "",
                     f"{statistics.fmean(times):.0f}" if times else ""])
    lines += markdown_table(["labels", "K", "slot policy", "epochs per slot", "mean val top-1",
                             "seeds", "vs online", "precompute s"], rows)
    choice = s["choice"]
    if online is None:
        verdict = "No online student finished: parity cannot be judged."
    elif choice:
        verdict = (f"Cheapest setting within {s['tolerance']} points of the online mean "
                   f"({online:.2f}): **K = {choice['K']}, {choice['policy']} policy** "
                   f"({choice['mean']:.2f}).")
    else:
        verdict = (f"No cached setting came within {s['tolerance']} points of the online mean "
                   f"({online:.2f}).")
    lines += ["", verdict, ""]
    side_by_side = max((p.get("side_by_side", 1) for p in result["precompute"]), default=1)
    if side_by_side > 1:
        lines += [f"Stores were made {side_by_side} side by side, so \"precompute s\" is wall "
                  "time while sharing the machine.", ""]
    if a.get("collect_only"):
        lines += ["Students trained by the command below without `--collect-only`; this table "
                  "summarises those that finished.", ""]
    missing = result.get("unfinished", [])
    if missing:
        lines += [f"Not finished (left out above): {', '.join(missing)}.", ""]
    return "\n".join(lines)


def precompute_stores(args, work: Path, store) -> list[dict]:
    """Each seed's store for every K, made unless done before (``--precompute-jobs`` at a time,
    the workers split between them); only the finished ones' times when collecting."""
    wanted = [(k, seed) for seed in args.seeds for k in args.crops_per_image]
    jobs = max(1, min(args.precompute_jobs, len(wanted)))
    workers = max(1, args.precompute_workers // jobs)

    def make(k: int, seed: int) -> float | None:
        if args.collect_only:
            return precompute_seconds(store(k, seed))
        return precompute_once(work, store(k, seed), [
            args.data, "--weights", args.refinery, "-K", str(k), "--top-k", str(args.top_k),
            "--seed", str(seed), "--input-size", str(args.res), "--workers", str(workers)],
            threads=threads_per_job(jobs))

    with ThreadPoolExecutor(jobs) as pool:
        seconds = list(pool.map(lambda ks: make(*ks), wanted))
    return [{"K": k, "seed": seed, "seconds": s, "side_by_side": jobs}
            for (k, seed), s in zip(wanted, seconds) if s is not None]


def main():
    args = get_args()
    work = Path(args.work)
    device = recorded_device(work, args.collect_only)

    def store(k, seed):
        return work / "stores" / f"K{k}_seed{seed}.zarr"

    precomputed = precompute_stores(args, work, store)
    if args.precompute_only:
        return
    students = StudentRuns.from_args(args, collect_only=args.collect_only)
    runs = sweep_runs(args, store)
    rows = students.train_all(runs)
    finished = {(r["name"], r["seed"]) for r in rows}
    unfinished = [f"{r['name']} seed {r['seed']}" for r in runs
                  if (r["name"], r["seed"]) not in finished]
    summary = summarise(rows, args.tolerance)
    result = {"args": vars(args), "device": device, "precompute": precomputed,
              "students": rows, "unfinished": unfinished, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(summary, args.crops_per_image, args.policies, RESULTS / f"{args.tag}.png",
         f"{args.arch} students, {args.epochs} epochs @ {args.res} px, {device}")
    write_results(args.tag, result, to_markdown(result))


if __name__ == "__main__":
    main()
