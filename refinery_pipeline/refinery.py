"""The refinery: a trained classifier that turns crops into soft labels.

BatchNorm runs in train mode by default, as in the paper (the refinery was trained that way and
labels its own training crops better so). Batch statistics then depend on which crops share a
batch, so callers must feed randomly composed batches; precompute fixes that composition per
chunk with a seeded permutation so labels stay reproducible. ``bn_mode="eval"`` uses running
statistics and makes every crop's label independent of its neighbours.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .models import (IMAGENET_NORMALIZATION, ClassSubset, batchnorm_layers, file_sha256,
                     load_trained_model, normalize, to_pixels)

BN_MODES = ("train", "eval")


def _input_size(weights, asked: int, ckpt: dict) -> int:
    """The refinery's crop size: ``asked``, else the checkpoint's. Never a guess: a network
    labels crops of another size than it was trained at worse, and silently so, and the size
    also becomes the store's and so its students'."""
    size = asked or ckpt.get("input_size")
    if not size:
        raise CheckpointError(f"{weights}: the checkpoint records no input size; pass the size "
                              "it was trained at, --input-size N (refine precompute) or --res N "
                              "(refine train --teacher)")
    return int(size)


def set_bn_mode(model: nn.Module, bn_mode: str) -> nn.Module:
    """Eval mode everywhere (no dropout), then BatchNorm layers in train mode if asked.

    Momentum 0 keeps the running statistics untouched while batch statistics are used.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {bn_mode!r}; choose one of {BN_MODES}")
    model.eval()
    if bn_mode == "train":
        for m in batchnorm_layers(model):
            m.train()
            m.momentum = 0.0
    return model


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU, where bf16 is slower than fp32 on most chips."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Refinery:
    """A frozen model that labels uint8 NHWC crops with softmax(logits / T)."""

    def __init__(self, model: nn.Module, arch: str, weights_sha256: str, input_size: int,
                 bn_mode: str = "train", temperature: float = 1.0, device="cpu",
                 normalization=IMAGENET_NORMALIZATION, channels_last: bool = True,
                 compile: bool = False):
        self.device = torch.device(device)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.model = set_bn_mode(model.to(self.device, memory_format=memory), bn_mode)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # which of the network's outputs are the data set's classes: part of its identity
        self.selected_outputs = (model.outputs.tolist() if isinstance(model, ClassSubset)
                                 else None)
        if compile:  # pays off on long GPU runs; numerics may differ slightly from eager mode
            self.model = torch.compile(self.model)
        self.arch, self.weights_sha256, self.input_size = arch, weights_sha256, int(input_size)
        self.bn_mode, self.temperature = bn_mode, float(temperature)
        self.normalization, self.channels_last = normalization, channels_last

    @classmethod
    def from_checkpoint(cls, weights, arch: str = None, classes: list = None,
                        input_size: int = None, **kwargs) -> "Refinery":
        """Load weights: a ``refine train`` checkpoint (needs no ``arch``), a ``state_dict``, a
        torchvision or timm training checkpoint, or torchvision's pretrained weights by name;
        they must predict the data set's ``classes``, or more classes among which they are (an
        ImageNet-1k refinery for an ImageNet-subset data set: those classes' outputs are
        selected, :class:`.models.ClassSubset`). ``input_size`` overrides the checkpoint's
        and is required where it records none."""
        model, ckpt = load_trained_model(weights, arch, classes)
        size = _input_size(weights, input_size, ckpt)
        return cls(model, ckpt["arch"], file_sha256(ckpt["file"]), size,
                   normalization=ckpt.get("normalization", IMAGENET_NORMALIZATION), **kwargs)

    def describe(self) -> dict:
        """What a label store records about the refinery (its identity for mismatch checks).

        ``selected_outputs`` only where outputs were selected, so stores written before the
        field existed still match the refinery that wrote them."""
        info = {"arch": self.arch, "weights_sha256": self.weights_sha256, "bn_mode": self.bn_mode,
                "temperature": self.temperature, "input_size": self.input_size,
                "normalization": self.normalization}
        if self.selected_outputs is not None:
            info["selected_outputs"] = self.selected_outputs
        return info

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 class probabilities ``(B, C)`` for uint8 NHWC crops."""
        return self.probabilities_of_pixels(to_pixels(images, self.device))

    @torch.no_grad()
    def probabilities_of_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Probabilities for float NCHW pixel values (0-255), e.g. crops perturbed in training."""
        x = normalize(pixels.to(self.device), self.normalization, self.channels_last)
        with autocast_for(self.device):
            logits = self.model(x)
        return F.softmax(logits.float() / self.temperature, dim=1)

    def top_k(self, images: torch.Tensor, k: int):
        """``(indices uint16, probabilities float16)`` of the k most likely classes, on the CPU."""
        values, indices = self.probabilities(images).topk(k, dim=1)
        return indices.to(torch.int32).cpu().numpy().astype("uint16"), \
            values.cpu().numpy().astype("float16")
