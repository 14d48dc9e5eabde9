"""Label sources: where each training batch's target distributions come from.

Each labelling mode is one of these objects (the paper's: ground truth, soft and hard dynamic,
soft static, visual and WordNet category labels, the online refinery), chosen once by
``train.fit``; the step loop calls whichever it is given and never branches on the mode. Each
maps a batch (a :class:`.crop_batch.CropBatch` on the device: labels, image indices, the slot of
each crop) and its pixels to dense target distributions (B, C); the pixels are the crops as
shown, float NCHW 0-255 on the device, before the student's normalisation, so an online
refinery labels exactly what the student sees without a second copy.
"""
import numpy as np
import torch

from ..core.validators import index_array, one_of, refuse, whole_number
from ..loaders.crop_batch import SparseLabels, sparse_labels
from ..loaders.dense_targets import dense_from_sparse
from ..store.schema import DEFAULT_REST, REST_POLICIES
from .losses import hard_from_soft, one_hot


class GroundTruthTargets:
    """One-hot (optionally smoothed) targets from the data set's labels; for crops a recipe
    mixed with a partner (``batch.mix``), the two classes in the crop's and partner's shares,
    as torchvision's MixUp and CutMix mix one-hot labels."""

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, batch, pixels):
        return _per_class(batch, lambda labels: one_hot(labels, self.num_classes,
                                                        self.smoothing))


def _per_class(batch, target_of):
    """Targets that depend on the class alone (``target_of(labels) -> (B, C)``); for crops a
    recipe mixed with a partner (``batch.mix``), the crop's and the partner's targets in their
    shares of the pixels, as torchvision's MixUp and CutMix mix one-hot labels."""
    own = target_of(batch.labels)
    if batch.mix is None:
        return own
    weights = batch.mix.weights.to(own.dtype)[:, None]
    return own * weights + target_of(batch.mix.partner_labels) * (1 - weights)


class StoredTargets:
    """Sparse stored labels of each sample's crop: per image and slot (dynamic: arrays
    ``(N, K, k)``), or per image alone (soft-static labels of the whole image: ``(N, k)``).

    Dynamic labels stay on the host, where the loader gathers each batch's rows (``CropBatch.
    targets``, attached by the FFCV backend when ``loader.records`` is set, as ``refine train``
    does), so a GPU holds a batch's labels, never the store's: at ImageNet-1k, K = 40, top-10,
    those are 2 GB on every GPU (int16 indices, float16 probabilities), ~23 GB at ImageNet-21k.
    A batch that comes without them is looked up here from its image indices and slots (on the
    host: a device sync when the batch is on a GPU, so training always attaches them). Static
    labels are K times smaller (51 MB at ImageNet-1k) and are looked up on the device.

    The slot comes with the batch (the loader contract), so the lookup can never drift from the
    crop shown, whatever else iterated the loader in between.
    """

    def __init__(self, indices: np.ndarray, probs: np.ndarray, num_classes: int, device,
                 rest: str = DEFAULT_REST):
        self.num_classes, self.rest = num_classes, rest
        self.per_slot = np.ndim(indices) == 3
        if self.per_slot:
            self.indices, self.probs = indices, probs  # host arrays
            self.crops = _WholeArrays(indices, probs)
        else:
            self.indices = _compact_class_indices(indices, num_classes).to(device)
            self.probs = torch.from_numpy(np.asarray(probs)).to(device)

    @classmethod
    def of_crops(cls, crops, num_classes: int, rest: str = DEFAULT_REST) -> "StoredTargets":
        """Dynamic labels of the crops an epoch replays: ``crops.sparse_labels(images,
        slots)`` (a :class:`..loaders.crop_sources.ReplayedCrops`, which reads just its epoch's) looks up a
        batch that comes without them; nothing store-sized is held here."""
        targets = cls.__new__(cls)
        targets.num_classes, targets.rest, targets.per_slot = num_classes, rest, True
        targets.crops = crops
        return targets

    def __call__(self, batch, pixels):
        if not self.per_slot:
            rows = batch.indices
            return dense_from_sparse(self.indices[rows], self.probs[rows], self.num_classes,
                                     self.rest)
        labels = batch.targets
        if not isinstance(labels, SparseLabels):  # train.fit pairs these with replayed crops
            labels = self.crops.sparse_labels(batch.indices.cpu().numpy(),
                                              batch.slots.cpu().numpy()).to(batch.indices.device)
        return dense_from_sparse(labels.indices, labels.probs, self.num_classes, self.rest)


