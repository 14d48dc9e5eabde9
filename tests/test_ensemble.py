"""Ensemble refineries (``--weights A --weights B``): labels are the mean of the members'
probabilities, the store records every member, audit checks them member by member."""
import json

import numpy as np
import pytest
import torch

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.checkpoints import file_sha256, load_trained_model, save_checkpoint
from refinery_pipeline.labelling.refinery import (ENSEMBLE, EnsembleRefinery, Refinery,
                                                  ensemble_sha256, load_refinery)
from refinery_pipeline.paper.synthetic import SHAPES

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

PRECOMPUTE = ("-K", 2, "--top-k", 3, "--batch-size", 32, "--chunk-size", 32, "--prob-bits", 0,
              "--workers", 1)


def perturbed_copy(ckpt, path, seed: int, input_size: int = 24):
    """Another refinery: ``ckpt``'s weights with seeded noise (a different labeller, same
    architecture and classes), saved as `refine train` saves."""
    model, _ = load_trained_model(ckpt)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
    save_checkpoint(path, model, "demo_cnn", SHAPES, input_size)
    return path


@pytest.fixture(scope="module")
def second(tiny_refinery_ckpt, tmp_path_factory):
    return perturbed_copy(tiny_refinery_ckpt, tmp_path_factory.mktemp("b") / "b.pt", seed=1)


@pytest.fixture(scope="module")
def third(tiny_refinery_ckpt, tmp_path_factory):
    return perturbed_copy(tiny_refinery_ckpt, tmp_path_factory.mktemp("c") / "c.pt", seed=2)


@pytest.fixture(scope="module")
def ensemble_store(tiny_data, tiny_refinery_ckpt, second, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "ensemble.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "--weights", second,
        "--bn-mode", "eval", *PRECOMPUTE)
    return path


def files_under(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_ensemble_is_the_mean_of_its_members_on_the_same_crops(tiny_refinery_ckpt, second):
    a, b = (Refinery.from_checkpoint(w, bn_mode="eval") for w in (tiny_refinery_ckpt, second))
    both = load_refinery([tiny_refinery_ckpt, second], bn_mode="eval")
    assert isinstance(both, EnsembleRefinery) and both.input_size == 24
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 24, 24, 3),
                                                               dtype=np.uint8))
    pa, pb = a.probabilities(crops), b.probabilities(crops)
    assert (pa - pb).abs().max() > 0.05, "the members must label differently for this to test"
    torch.testing.assert_close(both.probabilities(crops), (pa + pb) / 2)
    idx, _ = both.top_k(crops, 3)
    assert np.array_equal(idx, ((pa + pb) / 2).topk(3, dim=1).indices.numpy())


def test_train_mode_members_see_the_same_forward_batch(tiny_refinery_ckpt, second):
    """Batch statistics per member over the very crops given: labels reproduce."""
    both = load_refinery([tiny_refinery_ckpt, second], bn_mode="train")
    crops = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (12, 24, 24, 3),
                                                               dtype=np.uint8))
    alone = [Refinery.from_checkpoint(w, bn_mode="train").probabilities(crops)
             for w in (tiny_refinery_ckpt, second)]
    torch.testing.assert_close(both.probabilities(crops), sum(alone) / 2)
    torch.testing.assert_close(both.probabilities(crops), both.probabilities(crops), rtol=0,
                               atol=0)


