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

The paper's regime (issue 19, item 5): its chains gain because each generation overfits its
training set and the next one, trained on its crop labels, overfits less. ``--gap`` measures that
for every generation (top-1 on the centred training images and on validation, ``refine evaluate
--split train|val``) and draws it (``refine plot --gap``: Fig. 1, Figs. 4-6);
``--control`` adds ground-truth students trained as many epochs as the whole chain
((generations + 1) x --epochs), so a gain cannot be just more training; ``--show-crops`` draws the
same stored crops with every generation's top-3 (``refine show --compare``: Figs. 7-8; one extra
store labelled by the last generation). A small training set and a long schedule reach it:
  python benchmarks/folder_subset.py ../shared/datasets/imagenette-96 /tmp/nette100 --train 100
  python benchmarks/generations.py /tmp/nette100 --work /tmp/overfit --res 32 --epochs 30 \
      --batch-size 64 --lr 0.1 --generations 2 --seeds 0 1 --jobs 2 --workers 1 --gap \
      --control --show-crops --tag generations_overfit_cpu32
"""
import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refinery_pipeline.store.schema import DEFAULT_TOP_K

from _results import RESULTS, markdown_table, write_results
from _runs import (GROUND_TRUTH, StudentRuns, add_student_arguments, describe_students,
                   overfitting_gap, precompute_once, recorded_device, run_logged)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    add_student_arguments(p, work="runs/generations", epochs=8)
    p.add_argument("--generations", type=int, default=3, help="refined generations after gen 0")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--gap", action="store_true",
                   help="evaluate every generation on its training images too (the overfitting gap)")
    p.add_argument("--control", action="store_true",
                   help="ground-truth students trained as many epochs as the whole chain")
    p.add_argument("--show-crops", action="store_true",
                   help="draw the same stored crops with every generation's top-3 (Figs. 7-8)")
    p.add_argument("--tag", default="generations")
    return p.parse_args()


def generation_name(g: int) -> str:
    return GROUND_TRUTH if g == 0 else f"generation {g}"


CONTROL = "ground truth, equal total epochs"


def run_chain(args, students: StudentRuns, seed: int) -> list[dict]:
    """Generation 0 on ground truth, then each generation on a store labelled by the one before
    (and, with --show-crops, a store labelled by the last one, to draw)."""
    rows = [{**students.train({"name": generation_name(0), "seed": seed, "options": []}),
             "generation": 0}]
    for g in range(1, args.generations + 1):
        store, seconds = label_with(args, students, g - 1, seed)
        row = students.train({"name": generation_name(g), "seed": seed,
                              "options": ["--labels", str(store)]})
        rows.append({**row, "generation": g, "precompute_seconds": seconds})
    if args.show_crops:
        label_with(args, students, args.generations, seed)
    if args.gap:
        for row in rows:
            row.update(overfitting_gap(students.run_dir(row), students.threads, args.workers))
    return rows


def label_with(args, students: StudentRuns, g: int, seed: int) -> tuple[Path, float]:
    """The store generation ``g`` labels (the training store of generation g + 1): the chain's
    plan seed, so every store of a chain holds the same crops."""
    refinery = students.run_dir({"name": generation_name(g), "seed": seed}) / "model.pt"
    store = chain_store(students, g + 1, seed)
    store.parent.mkdir(parents=True, exist_ok=True)
    seconds = precompute_once(students.work, store, [
        args.data, "--weights", str(refinery), "-K", str(args.epochs), "--top-k",
        str(args.top_k), "--input-size", str(args.res), "--seed", str(seed),
        "--workers", str(args.workers)], threads=students.threads)
    return store, seconds


def chain_store(students: StudentRuns, g: int, seed: int) -> Path:
    return students.work / "stores" / f"generation{g}_seed{seed}.zarr"


def run_control(args, seed: int) -> dict:
    """Ground truth trained as many epochs as generations 0..G together."""
    epochs = (args.generations + 1) * args.epochs
    students = StudentRuns.from_args(args)
    students.epochs = epochs
    row = students.train({"name": CONTROL, "seed": seed, "options": []})
    row.update(epochs=epochs, **(overfitting_gap(students.run_dir(row), students.threads,
                                                 args.workers) if args.gap else {}))
    return row


def draw_gap(args, students: StudentRuns, seed: int, path: Path):
    """Fig. 1 / Figs. 4-6: ``refine plot --gap`` of one chain's generations (and the control)."""
    runs = [students.run_dir({"name": generation_name(g), "seed": seed})
            for g in range(args.generations + 1)]
    names = [generation_name(g) for g in range(args.generations + 1)]
    if args.control:
        runs.append(students.run_dir({"name": CONTROL, "seed": seed}))
        names.append(f"ground truth, {(args.generations + 1) * args.epochs} epochs")
    command = ["refine", "plot", *map(str, runs), "--gap", "--out", str(path)]
    run_logged(command + [o for n in names for o in ("--name", n)],
               students.work / "logs" / f"plot_gap_seed{seed}.log", students.threads)


