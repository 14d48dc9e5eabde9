"""The plain-PyTorch backend: a label store as a ``torch.utils.data.Dataset`` for any training loop.

:class:`StoreCropDataset` item ``n`` is image ``n``'s crop for the current epoch: the stored box
and flip of the slot that ``(epoch, n)`` selects (the same slot ``refine train`` replays), cut
from the image, handed to the user's own transform, with that slot's stored top-k label. The
slot is a pure function of ``(seed, epoch, n)``, so the result never depends on batch size,
``DataLoader`` workers, samplers or ranks; ``set_epoch`` reaches persistent workers too.

Pixel sources, in decreasing fidelity:

* :class:`BetonImages`: the ``.beton`` the store was made from. Its JPEG bytes are decoded with
  FFCV's exact libjpeg-turbo settings, so crops equal the FFCV replay byte for byte (FFCV's
  Python ``Reader`` locates the bytes; nothing else of FFCV runs);
* :class:`FolderImages`: the original ImageFolder tree, in the store's order, checked against
  the store's record of it. Approximate: the ``.beton`` holds a re-encoded copy of each file
  (``benchmarks/results/`` measures the refinery's agreement between the two);
* :class:`MappedImages`: any map-style data set of ``(image, label)`` in the store's order (a
  torchvision ``ImageFolder`` is put in the store's order by itself, and its file names are
  checked as a tree's are).

Nothing here imports FFCV at import time; only :class:`BetonImages` needs it, when opened.
"""
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .augment import plan_augment
from .crop_batch import CropBatch, MixedLabels, SparseLabels
from .crop_plan import DEFAULT_SLOT_POLICY, SLOT_POLICIES, slot_of
from .errors import DataSetError, StoreMismatchError
from .label_store import LabelStore, open_for_reading
from .losses import DEFAULT_REST, REST_POLICIES, dense_from_sparse
from .pixels import (box_in_frame, cut_crop, decode_jpeg, read_image_file, rgb_of_array,
                     rgb_of_image)
from .validators import (one_of, optional_callable, optional_whole_number, path_like, refuse,
                         whole_number)

CROP_FORMATS = ("tensor", "pil", "numpy")
NO_PARTNER = -1  # CropSample.partner_label of a crop no mixing recipe made


# ----------------------------------------------------------------------------- pixel sources

class BetonImages:
    """Images of a ``.beton``, decoded exactly as FFCV decodes them.

    Only small per-image tables are kept; the file is memory-mapped lazily in each process, so
    the object pickles cheaply into ``DataLoader`` workers.
    """

    def __init__(self, path):
        from .dataset import ImageDataset
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
        if self._blob is None:
            self._blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._blob[self.pointers[n]:self.pointers[n] + self.nbytes[n]]
        if self.modes[n] == 0:  # FFCV's IMAGE_MODES["jpg"]
            return decode_jpeg(data.tobytes())
        h, w = self.sizes[n]
        return np.asarray(data[:h * w * 3]).reshape(h, w, 3)

    def check(self, store: LabelStore):
        store.check_matches(self.dataset.fingerprint())


class FolderImages:
    """The original files of an ImageFolder tree, in the order ``refine`` wrote them.

    ``root`` is the split folder (``DATA/train``) or a root holding ``train/``. The order is the
    tree's sorted scan permuted by the store's recorded rule; :meth:`check` compares the files
    with the store's record of its source and the labels with its ground truth.
    """

    def __init__(self, root):
        from .dataset import scan_image_folder, split_dir, store_order
        self.root = split_dir(path_like("root", root, "ImageFolder tree"), "train")
        self.classes, files, labels = scan_image_folder(self.root)
        order = store_order(len(files))
        self.files = [files[i] for i in order]
        self.labels = np.asarray(labels)[order]

    def __len__(self):
        return len(self.files)

    def image(self, n: int) -> np.ndarray:
        return read_image_file(self.files[n])

    def check(self, store: LabelStore):
        check_source_files(store, self.root, self.files)


