"""Claim: the plain-PyTorch backend (`StoreCropDataset` in a `DataLoader`) is no slower than the
torchvision loader users run today; goal ≥ 1.0× torchvision's images/s, aim ≥ 2×.

Same train split, worker count, batch size, crop size, shuffled order and `drop_last` for every
mode; all yield uint8 crops on the host (no normalisation, no model):

* torchvision: `ImageFolder` + `RandomResizedCrop(res)` + `RandomHorizontalFlip` + `PILToTensor`
  in a `DataLoader` (PIL decode and bilinear resize per image, in the workers);
* stock FFCV: `RandomResizedCropRGBImageDecoder` + flip (``loader_throughput.stock_loader``);
* replay: `refinery.replay_loader` (FFCV backend, stored boxes and flips);
* plain, .beton: `StoreCropDataset(store, beton)` + `CropCollate` (simplejpeg + cv2, exact pixels);
* plain, files: `StoreCropDataset(store, tree)` (the original JPEG files, approximate pixels).

`DataLoader`s use persistent workers (so `set_epoch` and steady state are what is timed). One
warm-up epoch each (worker start, numba compilation), then ``--rounds`` interleaved epochs per
mode, median reported: ratios come from one run on one machine. The store is labelled by an
untrained ``demo_cnn`` (labels do not matter here; only their reading is timed) and cached under
``--work``. ``--profile N`` also times N `__getitem__` calls of each map-style data set in this
process under cProfile, to show where an item's time goes.

  python benchmarks/plain_loader_throughput.py --res 96 --workers 2 --batch-size 256 \\
      --tag plain_loader_cpu
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from pathlib import Path

import torch
from _results import markdown_table, write_results
from _runs import precompute_once
from loader_throughput import epoch_rate, stock_loader

import refinery_pipeline as refinery
from refinery_pipeline.dataset import open_dataset
from refinery_pipeline.models import create_model, save_checkpoint
from refinery_pipeline.precompute import software_versions

TORCHVISION = "torchvision ImageFolder + RandomResizedCrop + flip + PILToTensor"


def make_store(args, dataset) -> Path:
    """A K-slot store at ``args.res`` labelled by an untrained demo_cnn, made once under --work."""
    work = Path(args.work)
    ckpt = work / f"demo_cnn_untrained_{args.res}.pt"
    if not ckpt.exists():
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model("demo_cnn", len(dataset.classes)), "demo_cnn",
                        dataset.classes, args.res)
    store = work / f"plain_loader_demo{args.res}_k{args.K}.zarr"
    precompute_once(work, store, [args.data, "--weights", str(ckpt), "-K", str(args.K),
                                  "--top-k", "10", "--batch-size", "512"])
    return store


class EpochedLoader:
    """A `DataLoader` over a `StoreCropDataset` that calls `set_epoch` before each epoch."""

    def __init__(self, dataset, **kwargs):
        self.dataset, self.epoch = dataset, 0
        self.loader = torch.utils.data.DataLoader(dataset, **kwargs)

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def torchvision_dataset(args):
    from torchvision import datasets, transforms
    return datasets.ImageFolder(str(Path(args.data) / "train"), transforms.Compose([
        transforms.RandomResizedCrop(args.res), transforms.RandomHorizontalFlip(),
        transforms.PILToTensor()]))


def profile_items(name: str, dataset, count: int, top: int = 10) -> dict:
    """Seconds per `__getitem__` over ``count`` items in this process, and the top functions."""
    for n in range(10):
        dataset[n]  # warm-up: imports, first file handles
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    for n in range(count):
        dataset[n * 37 % len(dataset)]
    seconds = (time.perf_counter() - start) / count
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    rows = [line for line in text.getvalue().splitlines() if line.strip()[:1].isdigit()]
    return {"dataset": name, "items": count, "us_per_item_profiled": seconds * 1e6,
            "top_by_tottime": rows[1:] if rows and "function calls" in rows[0] else rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/work/shared/datasets/imagenette-96")
    p.add_argument("--work", default="/tmp/bench")
    p.add_argument("--res", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-K", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=int, default=200, help="__getitem__ calls profiled (0: off)")
    p.add_argument("--tag", default="plain_loader_cpu")
    args = p.parse_args()
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    store = refinery.open_store(make_store(args, dataset))
    tree, beton = Path(args.data), dataset.path
    common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                  drop_last=True, persistent_workers=True)
    maps = {TORCHVISION: torchvision_dataset(args),
            "plain backend, .beton (StoreCropDataset)": refinery.StoreCropDataset(store, beton),
            "plain backend, original files (StoreCropDataset)":
                refinery.StoreCropDataset(store, tree)}
    loaders = {TORCHVISION: torch.utils.data.DataLoader(maps[TORCHVISION], **common),
               "stock FFCV RandomResizedCrop + flip": stock_loader(
                   dataset, args.res, args.batch_size, args.workers, 0),
               f"replay (refinery.replay_loader, K={args.K})": refinery.replay_loader(
                   store, beton, args.batch_size, args.workers, seed=0)}
    for name in list(maps)[1:]:
        loaders[name] = EpochedLoader(maps[name], collate_fn=refinery.CropCollate(), **common)
    load_before = os.getloadavg()
    # Warm-up (worker start, numba compilation): DataLoaders first, so that their persistent
    # workers fork before FFCV starts any threads.
    for name in sorted(loaders, key=lambda name: name not in maps):
        epoch_rate(loaders[name])
    rates = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader))
    load = {"before": load_before, "after": os.getloadavg()}  # others' work on the machine
    base = statistics.median(rates[TORCHVISION])
    per_round = {n: [a / b for a, b in zip(r, rates[TORCHVISION])] for n, r in rates.items()}
    rows = [{"loader": n, "median_images_per_second": statistics.median(r), "min": min(r),
             "max": max(r), "ratio_to_torchvision": statistics.median(r) / base, "epochs": r,
             "round_ratios": per_round[n]} for n, r in rates.items()]
    profiles = [profile_items(n, d, args.profile) for n, d in maps.items()] if args.profile else []
    result = {"args": vars(args), "software": software_versions(), "rows": rows,
              "profiles": profiles, "load_average": load, "store": str(store.location),
              "beton": str(beton)}
    lines = [f"# Plain-PyTorch backend throughput: `{args.tag}`", "",
             f"`{args.data}` train ({dataset.num_images:,} images), {args.res} px crops, batch "
             f"{args.batch_size}, {args.workers} workers, shuffled, drop_last, uint8 crops on the "
             f"host; median of {args.rounds} interleaved epochs per loader after one warm-up "
             f"epoch each. Store: K={args.K}, top-10. 1-min load average {load['before'][0]:.1f} "
             f"before, {load['after'][0]:.1f} after ({os.cpu_count()} cores).", ""]
    lines += markdown_table(["loader", "median img/s", "min", "max", "ratio to torchvision",
                             "same-round ratios"],
                            [[r["loader"], f"{r['median_images_per_second']:,.0f}",
                              f"{r['min']:,.0f}", f"{r['max']:,.0f}",
                              f"{r['ratio_to_torchvision']:.2f}",
                              f"{min(r['round_ratios']):.2f}–{max(r['round_ratios']):.2f}"]
                             for r in rows])
    if profiles:
        lines += ["", f"One process, {args.profile} `__getitem__` calls each under cProfile "
                  "(profiling overhead included):", ""]
        lines += markdown_table(["data set", "µs / item"],
                                [[q["dataset"], f"{q['us_per_item_profiled']:,.0f}"]
                                 for q in profiles])
        for q in profiles:
            lines += ["", f"`{q['dataset']}`, top functions by own time (ncalls, tottime, "
                      "percall, cumtime, percall, function):", "", "```",
                      *q["top_by_tottime"], "```"]
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
