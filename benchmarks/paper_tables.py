"""Claims: the paper's Tables 5, 6 and 2 at reduced scale, students of one data set side by side.

Three tables, one ``--work`` shared by all (a student trained for one table is reused by another
with the same settings and name):

``levels`` (Table 5, label levels; the first ``--refinery``): ground truth; WordNet category labels (``--label-mode
category-wordnet``, one row per ``--wordnet-temperature``); visual category labels (each
class's mean refinery label, ``category-visual``); visually refined images (the whole image's
label, ``static``); and, for reference, crop-level soft dynamic labels. The refinery's
BatchNorm is fixed (``--bn-mode eval``) for every visual level, as the paper fixes it.

``refineries`` (Table 6, refinery choice): one store per ``--refinery NAME=MODEL`` (BN train,
the default), one student each; beside each, the refinery's own top-1 on its training images
and on validation (``refine evaluate --split train|val``), the gap between them, and how much
of its labels is the ground truth (the share of stored crops whose top-1 is the image's class,
and the mean probability given to it): the paper's reason an overfit refinery labels worse.

``architectures`` (Table 2, cross-architecture refinery): each ``--student-arch`` on ground
truth and on the store of each ``--refinery NAME=MODEL``.

Every step is a ``refine`` command, finished steps are skipped, so an interrupted run resumes.

CPU at reduced scale (a class-balanced subset; say so):
  python benchmarks/folder_subset.py ../shared/datasets/imagenette-96 /tmp/nette400 --train 400
  python benchmarks/paper_tables.py levels /tmp/nette400 --work /tmp/paper/work \
      --refinery resnet18=REF18/model.pt --res 32 --epochs 8 -K 8 --jobs 2 --workers 1 \
      --tag paper_table5_cpu32
  python benchmarks/paper_tables.py refineries /tmp/nette400 --work /tmp/paper/work \
      --refinery resnet18=REF18/model.pt --refinery resnet50=REF50/model.pt ... \
      --res 32 --epochs 8 -K 8 --jobs 2 --workers 1 --tag paper_table6_cpu32
  python benchmarks/paper_tables.py architectures /tmp/nette400 --work /tmp/paper/work \
      --refinery resnet50=REF50/model.pt --student-arch resnet18 mobilenet_v2 \
      mobilenet_v3_large --res 32 --epochs 8 -K 8 --jobs 2 --workers 1 --tag paper_table2_cpu32
GPU: the same with ``--res 96 --epochs 40 -K 40 --batch-size 256 --lr 0.4 --workers 8``.
"""
import argparse
import statistics
from pathlib import Path

import numpy as np

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import DEFAULT_TOP_K
from refinery_pipeline.training.wordnet import DEFAULT_TEMPERATURE

from _results import markdown_table, write_results
from _runs import (GROUND_TRUTH, StudentRuns, add_student_arguments, describe_students,
                   overfitting_gap, precompute_once, recorded_device,
                   runs_by_name, threads_per_job)

TABLES = ("levels", "refineries", "architectures")


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("table", choices=TABLES)
    p.add_argument("data", help="ImageFolder tree with train/ and val/")
    p.add_argument("--refinery", action="append", required=True, metavar="NAME=MODEL",
                   help="a refinery's name and model.pt (a `refine train` run's); repeatable")
    add_student_arguments(p, work="runs/paper_tables", epochs=8)
    p.add_argument("--student-arch", nargs="+", default=None,
                   help="architectures: the students' architectures (default: --arch)")
    p.add_argument("--wordnet-temperature", type=float, nargs="+", default=[DEFAULT_TEMPERATURE],
                   help="levels: one WordNet row per temperature")
    p.add_argument("--smoothing", type=float, nargs="*", default=[],
                   help="levels: also ground truth label-smoothed by each of these (is a "
                        "category level more than smoothing?)")
    p.add_argument("-K", "--crops-per-image", type=int, default=8)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tag", default="paper_tables")
    return p.parse_args()


def named_refineries(args) -> dict[str, Path]:
    pairs = [item.split("=", 1) for item in args.refinery]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("error: --refinery takes NAME=MODEL, e.g. resnet18=runs/ref/model.pt")
    return {name: Path(model) for name, model in pairs}


def make_store(args, work: Path, name: str, model: Path, bn_mode: str = "train") -> Path:
    """The store of refinery ``name`` for the students' data (once; BN eval adds soft-static)."""
    path = work / "stores" / f"{name}_bn{bn_mode}_K{args.crops_per_image}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--soft-static"] if bn_mode == "eval" else []
    precompute_once(work, path, [args.data, "--weights", str(model), "-K",
                                 str(args.crops_per_image), "--top-k", str(args.top_k),
                                 "--input-size", str(args.res), "--bn-mode", bn_mode,
                                 "--workers", str(threads_per_job(1)), *extra])
    return path


def student_name(arch: str, args, setting: str) -> str:
    """Run names that keep the default architecture's runs shared with the other scripts."""
    return setting if arch == args.arch else f"{arch}, {setting}"


def level_runs(args, work: Path) -> list[dict]:
    name, model = next(iter(named_refineries(args).items()))
    store = str(make_store(args, work, name, model, bn_mode="eval"))
    settings = [(GROUND_TRUTH, [])]
    settings += [(f"ground truth, smoothed {e}", ["--label-smoothing", str(e)])
                 for e in args.smoothing]
    settings += [(f"WordNet categories, T={t}", ["--label-mode", "category-wordnet",
                                                 "--wordnet-temperature", str(t)])
                 for t in args.wordnet_temperature]
    settings += [(f"visual categories, {name} BN eval",
                  ["--labels", store, "--label-mode", "category-visual"]),
                 (f"visual images (soft static), {name} BN eval",
                  ["--labels", store, "--label-mode", "static"]),
                 (f"visual crops (soft dynamic), {name} BN eval", ["--labels", store])]
    return [{"name": n, "seed": seed, "options": options}
            for seed in args.seeds for n, options in settings]


