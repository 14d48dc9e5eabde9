"""Image files on a local disk: an ImageFolder tree, a flat directory, a list of paths."""
import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from ..dataset import IMAGE_EXTENSIONS, scan_image_folder, split_dir
from ..errors import ArgumentError, DataSetError
from .base import ImageSource, as_labels, read_file_bytes

LIST_PATH_COLUMNS = ("path", "file", "file_name", "filename", "image", "image_path")
MISSING_EXAMPLES = 3


class FileSource(ImageSource):
    """Image files, each read as it is stored; the key of a file is its path relative to
    ``root``, normalized (extension removed)."""

    def __init__(self, location, files, root, labels=None, classes=None, key_rule=None):
        self.files = [Path(f) for f in files]
        self.root = Path(root)
        self.key_rule = key_rule or self.key_rule
        self._labels = None if labels is None else as_labels(labels, classes, str(location))
        super().__init__(location, [_relative(f, self.root) for f in self.files], classes)

    def labels(self):
        return self._labels

    def encoded(self, i: int) -> bytes:
        return read_file_bytes(self.files[i])

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def _record_details(self) -> dict:
        return {"root": str(self.root)}

    def stamp(self) -> str:
        """SHA-256 over each file's path, size and modification time, in order."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


class ImageFolderSource(FileSource):
    """A torchvision-style ImageFolder tree, ``DATA/<split>/<class>/<image>`` or
    ``DATA/<class>/<image>``, in any file order. Classes are the folder names, sorted."""

    kind = "image_folder"
    key_rule = "path relative to the split folder, image extension removed"

    @classmethod
    def from_tree(cls, data, split: str = "train") -> "ImageFolderSource":
        """The tree ``data`` (its ``split`` folder where it has one)."""
        root = split_dir(data, split).resolve()
        classes, files, labels = scan_image_folder(root)
        return cls(root, files, root, labels, classes)

    @classmethod
    def from_folder_dataset(cls, dataset) -> "ImageFolderSource":
        """A torchvision ``DatasetFolder``/``ImageFolder`` object's files (its ``samples``),
        keyed relative to its ``root``, with its classes and targets."""
        root = Path(dataset.root).resolve()
        files = [Path(path).resolve() for path, _ in dataset.samples]
        return cls(root, files, root, [target for _, target in dataset.samples],
                   dataset.classes)

    def _record_details(self) -> dict:
        return {**super()._record_details(), "split": self.root.name}


class PathsSource(FileSource):
    """Image files named one by one (a list) or by their folder (a flat copy, no classes)."""

    kind = "paths"
    key_rule = "path relative to the deepest folder holding all listed files, extension removed"

    @classmethod
    def from_list(cls, paths, root=None, path_column=None,
                  label_column=None) -> "PathsSource":
        """A text file (one path per line; blank and ``#`` lines skipped), a CSV file with a
        path column (and optionally ``label_column``, of class names), or a Python list.
        Relative paths in a file resolve against its folder, in a Python list against the
        working directory. Keys are relative to ``root`` (default: the deepest folder holding
        every file), so a list of one tree's files gives the tree's keys."""
        if isinstance(paths, (str, os.PathLike)):
            location = Path(paths).resolve()
            files, names = _read_list(location, path_column, label_column)
        else:
            if path_column is not None or label_column is not None:
                raise ArgumentError("path_column, label_column: name columns of a CSV file, "
                                    "not of a Python list; leave them out")
            location, files, names = "list of paths", [Path(p) for p in paths], None
        files = [f.resolve() for f in files]
        _refuse_missing_files(files, location)
        key_rule = "path relative to root, image extension removed" if root is not None else None
        if root is None:
            root = os.path.commonpath([str(f.parent) for f in files]) if files else "."
        classes = None if names is None else sorted(set(names))
        labels = None if names is None else np.searchsorted(classes, names)
        return cls(location, files, root, labels, classes, key_rule)

    @classmethod
    def from_directory(cls, folder) -> "PathsSource":
        """The image files directly in ``folder`` (a flat copy: no class folders)."""
        folder = Path(folder).resolve()
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return cls(folder, files, folder,
                   key_rule="file name in the folder, image extension removed")


def _relative(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        raise DataSetError(f"{file}: not under the key root {root}; pass a root that holds "
                           "every file") from None


def _refuse_missing_files(files, location):
    missing = [f for f in files if not f.is_file()]
    if missing:
        names = ", ".join(str(f) for f in missing[:MISSING_EXAMPLES])
        raise DataSetError(f"{location}: {len(missing)} of {len(files)} listed files do not exist "
                           f"(e.g. {names}); fix the paths or remove them from the list")


def _read_list(path: Path, path_column, label_column) -> tuple:
    """``(files, class names or None)`` listed in a text or CSV file."""
    if not path.is_file():
        raise DataSetError(f"{path}: no such file; pass a list of image paths (text or CSV)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSetError(f"{path}: cannot be read as a text list ({exc}); pass a UTF-8 text "
                           "or CSV file of image paths") from None
    if path.suffix.lower() == ".csv":
        paths, names = _csv_columns(path, text, path_column, label_column)
    else:
        if path_column is not None or label_column is not None:
            raise ArgumentError(f"path_column, label_column: {path.name} is a plain list (one "
                                "path per line), not a CSV file; leave them out")
        paths = [line.strip() for line in text.splitlines()]
        paths, names = [p for p in paths if p and not p.startswith("#")], None
    return [path.parent / p for p in paths], names


def _csv_columns(path: Path, text: str, path_column, label_column) -> tuple:
    rows = list(csv.DictReader(text.splitlines()))
    header = list(rows[0]) if rows else []
    column = path_column or next((c for c in LIST_PATH_COLUMNS if c in header), None)
    if column is None or column not in header:
        raise DataSetError(f"{path}: no column {column or 'of paths'!r} (columns: "
                           f"{', '.join(header) or 'none'}); name it with path_column=")
    if label_column is not None and label_column not in header:
        raise DataSetError(f"{path}: no column {label_column!r} (columns: {', '.join(header)}); "
                           "name the column of class names with label_column=")
    names = None if label_column is None else [row[label_column] for row in rows]
    return [row[column] for row in rows], names
