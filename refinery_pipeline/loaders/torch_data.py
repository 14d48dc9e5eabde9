"""The plain-PyTorch backend: a label store as a ``torch.utils.data.Dataset`` for any training loop.

:class:`StoreCropDataset` item ``i`` is store row ``n = rows[i]``'s crop for the current epoch:
the stored box and flip of the slot that ``(epoch, n)`` selects (the same slot ``refine train``
replays), cut from the image, handed to the user's own transform, with that slot's stored top-k
label. The slot is a pure function of ``(seed, epoch, n)``, so the result never depends on batch
size, ``DataLoader`` workers, samplers, ranks, or the copy's order and completeness;
``set_epoch`` reaches persistent workers too.

Where the pixels come from (:mod:`.pixel_readers`): a store that names its images (format 5)
takes any copy of its data set, joined by key (:mod:`.copies`: missing images refused or
skipped, boxes rescaled to a resized copy's frame, each crop told exact or approximate); older
stores take the data set they were made from, by position. :class:`StoreCrops` offers the same
crops as a stage of a streaming ``webdataset`` pipeline.

Nothing here imports FFCV at import time; only a ``.beton`` needs it, when opened.
"""
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..core.errors import DataSetError, RefineryError
from ..core.validators import (flag, one_of, optional_callable, optional_whole_number, refuse,
                               whole_number)
from ..plan.recipe import plan_augment
from ..plan.crop_plan import DEFAULT_SLOT_POLICY, SLOT_POLICIES, SlotSchedule
from ..sources.pixels import box_in_frame, cut_crop, reframed
from ..store.label_store import open_for_reading
from ..training.losses import DEFAULT_REST, REST_POLICIES, dense_from_sparse
from .copies import reframed_message
from .crop_batch import CropBatch, MixedLabels, SparseLabels
from .epoch_reads import CUT_ARRAYS, LABEL_ARRAYS, EpochReader, SharedEpoch, StoreSlots, read_epoch
from .pixel_readers import (BetonImages, FolderImages, MappedImages,  # noqa: F401 - public
                            open_pixels)

CROP_FORMATS = ("tensor", "pil", "numpy")
NO_PARTNER = -1  # CropSample.partner_label of a crop no mixing recipe made


class CropSample(NamedTuple):
    """One item of :class:`StoreCropDataset` (see :class:`CropCollate` for batches)."""

    image: Any             # the crop after the user's transform
    label: int             # ground-truth class (the store's)
    index: int             # the store's row n of the image
    slot: int              # the stored slot this crop replays
    topk_indices: np.ndarray  # (k,) int64 stored top-k classes of this crop
    topk_probs: np.ndarray    # (k,) float16 their probabilities
    # A mixing recipe's partner (CropBatch.mix, one sample of it): the partner image's class
    # (NO_PARTNER without a mixing recipe) and the crop's own share of the pixels (1: unmixed).
    partner_label: int = NO_PARTNER
    mix_weight: float = 1.0
    # Whether the crop was cut from the very bytes the refinery decoded (its labels describe
    # exactly these pixels); False: approximate (another encoding or size of the image).
    exact: bool = False