def check_source_files(store: LabelStore, root, files):
    """Raise :class:`StoreMismatchError` unless ``files`` (in store order, under the split folder
    ``root``) are the tree the store records as its source: the same names relative to the split
    folder, in the same order. Stores made from a ``.beton`` given directly, and format-1
    stores, record no tree: their pixel sources are checked by count and labels alone."""
    from .dataset import source_fingerprint
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
        what = f"image {n} of the mapped data set ({type(self.dataset).__name__})"
        if isinstance(image, torch.Tensor):
            image = _tensor_as_hwc(image)
        if hasattr(image, "convert"):  # PIL
            return rgb_of_image(image, what)
        return rgb_of_array(image, what)

    def check(self, store: LabelStore):
        """File names where the data set lists them (torchvision's ``DatasetFolder``,
        ``ImageFolder``); count and listed labels are checked by the caller, and labels the
        data set does not list are checked as :meth:`image` reads them."""
        if self.files is not None:
            check_source_files(store, self.root, self.files)
        if self.labels is None:
            self._store_labels, self._location = store.read_labels(), store.location


def _tensor_as_hwc(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` tensor (torchvision's layout; C 1 to 4) as an ``(H, W, C)`` array; an
    ``(H, W, C)`` or ``(H, W)`` one as it is. bfloat16 and half become float32."""
    image = image.detach().cpu()
    if image.is_floating_point():
        image = image.float()
    if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4):
        image = image.permute(1, 2, 0)
    return image.numpy()


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
    from .dataset import scan_image_folder, store_order
    _, files, _ = scan_image_folder(dataset.root)
    files = [files[i] for i in store_order(len(files))]
    where = {os.path.normpath(path): i for i, (path, _) in enumerate(dataset.samples)}
    try:
        return files, np.array([where[os.path.normpath(f)] for f in files], dtype=np.int64)
    except KeyError as missing:
        raise DataSetError(f"{dataset.root}: the data set does not list {missing}, which the "
                           "tree holds; pass the tree whole (no filtering)") from None


def pixel_source(images):
    """A pixel source for ``images``: a ``.beton`` path, an ImageFolder tree path, a source
    object, or any map-style data set of ``(image, label)``."""
    if isinstance(images, (BetonImages, FolderImages, MappedImages)):
        return images
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.suffix == ".beton" or path.is_file():
            return BetonImages(path)
        if not path.is_dir():
            raise DataSetError(f"{path}: no such .beton or ImageFolder tree; pass the data set "
                               "the store was made from")
        return FolderImages(path)
    return MappedImages(images)


# ----------------------------------------------------------------------------- the data set

class CropSample(NamedTuple):
    """One item of :class:`StoreCropDataset` (see :class:`CropCollate` for batches)."""

    image: Any             # the crop after the user's transform
    label: int             # ground-truth class
    index: int             # image index n (the store's row)
    slot: int              # the stored slot this crop replays
    topk_indices: np.ndarray  # (k,) int64 stored top-k classes of this crop
    topk_probs: np.ndarray    # (k,) float16 their probabilities
    # A mixing recipe's partner (CropBatch.mix, one sample of it): the partner image's class
    # (NO_PARTNER without a mixing recipe) and the crop's own share of the pixels (1: unmixed).
    partner_label: int = NO_PARTNER
    mix_weight: float = 1.0


class StoreCropDataset(Dataset):
    """Image ``n``'s stored crop for the current epoch, with its stored label.

    Parameters
    ----------
    store : LabelStore or str or os.PathLike
        The label store, or its location (directory, ``.zip`` or fsspec URL).
    images : str, os.PathLike or Dataset
        The pixels: the ``.beton`` the store was made from (byte-exact), the ImageFolder tree
        it was converted from (approximate), or any map-style data set of ``(image, label)``
        in the store's order (see the module docstring).
    transform : callable, optional
        Applied to each crop after it is cut and resized (torchvision v2 transforms, timm's
        post-crop transforms, ...). It receives a ``(3, S, S)`` uint8 tensor, a PIL image or an
        ``(S, S, 3)`` array, per ``crop_format``.
    slot_policy : {"cycle", "random"}
        Which slot each epoch replays, as ``refine train --slot-policy``.
    seed : int
        The run's seed for slot choice (``refine train --seed``).
    epoch : int
        The first epoch; later ones via :meth:`set_epoch`.
    size : int, optional
        Crop side; defaults to the size the refinery labelled (anything else is the same region
        at another resolution, not the labelled pixels).
    crop_format : {"tensor", "pil", "numpy"}
        What ``transform`` receives.

    Raises
    ------
    StoreCorruptError
        The store fails the checks ``refine verify`` and ``refine train`` run (edited
        attributes, plan or ``labels``; damaged chunks).
    StoreMismatchError
        The pixels are not those the store was made from (count, labels, or file names).
    ArgumentError
        An argument of the wrong kind or range.

    Notes
    -----
    Works with any ``DataLoader`` settings and with ``DistributedSampler``: call
    ``dataset.set_epoch(e)`` (and the sampler's) before each epoch. The store's boxes, flips
    and labels are read into memory once (about 2.4 GB for ImageNet at K = 40, top-10), shared
    by forked workers.
    """

    def __init__(self, store, images, transform: Optional[Callable] = None, *,
                 slot_policy: str = DEFAULT_SLOT_POLICY, seed: int = 0, epoch: int = 0,
                 size: Optional[int] = None, crop_format: str = "tensor"):
        optional_callable("transform", transform)
        one_of("slot_policy", slot_policy, SLOT_POLICIES)
        one_of("crop_format", crop_format, CROP_FORMATS)
        seed, epoch = whole_number("seed", seed), whole_number("epoch", epoch)
        size = optional_whole_number("size", size, 1, "pass a crop side in pixels, or None "
                                     "for the size the refinery labelled")
        self.store = open_for_reading(store)
        self.images = pixel_source(images)
        self.labels = self.store.read_labels()
        self._check_images()
        self.records = self.store.read_crops()
        self.stored_sizes = self.store.read_image_sizes()
        self.transform, self.crop_format = transform, crop_format
        self.slot_policy, self.seed = slot_policy, seed
        self.size = size or self.store.refinery.input_size
        self.recipe = plan_augment(self.store.plan, len(self.labels), self.size)
        self._epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()

    def _check_images(self):
        store, n = self.store, len(self.images)
        if n != store.layout.num_images:
            raise StoreMismatchError(f"{store.location}: labels {store.layout.num_images} images "
                                     f"but the pixel source holds {n}; pass the data set the "
                                     "store was made from")
        self.images.check(store)
        labels = getattr(self.images, "labels", None)
        if labels is not None and not np.array_equal(np.asarray(labels), self.labels):
            raise other_class_error(store.location,
                                    int(np.flatnonzero(np.asarray(labels) != self.labels)[0]))

    def __len__(self):
        return self.store.layout.num_images

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s slots from now on (shared memory: persistent workers see it);
        epochs count from 0."""
        self._epoch[0] = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")

    def slot(self, n: int) -> int:
        """The slot image ``n`` replays this epoch."""
        return slot_of(self.epoch, n, self.store.layout.crops_per_image, self.slot_policy,
                       self.seed)

    def crop(self, n: int, slot: int) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 crop of ``(n, slot)`` as the refinery labelled it: cut, then
        through the store's recipe (``plan.augment``: RandAugment, erasing, mixing with the
        partner crop (m, j), ...), before the user's transform."""
        return self.crop_and_mix(n, slot)[0]

    def crop_and_mix(self, n: int, slot: int) -> tuple:
        """:meth:`crop`, and its :class:`~refinery_pipeline.crop_batch.MixedLabels` (one row:
        the partner's class and the crop's share) where the store's recipe mixes, else None."""
        crop = self.cut(n, slot)
        if self.recipe is None:
            return crop, None
        params = self.recipe.pair_params([n], [slot])
        partner, mix = None, None
        if self.recipe.recipe.mixes:
            m, j = int(params[0].partner[0]), int(params[0].partner_slot[0])
            partner = torch.from_numpy(self.cut(m, j))[None]
            mix = MixedLabels.of_crops(params[0], self.labels)
        crop = self.recipe.crops(torch.from_numpy(crop)[None], partner, params)[0].numpy()
        return crop, mix

    def cut(self, n: int, slot: int) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 crop of ``(n, slot)``: its stored box and flip only."""
        image = self.images.image(n)
        box = self.records.boxes[n, slot]
        if self.stored_sizes is not None:
            box = box_in_frame(box, self.stored_sizes[n], image.shape[:2])
        return cut_crop(image, box, bool(self.records.flips[n, slot]), self.size)

    def __getitem__(self, n: int) -> CropSample:
        n = int(n)
        slot = self.slot(n)
        crop, mix = self.crop_and_mix(n, slot)
        crop = _as_format(crop, self.crop_format)
        if self.transform is not None:
            crop = self.transform(crop)
        partner = (NO_PARTNER, 1.0) if mix is None else \
            (int(mix.partner_labels[0]), float(mix.weights[0]))
        return CropSample(crop, int(self.labels[n]), n, slot,
                          self.records.topk_indices[n, slot].astype(np.int64),
                          self.records.topk_probs[n, slot], *partner)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["store"] = _StoreSummary.of(self.store)  # zarr handles stay in the parent
        return state


class _StoreSummary:
    """What a worker needs of the store: its layout (everything else was read already)."""

    def __init__(self, layout, location):
        self.layout, self.location = layout, location

    @classmethod
    def of(cls, store):
        return store if isinstance(store, cls) else cls(store.layout, store.location)


def _as_format(crop: np.ndarray, crop_format: str):
    if crop_format == "numpy":
        return crop
    if crop_format == "pil":
        from PIL import Image
        return Image.fromarray(crop)
    return torch.from_numpy(crop).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- batches

class CropCollate:
    """``DataLoader`` ``collate_fn`` turning :class:`CropSample` s into a
    :class:`~refinery_pipeline.CropBatch`.

    Parameters
    ----------
    num_classes : int, optional
        With it, ``targets`` are dense ``(B, C)`` float32 distributions (built in the worker,
        :func:`dense_targets`); without it, :class:`~refinery_pipeline.SparseLabels`, to be
        expanded on the device.
    rest : {"renormalize", "uniform"}
        Where the probability mass outside the stored top-k goes (as in training; default
        ``renormalize``, as ``refine train``).

    Batches of a store whose recipe mixes carry ``mix`` (each crop's partner class and share),
    exactly as the FFCV backend's do; see :class:`~refinery_pipeline.CropBatch`.
    """

    def __init__(self, num_classes: Optional[int] = None, rest: str = DEFAULT_REST):
        self.num_classes = optional_whole_number("num_classes", num_classes, 1,
                                                 "pass the store's number of classes "
                                                 "(store.num_classes), or None for sparse labels")
        self.rest = one_of("rest", rest, REST_POLICIES)

    def __call__(self, samples) -> CropBatch:
        images = default_collate([s.image for s in samples])
        column = lambda name, dtype: torch.tensor([getattr(s, name) for s in samples], dtype=dtype)
        sparse = SparseLabels(torch.from_numpy(np.stack([s.topk_indices for s in samples])),
                              torch.from_numpy(np.stack([s.topk_probs for s in samples])))
        targets = sparse if self.num_classes is None else \
            dense_targets(sparse, self.num_classes, self.rest)
        return CropBatch(images, column("label", torch.int64), column("index", torch.int64),
                         column("slot", torch.int64), targets, _collated_mix(samples))


def _collated_mix(samples) -> Optional[MixedLabels]:
    """The batch's :class:`MixedLabels` where any sample was made by a mixing recipe (a sample
    without a partner, e.g. from another data set, counts as mixed with itself at share 1),
    else None."""
    if all(s.partner_label == NO_PARTNER for s in samples):
        return None
    partners = [s.label if s.partner_label == NO_PARTNER else s.partner_label for s in samples]
    return MixedLabels(torch.tensor(partners, dtype=torch.int64),
                       torch.tensor([s.mix_weight for s in samples], dtype=torch.float32))


def dense_targets(labels, num_classes: int, rest: str = DEFAULT_REST,
                  device=None) -> torch.Tensor:
    """Stored sparse labels as dense target distributions, exactly as ``refine train`` builds them.

    Parameters
    ----------
    labels : SparseLabels, tuple of (indices, probs), or torch.Tensor
        ``(B, k)`` class indices and their stored (float16) probabilities; a dense ``(B, C)``
        tensor (from ``CropCollate(num_classes)``) is returned as it is, on ``device``.
    num_classes : int
        C, the store's number of classes.
    rest : {"renormalize", "uniform"}
        Default ``renormalize``, as ``refine train``: the top-k probabilities are divided by
        their sum. ``uniform``: the mass outside the top-k, ``max(0, 1 - sum(probs))``, is
        spread evenly over the other ``C - k`` classes. Either way each row is then divided by
        its sum, which absorbs float16 rounding (stored sums can exceed 1 slightly). With
        ``k == C`` both renormalize.
    device : torch.device or str, optional
        Where to build them (default: where ``labels`` are).

    Returns
    -------
    torch.Tensor
        ``(B, C)`` float32 rows summing to 1.

    Raises
    ------
    ArgumentError
        ``num_classes`` below 1 or not above every class index in ``labels``, an unknown
        ``rest``, a dense tensor ``(B, C')`` of another width, or sparse indices and
        probabilities of different shapes.
    """
    num_classes = whole_number("num_classes", num_classes, 1, "pass the store's number of "
                               "classes (store.num_classes)")
    one_of("rest", rest, REST_POLICIES)
    if isinstance(labels, torch.Tensor):
        _check_dense(labels, num_classes)
        return labels if device is None else labels.to(device)
    indices, probs = _sparse_pair(labels, num_classes)
    if device is not None:
        indices, probs = indices.to(device), probs.to(device)
    return dense_from_sparse(indices, probs, num_classes, rest)


def _check_dense(labels: torch.Tensor, num_classes: int):
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise refuse("labels", labels, f"a dense target tensor must be (B, num_classes) = "
                     f"(B, {num_classes})", "pass num_classes equal to the store's "
                     "(store.num_classes, the width CropCollate(num_classes) built)")


def _sparse_pair(labels, num_classes: int) -> tuple:
    """``labels`` as ``(indices, probs)`` tensors, refused unless both are ``(B, k)``, the
    indices whole numbers in ``0 ... num_classes - 1`` and ``k <= num_classes``. (On a GPU,
    the range check costs one device sync.)"""
    if not (isinstance(labels, (tuple, list)) and len(labels) == 2):
        raise refuse("labels", labels, "must be SparseLabels(indices, probs), an (indices, "
                     "probs) pair, or a dense (B, C) tensor", "pass CropBatch.targets")
    indices, probs = torch.as_tensor(labels[0]), torch.as_tensor(labels[1])
    if indices.ndim != 2 or indices.shape != probs.shape:
        raise refuse("labels", labels, f"indices {tuple(indices.shape)} and probabilities "
                     f"{tuple(probs.shape)} must both be (B, k)", "pass CropBatch.targets")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise refuse("labels", labels, f"class indices must be integers (got {indices.dtype})",
                     "pass CropBatch.targets")
    indices = indices.long()  # stored uint16 too; scatter needs int64 anyway
    low, high = torch.stack(torch.aminmax(indices)).tolist() if indices.numel() else (0, 0)
    if low < 0:
        raise refuse("labels", labels, f"holds the negative class index {low}",
                     "pass CropBatch.targets")
    if high >= num_classes or indices.shape[1] > num_classes:
        raise refuse("num_classes", num_classes, f"too few for these labels (class index "
                     f"{high}, {indices.shape[1]} classes per crop)", "pass the store's number "
                     "of classes (store.num_classes)")
    return indices, probs
