"""One definition of ``CropBatch.mix`` (issue 25): wherever a mixing recipe made the crops, both
backends carry each crop's partner class and own share, the same for every ``(epoch, n)``.

Before, on a mixup store ``replay_loader`` filled ``mix`` while ``StoreCropDataset`` +
``CropCollate`` left it None, so a loop that mixes class targets when ``mix`` is set mixed on
one backend only.
"""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import refinery_pipeline as refinery
from refinery_pipeline.loaders.crop_batch import MixedLabels
from refinery_pipeline.training.targets import CategoryTargets, GroundTruthTargets

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

EPOCHS = (0, 1, 3)


def per_image(batches) -> dict:
    """Image index -> (label, partner label, share, stored top-1, crop bytes) over an epoch."""
    seen = {}
    for batch in batches:
        assert isinstance(batch.mix, MixedLabels), "a mixing recipe's batch without mix"
        images = batch.images if batch.images.shape[-1] == 3 else batch.images.permute(0, 2, 3, 1)
        for i, n in enumerate(batch.indices.tolist()):
            seen[n] = (int(batch.labels[i]), int(batch.mix.partner_labels[i]),
                       float(batch.mix.weights[i]), int(batch.targets.indices[i, 0]),
                       images[i].numpy().tobytes())
    return seen


@pytest.fixture(scope="module")
def both_backends(mixup_store, tiny_data):
    ffcv = refinery.replay_loader(mixup_store, tiny_data, batch_size=16, num_workers=1,
                                  drop_last=False)
    plain = refinery.StoreCropDataset(mixup_store, tiny_data)
    loader = DataLoader(plain, batch_size=16, shuffle=True, collate_fn=refinery.CropCollate(),
                        generator=torch.Generator().manual_seed(0))
    runs = {}
    for epoch in EPOCHS:
        ffcv.set_epoch(epoch)
        plain.set_epoch(epoch)
        runs[epoch] = (per_image(ffcv), per_image(loader))
    return runs


@pytest.mark.parametrize("epoch", EPOCHS)
def test_both_backends_give_the_same_mix_for_every_crop(both_backends, epoch):
    replayed, plain = both_backends[epoch]
    assert sorted(replayed) == sorted(plain) == list(range(96))
    assert replayed == plain  # labels, partners, shares, stored labels and pixels
    shares = np.array([share for _, _, share, _, _ in plain.values()])
    assert ((shares > 0) & (shares < 1)).mean() > 0.9  # mixup: the crops were mixed
    partners = np.array([partner for _, partner, _, _, _ in plain.values()])
    labels = np.array([label for label, _, _, _, _ in plain.values()])
    assert (partners != labels).any()  # partners are other images, of other classes too


def test_class_targets_mix_alike_on_both_backends(mixup_store, tiny_data):
    """Ground-truth and category targets (train.py's consumers of ``mix``) are the same batch
    for batch on both backends, and differ from the unmixed one-hot (so this can fail)."""
    ffcv = refinery.replay_loader(mixup_store, tiny_data, batch_size=96, num_workers=1,
                                  drop_last=False)
    plain = refinery.StoreCropDataset(mixup_store, tiny_data)
    a = next(iter(ffcv))
    b = next(iter(DataLoader(plain, batch_size=96, collate_fn=refinery.CropCollate())))
    order_a, order_b = a.indices.argsort(), b.indices.argsort()
    table = torch.softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)), 1)
    for targets in (GroundTruthTargets(10), CategoryTargets(table, "cpu")):
        mixed_a, mixed_b = targets(a, None)[order_a], targets(b, None)[order_b]
        assert torch.equal(mixed_a, mixed_b)
        unmixed = targets(b._replace(mix=None), None)[order_b]
        assert not torch.allclose(mixed_b, unmixed)


def test_collate_sets_mix_only_where_a_recipe_mixed():
    sample = lambda n, partner=refinery.CropSample._field_defaults["partner_label"], share=1.0: \
        refinery.CropSample(torch.zeros(3, 4, 4, dtype=torch.uint8), n % 2, n, 0,
                            np.zeros(2, np.int64), np.full(2, 0.5, np.float16), partner, share)
    collate = refinery.CropCollate()
    assert collate([sample(0), sample(1)]).mix is None
    batch = collate([sample(0, 7, 0.25), sample(1)])  # e.g. a data set mixed into another
    assert batch.mix.partner_labels.tolist() == [7, 1]  # unmixed: itself, at share 1
    assert batch.mix.weights.tolist() == [0.25, 1.0]
