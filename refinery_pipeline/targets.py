"""Label sources: where each training batch's target distributions come from.

Every labelling mode of the paper is one of these objects, chosen once by ``train.fit``; the
step loop calls whichever it is given and never branches on the mode. Each maps a batch (a
:class:`.crop_batch.CropBatch` on the device: labels, image indices, the slot of each crop) and its
pixels to dense target distributions (B, C); the pixels are the crops as shown, float NCHW 0-255 on the device, before the student's normalisation, so an online refinery
labels exactly what the student sees without a second copy.
"""
import numpy as np
import torch

from .losses import dense_from_sparse, hard_from_soft, one_hot


class GroundTruthTargets:
    """One-hot (optionally smoothed) targets from the data set's labels."""

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, batch, pixels):
        return one_hot(batch.labels, self.num_classes, self.smoothing)


class StoredTargets:
    """Sparse stored labels, looked up on the device by each sample's image index and the slot
    its crop was cut from (dynamic: arrays ``(N, K, k)``), or by image alone (soft-static labels
    of the whole image: arrays ``(N, k)``).

    The slot comes with the batch (the loader contract), so the lookup can never drift from the
    crop shown, whatever else iterated the loader in between.
    """

    def __init__(self, indices: np.ndarray, probs: np.ndarray, num_classes: int, device,
                 rest: str = "uniform"):
        self.indices = _compact_class_indices(indices, num_classes).to(device)
        self.probs = torch.from_numpy(probs).to(device)
        self.num_classes, self.rest = num_classes, rest
        self.per_slot = self.indices.ndim == 3

    def __call__(self, batch, pixels):
        rows = batch.indices
        if self.per_slot:  # train.fit pairs these only with replayed crops (no NOT_STORED slot)
            top, p = self.indices[rows, batch.slots], self.probs[rows, batch.slots]
        else:
            top, p = self.indices[rows], self.probs[rows]
        return dense_from_sparse(top, p, self.num_classes, self.rest)


def _compact_class_indices(indices: np.ndarray, num_classes: int) -> torch.Tensor:
    """Class indices as int16 (int32 past 32,768 classes), not int64: the whole store's labels
    live on every GPU, and at ImageNet scale (K = 40, top-10) that is 1 GB instead of 4 GB.
    ``dense_from_sparse`` widens each batch's few indices where scatter needs int64."""
    dtype = np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32
    return torch.from_numpy(np.asarray(indices).astype(dtype, copy=False))


class OnlineTargets:
    """The paper's online refinery: the teacher labels each batch's crops as they are shown."""

    def __init__(self, refinery):
        self.refinery = refinery

    def __call__(self, batch, pixels):
        return self.refinery.probabilities_of_pixels(pixels)

    def label_pixels(self, pixels):
        """Label any float pixels, e.g. adversarial twins of the shown crops."""
        return self.refinery.probabilities_of_pixels(pixels)


class HardTargets:
    """Arg-max of another source's soft labels (the paper's "hard dynamic" ablation)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, batch, pixels):
        return hard_from_soft(self.source(batch, pixels))

    def label_pixels(self, pixels):
        return hard_from_soft(self.source.label_pixels(pixels))
