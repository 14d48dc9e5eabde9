"""Where images come from: one interface over every form a data set is held in.

:func:`open_source` turns a path, URL or object into an :class:`ImageSource`: an ImageFolder
tree, a flat folder, a list of paths (text, CSV or Python list), a ``.beton`` written by
``refine``, WebDataset shards (local, brace patterns, ``s3://``, ``http(s)://``), a Hugging Face
table (``Dataset`` object, ``save_to_disk`` folder, Arrow/Parquet files) or any map-style data
set with a key function. Each gives keys without reading an image, labels and class names where
it has them, and each item's encoded bytes exactly as stored (or decoded pixels), so a reader
joins a label store with any copy of its data by key (:mod:`refinery_pipeline.sources.keys`).
"""
import inspect
import os
from pathlib import Path

from ..core.errors import ArgumentError, DataSetError
from ..core.object_storage import is_remote
from .base import ImageSource, decode_image
from .beton import BetonSource
from .dataset import IMAGE_EXTENSIONS
from .files import ImageFolderSource, PathsSource
from .hf import HFDatasetSource, is_table_path
from .mapped import MappedSource
from .shards import COMPRESSED, WebDatasetSource, expand_shards

LIST_SUFFIXES = (".csv", ".txt", ".lst")
SOURCE_HELP = ("pass an ImageFolder tree, a folder of images, a list of paths (.txt/.csv), a "
               ".beton, WebDataset .tar shards or a Hugging Face dataset")


def _image_folder(spec, split: str = "train"):
    if _is_folder_dataset(spec):
        return ImageFolderSource.from_folder_dataset(spec)
    return ImageFolderSource.from_tree(spec, split)


def _paths(spec, root=None, path_column=None, label_column=None):
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        if root is not None or path_column is not None or label_column is not None:
            raise ArgumentError(f"{spec}: a folder of images takes no root, path_column or "
                                "label_column; leave them out")
        return PathsSource.from_directory(spec)
    return PathsSource.from_list(spec, root, path_column, label_column)


BUILDERS = {"image_folder": _image_folder, "paths": _paths, "beton": BetonSource,
            "webdataset": WebDatasetSource, "hf_dataset": HFDatasetSource,
            "mapped": MappedSource}