def test_the_store_holds_the_mean_labels_of_the_stored_crops(ensemble_store, tiny_dataset,
                                                             tiny_refinery_ckpt, second):
    from refinery_pipeline.labelling.shown_crops import sample_stored_crops
    sample = sample_stored_crops(tiny_dataset, ensemble_store, num_images=12, seed=0,
                                 num_workers=1)
    crops = torch.from_numpy(sample.pixels.reshape((-1,) + sample.pixels.shape[2:]))
    a, b = (Refinery.from_checkpoint(w, bn_mode="eval") for w in (tiny_refinery_ckpt, second))
    mean = (a.probabilities(crops) + b.probabilities(crops)) / 2
    values, indices = mean.topk(3, dim=1)
    K = sample.pixels.shape[1]
    assert np.array_equal(sample.topk_indices, indices.numpy().reshape(-1, K, 3))
    np.testing.assert_allclose(sample.topk_probs, values.numpy().reshape(-1, K, 3), atol=1e-3)
    # and not one member's labels alone
    assert not np.allclose(sample.topk_probs, a.probabilities(crops).topk(3).values.numpy()
                           .reshape(-1, K, 3), atol=1e-2)


def test_the_store_records_every_member_in_order(ensemble_store, tiny_refinery_ckpt, second):
    store = LabelStore.open(ensemble_store)
    recorded = store.attrs["refinery"]
    members = [Refinery.from_checkpoint(w, bn_mode="eval").describe()
               for w in (tiny_refinery_ckpt, second)]
    assert recorded["members"] == members
    assert [m["weights_sha256"] for m in recorded["members"]] == \
        [file_sha256(tiny_refinery_ckpt), file_sha256(second)]
    assert recorded["arch"] == ENSEMBLE and store.refinery.arch == ENSEMBLE
    assert recorded["weights_sha256"] == ensemble_sha256(m["weights_sha256"] for m in members)
    assert recorded["weights_sha256"] != ensemble_sha256(m["weights_sha256"] for m in members[::-1])
    assert (recorded["bn_mode"], recorded["temperature"], recorded["input_size"]) == \
        ("eval", 1.0, 24)
    assert recorded["normalization"] == members[0]["normalization"]
    assert store.refinery.members == members and store.refinery.input_size == 24
    summary = run("inspect", ensemble_store, "--json").output
    assert json.loads(summary)["refinery"]["members"] == members


def test_audit_with_the_members_agrees_exactly(ensemble_store, tiny_data, tiny_refinery_ckpt,
                                               second):
    out = run("audit", ensemble_store, tiny_data, "--weights", tiny_refinery_ckpt, "--weights",
              second, "--workers", 1).output
    assert "top-1 agreement 100.000%" in out and "max 0.00e+00" in out, out


@pytest.mark.parametrize("case", ["missing", "other file", "extra", "order"])
def test_audit_with_other_members_is_refused_naming_which(case, ensemble_store, tiny_data,
                                                          tiny_refinery_ckpt, second, third):
    weights = {"missing": [tiny_refinery_ckpt], "other file": [tiny_refinery_ckpt, third],
               "extra": [tiny_refinery_ckpt, second, third],
               "order": [second, tiny_refinery_ckpt]}[case]
    expected = {"missing": f"member 2 (SHA-256 {file_sha256(second)[:16]}...) is missing",
                "other file": f"member 2 ({third}) differs in ['weights_sha256']",
                "extra": f"member 3 ({third}) is extra",
                "order": "the members are the recorded ones in another order"}[case]
    before = files_under(ensemble_store)
    args = [a for w in weights for a in ("--weights", w)]
    result = run("audit", ensemble_store, tiny_data, *args, "--workers", 1, ok=False)
    assert_one_line_error(result, "refinery differs from the one that wrote the store", expected,
                          "one --weights per member in the recorded order",
                          file_sha256(tiny_refinery_ckpt)[:16])
    assert files_under(ensemble_store) == before


def test_a_single_refinery_store_audited_as_an_ensemble_is_refused(tiny_data, tiny_refinery_ckpt,
                                                                   second, tmp_path):
    path = tmp_path / "single.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, *PRECOMPUTE)
    result = run("audit", path, tiny_data, "--weights", tiny_refinery_ckpt, "--weights", second,
                 ok=False)
    assert_one_line_error(result, "(one refinery; given an ensemble of 2)",
                          f"member 2 ({second}) is extra")


