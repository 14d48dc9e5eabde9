"""The loader contract: what every batch of crops carries, whichever backend cut it.

Every stage that reads crops (precompute, training, precise BN, audit, show) and both loader
backends (FFCV, plain PyTorch) speak this one type. The slot each crop was cut from travels
*with the sample*, so a label is looked up from the batch itself and never from loader state
that a stray ``iter(loader)`` could have moved on.

This module imports neither FFCV nor any image library.
"""
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

# The slot value of a crop that is not one of the store's slots: a fresh random crop
# (ground-truth and online modes) or an image's centred square (evaluation, soft-static labels).
NOT_STORED = -1
"""The slot of a crop that is none of the store's: a fresh random crop (ground truth, an online
refinery) or an image's centred square (evaluation, soft-static labels)."""


class SparseLabels(NamedTuple):
    """Top-k labels of a batch: class indices and their probabilities, most probable first.

    Attributes
    ----------
    indices : torch.Tensor
        ``(B, k)`` integer class indices.
    probs : torch.Tensor
        ``(B, k)`` float16 probabilities as stored; their sum may fall short of (or, through
        float16 rounding, slightly exceed) 1. :func:`refinery_pipeline.dense_targets` turns them
        into distributions.
    """

    indices: torch.Tensor
    probs: torch.Tensor

    def to(self, device, non_blocking: bool = True) -> "SparseLabels":
        """Both tensors moved to ``device`` (asynchronously from pinned memory by default)."""
        return SparseLabels(self.indices.to(device, non_blocking=non_blocking),
                            self.probs.to(device, non_blocking=non_blocking))


class MixedLabels(NamedTuple):
    """What ground-truth targets need of crops a mixing recipe (mixup, cutmix) blended with a
    partner: the partner's class and each crop's own share of the label.

    Attributes
    ----------
    partner_labels : torch.Tensor
        ``(B,)`` int64 ground-truth class of each crop's partner image.
    weights : torch.Tensor
        ``(B,)`` float32 the crop's own share: mixup's λ, cutmix's area share; 1 where a crop
        was not mixed.
    """

    partner_labels: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of_crops(cls, params, labels) -> "MixedLabels":
        """The mix of crops whose recipe draws are ``params`` (:class:`..plan.recipe.CropAugment`):
        the class in ``labels`` (every image's) of each crop's partner image, and its share. The
        one definition both backends use."""
        return cls(torch.from_numpy(np.asarray(labels)[params.partner].astype(np.int64)),
                   torch.from_numpy(params.weight.astype(np.float32)))

    def to(self, device, non_blocking: bool = True) -> "MixedLabels":
        return MixedLabels(self.partner_labels.to(device, non_blocking=non_blocking),
                           self.weights.to(device, non_blocking=non_blocking))


class CropBatch(NamedTuple):
    """One batch of crops, the same in every backend and stage.

    Attributes
    ----------
    images : torch.Tensor or Any
        The crops. The FFCV backend and internal stages give uint8 ``(B, H, W, 3)`` (one crop
        per image) or ``(B, S, H, W, 3)`` (all S planned crops per image, precompute); the plain
        PyTorch backend gives whatever the user's transform returns, collated.
    labels : torch.Tensor
        ``(B,)`` int64 ground-truth class of each image.
    indices : torch.Tensor
        ``(B,)`` int64 index of each image in the data set, which is its row in the store.
    slots : torch.Tensor
        int64 stored slot each crop was cut from: ``(B,)``, or ``(B, S)`` for multi-crop batches;
        ``NOT_STORED`` (-1) for a crop that is no stored slot (fresh or centred).
    targets : SparseLabels, torch.Tensor or None
        The crops' stored labels when the backend reads them (plain PyTorch backend: sparse or
        dense ``(B, C)``); None when the consumer looks them up from ``indices`` and ``slots``.
    mix : MixedLabels or None
        Wherever a mixing recipe (mixup, cutmix) made the crops, stored (a recipe store, both
        backends) or fresh (ground-truth training with a mixing ``--augment``): each crop's
        partner class and own share of the pixels (1 where the recipe left a crop unmixed);
        None without a mixing recipe. It describes the pixels, for targets made from classes
        (one-hot ground truth, category labels: mix them with it). Stored labels (``targets``)
        and an online refinery's describe the mixed pixels already: never mix those again.
    exact : torch.Tensor or None
        ``(B,)`` bool where the crops replay a store: True for a crop cut from the very bytes
        the refinery decoded (its label describes exactly these pixels), False for one cut from
        a copy of another encoding or size (approximate); None for crops no store labelled
        (fresh, centred).
    """

    images: Any
    labels: torch.Tensor
    indices: torch.Tensor
    slots: torch.Tensor
    targets: Optional[Any] = None
    mix: Optional[MixedLabels] = None
    exact: Optional[torch.Tensor] = None

    def to(self, device, non_blocking: bool = True) -> "CropBatch":
        """The labels, indices, slots and targets on ``device`` (images stay where they are: a
        training step copies them itself, once, as pixels)."""
        move = lambda t: t.to(device, non_blocking=non_blocking) if t is not None else None
        return CropBatch(self.images, move(self.labels), move(self.indices), move(self.slots),
                         move(self.targets), move(self.mix), move(self.exact))


def batch_from_rows(images, rows: torch.Tensor) -> CropBatch:
    """A :class:`CropBatch` from an FFCV label row block ``[label, index, slot_0 .. slot_S-1]``
    (see :class:`.ffcv_ops.WithIndexAndSlots`)."""
    slots = rows[:, 2] if rows.shape[1] == 3 else rows[:, 2:]
    return CropBatch(images, rows[:, 0], rows[:, 1], slots)


def sparse_labels(topk_indices: np.ndarray, topk_probs: np.ndarray, images,
                  slots) -> SparseLabels:
    """The stored top-k labels of crops ``(images[i], slots[i])`` from whole-store arrays
    ``(N, K, k)``, as a :class:`SparseLabels` batch (indices int64, probabilities float16)."""
    images, slots = np.asarray(images), np.asarray(slots)
    return SparseLabels(torch.from_numpy(topk_indices[images, slots].astype(np.int64)),
                        torch.from_numpy(np.ascontiguousarray(topk_probs[images, slots])))


def as_numpy_indices(batch: CropBatch) -> np.ndarray:
    """The batch's image indices as a NumPy array (a copy: FFCV reuses its buffers)."""
    return batch.indices.numpy().copy()