class _WholeArrays:
    """``sparse_labels(images, slots)`` of whole ``(N, K, k)`` label arrays."""

    def __init__(self, indices: np.ndarray, probs: np.ndarray):
        self.indices, self.probs = indices, probs

    def sparse_labels(self, images, slots) -> SparseLabels:
        return sparse_labels(self.indices, self.probs, images, slots)


def _compact_class_indices(indices: np.ndarray, num_classes: int) -> torch.Tensor:
    """Class indices as int16 (int32 past 32,768 classes), not int64, for labels held on the
    device. ``dense_from_sparse`` widens each batch's few indices where scatter needs int64."""
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


class CategoryTargets:
    """One target per class, whatever the crop (the paper's category-level labels, Table 5):
    row ``c`` of ``table`` ``(C, C)`` for every crop of an image of class ``c`` (mixed crops:
    both classes' rows in their shares, as for ground truth)."""

    def __init__(self, table: torch.Tensor, device):
        self.table = torch.as_tensor(table, dtype=torch.float32).to(device)

    def __call__(self, batch, pixels):
        return _per_class(batch, lambda labels: self.table[labels])


def visual_category_table(topk_indices: np.ndarray, topk_probs: np.ndarray, labels: np.ndarray,
                          num_classes: int, rest: str = DEFAULT_REST,
                          crops_per_step: int = 1 << 16) -> torch.Tensor:
    """The paper's *visual* category labels: each class's mean refinery label over every stored
    crop of its training images, ``(C, C)`` float32, row ``c`` for class ``c``.

    Each stored label is expanded exactly as training expands it (``rest``), so a class's row is
    the mean of the targets its crops would otherwise get. The refinery's BatchNorm mode is the
    store's (the paper fixes it for all its visual variants; here it is whatever labelled the
    store, recorded in ``refinery.bn_mode``). Summed ``crops_per_step`` crops at a time, so an
    ImageNet-sized store never expands whole.

    Parameters
    ----------
    topk_indices, topk_probs : numpy.ndarray
        ``(N, K, k)`` (``records.topk_indices``, ``records.topk_probs``) or ``(N, k)``.
    labels : numpy.ndarray
        ``(N,)`` ground-truth class of each image (``store.read_labels()``).
    num_classes : int
        C, the store's number of classes.
    rest : {"renormalize", "uniform"}
        As :func:`dense_targets`.
    crops_per_step : int
        Crops expanded at a time (memory, not the result).

    Raises
    ------
    ArgumentError
        Shapes that do not fit together, class indices or labels not below ``num_classes``,
        an unknown ``rest``.
    """
    num_classes = whole_number("num_classes", num_classes, 1, "pass the store's number of "
                               "classes (store.num_classes)")
    one_of("rest", rest, REST_POLICIES)
    crops_per_step = whole_number("crops_per_step", crops_per_step, 1, "pass e.g. 65536")
    inputs = _category_inputs(topk_indices, topk_probs, labels, num_classes)
    return _category_means([inputs], num_classes, rest, crops_per_step)


