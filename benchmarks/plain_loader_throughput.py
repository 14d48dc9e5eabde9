"""Claim: the plain-PyTorch readers reach at least 2x torchvision's loader from every form a team
holds its data in (tree, flat list, WebDataset shards, Hugging Face table), side by side with
our FFCV replay (issue 26, item 5).

Same train split, worker count, batch size, crop size, shuffled order and `drop_last` for every
loader; all yield uint8 crops on the host (no normalisation, no model):

* torchvision: `ImageFolder` + `RandomResizedCrop(res)` + `RandomHorizontalFlip` + `PILToTensor`
  in a `DataLoader` (PIL decode and bilinear resize per image, in the workers);
* stock FFCV: `RandomResizedCropRGBImageDecoder` + flip (``loader_throughput.stock_loader``);
* replay: `refinery.replay_loader` (FFCV backend, stored boxes and flips);
* plain, from each source: `StoreCropDataset(store, DATA)` + `CropCollate` (simplejpeg + cv2,
  each item's bytes hashed to tell exact from approximate): the store's `.beton`, the original
  tree, a flat folder read through a shuffled list, WebDataset shards (read by index), a HF
  table (`save_to_disk`);
* stream: `wds.WebDataset(shards).shuffle(1000).map(StoreCrops(store))` (read in order).

The copies are made once under ``--work`` from the tree's files (benchmarks/_copies.py).
`DataLoader`s use persistent workers (so `set_epoch` and steady state are what is timed). One
warm-up epoch each (worker start, numba compilation), then ``--rounds`` interleaved epochs per
loader, median reported: ratios come from one run on one machine. The store (``--store``, else
made once under ``--work``: K slots labelled by an untrained ``demo_cnn``; labels do not matter,
only their reading is timed) must name its images. ``--profile N`` also times N `__getitem__`
calls of each map-style data set in this process under cProfile.

  python benchmarks/plain_loader_throughput.py --res 96 --workers 2 --batch-size 256 \\
      --rounds 5 --tag plain_loader_sources_cpu
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

import _copies

import refinery_pipeline as refinery
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.models.checkpoints import save_checkpoint
from refinery_pipeline.labelling.precompute import software_versions

TORCHVISION = "torchvision ImageFolder + RandomResizedCrop + flip + PILToTensor"


def make_store(args, dataset) -> Path:
    """A K-slot store at ``args.res`` labelled by an untrained demo_cnn, made once under --work
    (or ``--store`` as given)."""
    if args.store:
        return Path(args.store)
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
    """A `DataLoader` over a `StoreCropDataset` (or a pipeline ending in ``crops``, a
    `StoreCrops`) that calls `set_epoch` before each epoch."""

    def __init__(self, dataset, crops=None, **kwargs):
        self.dataset, self.epoch = crops if crops is not None else dataset, 0
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


def copies(args) -> dict:
    """Each form of the train split a plain reader is timed on (made once under --work)."""
    split, work = Path(args.data) / "train", Path(args.work) / "copies"
    return {"original tree": Path(args.data),
            "flat folder, shuffled list": _copies.listed_flat(split, work / "flat"),
            "WebDataset shards, by index": _copies.shards(split, work / "shards"),
            "Hugging Face table": _copies.hf_table(split, work / "hf")}


def stream_loader(store, pattern: str, common: dict):
    """`StoreCrops` as a stage of a shuffled WebDataset stream (workers split the shards)."""
    import webdataset as wds
    crops = refinery.StoreCrops(store)
    pipeline = wds.WebDataset(pattern, shardshuffle=100, seed=0,
                              empty_check=False).shuffle(1000).map(crops)
    stream = {k: v for k, v in common.items() if k != "shuffle"}
    return EpochedLoader(pipeline, crops, collate_fn=refinery.CropCollate(), **stream)


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
    p.add_argument("--store", default=None, help="a store of DATA that names its images "
                   "(default: made under --work)")
    p.add_argument("--tag", default="plain_loader_sources_cpu")
    args = p.parse_args()
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    store = refinery.open_store(make_store(args, dataset))
    if not store.keyed:
        raise SystemExit(f"error: {store.location} names no images; pass --store with a store "
                         "made by this version")
    beton, forms = dataset.path, copies(args)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                  drop_last=True, persistent_workers=True)
    maps = {TORCHVISION: torchvision_dataset(args),
            "plain, the store's .beton": refinery.StoreCropDataset(store, beton),
            **{f"plain, {name}": refinery.StoreCropDataset(store, data)
               for name, data in forms.items()}}
    loaders = {TORCHVISION: torch.utils.data.DataLoader(maps[TORCHVISION], **common),
               "stock FFCV RandomResizedCrop + flip": stock_loader(
                   dataset, args.res, args.batch_size, args.workers, 0),
               f"replay (refinery.replay_loader, K={args.K})": refinery.replay_loader(
                   store, beton, args.batch_size, args.workers, seed=0)}
    for name in list(maps)[1:]:
        loaders[name] = EpochedLoader(maps[name], collate_fn=refinery.CropCollate(), **common)
    loaders["stream, WebDataset shards in order (StoreCrops)"] = stream_loader(
        store, str(forms["WebDataset shards, by index"]), common)
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
    replay = statistics.median(next(r for n, r in rates.items() if n.startswith("replay")))
    rows = [{"loader": n, "median_images_per_second": statistics.median(r), "min": min(r),
             "max": max(r), "ratio_to_torchvision": statistics.median(r) / base,
             "ratio_to_replay": statistics.median(r) / replay, "epochs": r,
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
                             "same-round ratios", "ratio to replay"],
                            [[r["loader"], f"{r['median_images_per_second']:,.0f}",
                              f"{r['min']:,.0f}", f"{r['max']:,.0f}",
                              f"{r['ratio_to_torchvision']:.2f}",
                              f"{min(r['round_ratios']):.2f}–{max(r['round_ratios']):.2f}",
                              f"{r['ratio_to_replay']:.2f}"]
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
