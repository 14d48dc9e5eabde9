"""Hugging Face ``datasets`` tables: a ``Dataset`` object, a ``save_to_disk`` folder, Arrow or
Parquet files. Images are read as stored bytes (``Image(decode=False)``), keys from a column."""
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import DataSetError, first_line
from .base import ImageSource, as_labels, read_file_bytes
from .data_cache import default_cache_dir

KEY_COLUMNS = ("file_name", "path", "__key__")  # tried in this order when none is named
LABEL_COLUMNS = ("label", "cls")  # integer columns taken as labels when no ClassLabel exists
TABLE_SUFFIXES = (".parquet", ".arrow")
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes


class HFDatasetSource(ImageSource):
    """A Hugging Face table of images.

    ``data`` is a ``datasets.Dataset`` (or ``DatasetDict``, of which ``split`` is taken), a
    folder written by ``save_to_disk``, or Arrow/Parquet files (a path, a list, or a folder of
    ``.parquet`` files). The image column (default: the first ``Image`` column) is read as
    bytes, as stored; a binary column is taken as encoded images. Keys come from
    ``key_column`` (default: ``file_name``, ``path`` or ``__key__``, else the image column's
    file paths where the table kept them); labels from ``label_column`` (default: the first
    ``ClassLabel`` column, named by its class names, else an integer ``label``/``cls``).
    """

    kind = "hf_dataset"

    def __init__(self, data, key_column=None, image_column=None, label_column=None,
                 split: str = "train", cache_dir=None):
        dataset, self.split, location = _load(data, split, cache_dir)
        self.image_column = image_column or _image_column(dataset, location)
        self._images = _bytes_view(dataset, self.image_column, location)
        keys, self.key_column = _keys(dataset, key_column, self.image_column, location)
        self.key_rule = (f"the image column {self.image_column!r}'s file paths, extension removed"
                         if self.key_column is None
                         else f"column {self.key_column!r}, image extension removed")
        classes, self._labels, self.label_column = _labels(dataset, label_column, location)
        super().__init__(location, keys, classes)

    def labels(self):
        return self._labels

    _cells = None  # the image column's bytes in place (_arrow_cells), made in each process

    def __getstate__(self):
        return dict(self.__dict__, _cells=None)  # a view of this process's memory map

    def encoded(self, i: int) -> bytes:
        cells = self._arrow_cells()
        if cells is not None:
            data = cells[int(i)].as_py()
            if data is not None:
                return data
        value = self._images[int(i)][self.image_column]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return read_file_bytes(value["path"])
            raise DataSetError(f"{self.describe(i)}: holds neither bytes nor a path; fill the "
                               "image column")
        return value

    def _arrow_cells(self):
        """The image column's encoded bytes as pyarrow holds them (memory-mapped), read in
        place: ~1 us a row, where ``datasets``' row access costs ~25 us (a third of a crop's
        time). None for a table seen through an index mapping (``select``, ``shuffle``): read
        through ``datasets``."""
        if self._cells is None:
            self._cells = False
            if getattr(self._images, "_indices", None) is None:
                column = self._images.data.column(self.image_column)
                if str(column.type).startswith("struct"):  # Image: {bytes, path}
                    import pyarrow as pa
                    column = pa.chunked_array([c.field("bytes") for c in column.chunks],
                                              type=column.type.field("bytes").type)
                self._cells = column
        return self._cells if self._cells is not False else None

    def describe(self, i: int) -> str:
        return f"{self.location} row {i}"

    def _record_details(self) -> dict:
        return {"key_column": self.key_column, "image_column": self.image_column,
                "label_column": self.label_column, "split": self.split}

    def stamp(self):
        """The table's ``datasets`` fingerprint (of its files, or of its in-memory data)."""
        return getattr(self._images, "_fingerprint", None)


def is_table_path(path) -> bool:
    """Whether ``path`` looks like HF data: Arrow/Parquet files or a ``save_to_disk`` folder."""
    path = Path(path)
    if path.is_dir():
        return (any((path / m).is_file() for m in SAVED_MARKERS)
                or any(path.glob("*.parquet")))
    return path.suffix.lower() in TABLE_SUFFIXES


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataSetError("Hugging Face tables need the datasets package; pip install "
                           "'refinery[hf]'") from None
    return datasets


