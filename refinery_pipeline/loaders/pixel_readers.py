"""Where a label store's replayed crops take their pixels from, for the plain-PyTorch readers.

A store of format 5 names its images (keys): any copy of its data set that
:func:`refinery_pipeline.sources.open_source` opens (a tree in any order, a flat folder, a list of
paths, a ``.beton``, WebDataset shards, a Hugging Face table, a map-style data set with a key
function) is joined with it by key (:mod:`.copies`), and :class:`KeyedPixels` reads store row n
from the copy's item holding it: the copy's own bytes, decoded by the spec's decoder (JPEG:
simplejpeg with fast DCT, FFCV's; other formats: PIL and the pixel mode rule), hashed to tell
*exact* (the bytes the refinery decoded) from *approximate*.

Older stores name no images; their pixels come by position, in decreasing fidelity:

* :class:`BetonImages`: the ``.beton`` the store was made from. Its JPEG bytes are decoded with
  FFCV's exact libjpeg-turbo settings, so crops equal the FFCV replay byte for byte (FFCV's
  Python ``Reader`` locates the bytes; nothing else of FFCV runs);
* :class:`FolderImages`: the original ImageFolder tree, in the store's order, checked against
  the store's record of it. Approximate: the ``.beton`` holds a re-encoded copy of each file;
* :class:`MappedImages`: any map-style data set of ``(image, label)`` in the store's order (a
  torchvision ``ImageFolder`` is put in the store's order by itself, and its file names are
  checked as a tree's are).

Neither torch nor FFCV is imported here at import time; only a ``.beton`` needs FFCV, when
opened.
"""
import hashlib
import os
from pathlib import Path

import numpy as np

from .copies import CopyJoin, join_copy
from ..core.errors import ArgumentError, DataSetError, StoreMismatchError
from ..store.label_store import LabelStore
from ..sources.pixels import decode_jpeg, read_image_file, rgb_of_any
from ..core.validators import path_like, refuse


# ----------------------------------------------------------------------------- by key

class KeyedPixels:
    """Store row n's pixels from a copy joined by key: the item ``join.copy_index[n]`` of
    ``source``, decoded from its own bytes, with its exact verdict (SHA-256 of the bytes
    against the store's ``image_digests``: one hash per read, beside the decode). Sources of
    decoded pixels only (a mapped data set) are approximate."""

    def __init__(self, source, join: CopyJoin, digests):
        self.source, self.join = source, join
        self.digests = digests  # (N, 32) uint8 or None (a store without digests: approximate)

    def read(self, n: int) -> tuple:
        """``(image (H, W, 3) uint8, exact)`` of store row ``n``."""
        c = int(self.join.item[n])  # also rows only a mixing partner needs
        if not self.source.has_bytes:
            return self.source.image(c), False
        from ..sources import decode_image
        data = self.source.encoded(c)
        exact = self.digests is not None and \
            hashlib.sha256(data).digest() == self.digests[n].tobytes()
        return decode_image(data, self.source.describe(c)), exact

    def describe(self, n: int) -> str:
        return self.source.describe(int(self.join.item[n]))


class PositionalPixels:
    """Store row n's pixels from image n of the data set the store was made from (an unkeyed
    store): exact from its ``.beton``, approximate from anything else (the ``.beton`` holds a
    re-encoded copy of each file)."""

    def __init__(self, images):
        self.images = images
        self.exact = isinstance(images, BetonImages)

    def read(self, n: int) -> tuple:
        return self.images.image(n), self.exact

    def describe(self, n: int) -> str:
        return f"image {n} of the pixel source"


