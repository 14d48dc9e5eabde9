"""Make a smaller ImageFolder tree (``train/`` and ``val/``) from a larger one: the first N files
of every class, in sorted order, so the subset is the same on every machine.

Used to run the many-class benchmarks at reduced scale (Tiny-ImageNet-200 with 100 training
images per class on 2 CPU cores) and to carry a data set to the GPU machine within its 64 MiB
(``--copy``; the default links, which costs no space).

  tar xzf ../shared/datasets/tiny-imagenet-200-300.tar.gz -C /tmp
  python benchmarks/folder_subset.py /tmp/tiny-imagenet-200 /tmp/tin100 --train 100
  python benchmarks/folder_subset.py /tmp/tiny-imagenet-200 .carry/tin50 --train 50 --val 25 --copy
  python benchmarks/folder_subset.py /tmp/tiny-imagenet-200 /tmp/tin50c --classes 50 --train 100
"""
import argparse
import os
import shutil
import sys
from pathlib import Path


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("dest", type=Path, help="new root (must not exist)")
    p.add_argument("--train", type=int, required=True, help="training files per class")
    p.add_argument("--val", type=int, default=None, help="validation files per class (all)")
    p.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    p.add_argument("--classes", type=int, default=None,
                   help="keep this many classes, evenly spaced in sorted order (all)")
    return p.parse_args()


def kept_classes(source: Path, count) -> list:
    """The class folders kept: all, or ``count`` evenly spaced in sorted order (a spread of the
    class set, the same on every machine)."""
    folders = sorted(d.name for d in source.iterdir() if d.is_dir())
    if count is None or count >= len(folders):
        return folders
    step = len(folders) / count
    return [folders[int(i * step)] for i in range(count)]


def subset_split(source: Path, dest: Path, per_class, copy: bool, classes: list) -> int:
    """Link (or copy) the first ``per_class`` files of each kept class folder; return how many."""
    made = 0
    for folder in (source / name for name in classes):
        files = sorted(f for f in folder.iterdir() if f.is_file())[:per_class]
        (dest / folder.name).mkdir(parents=True)
        for f in files:
            target = dest / folder.name / f.name
            shutil.copyfile(f, target) if copy else os.symlink(f.resolve(), target)
        made += len(files)
    return made


def main():
    args = get_args()
    if args.dest.exists():
        sys.exit(f"error: {args.dest}: already exists; pass a new directory")
    for split in ("train", "val"):
        if not (args.source / split).is_dir():
            sys.exit(f"error: {args.source}: has no {split}/ folder; pass an ImageFolder root")
    classes = kept_classes(args.source / "train", args.classes)
    counts = {split: subset_split(args.source / split, args.dest / split, per_class, args.copy,
                                  classes)
              for split, per_class in (("train", args.train), ("val", args.val))}
    print(f"{args.dest}: {counts['train']:,} training and {counts['val']:,} validation images")


if __name__ == "__main__":
    main()
