"""Training steps: adversarial twins (paper Eq. 3) go uphill, per crop, in valid pixels, and the
optimizer sees the mean loss over natural crops and twins."""
import pytest
import torch
from torch import nn

from refinery_pipeline.training.losses import kl_divergence
from refinery_pipeline.models.tensors import denormalize, normalize, to_model_input
from refinery_pipeline.training.steps import AdversarialStep, NaturalStep


def tiny_net(seed=0):
    """No BatchNorm: each crop's gradient is then independent of the rest of its batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 5))


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 12, 12, 3), dtype=torch.uint8, generator=g)
    target = torch.softmax(torch.randn(n, 5, generator=g) * 2, dim=1)
    return to_model_input(images, "cpu"), target


class FixedLabels:
    """A stand-in refinery that labels twins like their natural crops and remembers the twins."""

    def __init__(self, target):
        self.target, self.seen = target, []

    def __call__(self, pixels):
        self.seen.append(pixels.clone())
        return self.target[:len(pixels)]


def test_twins_raise_the_loss_they_were_built_from():
    x, target = batch()
    step = AdversarialStep(FixedLabels(target), eta=20.0)
    loss, _ = step(tiny_net(), x, target, kl_divergence)
    twins = step.summary()["adv_loss"]
    natural = 2 * loss - twins  # the step returns the mean of both halves
    assert twins > natural + 1e-3
    assert step.summary() == {}  # reset after each report


def test_a_twin_depends_only_on_its_own_crop():
    """eta is per crop: the same crop moves the same way in a batch of 6 or a batch of 1."""
    x, target = batch()
    labels_all, labels_one = FixedLabels(target), FixedLabels(target)
    AdversarialStep(labels_all, eta=50.0)(tiny_net(), x, target, kl_divergence)
    AdversarialStep(labels_one, eta=50.0)(tiny_net(), x[:1], target[:1], kl_divergence)
    twins_all, twin_one = labels_all.seen[0], labels_one.seen[0]
    assert torch.allclose(twins_all[:1], twin_one, atol=1e-3)
    moved = (twin_one - denormalize(x[:1])).abs().max()
    assert moved > 0.5, "the twin did not move; the test proves nothing"


def test_optimizer_sees_the_mean_over_natural_crops_and_twins():
    x, target = batch()
    labels = FixedLabels(target)
    net = tiny_net()
    AdversarialStep(labels, eta=30.0)(net, x, target, kl_divergence)
    got = [p.grad.clone() for p in net.parameters()]

    reference = tiny_net()
    both = torch.cat([x, normalize(labels.seen[0])])
    kl_divergence(reference(both), torch.cat([target, target])).backward()
    expected = [p.grad for p in reference.parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))


def test_twins_stay_valid_images_and_report_how_far_they_moved():
    x, target = batch()
    labels = FixedLabels(target)
    step = AdversarialStep(labels, eta=1e6)
    step(tiny_net(), x, target, kl_divergence)
    twins = labels.seen[0]
    assert twins.min() >= 0 and twins.max() <= 255
    assert 0 < step.summary()["adv_rms"] <= 255


def test_natural_step_is_one_plain_pass():
    x, target = batch()
    net = tiny_net()
    loss, logits = NaturalStep()(net, x, target, kl_divergence)
    assert torch.equal(logits, net(x).detach())
    assert all(p.grad is not None for p in net.parameters())
    assert NaturalStep().summary() == {}


def test_step_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        AdversarialStep(FixedLabels(None), eta=0.0)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def test_shared_bn_trains_natural_crops_and_twins_as_one_batch():
    """The paper's batching: the same twins as the separate mode (found by a pass that leaves
    BatchNorm's statistics alone), then one forward of all 2B crops: the parameter gradient is
    that of the mean loss over the joint batch, BN normalising both halves together."""
    x, target = batch(8)
    labels = FixedLabels(target)
    model = bn_net()
    reference = bn_net()
    before = [b.clone() for b in reference.buffers()]
    loss, logits = AdversarialStep(labels, eta=20.0, bn="shared")(model, x, target,
                                                                 kl_divergence)
    twins = labels.seen[0]
    separate = FixedLabels(target)
    AdversarialStep(separate, eta=20.0)(bn_net(), x, target, kl_divergence)
    assert torch.allclose(twins, separate.seen[0], atol=1e-4)  # same probe, same twins
    both = torch.cat([x, normalize(twins)])
    out = reference(both)
    expected = (kl_divergence(out[:8], target) + kl_divergence(out[8:], target)) / 2
    expected.backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5)
    assert torch.isclose(loss, expected.detach(), atol=1e-5) and logits.shape == (8, 5)
    # running statistics moved once (the joint batch), not by the probe as well
    for ours, theirs in zip(model.buffers(), reference.buffers()):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, reference.buffers()))


def test_an_unknown_bn_mode_is_refused():
    with pytest.raises(ValueError, match="adversarial BN"):
        AdversarialStep(FixedLabels(None), eta=1.0, bn="mixed")