def open_pixels(store: LabelStore, images, labels, *, recipe=None, allow_missing=False,
                key_fn=None) -> tuple:
    """``(pixels, join)``: the reader of each store row's pixels from ``images`` and the
    :class:`~.copies.CopyJoin` saying which rows it gives. A keyed store joins any source by
    key; an unkeyed one (or a ``.beton`` without keys, checked as the store's own) takes its
    data set by position, checked by count, labels and file names as before."""
    if store.keyed:
        source = keyed_source(store, images, key_fn)
        if source is not None:
            return _joined(store, source, recipe, allow_missing)
    elif key_fn is not None:
        raise refuse("key_fn", key_fn, f"{store.location} names no images (store format "
                     f"{store.format_version}), so its pixels are read by position",
                     "pass the data set in the store's order, without key_fn")
    positional = pixel_source(images, store)
    check_positional(store, positional, labels)
    pixels = PositionalPixels(positional)
    return pixels, CopyJoin.by_position(len(labels), pixels.exact)


def keyed_source(store, images, key_fn):
    """``images`` as an :class:`~.sources.ImageSource`, or None for a ``.beton`` without keys
    (read by position, as the store's own)."""
    from ..sources import BetonSource, ImageSource, open_source, source_kind
    spec = _spec_of(images)
    if isinstance(spec, ImageSource):
        if key_fn is not None:
            raise refuse("key_fn", key_fn, "an opened source has its keys already",
                         "pass key_fn to open_source instead")
        return spec
    options = {} if key_fn is None else {"key_fn": key_fn}
    if key_fn is None and not isinstance(spec, (str, os.PathLike)) and \
            source_kind(spec) == "mapped":
        raise refuse("images", images, f"a data set without file names, and {store.location} "
                     "joins its images by key", "pass key_fn=lambda i: <image i's file name "
                     "or key>")
    if isinstance(spec, (str, os.PathLike)) and source_kind(spec) == "beton":
        from .copies import beton_names_images
        from ..sources.dataset import ImageDataset
        if not beton_names_images(ImageDataset(spec)):
            return None  # a .beton naming no files: only the store's own one is usable
        return BetonSource(spec)
    return open_source(spec, **options)


def _spec_of(images):
    """What :func:`~.sources.open_source` opens for ``images`` (this module's positional
    readers stand for their path or data set)."""
    if isinstance(images, BetonImages):
        return images.path
    if isinstance(images, FolderImages):
        return images.root
    if isinstance(images, MappedImages):
        return images.dataset
    return images


def _joined(store, source, recipe, allow_missing) -> tuple:
    from ..sources import BetonSource
    frames = source.sizes if isinstance(source, BetonSource) else None
    join = join_copy(store, source.keys(), location=source.location, labels=source.labels(),
                     classes=source.classes, frames=frames, recipe=recipe,
                     allow_missing=allow_missing)
    return KeyedPixels(source, join, store.read_image_digests()), join


def check_positional(store: LabelStore, images, labels):
    """The data set read by position is the store's: the same count, its file names (where the
    store records a tree), the same labels where it lists them."""
    n = len(images)
    if n != store.layout.num_images:
        raise StoreMismatchError(f"{store.location}: labels {store.layout.num_images} images "
                                 f"but the pixel source holds {n}; pass the data set the "
                                 "store was made from")
    images.check(store)
    listed = getattr(images, "labels", None)
    if listed is not None and not np.array_equal(np.asarray(listed), labels):
        raise other_class_error(store.location,
                                int(np.flatnonzero(np.asarray(listed) != labels)[0]))


# ----------------------------------------------------------------------------- by position

