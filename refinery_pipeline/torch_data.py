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
  torchvision ``ImageFolder`` is put in the store's order by itself).

Nothing here imports FFCV at import time; only :class:`BetonImages` needs it, when opened.
"""
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .augment import plan_augment
from .crop_batch import CropBatch, SparseLabels
from .crop_plan import DEFAULT_SLOT_POLICY, SLOT_POLICIES, slot_of
from .errors import DataSetError, StoreMismatchError
from .label_store import LabelStore
from .losses import DEFAULT_REST, REST_POLICIES, dense_from_sparse
from .pixels import (box_in_frame, cut_crop, decode_jpeg, read_image_file, rgb_of_array,
                     rgb_of_image)

CROP_FORMATS = ("tensor", "pil", "numpy")


# ----------------------------------------------------------------------------- pixel sources

class BetonImages:
    """Images of a ``.beton``, decoded exactly as FFCV decodes them.

    Only small per-image tables are kept; the file is memory-mapped lazily in each process, so
    the object pickles cheaply into ``DataLoader`` workers.
    """

    def __init__(self, path):
        from .dataset import ImageDataset
        dataset = ImageDataset(path)  # FFCV's Reader: one-line errors for foreign files
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
        self.root = split_dir(root, "train")
        self.classes, files, labels = scan_image_folder(self.root)
        order = store_order(len(files))
        self.files = [files[i] for i in order]
        self.labels = np.asarray(labels)[order]

    def __len__(self):
        return len(self.files)

    def image(self, n: int) -> np.ndarray:
        return read_image_file(self.files[n])

    def check(self, store: LabelStore):
        from .dataset import source_fingerprint
        recorded = store.dataset.source
        if recorded is None or recorded.get("kind") != "image_folder":
            return  # a format-1 store, or one made from a .beton: the labels check below stays
        ours = source_fingerprint(self.root, self.files)
        if ours["files_sha256"] != recorded["files_sha256"]:
            raise StoreMismatchError(
                f"{self.root}: these files are not the tree {store.location} was made from "
                f"({ours['num_files']} files here, {recorded['num_files']} recorded, names or "
                "order differ); pass that tree, or its .beton")


class MappedImages:
    """Any map-style data set of ``(image, label)`` pairs in the store's order.

    Images may be PIL images of any mode, arrays ``(H, W[, C])`` or tensors ``([C, ]H, W)``,
    converted by the rule of :mod:`.pixels` (the one ``refine`` converts files by). A data
    set that lists its files as torchvision's ``DatasetFolder``/``ImageFolder`` do (``samples``
    and ``root``) is reordered into the store's order, so ``ImageFolder(root)`` works as it is.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.positions = _store_positions(dataset) if hasattr(dataset, "samples") else None
        targets = getattr(dataset, "targets", None)
        self.labels = None if targets is None else np.asarray(targets)
        if self.labels is not None and self.positions is not None:
            self.labels = self.labels[self.positions]

    def __len__(self):
        return len(self.dataset)

    def image(self, n: int) -> np.ndarray:
        """Item ``n``'s image as ``(H, W, 3)`` uint8 by :mod:`.pixels`' one rule: a PIL image of
        any mode, an ``(H, W[, C])`` array or a ``([C, ]H, W)`` tensor (torchvision's layout) of
        uint8, uint16, bool or float in [0, 1]; anything else is refused naming the item."""
        image = self.dataset[int(self.positions[n]) if self.positions is not None else n][0]
        what = f"image {n} of the mapped data set ({type(self.dataset).__name__})"
        if isinstance(image, torch.Tensor):
            image = _tensor_as_hwc(image)
        if hasattr(image, "convert"):  # PIL
            return rgb_of_image(image, what)
        return rgb_of_array(image, what)

    def check(self, store: LabelStore):
        pass  # nothing beyond count and labels (checked by the caller) identifies arbitrary data