def _load(data, split: str, cache_dir) -> tuple:
    """``(datasets.Dataset, the split taken or None, location)`` from an object, a saved
    folder or table files."""
    datasets = _datasets()
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        files = [f["filename"] for f in getattr(data, "cache_files", []) or []
                 if isinstance(f, dict)]
        location = files[0] if files else f"datasets.{type(data).__name__} in memory"
        return (*_split(data, split, location), location)
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    location = str(paths[0].resolve()) + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
    try:
        if len(paths) == 1 and paths[0].is_dir() and not any(paths[0].glob("*.parquet")):
            return (*_split(datasets.load_from_disk(str(paths[0])), split, location), location)
        files = [f for p in paths for f in (sorted(p.glob("*.parquet")) if p.is_dir() else [p])]
        for f in files:
            if not f.is_file():
                raise DataSetError(f"{f}: no such file; pass Arrow or Parquet files or a "
                                   "save_to_disk folder")
        if all(f.suffix.lower() == ".arrow" for f in files):
            return datasets.concatenate_datasets(
                [datasets.Dataset.from_file(str(f)) for f in files]), None, location
        cache = Path(cache_dir or default_cache_dir()) / "hf-datasets"
        with _quiet(datasets):
            return datasets.Dataset.from_parquet([str(f) for f in files],
                                                 cache_dir=str(cache)), None, location
    except DataSetError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many types for foreign files
        reason = first_line(exc)
        raise DataSetError(f"{location}: not a readable Hugging Face dataset ({reason}); pass "
                           "a save_to_disk folder or Arrow/Parquet files") from None


def _split(data, split: str, location: str) -> tuple:
    """``(the table, the split taken)``: split ``split`` of a ``DatasetDict``, or the table
    itself (None: it has no splits)."""
    datasets = _datasets()
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataSetError(f"{location}: no split {split!r} (splits: "
                               f"{', '.join(data)}); choose one with split=")
        return data[split], split
    return data, None


@contextmanager
def _quiet(datasets):
    """No progress bars while a Parquet file is turned into HF's Arrow cache (a library
    prints nothing unasked); the caller's setting is restored."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _column(dataset, name: str):
    """Column ``name`` as a pyarrow array, in the dataset's row order (indices applied)."""
    return dataset.select_columns([name]).with_format("arrow")[:][name]


def _require_column(dataset, name: str, role: str, location: str):
    if name not in dataset.column_names:
        raise DataSetError(f"{location}: no column {name!r} (columns: "
                           f"{', '.join(dataset.column_names)}); name the {role} with "
                           f"{role}=")


def _image_column(dataset, location: str) -> str:
    datasets = _datasets()
    found = [name for name, feature in dataset.features.items()
             if isinstance(feature, datasets.Image)]
    if not found:
        raise DataSetError(f"{location}: no Image column (columns: "
                           f"{', '.join(dataset.column_names)}); name the column of encoded "
                           "images with image_column=")
    return found[0]


def _bytes_view(dataset, column: str, location: str):
    """The dataset reduced to ``column``, giving each image's stored bytes (not decoded)."""
    datasets = _datasets()
    _require_column(dataset, column, "image_column", location)
    feature = dataset.features[column]
    images = dataset.select_columns([column])
    if isinstance(feature, datasets.Image):
        return images.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return images
    raise DataSetError(f"{location}: column {column!r} holds {feature}, not encoded images; "
                       "name an Image or binary column with image_column=")


def _keys(dataset, key_column, image_column: str, location: str) -> tuple:
    """``(keys, key column or None for the image paths)``."""
    import pyarrow.compute as pc
    column = key_column or next((c for c in KEY_COLUMNS if c in dataset.column_names), None)
    if column is not None:
        _require_column(dataset, column, "key_column", location)
        values = _column(dataset, column)
    else:
        values = None
        if isinstance(dataset.features[image_column], _datasets().Image):
            values = pc.struct_field(_column(dataset, image_column), "path")
        if values is None or values.null_count:
            raise DataSetError(f"{location}: no key column (none of {', '.join(KEY_COLUMNS)}, "
                               f"and the image column keeps no file paths; columns: "
                               f"{', '.join(dataset.column_names)}); name one with key_column=")
    if values.null_count:
        raise DataSetError(f"{location}: column {column!r} is empty in {values.null_count} rows; "
                           "give every row a key")
    return [str(v) for v in values.to_pylist()], column


def _labels(dataset, label_column, location: str) -> tuple:
    """``(classes or None, labels or None, the column used)``."""
    datasets = _datasets()
    features = dataset.features
    if label_column is None:
        label_column = next((n for n, f in features.items()
                             if isinstance(f, datasets.ClassLabel)), None)
        if label_column is None:
            label_column = next((n for n in LABEL_COLUMNS if n in features
                                 and isinstance(features[n], datasets.Value)
                                 and features[n].dtype.startswith(("int", "uint"))), None)
        if label_column is None:
            return None, None, None
    _require_column(dataset, label_column, "label_column", location)
    feature = features[label_column]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    values = _column(dataset, label_column)
    if values.null_count or not str(values.type).startswith(("int", "uint")):
        raise DataSetError(f"{location}: column {label_column!r} holds {values.type}"
                           f"{' with empty rows' if values.null_count else ''}, not class "
                           "numbers; name an integer or ClassLabel column with label_column=")
    return classes, as_labels(values.to_numpy(), classes, location), label_column