def open_source(spec, kind=None, **options) -> ImageSource:
    """Open ``spec`` as an :class:`ImageSource`, choosing the implementation from its form.

    Parameters
    ----------
    spec : str, os.PathLike, list, or object
        A folder (ImageFolder tree ``DATA/<split>/<class>/*`` or ``DATA/<class>/*``; a flat
        folder of images; a folder of ``.tar`` shards or ``.parquet`` files; a ``save_to_disk``
        folder), a file (``.beton``, ``.tar``, ``.parquet``/``.arrow``, ``.csv``/``.txt`` list),
        a brace pattern or URL of shards (``s3://b/shards-{000..009}.tar``), a list of paths or
        shards, a ``datasets.Dataset``/``DatasetDict``, a torchvision ``ImageFolder``, any
        map-style data set (with ``key_fn``), or an :class:`ImageSource` (returned as is).
    kind : str, optional
        Force one implementation: ``image_folder``, ``paths``, ``beton``, ``webdataset``,
        ``hf_dataset`` or ``mapped``.
    **options
        For the chosen kind only: ``split`` (image_folder, hf_dataset); ``root``,
        ``path_column``, ``label_column`` (paths); ``image_ext``, ``classes``, ``cache_dir``
        (webdataset); ``key_column``, ``image_column``, ``label_column``, ``cache_dir``
        (hf_dataset); ``key_fn``, ``classes`` (mapped).

    Returns
    -------
    ImageSource

    Raises
    ------
    DataSetError
        The data cannot be used as given (missing, empty, no images, no such column,
        duplicate keys, unreadable shards...); the message names the path and the fix.
    ArgumentError
        An unknown ``kind``, an option the kind does not take, a ``spec`` of no known form.
    """
    if isinstance(spec, ImageSource):
        if kind is not None or options:
            raise ArgumentError("spec: already an ImageSource; pass options when opening it")
        return spec
    kind = kind or source_kind(spec)
    if kind not in BUILDERS:
        raise ArgumentError(f"kind={kind!r}: not a kind of source; choose one of "
                            f"{', '.join(BUILDERS)}")
    build = BUILDERS[kind]
    accepted = list(inspect.signature(build).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ArgumentError(f"{', '.join(unknown)}: not an option of a {kind} source; it takes "
                            f"{', '.join(accepted) or 'none'}")
    return build(spec, **options)


def source_kind(spec) -> str:
    """The kind of source :func:`open_source` opens ``spec`` as (without opening it)."""
    if type(spec).__module__.split(".")[0] == "datasets":
        return "hf_dataset"
    if _is_folder_dataset(spec):
        return "image_folder"
    if isinstance(spec, (str, os.PathLike)):
        return _path_kind(str(spec))
    if isinstance(spec, (list, tuple)) and spec and all(
            isinstance(s, (str, os.PathLike)) for s in spec):
        kinds = {_file_kind(str(s)) for s in spec}
        return kinds.pop() if len(kinds) == 1 and None not in kinds else "paths"
    if hasattr(spec, "__getitem__") and hasattr(spec, "__len__"):
        return "mapped"
    raise ArgumentError(f"spec: cannot open a {type(spec).__name__} as images; {SOURCE_HELP}")


def _path_kind(spec: str) -> str:
    if is_remote(spec):
        if "{" in spec or spec.lower().endswith((".tar", *COMPRESSED)):
            return "webdataset"
        raise DataSetError(f"{spec}: only WebDataset shards are read from URLs; pass .tar "
                           "shard URLs or a brace pattern, or copy the data to a local folder")
    if "{" in spec and not Path(spec).exists():
        return "webdataset"
    path = Path(spec)
    kind = _file_kind(spec)
    if kind is not None:
        return kind
    if path.is_dir():
        return _folder_kind(path)
    if not path.exists():
        raise DataSetError(f"{spec}: no such file or folder; {SOURCE_HELP}")
    raise DataSetError(f"{spec}: not a kind of data set refine reads; {SOURCE_HELP}")


def _file_kind(spec: str):
    """The kind a file name says (by its ending), or None."""
    lower = spec.lower()
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        return "webdataset"
    if lower.endswith(".beton"):
        return "beton"
    if lower.endswith((".parquet", ".arrow")):
        return "hf_dataset"
    if lower.endswith(LIST_SUFFIXES):
        return "paths"
    return None


def _folder_kind(folder: Path) -> str:
    """A saved HF dataset, a tree (class folders), a flat folder of images, or shards."""
    if is_table_path(folder):
        return "hf_dataset"
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    folders = [e for e in entries if e.is_dir()]
    images = [e for e in entries if e.is_file() and _file_kind(e.name) is None
              and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
    if folders and images:
        raise DataSetError(f"{folder}: holds both images and folders; pass kind='image_folder' "
                           "(class folders) or kind='paths' (the images beside them)")
    if folders:
        return "image_folder"
    if images:
        return "paths"
    if any(e.name.endswith(".tar") for e in entries):
        return "webdataset"
    raise DataSetError(f"{folder}: holds no images, class folders, shards or tables; "
                       f"{SOURCE_HELP}")


def _is_folder_dataset(spec) -> bool:
    """A torchvision ``DatasetFolder``/``ImageFolder``: its files are known."""
    return all(hasattr(spec, a) for a in ("samples", "root", "classes"))


__all__ = ["ImageSource", "open_source", "source_kind", "ImageFolderSource", "PathsSource",
           "BetonSource", "WebDatasetSource", "HFDatasetSource", "MappedSource",
           "expand_shards", "decode_image", "BUILDERS"]
