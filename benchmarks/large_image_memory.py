"""Peak host memory of `refine convert`, `train` and `precompute` on a tree of very large JPEGs.

Claim (docs/design.md, bounded memory): the loaders' decode scratch is decoding threads x the
largest stored image, not batch size x (batches ahead + 2) x the largest image as FFCV's stock
decoder declares it. A tiny tree of 2 classes x a few photos of each size stands in for real
photo collections (iNaturalist, Open Images); the content is synthetic (smooth gradients with
noise, so JPEG sizes are photo-like).

Each command runs as its own process (`python -m cli.main ...` from --code, so an older
checkout is measured the same way); its peak memory is sampled every 10 ms as the sum of the
proportional (PSS) and resident (RSS) set sizes of the process and all its children (FFCV's
writer processes). A command
that dies is recorded with its exit status and last line.

    python benchmarks/large_image_memory.py --before-code /tmp/base   # a checkout of the base
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("disk", "square")


def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus mild noise, made in row bands to keep this process small."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    out = np.empty((height, width, 3), np.uint8)
    x = np.arange(width)[None, :] / width
    for top in range(0, height, 1000):
        y = np.arange(top, min(top + 1000, height))[:, None] / height
        for c in range(3):
            band = 127 + 100 * np.sin(7 * x + 4 * y + phase[c])
            out[top:top + len(y), :, c] = np.clip(band + rng.normal(0, 6, band.shape), 0, 255)
    return out


def make_tree(root: Path, height: int, width: int, per_class: int):
    """``train/`` with ``per_class`` photos per class, ``val/`` with one."""
    from PIL import Image
    seed = 0
    for split, count in (("train", per_class), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                Image.fromarray(synthetic_photo(height, width, seed)).save(
                    root / split / name / f"{i}.jpg", quality=90)


def measure(args: list, code: Path) -> dict:
    """Run ``refine ARGS`` from ``code``; peak RSS of its process tree, exit status, seconds."""
    import psutil
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=code,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        rss, pss = zip(*(_memory(p) for p in tree))
        peak_rss, peak_pss = max(peak_rss, sum(rss)), max(peak_pss, sum(pss))
        time.sleep(0.01)
    output = proc.stdout.read().decode(errors="replace").strip().splitlines()
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_tree_rss_mb": round(peak_rss / 2**20),
            "peak_tree_pss_mb": round(peak_pss / 2**20), "last_line": output[-1] if output else ""}


def _memory(process) -> tuple:
    """(RSS, PSS) bytes: RSS counts pages a forked writer shares with its parent in both; PSS
    splits them, so the tree's PSS sum is the host memory it holds."""
    import psutil
    try:
        info = process.memory_full_info()
        return info.rss, getattr(info, "pss", info.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


def commands(tree: Path, work: Path, batch: int, workers: int) -> list:
    """(name, refine arguments): convert once, then train and precompute from its .beton pair,
    each with the defaults a user starts from except what a 2-class toy set needs."""
    betons = work / "betons"
    train_beton = betons / f"{tree.name}_train.beton"
    common = ["--workers", workers, "--cache-dir", work / "cache"]
    return [
        ("convert", ["convert", tree, betons, "--workers", workers]),
        ("train", ["train", train_beton, "--arch", "demo_cnn", "--epochs", 1, "--res", 32,
                   "--batch-size", batch, "--out", work / "run", *common]),
        ("precompute", ["precompute", train_beton, work / "labels.zarr", "--weights",
                        work / "run" / "model.pt", *common]),
    ]


def bound_mb(height: int, width: int, workers: int) -> float:
    """The documented decode scratch: decoding threads x the largest stored image."""
    return workers * height * width * 3 / 2**20


def run_size(height, width, per_class, batch, workers, codes: dict, scratch: Path) -> list:
    rows = []
    for label, code in codes.items():
        work = scratch / f"{label}_{width}x{height}"
        shutil.rmtree(work, ignore_errors=True)
        tree = work / "tree"
        make_tree(tree, height, width, per_class)
        for name, args in commands(tree, work, batch, workers):
            result = measure(args, code)
            rows.append({"size": f"{width}x{height}", "code": label, "command": name,
                         "bound_mb": round(bound_mb(height, width, workers)), **result})
            print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6000x4000,12000x9000", help="WIDTHxHEIGHT,...")
    parser.add_argument("--per-class", type=int, default=2, help="training photos per class")
    parser.add_argument("--batch-size", type=int, default=2, help="refine train --batch-size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--code", default=str(REPO), help="checkout measured as 'after'")
    parser.add_argument("--before-code", default=None,
                        help="checkout measured as 'before' (e.g. the base commit's)")
    parser.add_argument("--scratch", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--tag", default="large_image_memory_cpu")
    args = parser.parse_args()
    codes = {"after": Path(args.code)}
    if args.before_code:
        codes = {"before": Path(args.before_code), **codes}
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="large_images_"))
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        rows += run_size(height, width, args.per_class, args.batch_size, args.workers, codes,
                         scratch)
    table = markdown_table(
        ["image", "code", "command", "exit", "peak PSS (MB)", "peak RSS (MB)",
         "decode scratch bound (MB)", "s", "last line"],
        [[r["size"], r["code"], r["command"], r["exit"], f"{r['peak_tree_pss_mb']:,}",
          f"{r['peak_tree_rss_mb']:,}", f"{r['bound_mb']:,}", r["seconds"],
          r["last_line"][:110].replace("|", "/")] for r in rows])
    markdown = "\n".join([
        "# Peak host memory with very large images (CPU)", "",
        f"Tree: {len(CLASSES)} classes x {args.per_class} training JPEGs (q90, synthetic) + 1 "
        f"validation JPEG per class, per image size; `--workers {args.workers}`; train "
        f"`--batch-size {args.batch_size}`, precompute with its defaults (--batch-size 512, -K "
        "40: 256 images per loader batch). Peak memory is sampled every 10 ms over the "
        "command's process tree (FFCV's writer processes included): PSS sums what the tree "
        "holds (shared pages split), RSS counts pages shared by forked writers in each. Decode scratch bound: --workers x the largest image x 3 "
        "bytes (docs/design.md).", "", *table, ""])
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    write_results(args.tag, {"rows": rows, "machine": machine, "args": vars(args)}, markdown)


if __name__ == "__main__":
    main()