def test_a_single_weights_store_records_the_refinery_as_before(tiny_data, tiny_refinery_ckpt,
                                                                tmp_path):
    """Stores written before ensembles must still match their refinery: same keys, same values."""
    path = tmp_path / "single.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, *PRECOMPUTE)
    recorded = LabelStore.open(path).attrs["refinery"]
    plain = Refinery.from_checkpoint(tiny_refinery_ckpt)
    assert recorded == plain.describe()
    assert set(recorded) == {"arch", "weights_sha256", "bn_mode", "temperature", "input_size",
                             "normalization"}
    assert recorded["weights_sha256"] == file_sha256(tiny_refinery_ckpt)
    assert type(load_refinery(tiny_refinery_ckpt)) is Refinery
    assert type(load_refinery([tiny_refinery_ckpt])) is Refinery


def test_members_of_other_input_sizes_are_one_line_until_a_size_is_given(tiny_data,
                                                                         tiny_refinery_ckpt,
                                                                         tmp_path):
    bigger = perturbed_copy(tiny_refinery_ckpt, tmp_path / "big.pt", seed=3, input_size=32)
    path = tmp_path / "s.zarr"
    result = run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "--weights",
                 bigger, *PRECOMPUTE, ok=False)
    assert_one_line_error(result, f"{bigger}: records input size 32 px",
                          f"{tiny_refinery_ckpt} records 24 px", "--input-size N")
    assert not path.exists()
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "--weights", bigger,
        "--input-size", 24, *PRECOMPUTE)
    assert LabelStore.open(path).refinery.input_size == 24


def test_an_arch_count_that_fits_no_member_count_is_one_line(tiny_data, tiny_refinery_ckpt,
                                                              second, third, tmp_path):
    path = tmp_path / "s.zarr"
    weights = [a for w in (tiny_refinery_ckpt, second, third) for a in ("--weights", w)]
    result = run("precompute", tiny_data, path, *weights, "--refinery", "demo_cnn",
                 "--refinery", "demo_cnn", ok=False)
    assert_one_line_error(result, "--refinery: given 2 times for 3 --weights",
                          "once per --weights")
    assert not path.exists()


def test_one_arch_applies_to_every_member(tiny_data, tiny_refinery_ckpt, second):
    both = load_refinery([tiny_refinery_ckpt, second], "demo_cnn")
    also = load_refinery([tiny_refinery_ckpt, second], ["demo_cnn", "demo_cnn"])
    assert both.describe() == also.describe()


def test_an_online_ensemble_teacher_trains_and_is_recorded(tiny_data, tiny_refinery_ckpt, second,
                                                           tmp_path):
    common = ("--arch", "demo_cnn", "--epochs", 1, "--batch-size", 32, "--workers", 1,
              "--warmup-epochs", 0)
    out = tmp_path / "run"
    run("train", tiny_data, "--teacher", tiny_refinery_ckpt, "--teacher", second, "--out", out,
        *common)
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"] == [str(tiny_refinery_ckpt), str(second)]
    assert config["res"] == 24
    single = tmp_path / "single"
    run("train", tiny_data, "--teacher", tiny_refinery_ckpt, "--out", single, *common)
    # one teacher stays a plain path, as in runs from before ensembles (so they resume)
    assert json.loads((single / "config.json").read_text())["teacher"] == str(tiny_refinery_ckpt)


def test_teachers_of_other_input_sizes_are_one_line(tiny_data, tiny_refinery_ckpt, tmp_path):
    bigger = perturbed_copy(tiny_refinery_ckpt, tmp_path / "big.pt", seed=3, input_size=32)
    out = tmp_path / "run"
    result = run("train", tiny_data, "--teacher", tiny_refinery_ckpt, "--teacher", bigger,
                 "--arch", "demo_cnn", "--epochs", 1, "--batch-size", 32, "--workers", 1,
                 "--out", out, ok=False)
    assert_one_line_error(result, f"{bigger}: records input size 32 px", "--res N")
    assert not (out / "model.pt").exists()
