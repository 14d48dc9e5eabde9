"""Options a mode ignores are refused before anything is read or written (one table,
``option_relevance.OPTION_USES``), and schedules with too few steps per epoch, or a warm-up
longer than the run, warn in one line with the numbers and the fix."""
import dataclasses
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinery_pipeline.sources.dataset import BetonOptions
from refinery_pipeline.core.errors import ArgumentError, RefineryWarning
from refinery_pipeline.core.option_relevance import OPTION_USES, check_options_used
from refinery_pipeline.training.schedule import (MIN_STEPS_PER_EPOCH, few_steps_problem,
                                                 warmup_problem)
from refinery_pipeline.training.train import fit
from refinery_pipeline.training.config import TrainConfig

from .test_cli import assert_one_line_error, make_tree, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

STORE, TEACHER = "labels.zarr", "refinery.pt"

# Settings every mode of `refine train` uses: each TrainConfig field is here or in the table.
EVERY_MODE = {"data", "out_dir", "arch", "epochs", "batch_size", "lr", "momentum", "nesterov",
              "weight_decay", "warmup_epochs", "lr_scheduler", "init", "teacher", "augment",
              "loss", "precise_bn", "res", "workers", "seed", "eval_every", "device",
              "channels_last", "compile", "resume", "cache_dir", "progress",
              "trust_checkpoint",  # how any checkpoint a run loads (init, resume) is read
              "max_resolution",  # how a DATA tree converts (refused for a .beton by itself)
              "val",  # the validation data, where DATA has no split of its own
              "source_options"}  # how DATA's kind of source is read (--label-column, ...)


def row_id(row) -> str:
    return f"{row.command} {row.option}" + (f" {row.value}" if row.value is not None else "")


TRAIN_ROWS = [row for row in OPTION_USES if row.command == "train"]

# For each row of the table: settings where the option would be ignored, and where it is used.
IGNORED = {
    "train --label-mode category-wordnet": dict(label_mode="category-wordnet", labels=STORE),
    "train --label-mode category-visual": dict(label_mode="category-visual"),
    "train --label-mode static": dict(label_mode="static", labels=STORE, teacher=TEACHER,
                                      teacher_crops="replay"),
    "train --label-mode hard": dict(label_mode="hard"),
    "train --labels": dict(labels=STORE, teacher=TEACHER),
    "train --teacher-crops replay": dict(teacher=TEACHER, teacher_crops="replay"),
    "train --teacher-bn": dict(labels=STORE, teacher_bn="eval"),
    "train --teacher-arch": dict(labels=STORE, teacher_arch="resnet18"),
    "train --adversarial-eta": dict(labels=STORE, adversarial_eta=1.0),
    "train --adversarial-bn": dict(teacher=TEACHER, adversarial_bn="shared"),
    "train --label-smoothing": dict(labels=STORE, label_smoothing=0.1),
    "train --rest": dict(teacher=TEACHER, rest="uniform"),
    "train --wordnet-temperature": dict(labels=STORE, wordnet_temperature=0.5),
    "train --slot-policy": dict(slot_policy="random"),
    "train --allow-partial": dict(allow_partial=True),
    "train --allow-missing": dict(allow_missing=True),
    "train --skip-store-check": dict(skip_store_check=True),
    "train --lr-step-size": dict(lr_step_size=5),
    "train --lr-gamma": dict(lr_scheduler="cosine", lr_gamma=0.5),
    "train --lr-milestones": dict(lr_milestones=(3,)),
}
USED = {
    "train --label-mode category-wordnet": dict(label_mode="category-wordnet"),
    "train --label-mode category-visual": dict(label_mode="category-visual", labels=STORE),
    "train --label-mode static": dict(label_mode="static", labels=STORE),
    "train --label-mode hard": dict(label_mode="hard", teacher=TEACHER),
    "train --labels": dict(labels=STORE, teacher=TEACHER, teacher_crops="replay"),
    "train --teacher-crops replay": dict(labels=STORE, teacher=TEACHER, teacher_crops="replay"),
    "train --teacher-bn": dict(teacher=TEACHER, teacher_bn="eval"),
    "train --teacher-arch": dict(teacher=TEACHER, teacher_arch="resnet18"),
    "train --adversarial-eta": dict(teacher=TEACHER, adversarial_eta=1.0),
    "train --adversarial-bn": dict(teacher=TEACHER, adversarial_eta=1.0, adversarial_bn="shared"),
    "train --label-smoothing": dict(label_smoothing=0.1),
    "train --rest": dict(labels=STORE, label_mode="static", rest="uniform"),
    "train --wordnet-temperature": dict(label_mode="category-wordnet", wordnet_temperature=0.5),
    "train --slot-policy": dict(labels=STORE, slot_policy="random"),
    "train --allow-partial": dict(labels=STORE, allow_partial=True),
    "train --allow-missing": dict(labels=STORE, allow_missing=True),
    "train --skip-store-check": dict(labels=STORE, skip_store_check=True),
    "train --lr-step-size": dict(lr_scheduler="step", lr_step_size=5),
    "train --lr-gamma": dict(lr_scheduler="multistep", lr_milestones=(3,), lr_gamma=0.5),
    "train --lr-milestones": dict(lr_scheduler="multistep", lr_milestones=(3,)),
}


