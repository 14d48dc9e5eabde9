"""Check: are finished students' val accuracies limited by stale BatchNorm running statistics?

Runs that update BN statistics at different rates (adversarial jittering updates them twice per
step) or models with slow BN momentum (torchvision's MobileNetV3 uses 0.01) in short schedules
can differ at evaluation only because their running statistics lag the weights. For each run
directory this evaluates ``model.pt`` as saved, then again after recomputing every BN layer's
running statistics as a plain average over ``--batches`` training batches ("precise BN",
:func:`refinery_pipeline.training.precise_bn.recompute_from_loader`, what ``refine train --precise-bn``
does before each evaluation), and prints both: the check for runs trained without it.

  python benchmarks/bn_recalibration.py DATA RUN [RUN ...] --res 32 --tag bn_recalibration_cpu32
"""
import argparse
import json
from pathlib import Path

import torch
from _results import markdown_table, write_results
from _runs import device_name

from refinery_pipeline.models.checkpoints import load_trained_model
from refinery_pipeline.training.precise_bn import recompute_from_loader
from refinery_pipeline.core.devices import resolve_device
from refinery_pipeline.training.evaluation import evaluate
from refinery_pipeline.training.data import load_data
from refinery_pipeline.training.config import TrainConfig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="the runs' ImageFolder tree (train/ and val/)")
    p.add_argument("runs", nargs="+", help="`refine train` output directories")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="training batches to average over")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tag", default="bn_recalibration")
    args = p.parse_args()
    device = resolve_device("auto")
    cfg = TrainConfig(data=args.data, out_dir="unused", res=args.res, batch_size=args.batch_size,
                      workers=args.workers, progress=False)
    _, train_loader, val_loader, _, _ = load_data(cfg, device)  # fresh seeded crops
    rows = []
    for run in args.runs:
        model, ckpt = load_trained_model(Path(run) / "model.pt")
        model = model.to(device, memory_format=torch.channels_last)
        saved = evaluate(model, val_loader, device, len(ckpt["classes"]))["val_top1"]
        train_loader.next_epoch = 0  # every run averages over the same crops, wherever it is listed
        recompute_from_loader(model, train_loader, args.batches, device)
        recalibrated = evaluate(model, val_loader, device, len(ckpt["classes"]))["val_top1"]
        config = json.loads((Path(run) / "config.json").read_text())
        rows.append({"run": Path(run).name, "arch": config["arch"], "val_top1_saved": saved,
                     "val_top1_recalibrated": recalibrated})
        print(f"{Path(run).name}: {saved:.2f} -> {recalibrated:.2f}", flush=True)
    result = {"args": vars(args), "device": device_name(), "rows": rows}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Val top-1 with BatchNorm statistics recomputed: `{a['tag']}`", "",
             f"Device {result['device']}; {a['res']} px; running statistics recomputed as the "
             f"plain average over {a['batches']} training batches of {a['batch_size']} fresh "
             "crops, weights frozen, dropout off (`refinery_pipeline.training.precise_bn`).", ""]
    lines += markdown_table(
        ["run", "arch", "val top-1 as saved", "recomputed BN statistics", "change"],
        [[r["run"], r["arch"], f"{r['val_top1_saved']:.2f}", f"{r['val_top1_recalibrated']:.2f}",
          f"{r['val_top1_recalibrated'] - r['val_top1_saved']:+.2f}"] for r in result["rows"]])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
