"""Claim: a cached-label epoch costs about a ground-truth epoch, and far less than an online one.

Times whole training epochs (`train.train_one_epoch`, the same step loop `refine train` uses) of
one student in three label modes, interleaved over rounds: ground truth (fresh crops), cached
soft labels (replayed crops, store in memory), and an online refinery on fresh crops.

  python benchmarks/epoch_time.py DATA --store S.zarr --teacher R50.pt --arch resnet18 \
      --res 96 --batch-size 256 --workers 16 --tag epoch_time_h100

``--compile`` times all three with ``torch.compile``d models (the student, and the online
refinery as ``refine train --compile`` compiles it); compilation falls in the warm-up round.

Each mode is also timed with the loader taken away (one real batch, resident on the device,
for every step of the epoch): what the models, labels and optimizer cost on this machine. With a
loader that overlaps the GPU work, an epoch costs the larger of the loader's time and the step
loop's, so the loader-removed online / cached ratio bounds the measured one: the claim is checked
against this machine's own models rather than another machine's ceilings.
"""
import argparse
import itertools
import statistics
import time
from dataclasses import replace

import torch
from _results import markdown_table, write_results
from _runs import device_name

from refinery_pipeline.plan.recipe import Recipe
from refinery_pipeline.training.losses import get_loss
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.labelling.precompute import software_versions
from refinery_pipeline.training.schedule import lr_factor
from refinery_pipeline.core.devices import resolve_device
from refinery_pipeline.training.train import train_one_epoch
from refinery_pipeline.training.data import load_data
from refinery_pipeline.training.config import TrainConfig

LOADER_REMOVED = "loader removed"
CACHED, ONLINE = "cached soft (store)", "online teacher (fresh crops)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    p.add_argument("--store", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile student and refinery")
    p.add_argument("--augment", nargs="+", default=[],
                   help="a recipe (refine train --augment steps) for the ground-truth and online "
                        "modes; the store must have been made with the same one")
    p.add_argument("--tag", default="epoch_time")
    args = p.parse_args()
    device = resolve_device("auto")
    base = TrainConfig(data=args.data, out_dir="unused", arch=args.arch, res=args.res,
                       batch_size=args.batch_size, workers=args.workers, compile=args.compile,
                       progress=False)
    recipe = Recipe.parse(args.augment).names()
    modes = {"ground truth": replace(base, augment=recipe), CACHED: replace(base, labels=args.store),
             ONLINE: replace(base, teacher=args.teacher, augment=recipe)}
    setups = {}
    for name, cfg in modes.items():
        _, loader, _, targets, _ = load_data(cfg, device)
        model = create_model(args.arch, 10).to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        model = torch.compile(model) if args.compile else model
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("linear", len(loader), 100, 1))
        setups[name] = (model, loader, targets, opt, sched)
    setups.update({f"{name}, {LOADER_REMOVED}": (model, resident_batches(loader), *rest)
                   for name, (model, loader, *rest) in list(setups.items())})
    times = {name: [] for name in setups}
    for round_ in range(args.rounds + 1):  # round 0 warms up (compilation)
        for name, (model, loader, targets, opt, sched) in setups.items():
            start = time.perf_counter()
            train_one_epoch(model, loader, targets, get_loss("kl"), opt, sched, device, 10)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    gt = statistics.median(times["ground truth"])
    rows = [{"mode": n, "median_epoch_seconds": statistics.median(t), "all": t,
             "relative_to_ground_truth": statistics.median(t) / gt} for n, t in times.items()]
    result = {"args": vars(args), "device": device_name(), "software": software_versions(),
              "rows": rows}
    write_results(args.tag, result, to_markdown(result))


def resident_batches(loader) -> list:
    """One batch of ``loader`` for each of its steps, the same tensors every time: an epoch of
    the step loop with no decoding or transfer. Cloned, since FFCV reuses its batch buffers."""
    epoch = iter(loader)
    try:
        batch = next(epoch)
    finally:
        epoch.close()  # stop FFCV's decoding thread for the batches not taken
    return list(itertools.repeat(clone(batch), len(loader)))


def clone(batch):
    """A batch (tensors, or named tuples of them such as a CropBatch) that FFCV cannot reuse."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, tuple):
        return type(batch)(*(None if part is None else clone(part) for part in batch))
    return batch


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Epoch time by label mode: `{a['tag']}`", "",
             f"Device {result['device']}; student {a['arch']} @ {a['res']} px, batch "
             f"{a['batch_size']}, {a['workers']} workers"
             f"{', torch.compile (student and refinery)' if a.get('compile') else ''}"
             f"{', recipe `' + ' '.join(a['augment']) + '` in every mode' if a.get('augment') else ''}"
             "; median of "
             f"{a['rounds']} interleaved epochs after a warm-up.", ""]
    lines += markdown_table(["label mode", "median epoch (s)", "relative to ground truth"],
                            [[r["mode"], f"{r['median_epoch_seconds']:.3f}",
                              f"{r['relative_to_ground_truth']:.2f}×"] for r in result["rows"]])
    t = {r["mode"]: r["median_epoch_seconds"] for r in result["rows"]}
    lines += ["", f"Cached labels: {t[CACHED] / t['ground truth']:.2f}× a ground-truth epoch, "
              f"{t[ONLINE] / t[CACHED]:.2f}× faster than the online refinery `{a['teacher']}`."]
    if f"{ONLINE}, {LOADER_REMOVED}" in t:  # results from before the loader-removed rows lack it
        bound = t[f"{ONLINE}, {LOADER_REMOVED}"] / t[f"{CACHED}, {LOADER_REMOVED}"]
        lines += ["", f"With the loader removed, an online step costs {bound:.2f}× a cached one on "
                  "this machine: the most any loader could make of the cached-vs-online ratio. "
                  f"Measured: {t[ONLINE] / t[CACHED]:.2f}× "
                  f"({100 * t[ONLINE] / t[CACHED] / bound:.0f}% of that bound)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