class BetonImages:
    """Images of a ``.beton``, decoded exactly as FFCV decodes them.

    Only small per-image tables are kept; the file is memory-mapped lazily in each process, so
    the object pickles cheaply into ``DataLoader`` workers.
    """

    def __init__(self, path):
        from ..sources.dataset import ImageDataset
        # FFCV's Reader: one-line errors for foreign files
        dataset = ImageDataset(path_like("path", path, ".beton"))
        self.path, self.dataset = Path(path), dataset
        self.pointers, self.nbytes = dataset.image_byte_spans()
        self.modes = dataset.reader.metadata[dataset.image_field]["mode"].astype(np.int64)
        self.sizes = np.stack([dataset.heights, dataset.widths], -1)
        self.labels = dataset.labels
        self._blob = None

    def __len__(self):
        return len(self.pointers)

    def __getstate__(self):
        state = dict(self.__dict__, _blob=None)
        state["dataset"] = None  # FFCV's Reader stays in the parent
        return state

    def image(self, n: int) -> np.ndarray:
        """Image ``n`` as ``(H, W, 3)`` uint8, decoded from the bytes the refinery decoded."""
        if self._blob is None:
            self._blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._blob[self.pointers[n]:self.pointers[n] + self.nbytes[n]]
        if self.modes[n] == 0:  # FFCV's IMAGE_MODES["jpg"]
            return decode_jpeg(data.tobytes())
        h, w = self.sizes[n]
        return np.asarray(data[:h * w * 3]).reshape(h, w, 3)

    def check(self, store: LabelStore):
        """Raise :class:`StoreMismatchError` unless this is the ``.beton`` the store was made from
        (its fingerprint)."""
        store.check_matches(self.dataset.fingerprint())


class FolderImages:
    """The original files of an ImageFolder tree, in the order ``refine`` wrote them.

    ``root`` is the split folder (``DATA/train``) or a root holding ``train/``. The order is the
    tree's sorted scan permuted by the store's recorded rule; :meth:`check` compares the files
    with the store's record of its source and the labels with its ground truth.
    """

    def __init__(self, root):
        from ..sources.dataset import store_order
        from ..sources.data_cache import scan_image_folder, split_dir
        self.root = split_dir(path_like("root", root, "ImageFolder tree"), "train")
        self.classes, files, labels = scan_image_folder(self.root)
        order = store_order(len(files))
        self.files = [files[i] for i in order]
        self.labels = np.asarray(labels)[order]

    def __len__(self):
        return len(self.files)

    def image(self, n: int) -> np.ndarray:
        """Image ``n`` as ``(H, W, 3)`` uint8, read from its file."""
        return read_image_file(self.files[n])

    def check(self, store: LabelStore):
        """Raise :class:`StoreMismatchError` unless these are the files (names and order) the
        store records as its source."""
        check_source_files(store, self.root, self.files)


def check_source_files(store: LabelStore, root, files):
    """Raise :class:`StoreMismatchError` unless ``files`` (in store order, under the split folder
    ``root``) are the tree the store records as its source: the same names relative to the split
    folder, in the same order. Stores made from a ``.beton`` given directly, and format-1
    stores, record no tree: their pixel sources are checked by count and labels alone."""
    from ..sources.dataset import source_fingerprint
    recorded = store.dataset.source
    if recorded is None or recorded.get("kind") != "image_folder":
        return
    ours = source_fingerprint(root, files)
    if ours["files_sha256"] != recorded["files_sha256"]:
        raise StoreMismatchError(
            f"{root}: these files are not the tree {store.location} was made from "
            f"({ours['num_files']} files here, {recorded['num_files']} recorded, names or "
            "order differ); pass that tree, or its .beton")


