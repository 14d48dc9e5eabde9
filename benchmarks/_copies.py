"""Shared by the benchmarks of copies: the forms a team holds an ImageFolder split in.

Each maker writes a copy of ``split`` (a ``DATA/train`` folder of class folders) under ``out``
once (an existing copy is kept) and returns what ``refine`` takes as DATA. Copies that hold the
files' own bytes are made of hard links (no space) where the file system allows, else copies:

* ``listed_flat``: every file in one flat folder, and a CSV list of them (``path``, ``label``:
  the class name) in a shuffled order; the class column is what a converted copy (the FFCV
  backend, ``refine train``) needs, read with ``label_column="label"`` / ``--label-column label``;
* ``tree_subset``: a tree holding a seeded share of the files (the rest lost);
* ``shards``: WebDataset shards of the files in a shuffled order (``__key__`` the file's path
  relative to the split, ``cls`` its class number) and ``classes.txt``, the class names the
  numbers index (``classes=`` / ``--classes``: shards record no names);
* ``hf_table``: a Hugging Face table (``save_to_disk``) with the files' bytes, a ``file_name``
  column and a ``ClassLabel``;
* ``reencoded``: a tree of the images decoded (FFCV's decoder), resized so the shorter side is
  ``short_side`` (OpenCV ``INTER_AREA``) where given, and saved as JPEG at ``quality`` (PIL).
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np


def split_files(split: Path) -> list:
    """``(file, class name)`` of every image under ``split``'s class folders, sorted."""
    return [(f, d.name) for d in sorted(p for p in split.iterdir() if p.is_dir())
            for f in sorted(d.iterdir()) if f.is_file()]


def _link(source: Path, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _done(out: Path) -> bool:
    return (out / ".done").is_file()


def _finish(out: Path):
    (out / ".done").write_text("")


def listed_flat(split: Path, out: Path, seed: int = 0) -> Path:
    """A flat folder of the files and ``out/list.csv`` naming them and their classes in a
    shuffled order."""
    if not _done(out):
        files = split_files(split)
        for f, _ in files:
            _link(f, out / "images" / f.name)
        rows = [f"images/{f.name},{name}" for f, name in files]
        random.Random(seed).shuffle(rows)
        (out / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        _finish(out)
    return out / "list.csv"


def tree_subset(split: Path, out: Path, share: float, seed: int = 0) -> Path:
    """A tree (``out/train``) holding a seeded ``share`` of the files."""
    if not _done(out):
        files = split_files(split)
        kept = np.random.default_rng(seed).permutation(len(files))[:round(share * len(files))]
        for i in sorted(kept):
            f, name = files[i]
            _link(f, out / "train" / name / f.name)
        _finish(out)
    return out


def shards(split: Path, out: Path, per_shard: int = 1000, seed: int = 0) -> str:
    """WebDataset shards of the files' bytes in a shuffled order; returns the brace pattern."""
    files = split_files(split)
    count = -(-len(files) // per_shard)
    pattern = str(out / f"part-{{000..{count - 1:03d}}}.tar")
    if _done(out):
        return pattern
    import webdataset as wds
    classes = class_names(split)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    for s in range(count):
        with wds.TarWriter(str(out / f"part-{s:03d}.tar")) as writer:
            for i in order[s * per_shard:(s + 1) * per_shard]:
                f, name = files[i]
                writer.write({"__key__": f.relative_to(split).with_suffix("").as_posix(),
                              "jpg": f.read_bytes(), "cls": classes.index(name)})
    _finish(out)
    return pattern


def hf_table(split: Path, out: Path, seed: int = 0) -> Path:
    """A ``save_to_disk`` table of the files' bytes in a shuffled order."""
    if _done(out):
        return out / "table"
    import datasets
    files = split_files(split)
    random.Random(seed).shuffle(files)
    classes = class_names(split)
    features = datasets.Features({"image": datasets.Image(), "file_name": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=classes)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f, _ in files],
         "file_name": [f.relative_to(split).as_posix() for f, _ in files],
         "label": [classes.index(name) for _, name in files]}, features=features)
    table.save_to_disk(str(out / "table"))
    _finish(out)
    return out / "table"


def reencoded(split: Path, out: Path, quality: int, short_side: int = None) -> Path:
    """A tree (``out/train``) of every image decoded, resized to ``short_side`` (if given) and
    saved as JPEG at ``quality``: other bytes, so every crop of it is approximate."""
    if _done(out):
        return out
    import cv2
    from PIL import Image

    from refinery_pipeline.sources.pixels import read_image_file
    for f, name in split_files(split):
        pixels = read_image_file(f)
        h, w = pixels.shape[:2]
        if short_side is not None and short_side != min(h, w):
            scale = short_side / min(h, w)
            pixels = cv2.resize(pixels, (round(w * scale), round(h * scale)),
                                interpolation=cv2.INTER_AREA)
        target = out / "train" / name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, format="JPEG", quality=quality)
    _finish(out)
    return out


def class_names(split: Path) -> list:
    """The class folders' names, sorted: what a copy's class numbers index."""
    return sorted({name for _, name in split_files(split)})
