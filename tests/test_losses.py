import pytest
import torch
import torch.nn.functional as F

from refinery_pipeline.training.losses import (get_loss, hard_from_soft, kl_divergence,
                                               l2_on_probabilities, one_hot, reverse_kl,
                                               soft_cross_entropy)
from refinery_pipeline.loaders.dense_targets import dense_from_sparse


def sparse_of(dense, k):
    probs, idx = dense.topk(k, dim=1)
    return idx, probs


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g)
    teacher = F.softmax(torch.randn(16, 10, generator=g) * 2, dim=1)
    return logits, teacher


def test_sparse_label_with_all_classes_is_the_dense_label(batch):
    _, teacher = batch
    for rest in ("uniform", "renormalize"):
        assert torch.allclose(dense_from_sparse(*sparse_of(teacher, 10), 10, rest), teacher,
                              atol=1e-6)


def test_uniform_rest_spreads_the_missing_mass_evenly(batch):
    _, teacher = batch
    idx, probs = sparse_of(teacher, 3)
    target = dense_from_sparse(idx, probs, 10, "uniform")
    assert torch.allclose(target.sum(1), torch.ones(16))
    assert torch.allclose(target.gather(1, idx), probs)
    outside = target.clone().scatter_(1, idx, float("nan"))
    rest = (1 - probs.sum(1)) / 7
    for row in range(16):
        values = outside[row][~outside[row].isnan()]
        assert torch.allclose(values, rest[row].expand(7), atol=1e-6)


def test_renormalize_rest_drops_the_missing_mass(batch):
    _, teacher = batch
    idx, probs = sparse_of(teacher, 3)
    target = dense_from_sparse(idx, probs, 10, "renormalize")
    assert torch.allclose(target.gather(1, idx), probs / probs.sum(1, keepdim=True))
    assert torch.allclose(target.sum(1), torch.ones(16))


def test_losses_against_dense_formulas(batch):
    logits, p = batch
    q = F.softmax(logits, dim=1)
    assert torch.allclose(soft_cross_entropy(logits, p), -(p * q.log()).sum(1).mean(), atol=1e-6)
    assert torch.allclose(kl_divergence(logits, p), (p * (p.log() - q.log())).sum(1).mean(),
                          atol=1e-5)
    assert torch.allclose(kl_divergence(logits, p),
                          F.kl_div(F.log_softmax(logits, 1), p, reduction="batchmean"), atol=1e-5)
    assert torch.allclose(reverse_kl(logits, p), (q * (q.log() - p.log())).sum(1).mean(),
                          atol=1e-5)
    assert torch.allclose(l2_on_probabilities(logits, p), ((q - p) ** 2).sum(1).mean())


def test_kl_is_zero_at_the_target_and_has_the_cross_entropy_gradient(batch):
    _, p = batch
    logits = p.log().clone().requires_grad_(True)
    assert kl_divergence(logits, p).abs() < 1e-5
    g_kl = torch.autograd.grad(kl_divergence(logits * 0.5, p), logits)[0]
    g_ce = torch.autograd.grad(soft_cross_entropy(logits * 0.5, p), logits)[0]
    assert torch.allclose(g_kl, g_ce, atol=1e-6)


def test_one_hot_smoothing_and_hard_labels():
    t = one_hot(torch.tensor([2, 0]), 4, smoothing=0.2)
    assert torch.allclose(t[0], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    assert torch.equal(hard_from_soft(torch.tensor([[0.1, 0.6, 0.3]])), torch.tensor([[0., 1., 0.]]))
    ce = soft_cross_entropy(torch.randn(3, 4), one_hot(torch.tensor([1, 2, 3]), 4))
    assert ce > 0


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
