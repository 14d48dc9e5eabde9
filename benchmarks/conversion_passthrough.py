"""Claim: storing JPEGs' own bytes (``--jpeg passthrough``) makes the original files give exactly
the pixels the refinery labels, and converts faster and smaller than re-encoding every image.

Converts one split of an ImageFolder tree both ways (``write_beton``, the same writer processes)
and reports per mode: wall seconds (median over rounds), the file's size, how many images were
stored as their own bytes, how many stored images hash to their original file (``image_digests``
against the file's SHA-256: exact copies), and over a sample of images the largest and mean
absolute pixel difference between the original file (decoded as refinery reads it) and the
``.beton``'s image.

  python benchmarks/conversion_passthrough.py --data ../shared/datasets/imagenette-96 \
      --rounds 2 --tag conversion_passthrough_cpu
"""
import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import markdown_table, write_results

from refinery_pipeline.dataset import BetonOptions, ImageDataset, write_beton
from refinery_pipeline.pixels import decode_image, read_image_file
from refinery_pipeline.sources import BetonSource, open_source


def pixel_differences(beton: Path, source, sample: int) -> tuple:
    """``(max, mean)`` absolute difference between original files and stored images."""
    stored = BetonSource(beton)
    files = {key: f for key, f in zip(source.keys(), source.files)}
    picks = np.linspace(0, len(stored) - 1, min(sample, len(stored))).astype(int)
    largest, total, count = 0, 0.0, 0
    for i in picks.tolist():
        original = read_image_file(files[stored.keys()[i]]).astype(np.int16)
        ours = decode_image(stored.encoded(i)).astype(np.int16)
        difference = np.abs(original - ours)
        largest, total, count = max(largest, int(difference.max())), total + difference.sum(), \
            count + difference.size
    return largest, total / count


def exact_copies(dataset: ImageDataset, source) -> int:
    """Stored images whose digest is their original file's SHA-256."""
    files = dict(zip(source.keys(), source.files))
    digests = dataset.image_digests()
    return sum(bytes(digests[n]) == hashlib.sha256(files[key].read_bytes()).digest()
               for n, key in enumerate(dataset.keys()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an ImageFolder tree")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=int, default=500, help="images compared pixel by pixel")
    parser.add_argument("--tag", default="conversion_passthrough_cpu")
    args = parser.parse_args()
    source = open_source(args.data, split=args.split)
    result, rows = {"images": len(source), "workers": args.workers, "modes": {}}, []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("reencode", "passthrough"):
            seconds = []
            for r in range(args.rounds):
                path = Path(scratch) / f"{mode}-{r}.beton"
                start = time.perf_counter()
                write_beton(source, path, BetonOptions(jpeg=mode), num_workers=args.workers)
                seconds.append(time.perf_counter() - start)
            dataset = ImageDataset(path)
            largest, mean = pixel_differences(path, source, args.sample)
            record = {"seconds": seconds, "bytes": path.stat().st_size,
                      "passed_through": dataset.meta["passed_through"],
                      "exact_copies": exact_copies(dataset, source),
                      "max_pixel_difference": largest, "mean_pixel_difference": mean}
            result["modes"][mode] = record
            rows.append([mode, f"{statistics.median(seconds):.1f}",
                         f"{record['bytes'] / 1e6:.1f}", f"{record['passed_through']:,}",
                         f"{record['exact_copies']:,}", largest, f"{mean:.2f}"])
    markdown = "\n".join([
        f"# Passthrough vs re-encoding conversion: `{args.tag}`", "",
        f"{args.data} ({args.split}): {len(source):,} images, {args.workers} writer processes; "
        f"median of {args.rounds} rounds; pixels compared on {args.sample} images.", "",
        *markdown_table(["--jpeg", "seconds", "MB", "passed through", "exact copies",
                         "max pixel diff", "mean pixel diff"], rows)])
    write_results(args.tag, result, markdown + "\n")


if __name__ == "__main__":
    main()