def draw_crops(args, students: StudentRuns, seed: int, path: Path):
    """Figs. 7-8: the same stored crops with each generation's top-3 (store g + 1 holds
    generation g's labels of them)."""
    stores = [chain_store(students, g + 1, seed) for g in range(args.generations + 1)]
    command = ["refine", "show", str(stores[0]), args.data, "--images", "4", "--crops", "4",
               "--seed", str(seed), "--out", str(path), "--workers", str(args.workers)]
    command += [o for store in stores[1:] for o in ("--compare", str(store))]
    command += [o for g in range(args.generations + 1)  # short: three fit under each crop
                for o in ("--name", f"gen {g}" + (" (GT)" if g == 0 else ""))]
    run_logged(command, students.work / "logs" / f"show_crops_seed{seed}.log", students.threads)


def summarise(rows: list[dict]) -> list[dict]:
    by_generation = {}
    for row in rows:
        by_generation.setdefault(row["generation"], []).append(row)
    base = statistics.mean(r["val_top1"] for r in by_generation[0])
    return [{"generation": g, "name": runs[0]["name"], "seeds": [r["seed"] for r in runs],
             "val_top1": [r["val_top1"] for r in runs],
             "mean": statistics.mean(r["val_top1"] for r in runs),
             "vs_generation_0": statistics.mean(r["val_top1"] for r in runs) - base,
             **({"train_top1": statistics.mean(r["train_top1"] for r in runs),
                 "gap": statistics.mean(r["gap"] for r in runs)} if "gap" in runs[0] else {})}
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
    rows = result["summary"] + result.get("control", [])
    gap = "gap" in rows[0]
    header = ["generation", "labels from", "mean val top-1", "vs generation 0", "per seed"]
    lines += markdown_table(header + (["train-image top-1", "gap"] if gap else []), [
        [s["generation"], s["name"] if s["generation"] in (0, "control") else
         f"generation {s['generation'] - 1}", f"{s['mean']:.2f}", f"{s['vs_generation_0']:+.2f}",
         ", ".join(f"{v:.2f}" for v in s["val_top1"])]
        + ([f"{s['train_top1']:.2f}", f"{s['gap']:+.2f}"] if gap else []) for s in rows])
    if gap:
        lines += ["", "Train-image top-1 and gap: `refine evaluate RUN --split train|val` "
                  "(centred images, seed mean); the validation column is the training run's own "
                  "last evaluation.", "", f"![train/validation gap]({a['tag']}_gap.png)"]
    if a.get("show_crops"):
        lines += ["", f"![each generation's top-3 of the same crops]({a['tag']}_crops.png)"]
    return "\n".join(lines) + "\n"


def main():
    args = get_args()
    device = recorded_device(Path(args.work), collect_only=False)
    students = StudentRuns.from_args(args)  # threads per step: the cores / --jobs
    with ThreadPoolExecutor(args.jobs) as pool:
        chains = list(pool.map(lambda seed: run_chain(args, students, seed), args.seeds))
        controls = list(pool.map(lambda seed: run_control(args, seed), args.seeds)) \
            if args.control else []
    rows = [row for chain in chains for row in chain]
    summary = summarise(rows)
    result = {"args": vars(args), "device": device, "students": rows + controls,
              "summary": summary}
    if controls:
        result["control"] = [{**summarise([{**c, "generation": 0} for c in controls])[0],
                              "generation": "control"}]
        result["control"][0]["vs_generation_0"] = result["control"][0]["mean"] - summary[0]["mean"]
    if args.gap:
        draw_gap(args, students, args.seeds[0], RESULTS / f"{args.tag}_gap.png")
    if args.show_crops:
        draw_crops(args, students, args.seeds[0], RESULTS / f"{args.tag}_crops.png")
    write_results(args.tag, result, to_markdown(result))
    plot(summary, RESULTS / f"{args.tag}.png", f"chained refineries, {args.arch} @ {args.res} px")


if __name__ == "__main__":
    main()
