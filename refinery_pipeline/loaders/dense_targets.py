"""Stored sparse top-k labels as dense target distributions: the one definition that
``refine train``, :class:`.torch_data.CropCollate` and users' own loops share.

A store keeps each crop's k most likely classes and their (float16) probabilities; a loss needs
a distribution over all C classes, and where the mass outside the top k goes is the ``rest``
policy (``store.label_store.REST_POLICIES``). This lives with the loaders, below training,
because the plain-PyTorch collate builds dense targets in its workers; training imports it.
"""
import torch

from ..core.validators import one_of, refuse, whole_number
from ..store.schema import DEFAULT_REST, REST_POLICIES


def dense_from_sparse(indices: torch.Tensor, probs: torch.Tensor, num_classes: int,
                      rest: str = DEFAULT_REST) -> torch.Tensor:
    """Expand top-k ``(indices, probs)`` of shape ``(B, k)`` into distributions ``(B, C)``.

    Every step is one float32 operation in an order ``docs/label-store.md`` gives, so a reader
    of the spec builds the same targets bit for bit: the top-k sum ``s`` adds the stored
    probabilities in stored order (most probable first), one addition at a time, because
    torch's and numpy's reductions each choose their own order (by vector width and device).
    ``renormalize`` (or ``k == C``): ``p / s``. ``uniform``: ``r = max(0, 1 - s) / (C - k)``
    for every other class, ``p`` for the top k, all divided by the row's sum
    ``s + r * (C - k)`` (which absorbs float16 rounding: stored sums can exceed 1)."""
    probs = probs.float()
    k = indices.shape[1]
    total = in_order_sum(probs)
    if rest == "renormalize" or k == num_classes:
        target = torch.zeros(len(probs), num_classes, device=probs.device)
        return target.scatter_(1, indices.long(), probs / total)
    one_of("rest", rest, REST_POLICIES)
    others = (1.0 - total).clamp_min(0.0) / (num_classes - k)
    target = others.expand(-1, num_classes).clone()
    target.scatter_(1, indices.long(), probs)
    return target / (total + others * (num_classes - k))



def in_order_sum(values: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` -> ``(B, 1)``: each row's values added left to right, one float32 addition
    at a time (a fixed order on every device; k is small, one vector operation per column)."""
    total = values[:, :1].clone()
    for j in range(1, values.shape[1]):
        total += values[:, j:j + 1]
    return total


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
