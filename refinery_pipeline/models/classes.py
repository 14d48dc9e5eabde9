"""Weights for more classes than the data set's label it through a subset of their outputs
(ImageNet-1k weights on Imagenette's WordNet-id folders); class lists checked against a
checkpoint's.
"""
import torch
from torch import nn

from ..core.errors import CheckpointError
from .imagenet_classes import (NUM_IMAGENET1K_CLASSES, imagenet1k_outputs, imagenet1k_wnids,
                               output_indices)


class ClassSubset(nn.Module):
    """A classifier restricted to some of its classes: the logits of ``outputs``, in that order.

    Softmax over the selected logits z_S is the full model's probabilities renormalised over
    those classes, softmax(z_S) = p_S / sum(p_S), so an ImageNet-1k refinery labels Imagenette
    or Tiny-ImageNet as if the other classes did not exist. A temperature T divides the selected
    logits, softmax(z_S / T), which is the tempered 1000-way distribution renormalised alike.

    Parameters
    ----------
    model : nn.Module
        The full classifier.
    outputs : sequence of int
        ``outputs[j]`` is the model output that predicts the data set's class ``j``.
    """

    def __init__(self, model: nn.Module, outputs):
        super().__init__()
        self.model = model
        # not persistent: the state_dict stays the full model's (under "model.")
        self.register_buffer("outputs", torch.as_tensor(list(outputs), dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.outputs)


def select_outputs(model: nn.Module, outputs) -> nn.Module:
    """``model`` itself when ``outputs`` is None (output i is class i), else its
    :class:`ClassSubset` of ``outputs``."""
    return model if outputs is None else ClassSubset(model, outputs)


def _check_classes(weights, saved_count: int, saved_names: list, classes: list):
    """Which outputs label the data set's ``classes``: None when output i is class i, else the
    output of each class (see :func:`_subset_outputs`).

    Refuses a model whose outputs mean other classes than the data set's: a label store made
    with it would be silently wrong. A bare state_dict names no classes; its count must fit,
    unless it is a 1000-way head and the data set's classes are ImageNet-1k ids.
    """
    if classes is None:
        return None
    outputs = _subset_outputs(saved_count, saved_names, classes)
    if outputs is not None:
        return outputs
    if saved_count is not None and saved_count != len(classes):
        raise CheckpointError(_count_mismatch(weights, saved_count, saved_names, classes))
    if _named(saved_names) and _named(classes) and list(saved_names) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved_names, classes)) if a != b)
        raise CheckpointError(f"{weights}: output {i} is class {saved_names[i]!r} but the data "
                              f"set's class {i} is {classes[i]!r}; use a refinery trained on these "
                              "classes (same class folders)")
    return None


def _subset_outputs(saved_count: int, saved_names: list, classes: list):
    """The outputs that predict the data set's ``classes`` when they are fewer than the model's
    and each is one of them: found by the class names a checkpoint records, else, for a
    1000-way head, by ImageNet-1k's WordNet-id order (torchvision's and timm's ImageNet weights;
    for a checkpoint that names no classes this assumes it was trained on ImageNet-1k, so the
    data set's folders must all be ImageNet-1k ids). None otherwise, and when output i already
    is class i (ImageNet-1k's own folders)."""
    if _named(saved_names):
        return output_indices(classes, saved_names) if len(classes) < len(saved_names) else None
    if saved_count != NUM_IMAGENET1K_CLASSES:
        return None
    outputs = imagenet1k_outputs(classes)
    return None if outputs == list(range(NUM_IMAGENET1K_CLASSES)) else outputs


def _count_mismatch(weights, saved_count: int, saved_names: list, classes: list) -> str:
    """The one-line refusal of weights for another number of classes, saying what would work."""
    said = (f"{weights}: these weights predict {saved_count} classes but the data set has "
            f"{len(classes)}")
    if len(classes) < saved_count and _named(saved_names):
        theirs = set(saved_names)
        missing = next((c for c in classes if c not in theirs), None)
        return (f"{said}, and its class {missing!r} is not one of theirs; use a refinery trained "
                "on these classes, or data whose class folders are some of the weights' classes")
    if len(classes) < saved_count == NUM_IMAGENET1K_CLASSES:
        wnids = set(imagenet1k_wnids())
        missing = next((c for c in classes if c not in wnids), None)
        return (f"{said}, and its class {missing!r} is not an ImageNet-1k WordNet id; name each "
                "class folder by its ImageNet-1k id (n01440764, ...) to label those classes with "
                "ImageNet weights, or use a refinery trained on these classes")
    return f"{said}; use a refinery trained on these classes"


def _named(classes: list) -> bool:
    """Whether ``classes`` are names: a .beton written without them numbers its classes "0",
    "1", ..., which says nothing about which class is which."""
    return classes is not None and list(classes) != [str(i) for i in range(len(classes))]