class MappedImages:
    """Any map-style data set of ``(image, label)`` pairs in the store's order.

    Images may be PIL images of any mode, arrays ``(H, W[, C])`` or tensors ``([C, ]H, W)``,
    converted by the rule of :mod:`.pixels` (the one ``refine`` converts files by). A data
    set that lists its files as torchvision's ``DatasetFolder``/``ImageFolder`` do (``samples``
    and ``root``) is reordered into the store's order, so ``ImageFolder(root)`` works as it is,
    and :meth:`check` compares its file names with the store's record, as for a tree. Labels
    are compared with the store's up front where the data set lists them (``targets``), else
    each as its item is read (listing them would decode every image).
    """

    def __init__(self, dataset):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise refuse("images", dataset, "must be a .beton path, an ImageFolder tree or a "
                         "map-style data set of (image, label)",
                         "pass the data set the store was made from")
        self.dataset = dataset
        self.root = self.files = self.positions = None
        if _lists_files(dataset):
            self.root = Path(dataset.root)
            self.files, self.positions = _store_order_of(dataset)
        targets = getattr(dataset, "targets", None)
        self.labels = None if targets is None else np.asarray(targets)
        if self.labels is not None and self.positions is not None:
            self.labels = self.labels[self.positions]
        self._store_labels, self._location = None, None  # check(): compared item by item

    def __len__(self):
        return len(self.dataset)

    def image(self, n: int) -> np.ndarray:
        """Item ``n``'s image as ``(H, W, 3)`` uint8 by :mod:`.pixels`' one rule: a PIL image of
        any mode, an ``(H, W[, C])`` array or a ``([C, ]H, W)`` tensor (torchvision's layout) of
        uint8, uint16, bool or float in [0, 1]; anything else is refused naming the item."""
        item = self.dataset[int(self.positions[n]) if self.positions is not None else n]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise DataSetError(f"images: item {n} of the data set is a {type(item).__name__}, "
                               "not an (image, label) pair; pass a data set whose items are "
                               "(image, label), as torchvision's are")
        image, label = item[0], item[1]
        if self._store_labels is not None and int(label) != self._store_labels[n]:
            raise other_class_error(self._location, n)
        return rgb_of_any(image, f"image {n} of the mapped data set "
                                 f"({type(self.dataset).__name__})")

    def check(self, store: LabelStore):
        """File names where the data set lists them (torchvision's ``DatasetFolder``,
        ``ImageFolder``); count and listed labels are checked by the caller, and labels the
        data set does not list are checked as :meth:`image` reads them."""
        if self.files is not None:
            check_source_files(store, self.root, self.files)
        if self.labels is None:
            self._store_labels, self._location = store.read_labels(), store.location


def other_class_error(location, n: int) -> StoreMismatchError:
    """Image ``n`` of the pixel source has another class than the store records."""
    return StoreMismatchError(f"{location}: image {n} has another class in the pixel source "
                              "than in the store; pass the images in the store's order (the "
                              "data set it was made from)")


def _lists_files(dataset) -> bool:
    """Whether ``dataset`` lists its files as torchvision's ``DatasetFolder`` does."""
    return hasattr(dataset, "samples") and hasattr(dataset, "root")


def _store_order_of(dataset) -> tuple:
    """A torchvision ``DatasetFolder``'s files in the store's order (the tree's scan, permuted
    as ``refine`` writes it), and the position in the data set of each."""
    from ..sources.dataset import store_order
    from ..sources.data_cache import scan_image_folder
    _, files, _ = scan_image_folder(dataset.root)
    files = [files[i] for i in store_order(len(files))]
    where = {os.path.normpath(path): i for i, (path, _) in enumerate(dataset.samples)}
    try:
        return files, np.array([where[os.path.normpath(f)] for f in files], dtype=np.int64)
    except KeyError as missing:
        raise DataSetError(f"{dataset.root}: the data set does not list {missing}, which the "
                           "tree holds; pass the tree whole (no filtering)") from None


def pixel_source(images, store: LabelStore = None):
    """A positional pixel source for ``images``: a ``.beton`` path, an ImageFolder tree path,
    one of this module's readers, or any map-style data set of ``(image, label)``."""
    if isinstance(images, (BetonImages, FolderImages, MappedImages)):
        return images
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.suffix == ".beton":
            return BetonImages(path)
        if path.is_dir() and _is_tree(path):
            return FolderImages(path)
        if path.exists() and store is not None:
            raise DataSetError(f"{path}: {store.location} names no images (store format "
                               f"{store.format_version}), so it reads only the data set it was "
                               "made from, in its order (its .beton or ImageFolder tree); "
                               "precompute a new store to use copies of other forms")
        if path.is_file():
            return BetonImages(path)
        if not path.is_dir():
            raise DataSetError(f"{path}: no such .beton or ImageFolder tree; pass the data set "
                               "the store was made from")
        return FolderImages(path)
    return MappedImages(images)


def _is_tree(path: Path) -> bool:
    from ..sources import source_kind
    try:
        return source_kind(path) == "image_folder"
    except (DataSetError, ArgumentError):
        return True  # FolderImages names the problem
