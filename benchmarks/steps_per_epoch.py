"""Claim: `refine train`'s defaults (batch 256, lr 0.4, 2 warm-up epochs) on a few hundred images
take one SGD step per epoch and diverge; the same epochs at more steps per epoch, with the LR
scaled linearly with the batch (what `refine train`'s warning suggests), train. This measures
where, to set ``schedule.MIN_STEPS_PER_EPOCH``.

  python benchmarks/folder_subset.py ../shared/datasets/imagenette-96 /tmp/nette500 \\
      --train 50 --val 20
  python benchmarks/steps_per_epoch.py /tmp/nette500 --res 32 --tag steps_per_epoch_cpu

Each row is one `refine train` (ground truth, ResNet-18, 16 epochs): steps per epoch S means
--batch-size floor(images / S) and --lr 0.4 x batch / 256, except the first row, the defaults.
"""
import argparse
import json
from pathlib import Path

from _results import markdown_table, write_results
from _runs import device_name, final_metrics, run_logged

from refinery_pipeline.training.schedule import MIN_STEPS_PER_EPOCH


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder root with train/ and val/")
    p.add_argument("--work", default="runs/steps_per_epoch")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="steps_per_epoch_cpu")
    return p.parse_args()


def training_images(data: str) -> int:
    return sum(1 for f in (Path(data) / "train").rglob("*") if f.is_file())


def settings(images: int, steps: list[int]) -> list[tuple[str, int, float]]:
    """``(name, batch size, lr)``: the defaults, then each steps-per-epoch count."""
    rows = [("defaults", 256, 0.4)]
    for s in steps:
        batch = images // s
        rows.append((f"{s} steps/epoch", batch, round(0.4 * batch / 256, 4)))
    return rows


def main():
    args = get_args()
    work, images = Path(args.work), training_images(args.data)
    results = []
    for name, batch, lr in settings(images, args.steps):
        out = work / f"b{batch}_lr{lr}"
        if not (out / "model.pt").exists():
            run_logged(["refine", "train", args.data, "--out", str(out), "--arch", args.arch,
                        "--res", str(args.res), "--epochs", str(args.epochs), "--batch-size",
                        str(batch), "--lr", str(lr), "--workers", str(args.workers),
                        "--eval-every", str(args.epochs)], work / f"{out.name}.log", args.threads)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = final_metrics(out)
        results.append({"setting": name, "batch_size": batch, "lr": lr,
                        "steps_per_epoch": images // batch, "max_train_loss":
                        max(r["train_loss"] for r in records), "final_train_loss":
                        records[-1]["train_loss"], "val_top1": last["val_top1"],
                        "warns": images // batch < MIN_STEPS_PER_EPOCH})
    header = ["setting", "batch", "lr", "steps/epoch", "max train loss", "last train loss",
              "val top-1 (%)", f"warns (< {MIN_STEPS_PER_EPOCH} steps)"]
    rows = [[r["setting"], r["batch_size"], r["lr"], r["steps_per_epoch"],
             f"{r['max_train_loss']:.2f}", f"{r['final_train_loss']:.2f}", f"{r['val_top1']:.1f}",
             "yes" if r["warns"] else "no"] for r in results]
    markdown = "\n".join([
        f"# Steps per epoch: {images} training images, {args.arch} @ {args.res} px, "
        f"{args.epochs} epochs, ground truth ({device_name()})", "",
        *markdown_table(header, rows), ""])
    write_results(args.tag, {"images": images, "arch": args.arch, "res": args.res,
                             "epochs": args.epochs, "device": device_name(), "runs": results},
                  markdown)


if __name__ == "__main__":
    main()
