"""The plain-PyTorch backend: a label store as a ``torch.utils.data.Dataset`` for any training loop.

:class:`StoreCropDataset` item ``i`` is store row ``n = rows[i]``'s crop for the current epoch:
the stored box and flip of the slot that ``(epoch, n)`` selects (the same slot ``refine train``
replays), cut from the image, handed to the user's own transform, with that slot's stored top-k
label. The slot is a pure function of ``(seed, epoch, n)``, so the result never depends on batch
size, ``DataLoader`` workers, samplers, ranks, or the copy's order and completeness;
``set_epoch`` reaches persistent workers too. :class:`CropCollate` batches its samples.

Where the pixels come from (:mod:`.pixel_readers`): a store that names its images (format 5)
takes any copy of its data set, joined by key (:mod:`.copies`: missing images refused or
skipped, boxes rescaled to a resized copy's frame, each crop told exact or approximate); older
stores take the data set they were made from, by position. What the data set shares with the
streaming :class:`.stream.StoreCrops` (the epoch's crops, the cut, the recipe, the sample) is
:class:`.stored_crops.StoredCrops`; dense targets are :mod:`.dense_targets`.

Nothing here imports FFCV at import time; only a ``.beton`` needs it, when opened.
"""
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..core.errors import RefineryError
from ..core.validators import (flag, one_of, optional_callable, optional_whole_number, refuse,
                               whole_number)
from ..plan.crop_plan import DEFAULT_SLOT_POLICY
from ..store.schema import DEFAULT_REST, REST_POLICIES
from .crop_batch import CropBatch, MixedLabels, SparseLabels
from .dense_targets import dense_targets
from .pixel_readers import open_pixels
from .stored_crops import NO_PARTNER, CropRecord, CropSample, StoredCrops


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

    def _replay(self, n: int, slot: int, record: "CropRecord") -> tuple:
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
