"""Recipes in the crop plan: parameters are pure functions of (n, k), and the pixels a recipe
store was labelled on are the pixels every backend shows, byte for byte."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader

import refinery_pipeline as refinery
from refinery_pipeline.loaders.recipe_ops import POOL_MIN_SIZE, recipe_crops
from refinery_pipeline.plan.recipe import (CUTMIX, MIXUP, NO_MIX, PlanAugment, Recipe, RecipeError,
                                           magnitude_table, op_names)
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import FreshCrops

K, TOP_K, SIZE = 2, 4, 24
FULL = ("trivialaugment", "erasing:0.5", "mixup:0.4", "cutmix:1")
RECIPES = [("trivialaugment",), ("randaugment:2:9",), ("erasing:1",), ("mixup:0.4",),
           ("cutmix:1",), FULL]


# ----------------------------------------------------------------------------- the recipe

def test_recipe_names_round_trip():
    recipe = Recipe.parse(["RandAugment:3:12", "erasing:0.25", "cutmix:1.0", "mixup:0.2"])
    assert recipe.names() == ("randaugment:3:12", "erasing:0.25", "mixup:0.2", "cutmix:1")
    assert Recipe.parse(recipe.names()) == recipe
    assert Recipe.parse(["randaugment"]).names() == ("randaugment:2:9",)  # torchvision's defaults
    assert not Recipe.parse([]) and Recipe.parse(["mixup:1"]).mixes


@pytest.mark.parametrize("spec", ["autoaugment", "randaugment:2:31", "randaugment:x", "erasing:0",
                                  "erasing:1.5", "mixup:0", "mixup:-1", "cutmix:nan",
                                  "trivialaugment:3", "mixup"])
def test_bad_recipe_steps_are_one_line_errors(spec):
    with pytest.raises(RecipeError) as error:
        Recipe.parse([spec])
    assert spec in str(error.value) and "\n" not in str(error.value)


def test_a_step_given_twice_is_refused():
    with pytest.raises(RecipeError, match="twice"):
        Recipe.parse(["trivialaugment", "randaugment:2:9"])


def test_magnitudes_are_torchvisions():
    from torchvision.transforms import v2
    table = magnitude_table(Recipe(auto="randaugment"), 96)
    names = op_names()
    assert names == tuple(v2.RandAugment._AUGMENTATION_SPACE)
    rotate = v2.RandAugment._AUGMENTATION_SPACE["Rotate"][0](31, 96, 96)
    assert table[names.index("Rotate")].tolist() == [float(v) for v in rotate]
    translate = v2.RandAugment._AUGMENTATION_SPACE["TranslateX"][0](31, 96, 96)
    assert table[names.index("TranslateX"), 30] == float(translate[30])  # depends on the size


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 499), st.integers(0, 7)), min_size=1, max_size=40),
       st.integers(0, 2 ** 31))
def test_parameters_depend_only_on_their_crop(crops, seed):
    """Drawn for any subset, in any order, crop (n, k) gets the same parameters: replay cannot
    depend on batch size, workers, ranks or visiting order."""
    plan = PlanAugment(Recipe.parse(FULL), seed, 500, 8, 32)
    n, k = np.array(crops).T
    everything = plan.params(np.repeat(np.arange(500), 8), np.tile(np.arange(8), 500))
    some = plan.params(n, k)
    for field, values in some._asdict().items():
        assert np.array_equal(values, getattr(everything, field)[n * 8 + k]), field


def test_parameters_cover_the_recipe():
    """Over many crops every op is drawn, signs go both ways, erasing and both mixes happen at
    their rates, and mixing shares follow their boxes."""
    plan = PlanAugment(Recipe.parse(FULL), 3, 1000, 10, 32)
    p = plan.params(np.repeat(np.arange(1000), 10), np.tile(np.arange(10), 1000))
    assert set(p.ops[:, 0]) == set(range(len(op_names())))
    assert (p.magnitudes < 0).any() and (p.magnitudes > 0).any()
    assert 0.45 < (p.erase[:, 2] > 0).mean() < 0.55
    assert 0.45 < (p.mix == MIXUP).mean() < 0.55 and not (p.mix == NO_MIX).any()
    cut = p.mix == CUTMIX
    x1, y1, x2, y2 = p.cut_box[cut].T
    assert np.allclose(p.weight[cut], 1 - (x2 - x1) * (y2 - y1) / 32 ** 2)
    assert ((0 <= p.partner) & (p.partner < 1000)).all() and set(p.partner_slot) == set(range(10))


def test_no_recipe_draws_nothing():
    p = PlanAugment(Recipe(), 0, 10, 2, 32).params(np.arange(4), np.zeros(4))
    assert p.ops.shape == (4, 0) and not p.erase.any() and (p.weight == 1).all()


# ----------------------------------------------------------------------------- exact pixels

def store_for(recipe, labelled_store):
    """The session's store of ``recipe`` (K = 2, top-4; its mixup one is ``mixup_store``)."""
    return labelled_store(seed=5, crops_per_image=K, augment=Recipe.parse(recipe).names(),
                          top_k=TOP_K)


