"""Results say what they measured: `refine evaluate` records the data set (path, fingerprint),
keeps another data set's result apart from the run's own, and `refine plot --gap` reads only
the run's own (old files without the record still read, with a note)."""
import json
import shutil

import pytest

from refinery_pipeline.sources.dataset import ImageDataset
from refinery_pipeline.core.errors import RefineryWarning, RunError
from refinery_pipeline.training.evaluation import data_id, read_evaluation
from refinery_pipeline.paper.plots import read_gap

from .conftest import _write_split
from .test_cli import assert_one_line_error, run
from .test_train_faults import snapshot

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


@pytest.fixture
def run_dir(tiny_refinery_ckpt, tmp_path):
    """A copy of a finished `refine train` run (the tiny refinery's) to evaluate into."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("metrics.jsonl", "config.json", "model.pt"):
        shutil.copy(tiny_refinery_ckpt.parent / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another shapes data set, same classes and sizes, other images."""
    directory = tmp_path_factory.mktemp("other")
    _write_split(directory, "val", 32, seed=5)
    return _write_split(directory, "train", 96, seed=6)


def evaluate(*args, ok=True):
    return run("evaluate", *args, "--workers", 1, ok=ok)


def test_training_records_the_fingerprints_of_both_splits(run_dir, tiny_data):
    ids = json.loads((run_dir / "config.json").read_text())["data_ids"]
    val = tiny_data.with_name("shapes_val.beton")
    assert ids == {"train": data_id(ImageDataset(tiny_data).fingerprint()),
                   "val": data_id(ImageDataset(val).fingerprint())}


def test_other_data_never_overwrites_the_runs_own_result(run_dir, tiny_data, other_data):
    own = evaluate(run_dir)
    saved = json.loads((run_dir / "eval_val.json").read_text())
    assert saved["data"]["path"] == str(tiny_data)
    assert saved["data"]["id"] == json.loads((run_dir / "config.json").read_text())[
        "data_ids"]["val"]
    assert str(run_dir / "eval_val.json") in own.output and "note:" not in own.output
    before = snapshot(run_dir)

    other = evaluate(run_dir, other_data)
    other_id = data_id(ImageDataset(other_data.with_name("shapes_val.beton")).fingerprint())
    kept = run_dir / f"eval_val-{other_id}.json"
    assert str(kept) in other.output and "not the data" in other.output
    record = json.loads(kept.read_text())["data"]
    assert record["path"] == str(other_data) and record["id"] == other_id
    assert record["beton"] == str(other_data.with_name("shapes_val.beton"))
    assert record["fingerprint"]["num_images"] == 32
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.name != kept.name} == before  # nothing else


def test_plot_gap_reads_only_the_runs_own_results(run_dir, other_data, tmp_path):
    evaluate(run_dir, other_data, "--split", "train")
    evaluate(run_dir, other_data)
    refused = run("plot", run_dir, "--gap", "--out", tmp_path / "gap.png", ok=False)
    assert_one_line_error(refused, "eval_train.json: not found", "eval_train-",
                          "results of other data sets",
                          f"refine evaluate {run_dir} --split train")
    assert not (tmp_path / "gap.png").exists()
    evaluate(run_dir, "--split", "train")
    evaluate(run_dir)
    gap = read_gap(run_dir)
    assert gap["train_top1"] == json.loads((run_dir / "eval_train.json").read_text())["train_top1"]
    assert gap["val_top1"] == json.loads((run_dir / "eval_val.json").read_text())["val_top1"]
    run("plot", run_dir, "--gap", "--out", tmp_path / "gap.png")


def test_an_old_result_without_a_record_still_reads_with_a_note(run_dir, tmp_path):
    """Written before evaluations recorded their data set: read as the run's own, with a
    one-line warning that says so and how to record it."""
    for split, top1 in (("train", 90.0), ("val", 60.0)):
        (run_dir / f"eval_{split}.json").write_text(json.dumps({
            f"{split}_top1": top1, f"{split}_top5": 99.0, f"{split}_per_class": [top1] * 10,
            "split": split, "images": 32, "res": 24, "checkpoint": "model.pt"}))
    with pytest.warns(RefineryWarning, match="written before evaluation files recorded their "
                                             "data set; read as the run's own"):
        assert read_gap(run_dir)["train_top1"] == 90.0
    result = run("plot", run_dir, "--gap", "--out", tmp_path / "gap.png")
    assert "plot:" in result.output


def test_another_data_sets_result_under_the_runs_name_is_refused(run_dir, other_data):
    evaluate(run_dir, other_data)
    (kept,) = run_dir.glob("eval_val-*.json")
    shutil.copy(kept, run_dir / "eval_val.json")  # e.g. copied by hand
    with pytest.raises(RunError, match=f"measured {other_data}"):
        read_evaluation(run_dir, "val")


def test_a_run_from_before_the_fingerprints_were_recorded_compares_paths(run_dir, tiny_data,
                                                                         other_data):
    config = json.loads((run_dir / "config.json").read_text())
    del config["data_ids"]
    (run_dir / "config.json").write_text(json.dumps(config))
    evaluate(run_dir, tiny_data)  # the path the run trained on: its own
    assert (run_dir / "eval_val.json").is_file()
    evaluate(run_dir, other_data)
    assert len(list(run_dir.glob("eval_val-*.json"))) == 1