def config(**kw) -> TrainConfig:
    return TrainConfig(data="DATA", out_dir="OUT", **kw)


def test_every_train_setting_is_in_the_table_or_used_by_every_mode():
    """A new TrainConfig field must say which modes use it (a row) or that all do."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    in_table = {row.field for row in TRAIN_ROWS}
    assert fields == in_table | EVERY_MODE and not in_table & EVERY_MODE


def test_every_row_has_a_case_where_it_is_ignored_and_one_where_it_is_used():
    ids = {row_id(row) for row in TRAIN_ROWS}
    assert ids == set(IGNORED) == set(USED)


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=row_id)
def test_an_ignored_option_is_refused_naming_it_and_the_fix(row, tmp_path):
    """fit() refuses before it reads the data (here absent) or creates the run directory."""
    out = tmp_path / "run"
    cfg = dataclasses.replace(config(**IGNORED[row_id(row)]), data=str(tmp_path / "absent"),
                              out_dir=str(out))
    with pytest.raises(ArgumentError) as refused:
        fit(cfg)
    message = str(refused.value)
    assert message.startswith(row.option) and row.fix in message and "\n" not in message
    assert not out.exists()


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=row_id)
def test_an_option_its_mode_uses_is_accepted(row):
    check_options_used("train", config(**USED[row_id(row)]))


@settings(max_examples=40, deadline=None)
@given(smoothing=st.floats(min_value=1e-6, max_value=0.999),
       source=st.sampled_from([dict(labels=STORE), dict(teacher=TEACHER),
                               dict(label_mode="category-wordnet")]))
def test_any_label_smoothing_is_refused_unless_the_targets_are_ground_truth(smoothing, source):
    with pytest.raises(ArgumentError, match="--label-smoothing"):
        check_options_used("train", config(label_smoothing=smoothing, **source))
    check_options_used("train", config(label_smoothing=smoothing))


@settings(max_examples=30, deadline=None)
@given(step_size=st.integers(min_value=1, max_value=500).filter(lambda n: n != 30),
       scheduler=st.sampled_from(["linear", "cosine", "multistep"]))
def test_any_step_size_is_refused_unless_the_scheduler_steps(step_size, scheduler):
    milestones = (1,) if scheduler == "multistep" else ()
    with pytest.raises(ArgumentError, match="only the step scheduler"):
        check_options_used("train", config(lr_scheduler=scheduler, lr_step_size=step_size,
                                           lr_milestones=milestones))
    check_options_used("train", config(lr_scheduler="step", lr_step_size=step_size))


def test_the_cli_refuses_label_smoothing_with_a_store_and_writes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny_data, "--labels", tmp_path / "labels.zarr", "--label-smoothing",
                 0.1, "--out", out, ok=False)
    assert_one_line_error(result, "--label-smoothing 0.1", "only ground-truth targets",
                          "--labels none")
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing read or converted


def test_convert_refuses_a_jpeg_quality_for_raw_pixels(tmp_path):
    make_tree(tmp_path / "tree", per_class=1)
    out = tmp_path / "betons"
    result = run("convert", tmp_path / "tree", out, "--write-mode", "raw", "--jpeg-quality", 50,
                 ok=False)
    assert_one_line_error(result, "--jpeg-quality 50", "--write-mode jpg")
    assert not out.exists()
    check_options_used("convert", BetonOptions(jpeg_quality=50))  # JPEG: used


def test_show_refuses_names_without_a_comparison(tiny_data, tmp_path):
    result = run("show", tmp_path / "labels.zarr", tiny_data, "--name", "mine", "--out",
                 tmp_path / "crops.png", ok=False)
    assert_one_line_error(result, "--name mine", "--compare")
    assert not (tmp_path / "crops.png").exists()


# ----------------------------------------------------------------------------- the schedule

@settings(max_examples=200, deadline=None)
@given(images=st.integers(1, 100_000), world=st.integers(1, 16), batch=st.integers(1, 4096),
       lr=st.floats(1e-4, 10), epochs=st.integers(1, 400))
def test_too_few_steps_warn_with_a_batch_that_gives_enough_and_the_scaled_lr(images, world,
                                                                             batch, lr, epochs):
    per_rank = -(-images // world)
    problem = few_steps_problem(images, world, batch, lr, epochs)
    if per_rank // batch >= MIN_STEPS_PER_EPOCH:
        assert problem is None
        return
    assert f"--batch-size {batch} on {images} training images" in problem
    suggested = int(problem.split("pass --batch-size ")[1].split()[0])
    if per_rank >= MIN_STEPS_PER_EPOCH:  # a batch of >= 1 image can give enough steps
        assert per_rank // suggested >= MIN_STEPS_PER_EPOCH
    scaled = float(problem.split(" and --lr ")[1].split()[0])
    assert scaled == pytest.approx(lr * suggested / batch, rel=1e-2)


def test_the_measured_threshold():
    """4 steps per epoch ended at chance, 8 trained (benchmarks/results/steps_per_epoch_cpu.md);
    the tests' tiny runs (96 images in batches of 16: 6 steps) are toys, and do warn."""
    assert few_steps_problem(500, 1, 125, 0.2, 16) and few_steps_problem(96, 1, 16, 0.4, 2)
    assert few_steps_problem(500, 1, 62, 0.1, 16) is None


