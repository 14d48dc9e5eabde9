"""What one optimizer step trains on: the batch as shown (:class:`NaturalStep`), or the batch and
its adversarial twins (:class:`AdversarialStep`, the paper's adversarial jittering, §3.1, Eq. 3,
Table 3), crops pushed towards where the student and the refinery disagree.

Each training crop ``x`` gets a twin ``x + eta * dL/dx``: one step of gradient ascent on the
student's loss against the refinery's label of ``x``, taken in the student's normalised input
space and clipped back to valid pixel values. The refinery then labels the twin, and the optimizer
step averages the loss over the natural crops and their twins, so the student never drifts far
from natural images. The twins depend on the student of the moment, so their labels cannot be
cached: this mode needs an online refinery (``refine train --teacher``).

Choices the paper leaves open, and why:
- ``dL/dx`` is the gradient of each crop's own loss (the batch-mean loss times the batch size), so
  ``eta`` means the same at any batch size and any number of ranks.
- The gradient goes through the student only (the refinery's label of ``x`` is held fixed), as in
  gradient-sign attacks on one model; it is also what the natural half's backward pass already
  computes, so finding the twins costs no extra pass.
- Natural crops and twins share the optimizer step. By default (``bn="separate"``) they do not
  share the BatchNorm batch: each half is normalised by its own statistics (AdvProp, Xie et al.
  2020, found mixing them hurts) and the natural half's backward pass is reused, so a step costs
  two student passes, not three; BatchNorm running statistics are updated twice per step.
  ``bn="shared"`` batches them as the paper does: one pass finds the twins (its gradient only
  reaches the inputs, and it leaves BatchNorm's running statistics alone), then natural crops
  and twins go through the student as one batch of 2B, normalised together: three passes per
  step, running statistics updated once, by both.
"""
from contextlib import contextmanager, nullcontext

import torch

from ..labelling.refinery import autocast_for
from ..models.registry import batchnorm_layers
from ..models.tensors import IMAGENET_NORMALIZATION, denormalize, normalize

# How natural crops and their twins meet BatchNorm: each in its own batch (the default), or one
# batch of both as the paper batches them.
ADVERSARIAL_BN = ("separate", "shared")


def forward_backward(model, x, target, loss_fn, weight: float = 1.0):
    """Loss and logits of one batch, its gradient (times ``weight``) accumulated."""
    with autocast_for(x.device):
        logits = model(x)
    loss = loss_fn(logits, target)
    (loss * weight).backward()
    return loss.detach(), logits.detach()


class NaturalStep:
    """One forward and backward pass on the crops as shown: every mode but adversarial."""

    def __call__(self, model, x, target, loss_fn):
        return forward_backward(model, x, target, loss_fn)

    def summary(self) -> dict:
        return {}


class AdversarialStep:
    """The natural batch and its adversarial twins in one optimizer step (see module docstring).

    ``summary()`` reports, per epoch, the loss on the twins (``adv_loss``, against the refinery's
    labels of the twins) and how far they moved (``adv_rms``: root mean square change per pixel
    value, 0-255 scale), the number to look at when choosing ``eta``.
    """

    def __init__(self, label_pixels, eta: float, normalization=IMAGENET_NORMALIZATION,
                 channels_last: bool = True, bn: str = "separate"):
        """``label_pixels``: float NCHW pixels -> target distributions (the online refinery);
        ``bn``: ``"separate"`` or ``"shared"`` BatchNorm batches (module docstring)."""
        if not eta > 0:
            raise ValueError(f"adversarial step size must be positive, got {eta}")
        if bn not in ADVERSARIAL_BN:
            raise ValueError(f"adversarial BN {bn!r}: choose one of {ADVERSARIAL_BN}")
        self.label_pixels, self.eta, self.bn = label_pixels, float(eta), bn
        self.normalization, self.channels_last = normalization, channels_last
        self._totals = None

    def __call__(self, model, x, target, loss_fn):
        if self.bn == "shared":
            return self._shared_batch(model, x, target, loss_fn)
        x = x.detach().requires_grad_(True)
        with _local_accumulation(model):  # under DDP, gradients are reduced once, after the twins
            natural, logits = forward_backward(model, x, target, loss_fn, weight=0.5)
        twins = self._twins(x.detach(), x.grad * (2 * len(x)))  # undo batch mean, 0.5 weight
        twin_input = normalize(twins, self.normalization, self.channels_last)
        adversarial, _ = forward_backward(model, twin_input, self.label_pixels(twins), loss_fn,
                                          weight=0.5)
        self._add(adversarial, self._moved(x.detach(), twins))
        return (natural + adversarial) / 2, logits

    def _twins(self, x, per_crop_grad):
        """Each crop moved ``eta`` along its own loss gradient, as pixels clipped to 0-255."""
        return denormalize(x + self.eta * per_crop_grad, self.normalization).clamp_(0, 255)

    def _moved(self, x, twins):
        """How far the twins moved: RMS change per pixel value (0-255)."""
        return (twins - denormalize(x, self.normalization)).square().mean().sqrt()

    def _shared_batch(self, model, x, target, loss_fn):
        """The paper's batching: twins from a pass whose gradient reaches only the inputs, then
        natural crops and twins as one batch (one BatchNorm batch, one backward pass)."""
        x = x.detach()
        probe = x.clone().requires_grad_(True)
        with _local_accumulation(model), _running_statistics_kept(model), \
                autocast_for(x.device):  # no DDP reduction, no BN statistics update here
            probe_loss = loss_fn(model(probe), target)
        twins = self._twins(x, torch.autograd.grad(probe_loss, probe)[0] * len(x))
        both = torch.cat([x, normalize(twins, self.normalization, self.channels_last)])
        twin_target = self.label_pixels(twins)
        with autocast_for(x.device):
            logits = model(both)
        natural = loss_fn(logits[:len(x)], target)
        adversarial = loss_fn(logits[len(x):], twin_target)
        ((natural + adversarial) / 2).backward()
        self._add(adversarial.detach(), self._moved(x, twins))
        return (natural.detach() + adversarial.detach()) / 2, logits[:len(x)].detach()

    def _add(self, adversarial_loss, rms):
        batch = torch.stack([adversarial_loss.float(), rms.float(), torch.ones_like(rms)])
        self._totals = batch if self._totals is None else self._totals + batch

    def summary(self) -> dict:
        """Epoch means since the last call (one CPU-GPU sync), then reset."""
        if self._totals is None:
            return {}
        loss, rms, steps = self._totals.tolist()
        self._totals = None
        return {"adv_loss": loss / steps, "adv_rms": rms / steps}


@contextmanager
def _running_statistics_kept(model):
    """BatchNorm in train mode normalises by the batch as usual, but its running statistics
    (and batch count) come out as they went in: momentum 0 for the pass, the count restored."""
    layers = [(m, m.momentum, m.num_batches_tracked.clone()) for m in batchnorm_layers(model)
              if m.track_running_stats and m.num_batches_tracked is not None]
    for m, _, _ in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in layers:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _local_accumulation(model):
    """DDP's ``no_sync`` when ``model`` has it (also through ``torch.compile``), else nothing."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else nullcontext()
