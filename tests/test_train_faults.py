"""`refine train` runs that would do nothing, or something else than asked, are refused in one
line before they write anything: too few images for a batch, --resume with no run or with other
settings, a fresh run into another run's directory, a missing validation split."""
import json
import shutil
import warnings

import pytest

from refinery_pipeline.core.errors import DataSetError, RefineryError, RefineryWarning
from refinery_pipeline.paper.plots import read_run
from refinery_pipeline.training import data as data_module
from refinery_pipeline.training import train as train_module
from refinery_pipeline.training.config import TrainConfig
from refinery_pipeline.training.run_dir import RUN_FILES
from refinery_pipeline.training.train import fit

from .test_cli import assert_one_line_error, make_tree, run
from .test_plots import write_run

ARGS = ("--arch", "demo_cnn", "--batch-size", 16, "--res", 24, "--workers", 1)

# The subject here is the refusal, not the loader: its pipelines run uncompiled, the same bytes
# at a tenth of the CPU (tests/conftest.py uncompiled_loaders)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


def train(data, out, *extra, ok=True):
    return run("train", data, *ARGS, "--out", out, *extra, ok=ok)


def snapshot(path):
    """Every file's bytes under ``path`` (None when it does not exist)."""
    if not path.exists():
        return None
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_refused(result, out, before, *fragments):
    assert_one_line_error(result, *fragments)
    assert snapshot(out) == before  # not a byte written, renamed or removed


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_data, out, "--epochs", 1)
    return out


@pytest.fixture(scope="module")
def unfinished(tiny_data, tmp_path_factory):
    """A two-epoch run interrupted (Ctrl-C) in its second epoch: last.pt holds epoch 1."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    real_epoch, calls = train_module.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train_one_epoch", interrupted)
        assert train(tiny_data, out, "--epochs", 2, ok=False).exit_code == 1  # click: Aborted!
    assert epochs_logged(out) == [1] and not (out / "model.pt").exists()
    return out


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


# ----------------------------------------------------------------------------- zero steps

def test_training_set_smaller_than_the_batch_is_refused(tiny_data, tmp_path):
    """96 images, batches of 128 dropped as incomplete: 0 steps and a 'trained' model.pt."""
    out = tmp_path / "run"
    result = train(tiny_data, out, "--epochs", 1, "--batch-size", 128, ok=False)
    assert_refused(result, out, None, str(tiny_data), "96 training images", "--batch-size 128",
                   "0 steps", "pass --batch-size 96 or less")


def test_finished_chunks_smaller_than_the_batch_are_refused(tiny_data, labelled_store, tmp_path):
    """--allow-partial trains only the finished chunks' images: those must fill a batch."""
    store = labelled_store(only_chunks=[1])
    out = tmp_path / "run"
    result = train(tiny_data, out, "--labels", store, "--allow-partial", "--epochs", 1,
                   "--batch-size", 48, ok=False)
    assert_refused(result, out, None, str(store), "finished chunks hold 32 training images",
                   "--batch-size 48", "pass --batch-size 32 or less")


@pytest.mark.parametrize("images, world, batch, fits", [
    (96, 4, 24, True), (96, 4, 25, False), (97, 4, 25, True), (96, 1, 96, True)])
