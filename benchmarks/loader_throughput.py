"""Claim: the replay loader is as fast as FFCV's stock random-resized-crop loader.

Same .beton, workers, batch size, output size and random order; the stock pipeline is
`RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip`, the replay pipeline cuts the stored
slot chosen for the epoch (flip included), the fresh pipeline is our ground-truth mode. Loaders
are timed in interleaved rounds (these machines are noisy) over whole epochs, after one warm-up
epoch each; the first epoch's numba compilation is excluded.

  python benchmarks/loader_throughput.py DATA --res 96 --batch-size 256 --workers 16 --tag loader_h100
  python benchmarks/loader_throughput.py DATA --res 96 --batch-size 256 --workers 2 --tag loader_cpu
"""
import argparse
import statistics
import time

import numpy as np
from _results import markdown_table, write_results

from refinery_pipeline.plan.crop_plan import CropPlan, sample_boxes, sample_flips
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.labelling.precompute import software_versions
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import FreshCrops, ReplayedCrops

def stock_loader(dataset, res, batch_size, workers, seed):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    return Loader(str(dataset.path), batch_size=batch_size, num_workers=workers,
                  order=OrderOption.RANDOM, seed=seed, drop_last=True, batches_ahead=2,
                  pipelines={"image": [RandomResizedCropRGBImageDecoder((res, res)),
                                       RandomHorizontalFlip(), ToTensor()],
                             "label": [IntDecoder(), ToTensor()]})


def epoch_rate(loader) -> float:
    start, seen = time.perf_counter(), 0
    for batch in loader:  # a CropBatch or stock FFCV's (images, labels): images come first
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    p.add_argument("--res", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-K", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tag", default="loader")
    args = p.parse_args()
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    ids = np.arange(dataset.num_images)
    plan = CropPlan(seed=0, crops_per_image=args.K)
    boxes = sample_boxes(plan, ids, dataset.heights, dataset.widths)
    flips = sample_flips(plan, ids)
    loaders = {
        "stock FFCV RandomResizedCrop + flip": stock_loader(dataset, args.res, args.batch_size,
                                                            args.workers, 0),
        f"replay (stored K={args.K} slots)": make_loader(
            dataset, ReplayedCrops(boxes, flips, 0), (args.res, args.res), args.batch_size,
            args.workers),
        "fresh seeded crops (ground-truth mode)": make_loader(
            dataset, FreshCrops(plan, dataset.heights, dataset.widths), (args.res, args.res),
            args.batch_size, args.workers),
    }
    for loader in loaders.values():
        epoch_rate(loader)  # warm-up: compilation
    rates = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader))
    stock = statistics.median(rates["stock FFCV RandomResizedCrop + flip"])
    rows = [{"loader": n, "median_images_per_second": statistics.median(r),
             "min": min(r), "max": max(r), "ratio_to_stock": statistics.median(r) / stock}
            for n, r in rates.items()]
    result = {"args": vars(args), "software": software_versions(), "rows": rows}
    lines = [f"# Loader throughput: `{args.tag}`", "",
             f"`{args.data}` train ({dataset.num_images:,} images), {args.res} px output, batch "
             f"{args.batch_size}, {args.workers} workers, random order, uint8 NHWC tensors on "
             f"the host; median of {args.rounds} interleaved epochs per loader.", ""]
    lines += markdown_table(["loader", "median img/s", "min", "max", "ratio to stock"],
                            [[r["loader"], f"{r['median_images_per_second']:,.0f}",
                              f"{r['min']:,.0f}", f"{r['max']:,.0f}", f"{r['ratio_to_stock']:.3f}"]
                             for r in rows])
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
