"""Opening a data set by what a user passes: a .beton as it is, any other source converted once into a cache named by its identity and options (or by refine convert into a folder of one's choice)."""
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ..core.errors import ArgumentError, DataSetError
from .beton_writer import write_beton
from .dataset import IMAGE_EXTENSIONS, META_SUFFIX, BetonOptions, ImageDataset, _sha, is_beton


def scan_image_folder(root) -> tuple:
    """``(classes, files, labels)`` of a torchvision-style ImageFolder tree, with clear errors."""
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"{root}: not a directory; pass an ImageFolder tree (one folder per "
                           "class) or a .beton file")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSetError(f"{root}: no class folders; expected {root}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DataSetError(f"{root / name}: class folder holds no images; add images or "
                               "remove the folder")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _tree_key(root: Path, files, settings: dict) -> str:
    h = hashlib.sha256(json.dumps([str(root.resolve()), settings]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery"))


def split_dir(data, split: str) -> Path:
    """``DATA/<split>`` when it exists (torchvision reference layout), else ``DATA`` itself."""
    data = Path(data)
    return data / split if (data / split).is_dir() else data


SPLIT_KINDS = ("image_folder", "hf_dataset")  # the sources whose data holds splits


CACHING_KINDS = ("webdataset", "hf_dataset")  # keep a shard index or a table cache


def open_data_source(data, split: str = "train", cache_dir=None, **options):
    """``data`` as an :class:`.sources.ImageSource` (:func:`.sources.open_source`): its split
    ``split`` where the kind has splits (a tree's ``train/``, a ``DatasetDict``'s split), its
    shard index or table cache under ``cache_dir`` where the kind keeps one."""
    from . import ImageSource, open_source, source_kind
    if isinstance(data, ImageSource):
        return open_source(data, **options)
    kind = options.pop("kind", None) or source_kind(data)
    if kind in SPLIT_KINDS:
        options = {"split": split, **options}
    if kind in CACHING_KINDS and cache_dir is not None:
        options = {"cache_dir": cache_dir, **options}
    return open_source(data, kind, **options)


def require_labels(source):
    """Refuse a source without labels in one line: a label store records each image's class
    as its ground truth (and ground-truth training needs it)."""
    if source.labels() is None:
        raise DataSetError(f"{source.location}: names no class for its images (a "
                           f"{source.kind} source without labels), and a label store records "
                           "each image's class; pass the data with its classes: class folders, "
                           "a CSV with a label column (label_column / --label-column), shards "
                           "with cls members, or a table with a label column")


def open_dataset(data, split: str = "train", cache_dir=None,
                 options: BetonOptions = BetonOptions(), num_workers: int = 2, *,
                 labels_required: bool = True, **source_options) -> ImageDataset:
    """Open ``data`` as an :class:`ImageDataset`, converting it once (cached) unless it is a
    ``.beton``.

    Parameters
    ----------
    data : str, os.PathLike or object
        A ``.beton``, or anything :func:`.sources.open_source` opens: an ImageFolder tree
        (``DATA/<split>/<class>/*`` or ``DATA/<class>/*``), a flat folder, a list of paths,
        WebDataset shards (local, brace patterns, URLs), a Hugging Face table, a mapped data
        set (with ``key_fn=``), or an :class:`.sources.ImageSource`.
    split : str
        The split of a tree or a ``DatasetDict``.
    cache_dir : str or os.PathLike, optional
        Where converted files are kept (default: ``$REFINERY_CACHE``, else
        ``~/.cache/refinery``), named by the source's identity (files' sizes and mtimes,
        shards' stamps, a table's fingerprint) and ``options``, so precompute and train share
        one file. A mapped data set cannot tell whether it changed: it is converted each time.
    options : BetonOptions
        How images are written (passthrough or re-encoded JPEGs, a capped resolution).
    num_workers : int
        Processes converting the images.
    labels_required : bool
        Refuse, before converting, a source without labels (a flat folder); False converts it
        with label ``-1`` throughout, for readers that take labels from a store.
    **source_options
        The options of the source's kind (``key_column=``, ``label_column=``, ...).

    Raises
    ------
    DataSetError
        The data cannot be opened or converted (the message names it and the fix).
    """
    if is_beton(data):
        if source_options:
            raise ArgumentError(f"{', '.join(source_options)}: {data} is a .beton, which takes "
                                "no source options; leave them out")
        return ImageDataset(data)
    source = open_data_source(data, split, cache_dir, **source_options)
    if labels_required:
        require_labels(source)
    return ImageDataset(converted(source, cache_dir, options, num_workers))


def converted(source, cache_dir=None, options: BetonOptions = BetonOptions(),
              num_workers: int = 2) -> Path:
    """The cached ``.beton`` of ``source`` under ``options``, written first if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{_cache_name(source, options)}.beton"
    if source.stamp() is None or not path.is_file():
        write_beton(source, path, options, num_workers=num_workers)
    return path


def _cache_name(source, options: BetonOptions) -> str:
    """``<name>-<key>``: a tree converted with ``reencode`` keeps the name it had before other
    sources and passthrough existed (so old stores find their ``.beton``); any other source
    and conversion is keyed by everything that makes its file."""
    if source.kind == "image_folder" and options.jpeg == "reencode":
        root = source.root
        legacy = {k: v for k, v in options.__dict__.items() if k != "jpeg"}
        return f"{root.parent.name}-{root.name}-{_tree_key(root, source.files, legacy)}"
    identity = {"record": source.record(), "options": options.__dict__,
                "stamp": source.stamp(), "classes": source.classes,
                "keys": hashlib.sha256("\n".join(source.keys()).encode()).hexdigest(),
                "labels": None if source.labels() is None else _sha(source.labels())}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{data_name(source)}-{key[:16]}"


def data_name(source) -> str:
    """A short file-name form of where ``source`` came from: ``data-train`` for a tree's split,
    the shards' or table's stem otherwise."""
    location = Path(source.location.split("{")[0].rstrip("/-_."))
    name = (f"{location.parent.name}-{location.name}" if source.kind == "image_folder"
            else location.stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:48] or source.kind


def find_cached_beton(fingerprint: dict, cache_dir=None):
    """The ``.beton`` in the cache whose recorded fingerprint (its sidecar's, still current) is
    ``fingerprint``'s images and labels, or None: where a store's exact pixels are, found
    without the tree (``refine inspect``). Only sidecars are read, never a ``.beton``'s bytes."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    keys = ("image_bytes_sha256", "labels_sha256")
    for sidecar in sorted(cache.glob(f"*.beton{META_SUFFIX}")):
        beton = sidecar.with_name(sidecar.name[:-len(META_SUFFIX)])
        try:
            meta, stat = json.loads(sidecar.read_text()), beton.stat()
        except (OSError, ValueError):
            continue
        recorded = meta.get("fingerprint") or {}
        current = meta.get("fingerprint_stamp") == [stat.st_size, stat.st_mtime_ns]
        if current and all(recorded.get(k) == fingerprint.get(k) for k in keys):
            return beton
    return None


SPLITS = ("train", "val")


def convert_data(data, out_dir, options: BetonOptions = BetonOptions(), num_workers: int = 2,
                 split: str = None, **source_options) -> list:
    """Write ``data`` to ``.beton`` files in ``out_dir``; returns their paths.

    An ImageFolder tree gives ``<name>_train.beton`` and ``<name>_val.beton`` (from
    ``DATA/train`` and ``DATA/val``; a bare class tree as train; only ``split`` if given), the
    pair ``refine train`` takes; any other data set (:func:`open_data_source`: shards, tables,
    lists, flat folders) gives ``<name>.beton``, keyed by its images' names. The explicit form
    of what :func:`open_dataset` caches, for the options a large data set wants (FFCV's
    ImageNet recipe caps the longer side at 256 to 512 px) and for a file to share. Existing
    files are never overwritten: label stores are fingerprinted against them.
    """
    from . import source_kind
    out_dir = Path(out_dir)
    if is_beton(data):
        raise DataSetError(f"{data}: already a .beton; pass the images it was made from")
    if source_kind(data) == "image_folder" and isinstance(data, (str, os.PathLike)):
        splits = [split] if split else [s for s in SPLITS if (Path(data) / s).is_dir()] or ["train"]
        sources = {s: open_data_source(data, s, **source_options) for s in splits}  # errors first
        if len({tuple(source.classes) for source in sources.values()}) > 1:
            raise DataSetError(f"{data}: train and val hold different class folders; give both "
                               "splits the same classes")
        name = Path(data).resolve().name
        targets = {out_dir / f"{name}_{s}.beton": source for s, source in sources.items()}
    else:
        source = open_data_source(data, split or "train", **source_options)
        targets = {out_dir / f"{data_name(source)}.beton": source}
    for path in targets:
        if path.exists():
            raise DataSetError(f"{path}: already exists (label stores may be fingerprinted "
                               "against it); remove it or choose another output folder")
    for path, source in targets.items():
        write_beton(source, path, options, num_workers=num_workers)
    return list(targets)
