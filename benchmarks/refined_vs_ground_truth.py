"""Claim: students on cached refined labels match or beat ground truth, in every labelling mode.

Runs the README's commands on an ImageFolder tree (train/ and val/): a refinery on ground truth
(or an existing one, ``--refinery``) -> ``refine precompute --soft-static`` -> one student per
labelling mode of the paper with identical settings: ground truth (with and without label
smoothing), cached soft dynamic under each loss (Table 7), cached hard dynamic and soft static
(Table 4), and the online refinery on fresh crops (BN train and eval) and on the store's own
crops (the parity check). Every step is a ``refine`` command; finished runs are skipped, so an
interrupted benchmark resumes. Writes a markdown table and JSON to benchmarks/results/.

GPU (the reference's setting):
  python benchmarks/refined_vs_ground_truth.py DATA --refinery-arch resnet50 --res 96 \
      --refinery-epochs 100 --epochs 40 --batch-size 256 --lr 0.4 --tag imagenette96_gpu
CPU at reduced scale (what a session without a GPU can run):
  python benchmarks/refined_vs_ground_truth.py DATA --refinery-arch resnet18 --res 32 \
      --refinery-epochs 16 --epochs 8 --batch-size 128 --lr 0.2 --jobs 2 --workers 1 --tag imagenette96_cpu32
"""
import argparse
import os
from pathlib import Path

from refinery_pipeline.store.schema import DEFAULT_TOP_K

from _results import markdown_table, write_results
from _runs import (GROUND_TRUTH, ONLINE, StudentRuns, add_student_arguments, describe_students,
                   device_name, final_metrics, precompute_once, resume_flag, run_logged)


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    add_student_arguments(p, work="runs/refined_vs_gt", epochs=8)
    p.add_argument("--refinery", help="an existing refinery model.pt (else one is trained)")
    p.add_argument("--refinery-arch", default="resnet18")
    p.add_argument("--refinery-epochs", type=int, default=16)
    p.add_argument("-K", "--crops-per-image", type=int, default=10)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tag", default="run")
    return p.parse_args()


def label_modes(store: str, teacher: str) -> list[tuple[str, list[str]]]:
    """Every labelling mode as (row name, `refine train` options)."""
    cached = ["--labels", store]
    online = ["--teacher", teacher]
    return [(GROUND_TRUTH, []),
            ("ground truth, label smoothing 0.1", ["--label-smoothing", "0.1"]),
            ("cached soft dynamic, KL", cached),
            ("cached soft dynamic, soft CE", cached + ["--loss", "soft_ce"]),
            ("cached soft dynamic, reverse KL", cached + ["--loss", "reverse_kl"]),
            ("cached soft dynamic, L2", cached + ["--loss", "l2"]),
            ("cached hard dynamic (arg-max)", cached + ["--label-mode", "hard"]),
            ("soft static (whole image)", cached + ["--label-mode", "static"]),
            (ONLINE, online),
            ("online, fresh crops, BN eval", online + ["--teacher-bn", "eval"]),
            ("online, replayed store crops", online + cached + ["--teacher-crops", "replay"])]


def refinery_checkpoint(args, work: Path) -> tuple[str, dict]:
    """The refinery to use and its final metrics: the one given, or one trained here."""
    if args.refinery:
        return args.refinery, final_metrics(Path(args.refinery).parent)
    out = work / "refinery"
    if not (out / "model.pt").exists():
        run_logged(["refine", "train", args.data, "--out", str(out), "--arch", args.refinery_arch,
                    "--res", str(args.res), "--epochs", str(args.refinery_epochs),
                    "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                    "--workers", str(args.workers), *resume_flag(out)],
                   work / "logs" / "refinery.log", threads=os.cpu_count() or 1)
    return str(out / "model.pt"), final_metrics(out)


def main():
    args = get_args()
    work = Path(args.work)
    teacher, teacher_metrics = refinery_checkpoint(args, work)
    store = work / f"labels_K{args.crops_per_image}.zarr"
    precompute_s = precompute_once(work, store, [
        args.data, "--weights", teacher, "-K", str(args.crops_per_image), "--top-k",
        str(args.top_k), "--input-size", str(args.res), "--workers", str(args.workers),
        "--soft-static"])
    students = StudentRuns.from_args(args)
    rows = students.train_all([{"name": name, "seed": seed, "options": options}
                               for seed in args.seeds
                               for name, options in label_modes(str(store), teacher)])
    result = {"args": vars(args), "device": device_name(),
              "refinery": {"checkpoint": teacher, "val_top1": teacher_metrics["val_top1"]},
              "precompute": {"seconds": precompute_s}, "students": rows}
    write_results(args.tag, result, to_markdown(result))




def to_markdown(r) -> str:
    a = r["args"]
    refinery = a["refinery"] or f"{a['refinery_arch']}, {a['refinery_epochs']} epochs"
    lines = [f"# Students in every labelling mode: `{a['tag']}`", "",
             f"Device: {r['device']}. Data: `{a['data']}` at {a['res']} px crops. Refinery "
             f"{refinery} (val top-1 {r['refinery']['val_top1']:.2f}). Store: K = "
             f"{a['crops_per_image']} crops per image, top-{a['top_k']}, soft-static labels, "
             f"precomputed in {r['precompute']['seconds']:.0f} s. Students: "
             f"{describe_students(a)}.", ""]
    lines += markdown_table(["student labels", "seed", "val top-1", "val top-5", "wall time (s)"],
                            [[row["name"], row["seed"], f"{row['val_top1']:.2f}",
                              f"{row['val_top5']:.2f}", f"{row['seconds']:.0f}"]
                             for row in r["students"]])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
