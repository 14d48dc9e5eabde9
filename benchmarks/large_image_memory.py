"""Peak host memory of `refine convert`, `train` and `precompute` on a tree with very large JPEGs.

Claim (docs/design.md, bounded decode memory): the loaders' decode scratch is decoding threads x
the largest stored image, not batch size x (batches ahead + 2) x the largest image as FFCV's
stock decoder declares it. The tree is what real photo collections (iNaturalist, Open Images)
look like to refinery: ordinary images (500 x 375 here) with one very large photo per class,
enough images for the commands' default batch sizes (train 256, precompute 256 images per
loader batch); the content is synthetic (smooth gradients with noise, so JPEG sizes are
photo-like).

Each command runs as its own process (`python -m cli.main ...` from --code, so an older
checkout is measured the same way); its peak memory is sampled every 10 ms as the sum of the
proportional (PSS) and resident (RSS) set sizes of the process and all its children (FFCV's
writer processes). A command that dies is recorded with its exit status and last line.

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
RES, K, PRECOMPUTE_IMAGES_PER_BATCH, RING = 32, 40, 256, 4  # RING: FFCV's batches ahead + 2


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


def make_tree(root: Path, height: int, width: int, large: int, small: int):
    """``train/``: per class ``large`` photos of ``height x width`` and ``small`` 500 x 375 ones;
    ``val/``: one of each per class."""
    from PIL import Image
    seed = 0
    for split, (n_large, n_small) in (("train", (large, small)), ("val", (1, 1))):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, size in enumerate([(height, width)] * n_large + [(375, 500)] * n_small):
                seed += 1
                Image.fromarray(synthetic_photo(*size, seed)).save(
                    root / split / name / f"{i}.jpg", quality=90)


def measure(args: list, code: Path, limit: float = 900) -> dict:
    """Run ``refine ARGS`` from ``code``; peak memory of its process tree, exit status,
    seconds. A command still running after ``limit`` seconds (FFCV's writer waits forever for
    a writer process that died) is stopped and recorded as hung."""
    import psutil
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=code,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = 0
    root, hung = psutil.Process(proc.pid), False
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        rss, pss = zip(*(_memory(p) for p in tree))
        peak_rss, peak_pss = max(peak_rss, sum(rss)), max(peak_pss, sum(pss))
        if time.perf_counter() - start > limit:
            hung = _stop(tree)
        time.sleep(0.01)
    log.seek(0)
    output = log.read().decode(errors="replace").strip().splitlines()
    last = f"hung: stopped after {limit:.0f} s" if hung else (output[-1] if output else "")
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_tree_rss_mb": round(peak_rss / 2**20),
            "peak_tree_pss_mb": round(peak_pss / 2**20), "last_line": last}


def _stop(processes) -> bool:
    import psutil
    for process in reversed(processes):
        try:
            process.kill()
        except psutil.Error:
            pass
    return True


def _memory(process) -> tuple:
    """(RSS, PSS) bytes: RSS counts pages a forked writer shares with its parent in both; PSS
    splits them, so the tree's PSS sum is the host memory it holds."""
    import psutil
    try:
        info = process.memory_full_info()
        return info.rss, getattr(info, "pss", info.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


def commands(tree: Path, work: Path, refinery: Path, batch: int, workers: int) -> list:
    """(name, refine arguments): convert once, then train and precompute (with ``refinery``)
    from its .beton pair, each with the defaults a user starts from except what a 2-class toy
    set needs."""
    betons = work / "betons"
    train_beton = betons / f"{tree.name}_train.beton"
    common = ["--workers", workers, "--cache-dir", work / "cache"]
    return [
        ("convert", ["convert", tree, betons, "--workers", workers]),
        ("train", ["train", train_beton, "--arch", "demo_cnn", "--epochs", 1, "--res", RES,
                   "--batch-size", batch, "--warmup-epochs", 0, "--out", work / "run",
                   *common]),
        ("precompute", ["precompute", train_beton, work / "labels.zarr", "--weights", refinery,
                        *common]),
    ]


def make_refinery(scratch: Path, code: Path) -> Path:
    """A demo CNN of the tree's classes at RES px, trained briefly on small images only: the
    one refinery every measured precompute uses (whether or not the measured train survives)."""
    tree = scratch / "refinery_tree"
    make_tree(tree, 375, 500, large=0, small=8)
    out = scratch / "refinery"
    result = measure(["train", tree, "--arch", "demo_cnn", "--epochs", 1, "--res", RES,
                      "--batch-size", 8, "--warmup-epochs", 0, "--out", out, "--cache-dir",
                      scratch / "refinery_cache"], code)
    if result["exit"] != 0:
        raise SystemExit(f"training the refinery failed: {result['last_line']}")
    return out / "model.pt"




def bound_mb(command: str, height: int, width: int, workers: int, batch: int):
    """The documented bound on a command's loader pixels (docs/design.md): decode scratch of
    ``workers`` x the largest image per loader, plus FFCV's ring of output crops. Training runs
    a training and a validation loader; conversion has no loader (None)."""
    scratch = workers * height * width * 3
    if command == "train":
        return round(2 * (scratch + RING * batch * RES * RES * 3) / 2**20)
    if command == "precompute":
        return round((scratch + RING * PRECOMPUTE_IMAGES_PER_BATCH * K * RES * RES * 3) / 2**20)
    return None


def run_size(height, width, large, small, batch, workers, codes: dict, scratch: Path,
             refinery: Path, limit: float) -> list:
    rows = []
    for label, code in codes.items():
        work = scratch / f"{label}_{width}x{height}"
        shutil.rmtree(work, ignore_errors=True)
        tree = work / "tree"
        make_tree(tree, height, width, large, small)
        for name, args in commands(tree, work, refinery, batch, workers):
            result = measure(args, code, limit)
            betons = sum(f.stat().st_size for f in (work / "betons").glob("*.beton"))
            rows.append({"size": f"{width}x{height}", "code": label, "command": name,
                         "bound_mb": bound_mb(name, height, width, workers, batch),
                         "beton_mb": round(betons / 1e6) if name == "convert" else None,
                         **result})
            print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6000x4000,12000x9000", help="WIDTHxHEIGHT,...")
    parser.add_argument("--large", type=int, default=1, help="large training photos per class")
    parser.add_argument("--small", type=int, default=130,
                        help="500 x 375 training images per class")
    parser.add_argument("--batch-size", type=int, default=256, help="refine train --batch-size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--code", default=str(REPO), help="checkout measured as 'after'")
    parser.add_argument("--before-code", default=None,
                        help="checkout measured as 'before' (e.g. the base commit's)")
    parser.add_argument("--code-label", default="after", help="its name in the table")
    parser.add_argument("--before-label", default="before", help="its name in the table")
    parser.add_argument("--limit", type=float, default=900,
                        help="seconds after which a command counts as hung and is stopped")
    parser.add_argument("--scratch", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--tag", default="large_image_memory_cpu")
    args = parser.parse_args()
    codes = {args.code_label: Path(args.code)}
    if args.before_code:
        codes = {args.before_label: Path(args.before_code), **codes}
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="large_images_"))
    refinery = make_refinery(scratch, Path(args.code))
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        rows += run_size(height, width, args.large, args.small, args.batch_size, args.workers,
                         codes, scratch, refinery, args.limit)
    table = markdown_table(
        ["large image", "code", "command", "exit", "peak PSS (MB)", "peak RSS (MB)",
         "loader pixels bound (MB)", ".beton pair (MB)", "s", "last line"],
        [[r["size"], r["code"], r["command"], r["exit"], f"{r['peak_tree_pss_mb']:,}",
          f"{r['peak_tree_rss_mb']:,}", "-" if r["bound_mb"] is None else f"{r['bound_mb']:,}",
          "-" if r["beton_mb"] is None else f"{r['beton_mb']:,}", r["seconds"],
          r["last_line"][:110].replace("|", "/")] for r in rows])
    markdown = "\n".join([
        "# Peak host memory with very large images (CPU)", "",
        f"Tree: {len(CLASSES)} classes x ({args.large} large + {args.small} 500 x 375) "
        "training JPEGs (q90, synthetic) and 1 + 1 validation JPEGs per class, per large size; "
        f"`--workers {args.workers}`; train `--batch-size {args.batch_size}` (1 epoch, demo_cnn "
        "at 32 px), precompute with its defaults (--batch-size 512, -K 40: 256 images per loader "
        "batch). Peak memory is sampled every 10 ms over the command's process tree (FFCV's "
        "writer processes included): PSS sums what the tree holds (shared pages split), RSS "
        "counts pages shared by forked writers in each. Loader pixels bound (docs/design.md): "
        "per loader, --workers x the largest image x 3 bytes of decode scratch plus 4 x batch x "
        "crops per image x "
        f"{RES}^2 x 3 of output crops (train: a training and a validation loader). The rest of "
        "each peak is Python, torch and numba (about 0.75 GB PSS here).", "", *table, ""])
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    write_results(args.tag, {"rows": rows, "machine": machine, "args": vars(args)}, markdown)


if __name__ == "__main__":
    main()