def replayed_pixels(store, data, batch_size, workers):
    """Every (n, slot) crop the FFCV backend shows over K epochs (cycle: each slot once)."""
    loader = refinery.replay_loader(store, data, batch_size, workers, seed=1, drop_last=False)
    shown = {}
    for epoch in range(K):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.slots.ndim == 1 and batch.images.shape[1:] == (SIZE, SIZE, 3)
            for i, n in enumerate(batch.indices.tolist()):
                shown[n, int(batch.slots[i])] = (batch.images[i].numpy().copy(),
                                                  batch.targets.indices[i].numpy().copy())
    return shown


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: "+".join(r))
def test_labels_describe_the_pixels_every_backend_shows(recipe, tiny_data, tiny_refinery_ckpt,
                                                        labelled_store):
    """The refinery (BN in eval mode: each label depends on its crop alone) relabels the crops
    the FFCV replay shows and finds the stored labels; the plain backend shows the same bytes;
    the recipe changed the pixels (so the test can fail)."""
    path = store_for(recipe, labelled_store)
    refinery_ = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")
    store = refinery.open_store(path)
    assert store.plan.augment == Recipe.parse(recipe).names()
    shown = replayed_pixels(path, tiny_data, 16, 1)
    assert len(shown) == store.layout.num_images * K
    keys = sorted(shown)
    pixels = torch.from_numpy(np.stack([shown[key][0] for key in keys]))
    records = store.read_crops()
    n, k = np.array(keys).T
    relabelled = refinery_.probabilities(pixels)
    stored_top1 = torch.from_numpy(records.topk_indices[n, k, 0].astype(np.int64))
    # the stored top class is the relabelled one, up to float16 rounding of near-ties
    assert (relabelled.max(1).values - relabelled.gather(1, stored_top1[:, None])[:, 0]
            ).max() < 2e-3
    top = relabelled.topk(TOP_K, 1)
    assert np.allclose(top.values.numpy(), records.topk_probs[n, k].astype(np.float32),
                       atol=2e-3)
    plain = refinery.StoreCropDataset(path, tiny_data)
    plain_only = refinery.StoreCropDataset(path, tiny_data)
    plain_only.recipe = None
    changed = 0
    for key in keys:
        assert np.array_equal(plain.crop(*key), shown[key][0]), key
        changed += not np.array_equal(plain_only.crop(*key), shown[key][0])
    assert changed > len(keys) // 4


@pytest.mark.slow
def test_replay_is_independent_of_batch_size_and_workers(tiny_data, labelled_store):
    path = store_for(FULL, labelled_store)
    first = replayed_pixels(path, tiny_data, 16, 1)
    second = replayed_pixels(path, tiny_data, 7, 2)
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key][0], second[key][0]) and \
            np.array_equal(first[key][1], second[key][1]), key
    dataset = refinery.StoreCropDataset(path, tiny_data, seed=1)
    loader = DataLoader(dataset, batch_size=5, num_workers=2,
                        collate_fn=refinery.CropCollate(), persistent_workers=True)
    for epoch in range(K):
        dataset.set_epoch(epoch)
        for batch in loader:
            for i, n in enumerate(batch.indices.tolist()):
                image = batch.images[i].permute(1, 2, 0).numpy()
                assert np.array_equal(image, first[n, int(batch.slots[i])][0])


def test_fresh_crops_with_a_mixing_recipe_carry_mixed_ground_truth(tiny_dataset):
    """Ground-truth training with the recipe: fresh parameters each epoch, the same whatever
    the batch size, and each batch says whose classes are mixed in which shares."""
    recipe = Recipe.parse(FULL)

    def epoch_crops(batch_size, epoch):
        crops = FreshCrops(CropPlan(seed=2), tiny_dataset.heights, tiny_dataset.widths, recipe,
                           tiny_dataset.labels, SIZE)
        loader = make_loader(tiny_dataset, crops, (SIZE, SIZE), batch_size, 1, seed=4,
                             drop_last=False)
        loader.next_epoch = epoch
        out = {}
        for batch in loader:
            assert batch.mix is not None and batch.slots.ndim == 1
            for i, n in enumerate(batch.indices.tolist()):
                out[n] = (batch.images[i].numpy().copy(), float(batch.mix.weights[i]),
                          int(batch.mix.partner_labels[i]))
        return out

    a, b, other_epoch = epoch_crops(16, 0), epoch_crops(9, 0), epoch_crops(16, 1)
    assert a.keys() == b.keys() == set(range(tiny_dataset.num_images))
    assert all(np.array_equal(a[n][0], b[n][0]) and a[n][1:] == b[n][1:] for n in a)
    assert sum(not np.array_equal(a[n][0], other_epoch[n][0]) for n in a) > len(a) // 2
    weights = np.array([a[n][1] for n in a])
    assert ((0 <= weights) & (weights <= 1)).all() and (weights < 1).any()