def test_images_per_rank_must_fill_a_batch(images, world, batch, fits, tiny_data, tmp_path):
    """Under DDP each rank takes ceil(images / ranks) images (FFCV pads like
    DistributedSampler) and drops its own incomplete batch. (A real multi-rank run needs
    torchrun; the count is the part that can go wrong.)"""
    cfg = TrainConfig(data=str(tiny_data), out_dir=str(tmp_path), batch_size=batch)
    if fits:
        data_module._check_an_epoch_trains(cfg, images, world)
        return
    per_rank = -(-images // world)
    with pytest.raises(DataSetError, match=f"{images} training images, {per_rank} per rank on "
                                           f"{world} ranks, fewer than --batch-size {batch}.*"
                                           f"pass --batch-size {per_rank} or less"):
        data_module._check_an_epoch_trains(cfg, images, world)


def test_zero_epochs_are_refused(tiny_data, tmp_path):
    """No epoch trained, yet an untrained model.pt saved: refused in the library too."""
    cfg = TrainConfig(data=str(tiny_data), out_dir=str(tmp_path / "run"), arch="demo_cnn",
                      epochs=0, batch_size=16, res=24, workers=1, progress=False)
    with pytest.raises(RefineryError, match="--epochs 0: nothing to train"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- resume

def test_resume_with_no_run_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_data, out, "--epochs", 1, "--resume", ok=False)
    assert_refused(result, out, None, str(out / "last.pt"), "not found", "drop --resume")


@pytest.mark.parametrize("option, value, saved, given", [
    ("--lr", 0.1, "lr 0.4", "lr 0.1"),
    ("--epochs", 3, "epochs 2", "epochs 3"),
    ("--batch-size", 8, "batch_size 16", "batch_size 8"),
    ("--seed", 1, "seed 0", "seed 1"),
    ("--labels", "STORE", "labels null", "labels \"")])
def test_resume_with_other_settings_is_refused(option, value, saved, given, unfinished,
                                               tiny_data, tmp_path):
    """Same state, other schedule or data: it would train something else, and overwrote the
    run's config.json. The first differing setting is named with both values."""
    out = copy_of(unfinished, tmp_path)
    before = snapshot(out)
    value = tmp_path / "labels.zarr" if value == "STORE" else value
    args = ["--epochs", 2, option, value] if option != "--epochs" else [option, value]
    result = train(tiny_data, out, *args, "--resume", ok=False)
    assert_refused(result, out, before, str(out / "config.json"), f"started with {saved}",
                   f"this resume has {given}", "start a new run in another --out")


def test_resume_may_change_how_the_run_executes(unfinished, tiny_data, tmp_path):
    """--workers, --device, --eval-every, ... do not change what is computed: accepted. The
    run's config.json is kept as it was written."""
    out = copy_of(unfinished, tmp_path)
    config = (out / "config.json").read_bytes()
    train(tiny_data, out, "--epochs", 2, "--resume", "--workers", 2, "--device", "cpu",
          "--eval-every", 2)
    assert epochs_logged(out) == [1, 2] and (out / "model.pt").is_file()
    assert (out / "config.json").read_bytes() == config


def test_resume_drops_epochs_logged_but_never_checkpointed(unfinished, tiny_data, tmp_path):
    """Killed between writing epoch 2's log line and its last.pt (here, mid-line too): the
    resumed run trains epoch 2 again and logs it once."""
    out = copy_of(unfinished, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": -1.0}) + "\n" + '{"epoch": 3, "tra')
    train(tiny_data, out, "--epochs", 2, "--resume")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["train_loss"] > 0


def test_resume_of_a_finished_run_is_refused(finished, tiny_data, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    result = train(tiny_data, out, "--epochs", 1, "--resume", ok=False)
    assert_refused(result, out, before, str(out / "last.pt"), "already trained all 1 epochs",
                   "another --out")


@pytest.mark.parametrize("damage", ["deleted", "not JSON"])
def test_resume_without_a_readable_config_is_refused(damage, unfinished, tiny_data, tmp_path):
    out = copy_of(unfinished, tmp_path)
    if damage == "deleted":
        (out / "config.json").unlink()
    else:
        (out / "config.json").write_text("{not json")
    before = snapshot(out)
    result = train(tiny_data, out, "--epochs", 2, "--resume", ok=False)
    assert_refused(result, out, before, str(out / "config.json"), "cannot be read",
                   "another --out")


def test_resume_from_a_damaged_last_pt_is_refused(unfinished, tiny_data, tmp_path):
    out = copy_of(unfinished, tmp_path)
    (out / "last.pt").write_bytes(b"not a checkpoint")
    before = snapshot(out)
    result = train(tiny_data, out, "--epochs", 2, "--resume", ok=False)
    assert_refused(result, out, before, str(out / "last.pt"), "cannot resume from it")


# ----------------------------------------------------------------------------- logs never mix

@pytest.mark.parametrize("kept", ["metrics.jsonl", "last.pt", "model.pt", "all"])
def test_fresh_run_into_another_run_is_refused(kept, finished, tiny_data, tmp_path):
    """Before: the log read epochs 1, 1 and `refine plot` drew the stale run too."""
    out = copy_of(finished, tmp_path)
    for name in RUN_FILES:
        if kept not in (name, "all"):
            (out / name).unlink()
    before = snapshot(out)
    result = train(tiny_data, out, "--epochs", 1, ok=False)
    assert_refused(result, out, before, str(out), "already holds a run", "pass --resume",
                   "choose another --out")


def test_out_that_is_a_file_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.write_text("notes")
    result = train(tiny_data, out, "--epochs", 1, ok=False)
    assert_one_line_error(result, str(out), "not a directory")
    assert out.read_text() == "notes"


def test_plot_of_an_old_mixed_log_draws_only_the_last_run(tmp_path):
    """Logs written before the refusal: epochs 1, 2, 3 then 1, 2 of a rerun."""
    out = write_run(tmp_path / "mixed", epochs=3)
    stale = (out / "metrics.jsonl").read_text()
    write_run(tmp_path / "rerun", epochs=2, offset=7.0)
    (out / "metrics.jsonl").write_text(stale + (tmp_path / "rerun" / "metrics.jsonl").read_text())
    with pytest.warns(RefineryWarning, match="holds 2 runs .*plotting only the last one"):
        result = run("plot", out)
    assert "mixed: val top-1 52.00 (epoch 2)" in result.output  # 25 + 10 * 2 + 7
    with pytest.warns(RefineryWarning):
        records = read_run(out).epochs
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["val_top1"] == 42.0


def test_plot_keeps_the_later_record_of_an_epoch_logged_twice(tmp_path):
    """An old resume after a kill between log and checkpoint logged epoch 2 twice: one run."""
    out = write_run(tmp_path / "resumed", epochs=3)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    again = {**json.loads(lines[1]), "val_top1": 99.0}
    (out / "metrics.jsonl").write_text("\n".join([*lines[:2], json.dumps(again), lines[2]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefineryWarning)
        records = read_run(out).epochs
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[1]["val_top1"] == 99.0


# ----------------------------------------------------------------------------- validation split

def test_missing_val_folder_is_found_before_converting_train(tmp_path):
    """Before: all of train/ was converted (minutes on ImageNet), then the error came."""
    tree = make_tree(tmp_path / "tree")
    shutil.rmtree(tree / "val")
    out = tmp_path / "run"
    result = train(tree, out, "--epochs", 1, ok=False)
    assert_refused(result, out, None, str(tree), "no val/ folder")
    cache = tmp_path / "cache"  # REFINERY_CACHE (conftest)
    assert not cache.exists() or not list(cache.rglob("*.beton"))


def test_missing_val_beton_is_refused(tiny_data, tmp_path):
    alone = shutil.copy(tiny_data, tmp_path / "solo_train.beton")
    out = tmp_path / "run"
    result = train(alone, out, "--epochs", 1, ok=False)
    assert_refused(result, out, None, str(alone), "cannot find its validation .beton")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tiny_data, tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError, not OSError: it still reads as a
    storage failure, and no partial checkpoint is left beside the real one."""
    import torch

    def full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    result = train(tiny_data, out, "--epochs", 1, ok=False)
    assert_one_line_error(result, str(out / "last.pt"), "writing the checkpoint failed",
                          "unexpected pos")
    assert not list(out.glob("*.tmp")) and not (out / "last.pt").exists()