def refinery_runs(args, work: Path) -> list[dict]:
    runs = [{"name": GROUND_TRUTH, "seed": seed, "options": []} for seed in args.seeds]
    for name, model in named_refineries(args).items():
        store = str(make_store(args, work, name, model))
        runs += [{"name": f"refinery {name}", "seed": seed, "options": ["--labels", store],
                  "refinery": name} for seed in args.seeds]
    return runs


def architecture_runs(args, work: Path) -> list[dict]:
    stores = {name: str(make_store(args, work, name, model))
              for name, model in named_refineries(args).items()}
    settings = [(GROUND_TRUTH, [])] + [(f"refinery {name}", ["--labels", store])
                                       for name, store in stores.items()]
    runs = []
    for arch in args.student_arch or [args.arch]:
        for setting, options in settings:
            runs += [{"name": student_name(arch, args, setting), "seed": seed, "arch": arch,
                      "labels": setting, "options": ["--arch", arch, *options],
                      "baseline": student_name(arch, args, GROUND_TRUTH)}
                     for seed in args.seeds]
    return runs


def refinery_profile(args, work: Path, name: str, model: Path, bn_mode: str) -> dict:
    """The refinery's overfitting gap on its own data, and how ground-truth-like its labels of
    the students' crops are (in the BatchNorm mode the table's stores use)."""
    profile = {"name": name, "model": str(model), "bn_mode": bn_mode,
               **overfitting_gap(model.parent, threads_per_job(1), threads_per_job(1))}
    store = make_store(args, work, name, model, bn_mode)
    records = LabelStore.open(store).read_crops()
    labels = _training_labels(args.data)[:, None]
    profile["labels_top1_is_class"] = 100 * float(np.mean(records.topk_indices[..., 0] == labels))
    on_class = (records.topk_indices == labels[..., None]) * records.topk_probs
    profile["labels_mass_on_class"] = float(on_class.sum(-1).mean())
    return profile


def _training_labels(data) -> np.ndarray:
    from refinery_pipeline.sources.data_cache import open_dataset
    return np.asarray(open_dataset(data, "train", None, num_workers=1).labels)


def own_class_mass(students: StudentRuns, run: dict) -> float | None:
    """Mean diagonal of a category-level run's table (``OUT/category_targets.npy``)."""
    table = students.run_dir(run) / "category_targets.npy"
    return float(np.load(table).diagonal().mean()) if table.is_file() else None


def summarise(rows: list[dict]) -> list[dict]:
    """Each setting's seeds, against the ground truth of the same architecture."""
    grouped = runs_by_name(rows)
    mean = {name: statistics.mean(r["val_top1"] for r in runs) for name, runs in grouped.items()}
    return [{"name": name, "seeds": [r["seed"] for r in runs],
             "val_top1": [r["val_top1"] for r in runs], "mean": mean[name],
             "vs_ground_truth": mean[name] - mean[runs[0].get("baseline", GROUND_TRUTH)],
             **{k: runs[0][k] for k in ("arch", "labels", "refinery", "own_class_mass")
                if runs[0].get(k) is not None}}
            for name, runs in grouped.items()]


def main():
    args = get_args()
    work = Path(args.work)
    device = recorded_device(work, collect_only=False)
    runs = {"levels": level_runs, "refineries": refinery_runs,
            "architectures": architecture_runs}[args.table](args, work)
    students = StudentRuns.from_args(args)
    rows = students.train_all(runs)
    by_key = {(run["name"], run["seed"]): run for run in runs}
    for row in rows:
        row["own_class_mass"] = own_class_mass(students, by_key[row["name"], row["seed"]])
    bn_mode = "eval" if args.table == "levels" else "train"
    used = list(named_refineries(args).items())[:1 if args.table == "levels" else None]
    refineries = [refinery_profile(args, work, name, model, bn_mode) for name, model in used]
    result = {"args": vars(args), "device": device, "refineries": refineries,
              "students": rows, "summary": summarise(rows)}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(result: dict) -> str:
    a = result["args"]
    title = {"levels": "Table 5: label levels", "refineries": "Table 6: refinery choice",
             "architectures": "Table 2: a refinery for other architectures"}[a["table"]]
    lines = [f"# {title}: `{a['tag']}`", "",
             f"Device: {result['device']}. Data `{a['data']}`. Students: {describe_students(a)}"
             f"; stores K = {a['crops_per_image']} crops per image, top-{a['top_k']}. Seeds "
             f"{a['seeds']}.", "", "Refineries (top-1 on the centred images of their own "
             "training set and of validation; their labels of the students' stored crops, "
             f"BN {result['refineries'][0]['bn_mode']}):", ""]
    lines += markdown_table(
        ["refinery", "train top-1", "val top-1", "gap", "labels: top-1 is the class",
         "labels: mass on the class"],
        [[r["name"], f"{r['train_top1']:.2f}", f"{r['val_top1']:.2f}", f"{r['gap']:+.2f}",
          f"{r['labels_top1_is_class']:.1f}%", f"{r['labels_mass_on_class']:.3f}"]
         for r in result["refineries"]])
    lines += ["", "Students:", ""]
    lines += markdown_table(
        ["student", "mean val top-1", "vs ground truth", "per seed", "own-class mass"],
        [[s["name"], f"{s['mean']:.2f}", f"{s['vs_ground_truth']:+.2f}",
          ", ".join(f"{v:.2f}" for v in s["val_top1"]),
          f"{s['own_class_mass']:.3f}" if "own_class_mass" in s else ""]
         for s in result["summary"]])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
