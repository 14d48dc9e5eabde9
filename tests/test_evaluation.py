"""`refine evaluate`: a model's accuracy on the centred images of either split (the paper's
train/validation gap), computed exactly as `refine train` evaluates validation."""
import json
import shutil

import numpy as np
import pytest

from refinery_pipeline.sources.dataset import ImageDataset
from refinery_pipeline.training.evaluation import evaluate_checkpoint

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


def test_validation_matches_what_training_logged(tiny_refinery_ckpt, tiny_data):
    """The run evaluated validation at its last epoch with these weights: the same number."""
    run_dir = tiny_refinery_ckpt.parent
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    result = run("evaluate", run_dir)
    saved = json.loads((run_dir / "eval_val.json").read_text())
    assert np.isclose(saved["val_top1"], logged["val_top1"])
    assert saved["val_per_class"] == logged["val_per_class"]
    assert f"val top-1 {logged['val_top1']:.2f}" in result.output


def test_the_train_split_evaluates_the_training_images(tiny_refinery_ckpt, tiny_data):
    metrics = evaluate_checkpoint(tiny_refinery_ckpt, tiny_data, "train", num_workers=1)
    assert metrics["images"] == ImageDataset(tiny_data).num_images == 96
    assert len(metrics["train_per_class"]) == 10 and 0 <= metrics["train_top1"] <= 100
    run("evaluate", tiny_refinery_ckpt.parent, "--split", "train", "--workers", 1)
    saved = json.loads((tiny_refinery_ckpt.parent / "eval_train.json").read_text())
    assert np.isclose(saved["train_top1"], metrics["train_top1"])


def test_a_checkpoint_file_needs_its_data(tiny_refinery_ckpt, tiny_data, tmp_path):
    assert_one_line_error(run("evaluate", tiny_refinery_ckpt, ok=False), "pass DATA")
    run("evaluate", tiny_refinery_ckpt, tiny_data, "--workers", 1)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert_one_line_error(run("evaluate", unfinished, ok=False), "holds no model.pt")


def test_plot_gap_draws_evaluated_runs_and_names_the_missing_step(tiny_refinery_ckpt,
                                                                   tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "config.json", "model.pt"):
        shutil.copy(tiny_refinery_ckpt.parent / name, run_dir / name)
    missing = run("plot", run_dir, "--gap", "--out", tmp_path / "none.png", ok=False)
    assert_one_line_error(missing, "eval_train.json", f"refine evaluate {run_dir} --split train")
    run("evaluate", run_dir, "--split", "train", "--workers", 1)
    run("evaluate", run_dir, "--workers", 1)
    out = tmp_path / "gap.png"
    result = run("plot", run_dir, run_dir, "--name", "a", "--name", "b", "--gap", "--out", out)
    assert out.stat().st_size > 10_000 and str(out) in result.output


def test_show_compare_labels_the_same_crops_by_every_store(tiny_data, tiny_dataset,
                                                           tiny_refinery_ckpt, tmp_path):
    """Figs. 7-8: the crops of STORE with each store's labels of them; stores of other crops
    (another plan) are refused in one line."""
    from refinery_pipeline.labelling.shown_crops import compared_labels, sample_stored_crops
    from refinery_pipeline.store.label_store import LabelStore
    stores = {}
    for name, options in (("train_bn", ()), ("eval_bn", ("--bn-mode", "eval")),
                          ("other_seed", ("--seed", 3))):
        stores[name] = tmp_path / f"{name}.zarr"
        run("precompute", tiny_data, stores[name], "--weights", tiny_refinery_ckpt, "-K", 2,
            "--top-k", 3, "--chunk-size", 32, "--workers", 1, *options)
    out = tmp_path / "compare.png"
    result = run("show", stores["train_bn"], tiny_data, "--compare", stores["eval_bn"],
                 "--name", "BN train", "--name", "BN eval", "--images", 2, "--crops", 2,
                 "--out", out, "--workers", 1)
    assert out.read_bytes()[:4] == b"\x89PNG" and "2 images x 2 crops" in result.output
    sample = sample_stored_crops(tiny_dataset, stores["train_bn"], num_images=3, num_workers=1)
    indices, _ = compared_labels(stores["eval_bn"], sample, stores["train_bn"])
    assert np.array_equal(indices, LabelStore.open(stores["eval_bn"]).read_crops(
        sample.images).topk_indices)
    refused = run("show", stores["train_bn"], tiny_data, "--compare", stores["other_seed"],
                  "--out", tmp_path / "no.png", ok=False)
    assert_one_line_error(refused, "its plan differs", "same --seed and -K")
    assert not (tmp_path / "no.png").exists()
