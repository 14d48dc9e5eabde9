"""Claim: joining a store's keys with a copy's takes seconds at ImageNet-1k size, so readers can
join by key (not position) every time they open a copy.

Synthetic keys shaped like ImageNet's (``n<8 digits>/n<8 digits>_<i>``, 1,000 class folders),
joined by ``keys.join`` with copies as teams hold them: the same keys, shuffled, a 90% shuffled
subset, and a flat shuffled copy of file names with ``.JPEG`` (every key matched by its last
component). Wall and process CPU seconds, median over rounds; ``normalize_keys`` alone (which
join runs on both sides) is timed too.

  python benchmarks/key_join.py --images 1281167 --rounds 3 --tag key_join_cpu
"""
import argparse
import statistics
import time

import numpy as np
from _results import markdown_table, write_results

from refinery_pipeline.sources.keys import join, normalize_keys


def synthetic_keys(images: int, classes: int = 1000, seed: int = 0) -> list:
    folders = np.random.default_rng(seed).integers(0, classes, images)
    return [f"n{c:08d}/n{c:08d}_{i}" for i, c in enumerate(folders.tolist())]


def copies(store: list, seed: int = 1) -> dict:
    order = np.random.default_rng(seed).permutation(len(store)).tolist()
    shuffled = [store[i] for i in order]
    return {"same order": list(store), "shuffled": shuffled,
            "90% subset, shuffled": shuffled[:len(store) * 9 // 10],
            "flat file names (.JPEG), shuffled": [k.rsplit("/", 1)[1] + ".JPEG"
                                                 for k in shuffled]}


def timed(function) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="key_join_cpu")
    args = parser.parse_args()
    store = synthetic_keys(args.images)
    cases = {"normalize_keys (one side)": lambda: normalize_keys(store)}
    for name, copy in copies(store).items():
        cases[f"join: {name}"] = (lambda copy=copy: join(store, copy))
    rows, result = [], {"images": args.images, "rounds": args.rounds, "cases": {}}
    for name, case in cases.items():
        runs = [timed(case) for _ in range(args.rounds)]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        joined = runs[0][2]
        matched = f"{joined.matched:,} ({joined.by_suffix:,} by suffix)" if hasattr(
            joined, "matched") else ""
        result["cases"][name] = {"wall_s": [r[0] for r in runs], "cpu_s": [r[1] for r in runs],
                                 "matched": getattr(joined, "matched", None)}
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", matched])
    lines = [f"# Joining store keys with a copy's: `{args.tag}`", "",
             f"{args.images:,} synthetic ImageNet-shaped keys; median of {args.rounds} rounds.",
             ""] + markdown_table(["case", "wall s", "CPU s", "matched"], rows)
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