def store_category_table(store, labels: np.ndarray, num_classes: int, rest: str = DEFAULT_REST,
                         verify: bool = True, crops_per_step: int = 1 << 16) -> torch.Tensor:
    """:func:`visual_category_table` of a store's labels, read chunk by chunk (each checked
    against its checksums unless ``verify`` is False), never whole: the same table, bit for
    bit, as from ``store.read_crops()``'s arrays."""
    from ..loaders.epoch_reads import LABEL_ARRAYS
    if verify:
        store.require_intact()
    checks = store.chunk_checks() if verify else None

    def chunks():
        for c in range(store.layout.num_chunks):
            rows = store.layout.chunk_range(c)
            arrays = store.read_chunk_span(range(c, c + 1), LABEL_ARRAYS, verify, checks)
            yield _category_inputs(*(arrays[name] for name in LABEL_ARRAYS),
                                   labels[rows.start:rows.stop], num_classes)

    return _category_means(chunks(), num_classes, rest, crops_per_step)


def _category_means(pieces, num_classes: int, rest: str, crops_per_step: int) -> torch.Tensor:
    """Each class's mean expanded label over ``pieces`` of crops ``(indices, probs, class of
    each crop)``, summed ``crops_per_step`` crops at a time in order, whatever the pieces'
    sizes (so the sums, and their float rounding, are those of one whole piece)."""
    sums = torch.zeros(num_classes, num_classes)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for indices, probs, per_crop in _in_steps(pieces, crops_per_step):
        dense = dense_from_sparse(torch.from_numpy(indices.astype(np.int64)),
                                  torch.from_numpy(probs), num_classes, rest)
        classes = torch.from_numpy(per_crop.astype(np.int64))
        sums.index_add_(0, classes, dense)
        counts += torch.bincount(classes, minlength=num_classes)
    return sums / counts.clamp_min(1)[:, None]


def _in_steps(pieces, step: int):
    """Tuples of equally long arrays, re-cut into tuples of exactly ``step`` rows (the last
    shorter): views of each piece, joined only across a piece's boundary."""
    carry = None  # the rows before the current piece that make no whole step yet
    for piece in pieces:
        if carry is not None:
            need = step - len(carry[0])
            head = tuple(np.concatenate([c, p[:need]]) for c, p in zip(carry, piece))
            piece, carry = tuple(p[need:] for p in piece), None
            if len(head[0]) < step:
                carry = head
                continue
            yield head
        whole = len(piece[0]) - len(piece[0]) % step
        for start in range(0, whole, step):
            yield tuple(p[start:start + step] for p in piece)
        if whole < len(piece[0]):
            carry = tuple(p[whole:] for p in piece)
    if carry is not None:
        yield carry


def _category_inputs(topk_indices, topk_probs, labels, num_classes: int) -> tuple:
    """Stored labels as ``(crops, k)`` indices and probabilities and each crop's class,
    refused unless their shapes fit together and every class is below ``num_classes``."""
    indices = index_array("topk_indices", topk_indices, what="class", keep_dtype=True)
    probs, labels = np.asarray(topk_probs), index_array("labels", labels, what="class")
    if indices.ndim not in (2, 3) or probs.shape != indices.shape:
        raise refuse("topk_probs", topk_probs, f"of shape {probs.shape} does not fit "
                     f"topk_indices of shape {indices.shape}; both must be (N, K, k) or (N, k)",
                     "pass records.topk_indices and records.topk_probs of one read")
    if labels.shape != indices.shape[:1]:
        raise refuse("labels", labels, f"of shape {labels.shape} does not fit {len(indices)} "
                     "images of stored labels", "pass store.read_labels() of the same store")
    high = max(int(indices.max(initial=0)), int(labels.max(initial=0)))
    if high >= num_classes:
        raise refuse("num_classes", num_classes, f"too few for these labels (class index {high})",
                     "pass the store's number of classes (store.num_classes)")
    per_crop = np.repeat(labels, indices[0].size // indices.shape[-1])
    return indices.reshape(-1, indices.shape[-1]), probs.reshape(-1, indices.shape[-1]), per_crop