def test_ground_truth_targets_mix_one_hot_labels():
    from refinery_pipeline.loaders.crop_batch import CropBatch, MixedLabels
    from refinery_pipeline.training.targets import GroundTruthTargets
    batch = CropBatch(None, torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([-1, -1]),
                      mix=MixedLabels(torch.tensor([1, 2]), torch.tensor([0.25, 0.5])))
    target = GroundTruthTargets(3)(batch, None)
    assert torch.allclose(target, torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]))


def test_show_draws_the_crops_as_labelled(tiny_data, labelled_store):
    """`refine show` of a recipe store shows the recipe's pixels, the ones the labels describe."""
    from refinery_pipeline.labelling.shown_crops import sample_stored_crops
    path = store_for(FULL, labelled_store)
    shown = sample_stored_crops(open_dataset(tiny_data), path, num_images=4, seed=2,
                                num_workers=1)
    plain = refinery.StoreCropDataset(path, tiny_data)
    for row, n in enumerate(shown.images):
        for k in range(K):
            assert np.array_equal(shown.pixels[row, k], plain.crop(int(n), k)), (n, k)


# ----------------------------------------------------------------------------- refine train

def train_args(tiny_data, out, *options):
    return ["train", str(tiny_data), "--arch", "demo_cnn", "--epochs", "1", "--batch-size", "32",
            "--workers", "1", "--out", str(out), *options]


def test_train_replays_a_recipe_store_and_refuses_another_recipe(tiny_data, labelled_store,
                                                                 tmp_path, monkeypatch):
    from .conftest import uncompile_loaders
    from .test_cli import assert_one_line_error, run
    uncompile_loaders(monkeypatch)  # training is the subject: same bytes, a tenth of the CPU
    path = store_for(FULL, labelled_store)
    run(*train_args(tiny_data, tmp_path / "cached", "--labels", path))
    assert (tmp_path / "cached" / "model.pt").is_file()
    same = [a for step in Recipe.parse(FULL).names() for a in ("--augment", step)]
    run(*train_args(tiny_data, tmp_path / "same", "--labels", path, *same))
    refused = run(*train_args(tiny_data, tmp_path / "other", "--labels", path, "--augment",
                              "cutmix:1"), ok=False)
    assert_one_line_error(refused, "its labels were computed with the recipe", "omit --augment")
    assert not (tmp_path / "other").exists()


def test_online_refinery_labels_fresh_recipe_crops(tiny_data, tiny_refinery_ckpt, tmp_path,
                                                   monkeypatch):
    from .conftest import uncompile_loaders
    from .test_cli import run
    uncompile_loaders(monkeypatch)  # training is the subject: same bytes, a tenth of the CPU
    out = tmp_path / "online"
    run(*train_args(tiny_data, out, "--teacher", tiny_refinery_ckpt, "--augment",
                    "trivialaugment", "--augment", "cutmix:1"))
    assert (out / "model.pt").is_file()


def test_threads_change_no_byte():
    """The recipe split over threads (as wide as the loader's workers) gives the same crops."""
    plan = PlanAugment(Recipe.parse(FULL), 1, 200, 4, POOL_MIN_SIZE)  # the pool runs from here
    ids = np.arange(64)
    own = torch.randint(0, 256, (64, POOL_MIN_SIZE, POOL_MIN_SIZE, 3), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    params = plan.pair_params(ids, ids % 4)
    alone = recipe_crops(own, own.flip(0), params)
    assert torch.equal(recipe_crops(own, own.flip(0), params, threads=3), alone)
    assert not torch.equal(alone, own)


def test_a_partial_mixing_store_is_refused_for_allow_partial(tiny_data, tiny_refinery_ckpt,
                                                            tmp_path):
    """Partners may lie in unfinished chunks, whose boxes were never written: refuse."""
    from .test_cli import assert_one_line_error, run
    path = tmp_path / "partial.zarr"
    precompute(open_dataset(tiny_data), path,
               Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=5, crops_per_image=2, augment=("mixup:0.4",)), top_k=TOP_K,
               crop_batch=32, chunk_size=32, progress=False, num_workers=1, only_chunks=[0])
    refused = run(*train_args(tiny_data, tmp_path / "run", "--labels", path, "--allow-partial"),
                  ok=False)
    assert_one_line_error(refused, "may lie in an unfinished chunk", "finish the store")
