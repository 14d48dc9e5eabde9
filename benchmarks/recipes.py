"""Claim: a store can hold a modern training recipe (TrivialAugment, random erasing, mixup and
cutmix: torchvision's ImageNet recipe), labelled on the exact pixels, and students train from it
as from an online refinery running the same recipe; an ensemble of refineries labels it too.

Issue 18's table. Per seed, students with identical settings on: ground truth with crop + flip;
ground truth with the recipe (mixed one-hot targets); cached crop + flip labels; cached labels
with the recipe; the online refinery with the recipe (fresh draws); cached labels of an
ensemble of two refineries with the recipe. Also the bytes per crop of the stores (the recipe
stores no per-crop bytes: its parameters are drawn from the plan) and each student's epoch time.
Every step is a ``refine`` command; finished runs and stores are skipped, so it resumes.

CPU at reduced scale (what a session without a GPU runs; a class-balanced subset, say so):
  python benchmarks/folder_subset.py ../shared/datasets/imagenette-96 /tmp/nette400 --train 400
  python benchmarks/recipes.py /tmp/nette400 --refinery A/model.pt --refinery B/model.pt \
      --res 32 --epochs 8 -K 8 --jobs 2 --workers 1 --tag recipes_cpu32
GPU: the same with ``--res 96 --epochs 40 -K 40 --batch-size 256 --lr 0.4 --workers 8``.
"""
import argparse
import statistics
from pathlib import Path

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import DEFAULT_TOP_K

from _results import markdown_table, write_results
from _runs import (StudentRuns, add_student_arguments, describe_students, final_metrics,
                   precompute_once, recorded_device, runs_by_name, threads_per_job)

# torchvision's classification reference, the "new recipe" (--auto-augment ta_wide
# --random-erase 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0)
TORCHVISION_RECIPE = ("trivialaugment", "erasing:0.1", "mixup:0.2", "cutmix:1")


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder tree with train/ and val/")
    p.add_argument("--refinery", action="append", required=True,
                   help="refinery model.pt; give two for the ensemble row (the first labels "
                        "the single-refinery stores and teaches online)")
    add_student_arguments(p, work="runs/recipes", epochs=8)
    p.add_argument("-K", "--crops-per-image", type=int, default=8)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--augment", nargs="+", default=list(TORCHVISION_RECIPE))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--collect-only", action="store_true", help="report finished runs only")
    p.add_argument("--tag", default="recipes")
    return p.parse_args()


def augment_options(recipe) -> list[str]:
    return [option for step in recipe for option in ("--augment", step)]


def make_stores(args, work: Path) -> dict:
    """The three stores, each made once: crop + flip, the recipe, the recipe by the ensemble."""
    common = [args.data, "-K", str(args.crops_per_image), "--top-k", str(args.top_k),
              "--input-size", str(args.res), "--workers", str(threads_per_job(1))]
    first = ["--weights", args.refinery[0]]
    both = [o for weights in args.refinery[:2] for o in ("--weights", weights)]
    recipe = augment_options(args.augment)
    wanted = {"crop+flip": first, "recipe": first + recipe}
    if len(args.refinery) > 1:
        wanted["ensemble recipe"] = both + recipe
    stores = {}
    for name, options in wanted.items():
        path = work / f"labels_K{args.crops_per_image}_{name.replace(' ', '_')}.zarr"
        seconds = None if args.collect_only else precompute_once(work, path, common + options)
        stores[name] = {"path": str(path), "seconds": seconds, **store_size(path)}
    return stores


def store_size(path: Path) -> dict:
    if not path.exists():
        return {}
    store = LabelStore.open(path)
    crops = store.layout.num_images * store.layout.crops_per_image
    return {"bytes_per_crop": store.nbytes_on_disk() / crops, "augment": list(store.plan.augment)}


def student_runs(args, stores: dict) -> list[dict]:
    recipe = augment_options(args.augment)
    settings = [("ground truth, crop+flip", []), ("ground truth, recipe", recipe),
                ("cached crop+flip", ["--labels", stores["crop+flip"]["path"]]),
                ("cached, recipe", ["--labels", stores["recipe"]["path"]]),
                ("online refinery, recipe", ["--teacher", args.refinery[0]] + recipe)]
    if "ensemble recipe" in stores:
        settings.append(("cached ensemble of 2, recipe",
                         ["--labels", stores["ensemble recipe"]["path"]]))
    return [{"name": name, "seed": seed, "options": options}
            for seed in args.seeds for name, options in settings]


def epoch_seconds(students: StudentRuns, run: dict) -> float:
    """Median training epoch of a finished run (its metrics.jsonl)."""
    import json
    lines = (students.run_dir(run) / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["epoch_seconds"] for line in lines)


def main():
    args = get_args()
    work = Path(args.work)
    device = recorded_device(work, args.collect_only)
    stores = make_stores(args, work)
    students = StudentRuns.from_args(args, args.collect_only)
    runs = student_runs(args, stores)
    rows = students.train_all(runs)
    by_key = {(run["name"], run["seed"]): run for run in runs}
    for row in rows:
        row["epoch_seconds"] = epoch_seconds(students, by_key[row["name"], row["seed"]])
    refineries = [{"checkpoint": r, "val_top1": final_metrics(Path(r).parent)["val_top1"]}
                  for r in args.refinery]
    result = {"args": vars(args), "device": device, "refineries": refineries, "stores": stores,
              "students": rows}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(r) -> str:
    a = r["args"]
    refineries = "; ".join(f"`{x['checkpoint']}` (val top-1 {x['val_top1']:.2f})"
                           for x in r["refineries"])
    lines = [f"# Training recipes in the store: `{a['tag']}`", "",
             f"Device: {r['device']}. Data: `{a['data']}` at {a['res']} px crops. Recipe: "
             f"`{' '.join(a['augment'])}`. Refineries: {refineries}. Students: "
             f"{describe_students(a)}; seeds {a['seeds']}. Stores: K = {a['crops_per_image']}, "
             f"top-{a['top_k']}.", ""]
    rows = []
    for name, runs in runs_by_name(r["students"]).items():
        top1 = [x["val_top1"] for x in runs]
        rows.append([name, f"{statistics.mean(top1):.2f}", ", ".join(f"{v:.2f}" for v in top1),
                     f"{statistics.mean(x['epoch_seconds'] for x in runs):.1f}"])
    lines += markdown_table(["student labels", "mean val top-1", "seeds", "epoch (s)"], rows)
    lines += ["", "Stores:", ""]
    lines += markdown_table(["store", "recipe", "bytes per crop", "precompute (s)"],
                            [[name, " ".join(s.get("augment", [])) or "crop+flip",
                              f"{s['bytes_per_crop']:.2f}" if "bytes_per_crop" in s else "",
                              f"{s['seconds']:.0f}" if s.get("seconds") else ""]
                             for name, s in r["stores"].items()])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