class StoredCrops:
    """What every plain reader of a store's crops shares: the store's labels, frames and
    recipe, the epoch and its crops (read for the epoch alone, :mod:`.epoch_reads`, into
    shared memory, so persistent workers see :meth:`set_epoch`), the cut of a stored box from
    an image of any frame, and the sample handed on."""

    def _open(self, store, transform, slot_policy, seed, epoch, size, crop_format):
        optional_callable("transform", transform)
        one_of("slot_policy", slot_policy, SLOT_POLICIES)
        one_of("crop_format", crop_format, CROP_FORMATS)
        seed, epoch = whole_number("seed", seed), whole_number("epoch", epoch)
        size = optional_whole_number("size", size, 1, "pass a crop side in pixels, or None "
                                     "for the size the refinery labelled")
        self.store = open_for_reading(store)
        self.labels = self.store.read_labels()
        self.stored_sizes = self.store.read_image_sizes()
        self.transform, self.crop_format = transform, crop_format
        self.slot_policy, self.seed = slot_policy, seed
        self.size = size or self.store.refinery.input_size
        self.recipe = plan_augment(self.store.plan, len(self.labels), self.size)
        self._epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()
        # Every row's slot of an epoch is drawn at once in the process that sets the epoch:
        # drawing one row's slot per item cost ~80 us of a ~300 us item
        # (benchmarks/results/plain_loader_sources_cpu.md); its crops are read with it.
        self._schedule = SlotSchedule(seed, len(self.labels),
                                      self.store.layout.crops_per_image, slot_policy)
        self._reader = EpochReader(self._read_epoch, keep=False)  # copied to _crops
        self._crops = None  # SharedEpoch: the epoch's crops, sized by _hold
        self._records = None  # every crop's records, read only for a crop of another epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def records(self):
        """Every crop's records (:class:`~refinery_pipeline.CropRecords`), read from the store
        on first use: replaying an epoch never needs them (its crops are read for it), a
        crop of another slot does."""
        if self._records is None:
            self._records = open_for_reading(self.store.location).read_crops() \
                if isinstance(self.store, _StoreSummary) else self.store.read_crops()
        return self._records

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s slots from now on (shared memory: persistent workers see it);
        epochs count from 0."""
        epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")
        self._fill_epoch(epoch)
        self._epoch[0] = epoch

    def _hold(self, capacity: int):
        """Make the shared table of the epoch's crops, for up to ``capacity`` rows."""
        mixes = self.recipe is not None and self.recipe.recipe.mixes
        self._crops = SharedEpoch(capacity, self.store.layout.top_k, partners=mixes)

    def _fill_epoch(self, epoch: int, rows=None):
        """Read ``epoch``'s crops of store rows ``rows`` (default: every row replayed, and
        then the next epoch's too, in the background) into the shared table."""
        self._crops.write(self._reader(epoch, rows))
        if rows is None:
            self._reader.prefetch(epoch + 1)

    def _read_epoch(self, epoch: int, rows=None):
        rows = self._replayed_rows() if rows is None else rows
        mixes = self.recipe is not None and self.recipe.recipe.mixes
        return read_epoch(StoreSlots(self.store), epoch, rows, self._slots_of,
                          CUT_ARRAYS + LABEL_ARRAYS, self.recipe.partners if mixes else None)

    def _replayed_rows(self) -> np.ndarray:
        return np.arange(len(self.labels))

    def _slots_of(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        """Store rows ``rows``' slots of ``epoch``: ``slot_of(epoch, n, ...)`` of each."""
        return self._schedule(epoch, rows)

    def _epoch_slot(self, n: int) -> int:
        """Row ``n``'s slot this epoch: the table's, else (a row not read for it) drawn."""
        held = self._crops.crop_of(n)
        if held is not None:
            return int(held["slots"])
        return int(self._slots_of(self.epoch, np.array([n]))[0])

    def _crop_record(self, n: int, slot: int, held: Optional[dict] = None) -> "_Crop":
        """Crop ``(n, slot)``'s box, flip and label (and its mixing partner's box and flip):
        from the epoch's table where this epoch replays it (``held``: row ``n``'s there, when
        the caller looked it up), else from :attr:`records`."""
        held = self._crops.crop_of(n) if held is None else held
        if held is not None and held["slots"] == slot:
            partner = (held["partner_boxes"], held["partner_flips"]) \
                if "partner_boxes" in held else None
            return _Crop(held["boxes"], held["flips"], held["topk_indices"],
                         held["topk_probs"], partner)
        records, partner = self.records, None
        if self.recipe is not None and self.recipe.recipe.mixes:
            m, j = (int(v[0]) for v in self.recipe.partners([n], [slot]))
            partner = (records.boxes[m, j], records.flips[m, j])
        return _Crop(records.boxes[n, slot], records.flips[n, slot],
                     records.topk_indices[n, slot], records.topk_probs[n, slot], partner)

    def _cut(self, image: np.ndarray, n: int, box, flip, where) -> np.ndarray:
        """Stored crop ``box``, ``flip`` of row ``n`` cut from ``image`` (box and flip only),
        the box rescaled to the image's frame where it differs from the stored one; a frame
        that is no rescaling of it is refused (``where()`` names the image)."""
        box = self._box(n, box, image.shape[:2])
        if box is None:
            raise DataSetError(reframed_message(where(), self.stored_sizes[n], image.shape[:2]))
        return cut_crop(image, box, bool(flip), self.size)

    def _box(self, n: int, box, frame) -> Optional[np.ndarray]:
        """Row ``n``'s stored ``box`` in an image of ``frame`` ``(H', W')``
        (``pixels.box_in_frame``), or None where that frame is no rescaling of the stored one
        (``pixels.reframed``)."""
        if self.stored_sizes is None or tuple(self.stored_sizes[n]) == tuple(frame):
            return box
        if reframed(self.stored_sizes[n], frame):
            return None
        return box_in_frame(box, self.stored_sizes[n], frame)

    def _through_recipe(self, crop, n: int, slot: int, partner_crop=None) -> tuple:
        """The crop after the store's recipe (as labelled), and its :class:`MixedLabels` (one
        row) where the recipe mixes; ``partner_crop(m, j)`` cuts the partner crop (m, j)."""
        if self.recipe is None:
            return crop, None
        params = self.recipe.pair_params([n], [slot])
        partner, mix = None, None
        if self.recipe.recipe.mixes:
            m, j = int(params[0].partner[0]), int(params[0].partner_slot[0])
            partner = torch.from_numpy(partner_crop(m, j))[None]
            mix = MixedLabels.of_crops(params[0], self.labels)
        crop = self.recipe.crops(torch.from_numpy(crop)[None], partner, params)[0].numpy()
        return crop, mix

    def _sample(self, n: int, slot: int, record: "_Crop", crop, mix,
                exact: bool) -> CropSample:
        crop = _as_format(crop, self.crop_format)
        if self.transform is not None:
            crop = self.transform(crop)
        partner = (NO_PARTNER, 1.0) if mix is None else \
            (int(mix.partner_labels[0]), float(mix.weights[0]))
        return CropSample(crop, int(self.labels[n]), n, slot,
                          record.topk_indices.astype(np.int64), record.topk_probs.copy(),
                          *partner, bool(exact))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["store"] = _StoreSummary.of(self.store)  # zarr handles stay in the parent
        state["_records"] = None  # read again where needed, never shipped
        return state


class _Crop(NamedTuple):
    """A stored crop's records: box, flip, top-k label, and its mixing partner's
    ``(box, flip)`` (None without a mixing recipe)."""

    box: np.ndarray
    flip: int
    topk_indices: np.ndarray
    topk_probs: np.ndarray
    partner: Optional[tuple]


class StoreCropDataset(StoredCrops, Dataset):
    """Each store image's stored crop for the current epoch, with its stored label.

    Parameters
    ----------
    store : LabelStore or str or os.PathLike
        The label store, or its location (directory, ``.zip`` or fsspec URL).
    images : str, os.PathLike, list or object
        The pixels. For a store that names its images (format 5): any copy of its data set
        that :func:`~refinery_pipeline.sources.open_source` opens, joined by key: an
        ImageFolder tree (any file order), a flat folder, a list of paths (``.txt``/``.csv`` or
        a Python list), a ``.beton``, WebDataset shards (paths, brace patterns, URLs), a
        Hugging Face ``Dataset`` (or its ``save_to_disk`` folder, Arrow/Parquet files), a
        torchvision ``ImageFolder``, any map-style data set with ``key_fn``, or an opened
        ``ImageSource``. For older stores: the data set the store was made from, in its
        order: its ``.beton`` (byte-exact), its ImageFolder tree (approximate), or a map-style
        data set of ``(image, label)``.
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
    allow_missing : bool
        Skip the store images the copy cannot give (missing, reframed, or, under a mixing
        recipe, without any slot whose partner the copy holds) instead of refusing the copy;
        ``join`` counts them.
    key_fn : callable, optional
        ``key_fn(i) -> str``: the key (file name) of item i of a map-style data set without
        file names of its own.

    Attributes
    ----------
    rows : numpy.ndarray
        The store row of each item, in increasing order (all rows, unless some are skipped).
    images : ImageSource, BetonImages, FolderImages or MappedImages
        Where the pixels come from.
    join : CopyJoin
        How the copy lines up with the store: ``counts()`` (matched, missing, extra,
        ambiguous, duplicates, reframed, unreplayable, used, skipped) and ``findings()`` (one
        line each).

    Raises
    ------
    StoreCorruptError
        The store fails the checks ``refine verify`` and ``refine train`` run (edited
        attributes, plan or ``labels``; damaged chunks).
    StoreMismatchError
        The pixels are not the store's data set: no key matches, classes differ (by name),
        or, for older stores, count, labels or file names differ.
    MissingImagesError
        The copy lacks store images (count and names in the message) and ``allow_missing`` is
        False.
    DataSetError
        The copy cannot be read, or (as it is read) holds an image whose frame is no
        rescaling of the stored one (rotated, cropped or padded).
    ArgumentError
        An argument of the wrong kind or range.

    Notes
    -----
    Works with any ``DataLoader`` settings and with ``DistributedSampler``: call
    ``dataset.set_epoch(e)`` (and the sampler's) before each epoch. The store's boxes, flips
    and labels are read into memory once (about 2.4 GB for ImageNet at K = 40, top-10), shared
    by forked workers. Each sample says whether its crop is ``exact`` (cut from the bytes the
    refinery decoded) or approximate; a batch (:class:`CropCollate`) carries them as
    ``CropBatch.exact``.
    """

    def __init__(self, store, images, transform: Optional[Callable] = None, *,
                 slot_policy: str = DEFAULT_SLOT_POLICY, seed: int = 0, epoch: int = 0,
                 size: Optional[int] = None, crop_format: str = "tensor",
                 allow_missing: bool = False, key_fn: Optional[Callable] = None,
                 num_replicas: Optional[int] = None):
        flag("allow_missing", allow_missing)
        optional_callable("key_fn", key_fn)
        num_replicas = optional_whole_number("num_replicas", num_replicas, 1, "pass the "
                                             "number of processes sharing the items (the "
                                             "DistributedSampler's num_replicas), or None")
        self._open(store, transform, slot_policy, seed, epoch, size, crop_format)
        self.pixels, self.join = open_pixels(self.store, images, self.labels,
                                             recipe=self.recipe, allow_missing=allow_missing,
                                             key_fn=key_fn)
        self.rows = self.join.rows
        self.num_replicas = num_replicas
        self._hold(len(self.rows) if num_replicas is None else -(-len(self.rows) // num_replicas))
        if num_replicas is None:
            self._fill_epoch(self.epoch)

    def __len__(self):
        return len(self.rows)

    @property
    def images(self):
        """The pixel source: the copy's ``ImageSource`` (a keyed store), or the positional
        reader of the store's own data set (``BetonImages``, ``FolderImages``,
        ``MappedImages``)."""
        return self.pixels.source if hasattr(self.pixels, "source") else self.pixels.images

    def set_epoch(self, epoch: int, items=None):
        """Replay ``epoch``'s slots from now on (shared memory: persistent workers see it);
        epochs count from 0.

        Parameters
        ----------
        epoch : int
            The epoch, from 0.
        items : iterable of int, optional
            The items this process reads in ``epoch`` (e.g. its ``DistributedSampler``, after
            ``sampler.set_epoch(epoch)``): only their crops are read and held. Default: every
            item (refused when the data set was made with ``num_replicas``).
        """
        epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")
        if items is None and self.num_replicas is not None:
            raise refuse("items", items, f"are needed: this data set holds the crops of "
                         f"1/{self.num_replicas} of its items", "pass this process's items, "
                         "e.g. set_epoch(epoch, sampler) after sampler.set_epoch(epoch)")
        rows = None if items is None else self.rows[_item_indices(items, len(self))]
        self._fill_epoch(epoch, rows)
        self._epoch[0] = epoch

    def slot(self, n: int) -> int:
        """The slot store row ``n`` replays this epoch: ``slot_of(epoch, n, ...)``, or, under
        a mixing recipe whose partner the copy lacks, the next slot whose partner it holds."""
        return self._epoch_slot(n)

    def _replayed_rows(self) -> np.ndarray:
        return self.rows

    def _slots_of(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        """Under a mixing recipe whose partner the copy lacks, a row's slot moves to the next
        one whose partner it holds (:meth:`.copies.CopyJoin.slots`)."""
        return self.join.slots(rows, super()._slots_of(epoch, rows))

    def crop(self, n: int, slot: int) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 crop of ``(n, slot)`` as the refinery labelled it: cut, then
        through the store's recipe (``plan.augment``: RandAugment, erasing, mixing with the
        partner crop (m, j), ...), before the user's transform."""
        return self.crop_and_mix(n, slot)[0]

    def crop_and_mix(self, n: int, slot: int) -> tuple:
        """:meth:`crop`, and its :class:`~refinery_pipeline.loaders.crop_batch.MixedLabels` (one row:
        the partner's class and the crop's share) where the store's recipe mixes, else None."""
        return self._replay(n, slot, self._crop_record(n, slot))[:2]

    def cut(self, n: int, slot: int) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 crop of ``(n, slot)``: its stored box and flip only."""
        record = self._crop_record(n, slot)
        return self._cut_row(n, record.box, record.flip)[0]

    def _cut_row(self, n: int, box, flip) -> tuple:
        image, exact = self.pixels.read(n)
        return self._cut(image, n, box, flip, lambda: self.pixels.describe(n)), exact

    def _replay(self, n: int, slot: int, record: "_Crop") -> tuple:
        """``(crop, mix, exact)`` of ``(n, slot)``: exact when the row's own bytes were the
        refinery's (a mixed crop also needs its partner's, so it is exact only if both are)."""
        crop, exact = self._cut_row(n, record.box, record.flip)
        partner_exact = [True]

        def partner_crop(m, j):
            cut, partner_exact[0] = self._cut_row(m, *record.partner)
            return cut

        crop, mix = self._through_recipe(crop, n, slot, partner_crop)
        return crop, mix, exact and partner_exact[0]

    def __getitem__(self, i: int) -> CropSample:
        n = int(self.rows[int(i)])
        held = self._crops.crop_of(n)
        if held is None:
            raise RefineryError(f"item {int(i)} (store row {n}) is not among the items this "
                                f"process was given for epoch {self.epoch}; pass every item "
                                "it reads to set_epoch(epoch, items), e.g. its sampler")
        slot = int(held["slots"])
        record = self._crop_record(n, slot, held)
        return self._sample(n, slot, record, *self._replay(n, slot, record))


def _item_indices(items, count: int) -> np.ndarray:
    """``items`` (any iterable of item indices, e.g. a sampler) as int64, refused unless each
    is an item of a data set of ``count``."""
    values = np.fromiter((int(i) for i in items), np.int64)
    if len(values) and (values.min() < 0 or values.max() >= count):
        raise refuse("items", values, f"must be item indices 0 ... {count - 1}",
                     "pass the indices this process's sampler yields")
    return values


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
    return torch.from_numpy(channels_first(crop))


def channels_first(crop: np.ndarray) -> np.ndarray:
    """``(S, S, 3)`` uint8 as a contiguous ``(3, S, S)`` array, by OpenCV's channel split into
    its planes (~4 us at 96 px, where torch's ``permute().contiguous()`` takes ~22 us)."""
    import cv2
    planes = np.empty((crop.shape[2],) + crop.shape[:2], crop.dtype)
    cv2.split(crop, list(planes))
    return planes


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

    Notes
    -----
    Batches of a store whose recipe mixes carry ``mix`` (each crop's partner class and share),
    exactly as the FFCV backend's do, and every batch ``exact`` (which crops were cut from the
    bytes the refinery decoded); see :class:`~refinery_pipeline.CropBatch`.
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
                         column("slot", torch.int64), targets, _collated_mix(samples),
                         column("exact", torch.bool))


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
