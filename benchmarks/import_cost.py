"""Claim: importing FFCV through refinery_pipeline costs a tenth of FFCV's own import, because
its one numba typed dict (two image modes) is not compiled (refinery_pipeline/core/ffcv_import.py).

Every process that reads a .beton pays this once: each ``refine`` command, each torchrun rank,
each Ray actor, each pytest-xdist worker and test subprocess. Each variant runs in a fresh
interpreter, alternated ``--repeats`` times so that both see the same machine; the table gives
the median wall seconds of the import itself (torch is imported first in both, and not timed).

  python benchmarks/import_cost.py --repeats 7 --tag import_cost_cpu
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _results import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent

TIMED = """
import time, torch
{before}
started = time.perf_counter()
import ffcv.loader, ffcv.fields.rgb_image as rgb_image
print(time.perf_counter() - started, type(rgb_image.IMAGE_MODES).__name__)
"""
VARIANTS = {  # name -> what runs before the timed import
    "FFCV's own import": "",
    "through refinery_pipeline (the hook)": "import refinery_pipeline",
}


def one_import(before: str) -> tuple[float, str]:
    """Seconds of ``import ffcv`` in a fresh interpreter, and the type of its image modes."""
    out = subprocess.run([sys.executable, "-c", TIMED.format(before=before)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tag", default="import_cost_cpu")
    args = parser.parse_args()
    seconds = {name: [] for name in VARIANTS}
    kinds = {}
    for _ in range(args.repeats):
        for name, before in VARIANTS.items():
            took, kinds[name] = one_import(before)
            seconds[name].append(took)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    own, ours = medians.values()
    rows = [[name, f"{medians[name]:.2f}", f"{min(seconds[name]):.2f}",
             f"{max(seconds[name]):.2f}", f"`{kinds[name]}`"] for name in VARIANTS]
    markdown = "\n".join([
        "# Importing FFCV: its own import vs through refinery_pipeline", "",
        f"Fresh interpreters, alternated, {args.repeats} each; wall seconds of `import "
        "ffcv.loader, ffcv.fields.rgb_image` after torch (`import refinery_pipeline`, untimed, "
        "loads nothing heavy). Load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
        *markdown_table(["variant", "median s", "min s", "max s", "IMAGE_MODES is a"], rows),
        "", f"Ratio (through refinery_pipeline / own): **{ours / own:.2f}**; "
            f"{own - ours:.1f} s saved per process.", ""])
    write_results(args.tag, {"seconds": seconds, "medians": medians, "ratio": ours / own},
                  markdown)


if __name__ == "__main__":
    main()
