"""Targets and losses. Every label mode becomes a dense target distribution ``(B, C)`` first, so
one loss function serves ground truth, cached sparse labels and online teachers alike.

Sparse top-k labels drop the mass outside the top k. ``rest="renormalize"`` (default) divides the
top-k probabilities by their sum; ``rest="uniform"`` spreads the dropped mass evenly over the
other classes, which keeps the target's total mass where the refinery put it but not its shape.
Students did better with ``renormalize`` wherever the two differ: on Tiny-ImageNet-200 (top-1 to
top-20 of 200 classes, a weak refinery whose top 10 held 36% of the mass) by 1.6 to 4.8 points,
and uniform fell further behind the fewer classes were kept; on imagenette at full scale by 1.1
points at top-5 (``benchmarks/results/top_k_rest_tin200_cpu32.md``, ``top_k_rest_gpu.md``).
"""
import torch
import torch.nn.functional as F

from ..core.validators import one_of, refuse

LOSSES = ("kl", "soft_ce", "reverse_kl", "l2")
"""The names :func:`get_loss` takes (``refine train --loss``)."""


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Ground-truth targets, optionally label-smoothed as in Szegedy et al. (the paper's [11])."""
    target = F.one_hot(labels.long(), num_classes).float()
    return target * (1.0 - smoothing) + smoothing / num_classes


def hard_from_soft(target: torch.Tensor) -> torch.Tensor:
    """Arg-max of each target as a one-hot (the paper's "hard dynamic" labels)."""
    return F.one_hot(target.argmax(1), target.shape[1]).float()


def check_pair(logits: torch.Tensor, target: torch.Tensor):
    """Refuse a target that is not one ``(B, C)`` distribution per row of ``(B, C)`` logits:
    broadcasting would otherwise turn a ``(B,)`` class-index target or a target of another
    width into a number that trains on nothing meaningful (shapes only: no device sync)."""
    for name, value in (("logits", logits), ("target", target)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise refuse(name, value, "must be a (B, C) tensor", "pass the model's logits and "
                         "dense targets (dense_targets(batch.targets, store.num_classes))")
    if logits.shape != target.shape:
        raise refuse("target", target, f"its shape {tuple(target.shape)} does not fit logits "
                     f"of shape {tuple(logits.shape)}", "pass targets built by dense_targets("
                     "labels, num_classes) for the model's number of classes")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``-sum_c p_c log q_c``, averaged over the batch; ``logits`` and ``target`` are
    both ``(B, C)``."""
    check_pair(logits, target)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def kl_divergence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``KL(p || q)``; same gradient as Eq. 2, but 0 when the student matches the label.
    ``logits`` and ``target`` are both ``(B, C)``."""
    check_pair(logits, target)
    entropy = -(target * target.clamp_min(1e-12).log()).sum(1).mean()
    return soft_cross_entropy(logits, target) - entropy


def reverse_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(q || p)`` (the paper's Table 7), with p floored to keep log p finite; ``logits``
    and ``target`` are both ``(B, C)``."""
    check_pair(logits, target)
    log_q = F.log_softmax(logits.float(), dim=1)
    return (log_q.exp() * (log_q - target.clamp_min(1e-8).log())).sum(1).mean()


def l2_on_probabilities(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance between probability vectors (the paper's Table 7); ``logits`` and
    ``target`` are both ``(B, C)``."""
    check_pair(logits, target)
    return ((F.softmax(logits.float(), dim=1) - target) ** 2).sum(1).mean()


def get_loss(name: str):
    """The loss function called ``name`` (one of :data:`LOSSES`), ``loss(logits, target)``."""
    table = {"kl": kl_divergence, "soft_ce": soft_cross_entropy, "reverse_kl": reverse_kl,
             "l2": l2_on_probabilities}
    return table[one_of("name", name, LOSSES, what="loss")]
