"""Claim: students trained on cached refined labels match or beat ground-truth students.

Runs the README's commands in sequence on an ImageFolder tree (train/ and val/):
refinery on ground truth -> `refine precompute` -> ground-truth student and refined student with
identical settings. Writes a markdown table and JSON to benchmarks/results/.

GPU (the reference's setting):
  python benchmarks/refined_vs_ground_truth.py DATA --refinery-arch resnet50 --res 96 \
      --refinery-epochs 100 --epochs 40 --batch-size 256 --tag imagenette96_gpu
CPU at reduced scale (what a session without a GPU can run):
  python benchmarks/refined_vs_ground_truth.py DATA --refinery-arch resnet18 --res 32 \
      --refinery-epochs 16 --epochs 8 --batch-size 128 --tag imagenette96_cpu32
"""
import argparse
import platform
import time
from pathlib import Path

import torch
from _results import write_results

from refinery_pipeline.crop_plan import CropPlan
from refinery_pipeline.dataset import open_dataset
from refinery_pipeline.precompute import precompute, software_versions
from refinery_pipeline.refinery import Refinery
from refinery_pipeline.train import TrainConfig, fit, resolve_device

def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    p.add_argument("--work", default="runs/refined_vs_gt")
    p.add_argument("--refinery-arch", default="resnet18")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--refinery-epochs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("-K", "--crops-per-image", type=int, default=10)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tag", default="run")
    return p.parse_args()


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def main():
    args = get_args()
    work = Path(args.work)
    common = dict(data=args.data, res=args.res, batch_size=args.batch_size, lr=args.lr,
                  workers=args.workers, progress=False)
    ref, ref_s = timed(fit, TrainConfig(out_dir=str(work / "refinery"), arch=args.refinery_arch,
                                        epochs=args.refinery_epochs, **common))
    refinery = Refinery.from_checkpoint(work / "refinery" / "model.pt",
                                        device=resolve_device("auto"))
    store = work / "labels.zarr"
    summary, pre_s = timed(precompute, open_dataset(args.data, "train"), store, refinery,
                           CropPlan(seed=0, crops_per_image=args.crops_per_image), args.top_k,
                           crop_batch=args.batch_size, num_workers=args.workers, progress=False)
    rows = []
    for seed in args.seeds:
        for name, labels in (("ground truth", None), (f"cached soft, K={args.crops_per_image} "
                                                      f"top-{args.top_k}", str(store))):
            m, s = timed(fit, TrainConfig(out_dir=str(work / f"student_{seed}_{labels is None}"),
                                          arch=args.arch, epochs=args.epochs, labels=labels,
                                          seed=seed, **common))
            rows.append({"labels": name, "seed": seed, "val_top1": m["val_top1"],
                         "val_top5": m["val_top5"], "seconds": s})
            print(rows[-1], flush=True)
    result = {"args": vars(args), "device": str(resolve_device("auto")),
              "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "software": software_versions(),
              "refinery": {"val_top1": ref["val_top1"], "seconds": ref_s},
              "precompute": {"crops": summary.crops, "seconds": pre_s,
                             "crops_per_second": summary.crops_per_second,
                             "bytes_per_crop": summary.bytes_per_crop},
              "students": rows}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(r) -> str:
    a = r["args"]
    lines = [f"# Refined vs ground-truth students: `{a['tag']}`", "",
             f"Device: {r['device']} ({r['threads']} threads). Data: `{a['data']}` at {a['res']} px "
             f"crops. Refinery: {a['refinery_arch']}, {a['refinery_epochs']} epochs on ground "
             f"truth, val top-1 {r['refinery']['val_top1']:.2f}. Students: {a['arch']}, "
             f"{a['epochs']} epochs, batch {a['batch_size']}, lr {a['lr']}.", "",
             f"Precompute: {r['precompute']['crops']:,} crops in {r['precompute']['seconds']:.0f} s "
             f"({r['precompute']['crops_per_second']:.0f} crops/s, "
             f"{r['precompute']['bytes_per_crop']:.1f} bytes/crop on disk).", "",
             "| student labels | seed | val top-1 | val top-5 | train time (s) |",
             "|---|---|---|---|---|"]
    for row in r["students"]:
        lines.append(f"| {row['labels']} | {row['seed']} | {row['val_top1']:.2f} | "
                     f"{row['val_top5']:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
