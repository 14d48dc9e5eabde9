"""What a training recipe costs per crop on the CPU, where it runs (after the loader, in the
training process): milliseconds per crop for each recipe and crop side, on 1 and on N threads
(``PlanAugment.crops``' pool, as wide as ``--workers``), measured side by side in one run.

  python benchmarks/recipe_cost.py --sizes 32 96 224 --threads 2 --tag recipe_cost_cpu
"""
import argparse
import os
import time

import numpy as np
import torch

from refinery_pipeline.loaders.recipe_ops import recipe_crops
from refinery_pipeline.plan.recipe import PlanAugment, Recipe

from _results import markdown_table, write_results
from _runs import device_name

RECIPES = {"trivialaugment": ["trivialaugment"],
           "randaugment:2:9": ["randaugment:2:9"],
           "torchvision ImageNet (ta + erasing 0.1 + mixup 0.2 + cutmix 1)":
               ["trivialaugment", "erasing:0.1", "mixup:0.2", "cutmix:1"]}


def ms_per_crop(recipe: Recipe, size: int, crops: int, threads: int, rounds: int) -> float:
    """Median over ``rounds`` of one batch of ``crops`` crops through the recipe."""
    plan = PlanAugment(recipe, 0, 10_000, 8, size)
    own = torch.randint(0, 256, (crops, size, size, 3), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(size))
    partner = own.flip(0) if recipe.mixes else None
    ids = np.arange(crops)
    params = plan.pair_params(ids, ids % 8)
    recipe_crops(own[:8], None if partner is None else partner[:8],
                 plan.pair_params(ids[:8], ids[:8] % 8), threads)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        recipe_crops(own, partner, params, threads)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / crops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--crops", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="recipe_cost")
    args = p.parse_args()
    torch.set_num_threads(1)  # the pool's threads, not intra-op ones, are what is measured
    rows = []
    for name, spec in RECIPES.items():
        for size in args.sizes:
            one = ms_per_crop(Recipe.parse(spec), size, args.crops, 1, args.rounds)
            many = ms_per_crop(Recipe.parse(spec), size, args.crops, args.threads, args.rounds)
            rows.append({"recipe": name, "size": size, "ms_per_crop_1_thread": one,
                         f"ms_per_crop_{args.threads}_threads": many, "speedup": one / many})
    result = {"args": vars(args), "device": device_name(), "rows": rows}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(r) -> str:
    a = r["args"]
    threads = a["threads"]
    lines = [f"# Recipe cost per crop: `{a['tag']}`", "",
             f"Device: {r['device']}. {a['crops']} crops per batch, median of {a['rounds']} "
             "batches; torch intra-op threads 1, the recipe's thread pool 1 and "
             f"{threads}.", ""]
    lines += markdown_table(["recipe", "crop side", "ms per crop, 1 thread",
                             f"ms per crop, {threads} threads", "speed-up"],
                            [[row["recipe"], row["size"], f"{row['ms_per_crop_1_thread']:.3f}",
                              f"{row[f'ms_per_crop_{threads}_threads']:.3f}",
                              f"{row['speedup']:.2f}×"] for row in r["rows"]])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
