"""FFCV's pipelines run uncompiled (``Compiler.is_enabled`` False) give the bytes they give
compiled: labels, replayed crops with a mixing recipe, fresh crops and the evaluation's centred
crops. This is what lets the training, CLI and refusal tests run their loaders uncompiled
(tests/conftest.py ``uncompiled_loaders``), ten times cheaper, while the loader's own tests run
them compiled."""
import numpy as np
import pytest
from ffcv.pipeline.compiler import Compiler

import refinery_pipeline as refinery
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import FixedCrops, FreshCrops
from refinery_pipeline.plan.recipe import Recipe
from refinery_pipeline.plan.crop_plan import CropPlan

FULL = ("trivialaugment", "erasing:0.5", "mixup:0.4", "cutmix:1")


def run_as(compiled: bool, make):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Compiler, "is_enabled", compiled)
        return make()


def both_ways(make):
    """``make()`` run compiled, then uncompiled."""
    return [run_as(True, make), run_as(False, make)]


def copied(tensor):
    return None if tensor is None else tensor.numpy().copy()


def batches(loader, epochs=1):
    """Every batch of ``epochs`` epochs: pixels, images, slots and mixing partners and shares."""
    out = []
    for epoch in range(epochs):
        loader.next_epoch = epoch
        for batch in loader:
            mix = batch.mix
            out.append({"images": copied(batch.images), "indices": copied(batch.indices),
                        "slots": copied(batch.slots),
                        "mix": None if mix is None else (copied(mix.partner_labels),
                                                         copied(mix.weights))})
    return out


def assert_same(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        for key in x:
            pairs = zip(x[key], y[key]) if isinstance(x[key], tuple) else [(x[key], y[key])]
            assert all(np.array_equal(u, v) for u, v in pairs), key


@pytest.fixture(scope="module")
def stores(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    """A mixing-recipe store labelled compiled on 2 decoding threads and one labelled uncompiled
    on 1 (train-mode BN: each label depends on its batch, so the batches must match too)."""
    from refinery_pipeline.sources.data_cache import open_dataset
    root = tmp_path_factory.mktemp("both")

    def label(name, workers):
        def make():
            path = root / name
            precompute(open_dataset(tiny_data), path, Refinery.from_checkpoint(tiny_refinery_ckpt),
                       CropPlan(seed=5, crops_per_image=2, augment=FULL), top_k=4,
                       crop_batch=32, chunk_size=32, progress=False, num_workers=workers)
            return path
        return make

    return (run_as(True, label("compiled.zarr", 2)),
            run_as(False, label("uncompiled.zarr", 1)))


def test_labels_are_the_same_bytes(stores):
    compiled, uncompiled = stores
    files = sorted(p.relative_to(compiled) for p in compiled.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(uncompiled) for p in uncompiled.rglob("*")
                           if p.is_file())
    for f in files:
        assert (compiled / f).read_bytes() == (uncompiled / f).read_bytes(), f


@pytest.mark.parametrize("workers", [1, 2])
def test_replayed_crops_are_the_same(stores, tiny_data, workers):
    assert_same(*both_ways(lambda: batches(refinery.replay_loader(
        stores[0], tiny_data, 16, workers, seed=1, drop_last=False), epochs=2)))


def test_fresh_and_centred_crops_are_the_same(tiny_dataset):
    recipe, workers = Recipe.parse(FULL), 1
    assert_same(*both_ways(lambda: batches(make_loader(
        tiny_dataset, FreshCrops(CropPlan(seed=2), tiny_dataset.heights, tiny_dataset.widths,
                                 recipe, tiny_dataset.labels, 24),
        (24, 24), 16, workers, seed=4, drop_last=False))))
    assert_same(*both_ways(lambda: batches(make_loader(
        tiny_dataset, FixedCrops(tiny_dataset.heights, tiny_dataset.widths), (24, 24), 32,
        workers, train=False))))
