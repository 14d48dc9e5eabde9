import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from refinery_pipeline.plan.crop_plan import (CropPlan, counter_uniform, epoch_slots, sample_boxes,
                                              sample_flips)


def boxes_for(plan, heights, widths, ids=None):
    ids = np.arange(len(heights)) if ids is None else ids
    return sample_boxes(plan, ids, np.asarray(heights)[ids], np.asarray(widths)[ids])


def test_boxes_are_a_pure_function_of_seed_image_and_slot():
    plan = CropPlan(seed=7, crops_per_image=6)
    h, w = np.full(500, 96), np.full(500, 128)
    full = boxes_for(plan, h, w)
    assert np.array_equal(full, boxes_for(plan, h, w))
    # any subset, in any order, gets the same boxes: batch size, ranks and order do not matter
    ids = np.random.default_rng(0).permutation(500)[:77]
    assert np.array_equal(boxes_for(plan, h, w, ids), full[ids])
    # a plan with more slots extends, not reshuffles, the first ones
    more = boxes_for(CropPlan(seed=7, crops_per_image=9), h, w)
    assert np.array_equal(more[:, :6], full)
    assert not np.array_equal(boxes_for(CropPlan(seed=8, crops_per_image=6), h, w), full)


def test_boxes_lie_inside_their_image():
    rng = np.random.default_rng(1)
    h, w = rng.integers(1, 300, 2000), rng.integers(1, 300, 2000)
    b = boxes_for(CropPlan(seed=1, crops_per_image=4), h, w).astype(np.int64)
    assert (b[..., 2] >= 1).all() and (b[..., 3] >= 1).all()
    assert (b[..., 0] + b[..., 2] <= h[:, None]).all()
    assert (b[..., 1] + b[..., 3] <= w[:, None]).all()


@pytest.mark.parametrize("size", [(96, 96), (96, 160), (200, 60)])
def test_statistics_match_torchvision_random_resized_crop(size):
    H, W = size
    ours = boxes_for(CropPlan(seed=3, crops_per_image=4000), [H], [W])[0].astype(np.float64)
    torch.manual_seed(0)
    image = torch.zeros(1, H, W)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(4000)], dtype=np.float64)
    for column, name in [(2, "h"), (3, "w"), (0, "y"), (1, "x")]:
        q = np.linspace(0.05, 0.95, 19)
        diff = np.abs(np.quantile(ours[:, column], q) - np.quantile(theirs[:, column], q))
        assert diff.max() <= 0.06 * max(H, W), (name, diff.max())
    area_ours = (ours[:, 2] * ours[:, 3]).mean() / (H * W)
    area_theirs = (theirs[:, 2] * theirs[:, 3]).mean() / (H * W)
    assert abs(area_ours - area_theirs) < 0.02


@pytest.mark.parametrize("size", [(10, 200), (200, 10), (50, 50), (7, 9), (1, 1)])
def test_centre_fallback_equals_torchvision(size):
    """With an impossible scale no try fits, so both must return torchvision's fallback box."""
    H, W = size
    plan = CropPlan(seed=0, crops_per_image=3, scale=(2.0, 3.0))
    ours = boxes_for(plan, [H], [W])[0]
    theirs = RandomResizedCrop.get_params(torch.zeros(1, H, W), [2.0, 3.0], [3 / 4, 4 / 3])
    assert all(tuple(row) == tuple(theirs) for row in ours.tolist())


def test_flips_are_fair_and_can_be_disabled():
    f = sample_flips(CropPlan(seed=2, crops_per_image=50), np.arange(400))
    assert 0.45 < f.mean() < 0.55
    assert not sample_flips(CropPlan(seed=2, crops_per_image=50, flip=False), np.arange(40)).any()


def test_counter_uniform_is_uniform_and_decorrelated():
    u = counter_uniform(0, 1, np.arange(100000), 0, 0)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_epoch_slots_random_policy_changes_across_epochs():
    a, b = epoch_slots(0, 0, 1000, 10, "random"), epoch_slots(0, 1, 1000, 10, "random")
    assert a.min() >= 0 and a.max() <= 9
    assert (a != b).mean() > 0.8
    assert np.array_equal(a, epoch_slots(0, 0, 1000, 10, "random"))
    counts = np.bincount(a, minlength=10)
    assert counts.min() > 60


def test_epoch_slots_cycle_policy_visits_every_slot_before_repeating():
    K = 7
    seen = np.stack([epoch_slots(5, e, 300, K, "cycle") for e in range(K)], axis=1)
    assert (np.sort(seen, axis=1) == np.arange(K)).all()
    nxt = np.stack([epoch_slots(5, e, 300, K, "cycle") for e in range(K, 2 * K)], axis=1)
    assert not np.array_equal(seen, nxt)  # a fresh order each cycle


@pytest.mark.parametrize("policy", ["cycle", "random"])
def test_replayed_crops_keep_a_rounds_order_yet_give_the_pure_functions_slots(policy):
    """ReplayedCrops keeps one cycle round's slot order for its K epochs (a 3 s draw at ImageNet
    size); every epoch, also across rounds and out of order, must still be epoch_slots'."""
    from refinery_pipeline.loaders.crop_sources import ReplayedCrops
    n, k = 300, 5
    crops = ReplayedCrops(np.zeros((n, k, 4), np.uint16), np.zeros((n, k), np.uint8), seed=7,
                          slot_policy=policy)
    for epoch in [0, 1, 4, 5, 12, 3, 9, 10, 0]:
        assert np.array_equal(crops.epoch_slots(epoch), epoch_slots(7, epoch, n, k, policy))
