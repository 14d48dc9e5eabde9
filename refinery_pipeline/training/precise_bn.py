"""Precise BatchNorm statistics: recompute running means and variances for the weights as they are.

BatchNorm evaluates with running statistics, an exponential average of batch statistics taken while
the weights were still moving. With a slow momentum (torchvision's MobileNetV3 uses 0.01, a memory
of ~100 steps) and a short schedule that average lags the final weights, and a model evaluates far
below what its weights can do: 15 to 28 points for MobileNetV3-small students after 8 epochs at
32 px (``benchmarks/results/bn_recalibration_cpu32.md``), and by different amounts in different
label modes, which makes comparisons between them wrong. Recomputing the statistics as a plain
average over a few hundred training crops with the weights frozen ("precise BN", Wu & Johnson
2021; ``torch.optim.swa_utils.update_bn``, fvcore's ``update_bn_stats``) removes the lag.

Training is unchanged: in train mode BatchNorm normalises with batch statistics, so the running
statistics are read only by evaluation, by the saved checkpoint, and by a refinery in BN eval mode.
"""
import itertools
from typing import Iterable

import torch
from torch import nn

from ..labelling.refinery import autocast_for
from ..models.registry import batchnorm_layers
from ..models.tensors import to_model_input

# When the running average's memory (1 / momentum steps) exceeds this share of a run, evaluation
# reads stale statistics. Measured with MobileNetV3-small (momentum 0.01) at 32 px, val top-1
# gained by recomputing, two seeds each: 17% of the run +14.9 / +15.7 points, 8.5% +0.6 / +0.7,
# 4.3% +0.7 / +0.2, and one seed at 2.1%: -0.2, i.e. nothing beyond the recomputation's own
# crop noise (~0.2); ResNet-18 (momentum 0.1) at 1.7% within 0.3 either way
# (benchmarks/results/bn_lag_vs_schedule_cpu32.md). 3% lies between the last share that lagged
# and the first that did not.
LAGGING_MEMORY_SHARE = 0.03
TORCH_DEFAULT_MOMENTUM = 0.1


def statistics_memory(model: nn.Module) -> float:
    """Steps the slowest BatchNorm running average remembers (1 / momentum); 0 without BN or
    with cumulative averages (momentum None)."""
    momenta = [m.momentum for m in batchnorm_layers(model) if m.momentum]
    return 1 / min(momenta) if momenta else 0.0


def lagging_statistics_memory(model: nn.Module, steps: int) -> float:
    """:func:`statistics_memory` when evaluation after ``steps`` training steps will read stale
    statistics, else 0. Only momenta below PyTorch's default 0.1 count: 0.1 measured harmless
    even in short runs."""
    memory = statistics_memory(model)
    lagging = memory > 1 / TORCH_DEFAULT_MOMENTUM and memory > LAGGING_MEMORY_SHARE * steps
    return memory if lagging else 0.0


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm layer's running statistics by their plain average over ``inputs``
    (model-ready batches), then average them over ranks under ``torch.distributed``.

    Only BatchNorm layers see train mode (dropout stays off, as at evaluation); momenta and the
    model's mode are restored. Returns the number of batches used.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training, momenta = model.training, [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
        m.train()
    batches = 0
    try:
        for x in inputs:
            with autocast_for(x.device):
                model(x)
            batches += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    _average_over_ranks(layers)
    return batches


def recompute_from_loader(model: nn.Module, loader, batches: int, device,
                          channels_last: bool = True) -> int:
    """:func:`recompute_bn_statistics` over the first ``batches`` batches of a crop loader's next
    epoch (:class:`.crop_batch.CropBatch` es of uint8 NHWC crops, as every loader yields them)."""
    epoch = iter(loader)
    try:
        return recompute_bn_statistics(model, (
            to_model_input(batch.images, device, channels_last=channels_last)
            for batch in itertools.islice(epoch, batches)))
    finally:
        epoch.close()  # stop FFCV's decoding thread for the batches not taken


def _average_over_ranks(layers: list):
    """Each rank saw its own shard of images: give all ranks the mean of their statistics."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for m in layers:
        for buffer in (m.running_mean, m.running_var):
            torch.distributed.all_reduce(buffer)
            buffer /= world