@settings(max_examples=100, deadline=None)
@given(warmup=st.floats(0, 1000), epochs=st.integers(1, 400))
def test_a_warmup_longer_than_the_run_warns(warmup, epochs):
    problem = warmup_problem(warmup, epochs)
    assert (problem is not None) == (warmup > epochs)
    if problem:
        assert f"--warmup-epochs {warmup:g} is longer than the run (--epochs {epochs})" in problem
        assert float(problem.split("pass --warmup-epochs ")[1].split()[0]) <= epochs


def test_the_defaults_on_a_small_data_set_warn_in_one_line_each(tiny_data, tmp_path):
    """96 images in batches of 64 with the default warm-up of 2 epochs in a 1-epoch run: both
    warnings, each one line with the numbers and the fix; the run itself goes ahead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("train", tiny_data, "--arch", "demo_cnn", "--epochs", 1, "--batch-size", 64,
                     "--res", 24, "--workers", 1, "--out", tmp_path / "run")
    shown = [str(w.message) for w in caught if issubclass(w.category, RefineryWarning)]
    steps = [m for m in shown if m.startswith("--batch-size 64 on 96 training images is 1 SGD "
                                               "step per epoch")]
    warm = [m for m in shown if m.startswith("--warmup-epochs 2 is longer than the run")]
    assert len(steps) == 1 and "pass --batch-size 12 (8 steps per epoch) and --lr 0.075" in steps[0]
    assert len(warm) == 1 and "pass --warmup-epochs 0.125 or less" in warm[0]
    assert "val top-1" in result.output
