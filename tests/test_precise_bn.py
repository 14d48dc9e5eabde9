"""Precise BN: running statistics become the plain average over the given batches, and nothing
else about the model or its training changes."""
import json
import warnings

import pytest
import torch
from torch import nn

from refinery_pipeline.training import train as train_module
from refinery_pipeline.sources.dataset import ImageDataset
from refinery_pipeline.core.errors import RefineryWarning
from refinery_pipeline.models.registry import batchnorm_layers
from refinery_pipeline.models.checkpoints import load_trained_model
from refinery_pipeline.training.precise_bn import recompute_bn_statistics

from .test_train_modes import config

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def test_statistics_are_the_plain_average_over_batches_with_dropout_off():
    model = small_model().train()
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [torch.randn(8, 3, 6, 6) * (1 + i) + 3 * i for i in range(3)]  # shifting inputs
    assert recompute_bn_statistics(model, iter(batches)) == 3
    conv1, bn1, conv2, bn2 = model[0], model[1], model[4], model[5]
    with torch.no_grad():
        h = [conv1(x) for x in batches]
        # what reaches bn2: bn1 with batch statistics, then ReLU, no dropout (as at evaluation)
        g = [conv2(torch.relu(nn.functional.batch_norm(a, None, None, bn1.weight, bn1.bias,
                                                       training=True))) for a in h]
    for bn, feats in ((bn1, h), (bn2, g)):
        means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
        torch.testing.assert_close(bn.running_mean, means)
        torch.testing.assert_close(bn.running_var, variances)
    assert [bn1.momentum, bn2.momentum] == [0.01, 0.1] and model.training
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert recompute_bn_statistics(model, iter([torch.randn(2, 3, 5, 5)])) == 0


def test_training_is_unchanged_and_saved_statistics_are_reproducible(tiny_data, tmp_path):
    epochs = 2
    plain = config(tiny_data, tmp_path / "plain", epochs=epochs)
    precise = config(tiny_data, tmp_path / "precise", epochs=epochs, precise_bn=2)
    train_module.fit(plain)
    record = train_module.fit(precise)
    assert record["precise_bn_batches"] == 2
    a, _ = load_trained_model(tmp_path / "plain" / "run" / "model.pt")
    b, _ = load_trained_model(tmp_path / "precise" / "run" / "model.pt")
    # the same weights (running statistics are read only at evaluation) ...
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # ... but other statistics, exactly those of 2 batches of this epoch's seeded crops
    means = lambda m: torch.cat([bn.running_mean for bn in batchnorm_layers(m)])  # noqa: E731
    assert not torch.allclose(means(a), means(b))
    loader = train_module._bn_statistics_loader(precise, ImageDataset(tiny_data), 24)
    train_module._recompute_bn(a, loader, epochs - 1, precise, torch.device("cpu"))
    assert torch.equal(means(a), means(b))
    log = (tmp_path / "precise" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["precise_bn_batches"] for line in log] == [2, 2]


def slow_momentum_model(momentum):
    model = small_model()
    for bn in batchnorm_layers(model):
        bn.momentum = momentum
    return model


@pytest.mark.parametrize("momentum, steps, precise_bn, warned", [
    (0.01, 584, 0, True),      # MobileNetV3-small's 8 short epochs: 15-28 points low
    (0.01, 2336, 0, True),     # 32 epochs (memory 4.3% of the run): 0.2-0.7 points low
    (0.01, 4672, 0, False),    # 64 epochs (2.1%): measured no lag
    (0.01, 584, 100, False),   # already recomputed
    (0.01, 100_000, 0, False),  # a long run forgets the early statistics
    (0.1, 100, 0, False),      # PyTorch's default momentum: measured harmless, even this short
    (None, 584, 0, False),     # cumulative averages
])
def test_short_runs_with_slow_batchnorm_momentum_are_warned(momentum, steps, precise_bn, warned,
                                                            tmp_path):
    cfg = config("DATA", tmp_path, arch="mobilenet_v3_small", precise_bn=precise_bn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_module._warn_if_bn_statistics_lag(cfg, slow_momentum_model(momentum), steps)
    messages = [str(w.message) for w in caught if issubclass(w.category, RefineryWarning)]
    assert len(messages) == int(warned), messages
    if warned:
        assert f"~100 steps, {100 / steps:.1%} of this {steps}-step run" in messages[0]
        assert "--precise-bn 100" in messages[0] and "\n" not in messages[0]