def _tensor_as_hwc(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` tensor (torchvision's layout; C 1 to 4) as an ``(H, W, C)`` array; an
    ``(H, W, C)`` or ``(H, W)`` one as it is. bfloat16 and half become float32."""
    image = image.detach().cpu()
    if image.is_floating_point():
        image = image.float()
    if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4):
        image = image.permute(1, 2, 0)
    return image.numpy()


def _store_positions(dataset) -> np.ndarray:
    """Positions in a torchvision ``DatasetFolder`` of the store's images 0..N-1."""
    from .dataset import scan_image_folder, store_order
    _, files, _ = scan_image_folder(dataset.root)
    order = store_order(len(files))
    where = {os.path.normpath(path): i for i, (path, _) in enumerate(dataset.samples)}
    try:
        return np.array([where[os.path.normpath(files[i])] for i in order], dtype=np.int64)
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
        if slot_policy not in SLOT_POLICIES:
            raise ValueError(f"slot_policy {slot_policy!r}: choose one of {SLOT_POLICIES}")
        if crop_format not in CROP_FORMATS:
            raise ValueError(f"crop_format {crop_format!r}: choose one of {CROP_FORMATS}")
        self.store = store if isinstance(store, LabelStore) else LabelStore.open(store)
        self.store.require_complete()
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
            first = int(np.flatnonzero(np.asarray(labels) != self.labels)[0])
            raise StoreMismatchError(f"{store.location}: image {first} has another class in the "
                                     "pixel source than in the store; pass the images in the "
                                     "store's order (the data set it was made from)")

    def __len__(self):
        return self.store.layout.num_images

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s slots from now on (shared memory: persistent workers see it)."""
        self._epoch[0] = int(epoch)

    def slot(self, n: int) -> int:
        """The slot image ``n`` replays this epoch."""
        return slot_of(self.epoch, n, self.store.layout.crops_per_image, self.slot_policy,
                       self.seed)

    def crop(self, n: int, slot: int) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 crop of ``(n, slot)`` as the refinery labelled it: cut, then
        through the store's recipe (``plan.augment``: RandAugment, erasing, mixing with the
        partner crop (m, j), ...), before the user's transform."""
        crop = self.cut(n, slot)
        if self.recipe is None:
            return crop
        params = self.recipe.pair_params([n], [slot])
        partner = None
        if self.recipe.recipe.mixes:
            m, j = int(params[0].partner[0]), int(params[0].partner_slot[0])
            partner = torch.from_numpy(self.cut(m, j))[None]
        return self.recipe.crops(torch.from_numpy(crop)[None], partner, params)[0].numpy()

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
        crop = _as_format(self.crop(n, slot), self.crop_format)
        if self.transform is not None:
            crop = self.transform(crop)
        return CropSample(crop, int(self.labels[n]), n, slot,
                          self.records.topk_indices[n, slot].astype(np.int64),
                          self.records.topk_probs[n, slot])

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
    """

    def __init__(self, num_classes: Optional[int] = None, rest: str = DEFAULT_REST):
        if rest not in REST_POLICIES:
            raise ValueError(f"rest {rest!r}: choose one of {REST_POLICIES}")
        self.num_classes, self.rest = num_classes, rest

    def __call__(self, samples) -> CropBatch:
        images = default_collate([s.image for s in samples])
        column = lambda name, dtype: torch.tensor([getattr(s, name) for s in samples], dtype=dtype)
        sparse = SparseLabels(torch.from_numpy(np.stack([s.topk_indices for s in samples])),
                              torch.from_numpy(np.stack([s.topk_probs for s in samples])))
        targets = sparse if self.num_classes is None else \
            dense_targets(sparse, self.num_classes, self.rest)
        return CropBatch(images, column("label", torch.int64), column("index", torch.int64),
                         column("slot", torch.int64), targets)


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
    """
    if isinstance(labels, torch.Tensor):
        return labels if device is None else labels.to(device)
    indices, probs = labels
    if device is not None:
        indices, probs = indices.to(device), probs.to(device)
    return dense_from_sparse(torch.as_tensor(indices), torch.as_tensor(probs), num_classes, rest)
