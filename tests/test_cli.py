"""The `refine` command end to end on tiny data, and its one-line errors on bad input."""
import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.errors import _one_line_warnings
from cli.main import cli
from refinery_pipeline.core.errors import RefineryWarning
from refinery_pipeline.store.label_store import LabelStore

from .conftest import shared_data_or_skip


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # progress bars (e.g. an ImageFolder conversion) may precede it; the error ends the output
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# The subject here is the command, not the loader: its pipelines run uncompiled, the same bytes
# at a tenth of the CPU (tests/conftest.py uncompiled_loaders)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

# One decoding thread wherever the number of threads is not the point: the default --workers 2
# compiles numba's parallel pipeline, which costs 2.5x the CPU of a whole tiny run. The default is
# run end to end by test_store_is_reproducible_byte_for_byte and the shared training run.
ONE_THREAD = ("--workers", 1)


@pytest.fixture(scope="module")
def store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 4, "--top-k", 3,
        "--batch-size", 32, "--chunk-size", 32, *ONE_THREAD)
    return path


@pytest.fixture(scope="module")
def store_run(store, tiny_data, tmp_path_factory):
    """One training run from ``store`` with the defaults (2 epochs, no --res: the store's 24 px),
    shared by the tests that read its outputs or its warnings: ``(out, result, messages)``, the
    RefineryWarnings it gave."""
    out = tmp_path_factory.mktemp("store_run") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 2,
                     "--batch-size", 16, "--out", out)
    return out, result, [str(w.message) for w in caught if issubclass(w.category, RefineryWarning)]


def test_precompute_writes_a_complete_store(store, tiny_dataset):
    s = LabelStore.open(store)
    assert s.complete and s.layout.num_chunks == 3
    data = s.read()
    assert data["topk_indices"].shape == (96, 4, 3)
    p = data["topk_probs"].astype(np.float32)
    assert (np.diff(p, axis=-1) <= 0).all() and (p.sum(-1) <= 1.002).all()
    assert s.attrs["refinery"]["arch"] == "demo_cnn" and s.attrs["refinery"]["bn_mode"] == "train"
    assert s.attrs["dataset"] == {**tiny_dataset.fingerprint(), "source": None}  # a .beton given


def test_one_crop_per_image_is_a_valid_plan(tiny_data, tiny_refinery_ckpt, tmp_path):
    """K = 1 (a one-epoch student at parity): the decoder then emits plain crops, no slot axis."""
    path = tmp_path / "k1.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 1, "--top-k", 3,
        "--batch-size", 32, *ONE_THREAD)
    arrays = LabelStore.open(path).read(("boxes", "topk_indices"))
    result = run("show", path, tiny_data, "--images", 2, "--out", tmp_path / "k1.png",
                 *ONE_THREAD)
    assert "2 images x 1 crop" in result.output
    assert arrays["boxes"].shape[1:] == (1, 4) and arrays["topk_indices"].shape[1:] == (1, 3)


def test_rerun_resumes_and_changes_nothing(store, tiny_data, tiny_refinery_ckpt):
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 4,
                 "--top-k", 3, "--batch-size", 32, "--chunk-size", 32, *ONE_THREAD)
    assert "0 chunks written, 3 already done" in result.output
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert before == after


def test_store_is_reproducible_byte_for_byte(store, tiny_data, tiny_refinery_ckpt, tmp_path):
    """Same command, fresh store: identical files (labels do not depend on timing or threads:
    this one decodes with the default 2 threads, the module's store with 1)."""
    other = tmp_path / "again.zarr"
    run("precompute", tiny_data, other, "--weights", tiny_refinery_ckpt, "-K", 4, "--top-k", 3,
        "--batch-size", 32, "--chunk-size", 32)
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for f in files:
        assert (store / f).read_bytes() == (other / f).read_bytes(), f


def test_inspect_reports_plan_size_and_label_statistics(store):
    text = run("inspect", store).output
    assert "complete: True" in text and "bytes_per_crop" in text and "mean_top1_probability" in text
    summary = json.loads(run("inspect", store, "--json").output)
    assert summary["crops_per_image"] == 4 and summary["plan"]["seed"] == 0
    assert 0 <= summary["labels"]["top1_agrees_with_ground_truth"] <= 1
    assert summary["bytes_per_crop"] > 0


def test_extending_a_store_with_another_plan_names_the_mismatch(store, tiny_data,
                                                                tiny_refinery_ckpt):
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 4,
                 "--top-k", 3, "--seed", 1, ok=False)
    assert_one_line_error(result, "plan mismatch", str(store))
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 4,
                 "--top-k", 3, "--bn-mode", "eval", ok=False)
    assert_one_line_error(result, "refinery mismatch")
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 4,
                 "--top-k", 2, ok=False)
    assert_one_line_error(result, "top_k mismatch")


@pytest.mark.parametrize("labels", ["store", "none"])
def test_train_from_store_and_from_ground_truth(labels, request, tiny_data, tmp_path):
    if labels == "store":
        out, result, _ = request.getfixturevalue("store_run")
    else:
        out = tmp_path / "run"
        result = run("train", tiny_data, "--labels", "none", "--arch", "demo_cnn", "--epochs", 2,
                     "--batch-size", 16, "--out", out, "--res", 24, *ONE_THREAD)
    assert "val top-1" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"val_top1", "val_top5", "train_loss", "val_per_class"} <= set(records[-1])
    assert (out / "model.pt").is_file() and (out / "last.pt").is_file()
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG" and "plot.png" in result.output
    assert json.loads((out / "config.json").read_text())["classes"][0] == "disk"


def test_step_lr_scheduler_reaches_the_optimizer(store, tiny_data, tmp_path):
    out = tmp_path / "run"
    run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 2,
        "--batch-size", 16, "--out", out, "--res", 24, "--lr", 0.4, "--lr-scheduler", "step",
        "--lr-step-size", 1, "--lr-gamma", 0.5, "--lr-warmup-epochs", 0, "--eval-every", 2,
        *ONE_THREAD)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.2, 0.1])  # after each epoch's steps


def test_multistep_milestones_reach_the_optimizer(store, tiny_data, tmp_path):
    """--lr-milestones 1,2 with gamma 0.5: the LR halves after epoch 1 and again after 2."""
    out = tmp_path / "run"
    run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 3,
        "--batch-size", 16, "--out", out, "--res", 24, "--lr", 0.4, "--lr-scheduler",
        "multistep", "--lr-milestones", "1,2", "--lr-gamma", 0.5, "--lr-warmup-epochs", 0,
        "--eval-every", 3, *ONE_THREAD)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.2, 0.1, 0.1])  # after each epoch
    assert json.loads((out / "config.json").read_text())["lr_milestones"] == [1, 2]


@pytest.mark.parametrize("options, fragment", [
    (["--lr-milestones", "1"], "only the multistep scheduler decays at milestones"),
    (["--lr-scheduler", "multistep"], "no --lr-milestones given"),
    (["--lr-scheduler", "multistep", "--lr-milestones", "1,5"], "epoch 5 is not before"),
])
def test_milestones_that_do_not_fit_are_one_line_before_training(store, tiny_data, tmp_path,
                                                                 options, fragment):
    out = tmp_path / "run"
    result = run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 3,
                 "--batch-size", 16, "--out", out, *options, ok=False)
    assert_one_line_error(result, fragment)
    assert not (out / "model.pt").exists()


def test_training_at_another_size_than_labelled_warns_in_one_line(store, store_run, tiny_data,
                                                                   tmp_path, monkeypatch):
    """Same boxes, resampled pixels: allowed, never silent (the store was labelled at 24 px)."""
    with pytest.warns(RefineryWarning, match="computed on 24 px crops .* at 16 px; omit --res"):
        run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 1,
            "--batch-size", 16, "--out", tmp_path / "run", "--res", 16, *ONE_THREAD)
    # --res omitted, 2 epochs over K=4 crops: no size or reuse warning, only the top 3 (tested
    # below) and the 6 SGD steps per epoch
    others = [m for m in store_run[2] if "keeps the top 3" not in m
              and "SGD steps per epoch" not in m]
    assert not others, others
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    _one_line_warnings()
    assert warnings.formatwarning("labels at 24 px", RefineryWarning, "x.py", 1) == \
        "warning: labels at 24 px\n"
    assert "UserWarning" in warnings.formatwarning("other", UserWarning, "x.py", 1)


def test_one_line_warnings_install_once_however_often_the_cli_runs(monkeypatch):
    """Each ``cli()`` call installs the one-line format: in one process it wraps the format it
    found (here a stand-in for Python's: earlier tests' runs installed ours) once, not once per
    call."""
    def python_format(message, category, filename, lineno, line=None):
        return f"python: {message}\n"
    monkeypatch.setattr(warnings, "formatwarning", python_format)
    _one_line_warnings()
    installed = warnings.formatwarning
    assert installed is not python_format
    _one_line_warnings()
    for _ in range(2):  # the group's callback runs it before the command's arguments are read
        assert_one_line_error(run("plot", ok=False), "Missing argument 'RUNS...'")
    assert warnings.formatwarning is installed
    assert installed("other", UserWarning, "x.py", 1) == "python: other\n"
    assert installed("ours", RefineryWarning, "x.py", 1) == "warning: ours\n"


def test_more_epochs_than_the_store_has_crops_for_warns_with_the_k_to_use(store, tiny_data,
                                                                         tmp_path):
    """K=4 stored crops cover 4 epochs at parity; 9 epochs reuse them (-K 9 fixes it)."""
    with pytest.warns(RefineryWarning, match="9 epochs replay each of its 4 crops per image "
                                             r"2\.2 times; .*precompute with -K 9 or more"):
        run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 9,
            "--batch-size", 64, "--out", tmp_path / "run", "--eval-every", 9, *ONE_THREAD)


def test_labels_truncated_below_the_default_top_k_warn_with_the_top_k_to_use(store_run):
    """The store keeps 3 of 10 classes; parity needed all 10 (--top-k 10 fixes it)."""
    assert [m for m in store_run[2] if "keeps the top 3 of 10 classes per crop; " in m
            and "precompute with --top-k 10" in m], store_run[2]


def test_a_uniform_rest_that_flattens_targets_warns_with_the_measured_share(store, store_run,
                                                                           tiny_data, tmp_path):
    """A top-3 store of 10 classes from the tiny (hesitant) refinery: --rest uniform would spread
    most of each target evenly; the warning says how much, the default does not warn."""
    probs = LabelStore.open(store).read_crops().topk_probs.astype(np.float32)
    spread = 1 - np.clip(probs.sum(-1), 0, 1).mean()
    assert spread > 0.25  # the premise: this store's top 3 hold under 75% of the mass
    with pytest.warns(RefineryWarning, match=f"--rest uniform spreads {spread:.0%} of each target "
                                             "evenly over the 7 classes outside its top 3"):
        run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 1,
            "--batch-size", 64, "--rest", "uniform", "--out", tmp_path / "uniform", *ONE_THREAD)
    assert not [m for m in store_run[2] if "--rest uniform" in m]  # the default run


def test_init_starts_the_student_from_the_given_weights(store, tiny_data, tiny_refinery_ckpt,
                                                       tmp_path):
    """--init the refinery (a demo_cnn on these classes): with a vanishing LR and no weight decay
    the student ends where it started, far from a random initialisation's weights."""
    import torch
    common = ("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 1,
              "--batch-size", 16, "--lr", 1e-12, "--wd", 0, "--res", 24, *ONE_THREAD)
    run(*common, "--init", tiny_refinery_ckpt, "--out", tmp_path / "init")
    run(*common, "--out", tmp_path / "random")
    start = torch.load(tiny_refinery_ckpt, weights_only=False)["model"]
    weights = [k for k, v in start.items() if v.ndim > 1]
    for run_name, close in (("init", True), ("random", False)):
        end = torch.load(tmp_path / run_name / "model.pt", weights_only=False)["model"]
        assert all(torch.allclose(end[k], start[k], atol=1e-6) for k in weights) is close
    config = json.loads((tmp_path / "init" / "config.json").read_text())
    assert config["init"] == str(tiny_refinery_ckpt) and len(config["init_sha256"]) == 64


def test_init_of_another_architecture_is_one_line(store, tiny_data, tiny_refinery_ckpt,
                                                  tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny_data, "--labels", store, "--arch", "resnet18", "--epochs", 1,
                 "--batch-size", 16, "--res", 24, "--init", tiny_refinery_ckpt, "--out", out,
                 ok=False)
    assert_one_line_error(result, str(tiny_refinery_ckpt), "resnet18")
    assert not (out / "model.pt").exists()


def test_a_trained_student_is_the_next_refinery(store_run, tiny_data, tmp_path):
    """Chained generations: model.pt loads as a refinery with no architecture flag."""
    out = store_run[0]  # the first generation, trained from the module's store
    run("precompute", tiny_data, tmp_path / "gen2.zarr", "--weights", out / "model.pt", "-K", 2,
        "--top-k", 3, *ONE_THREAD)
    attrs = LabelStore.open(tmp_path / "gen2.zarr").attrs
    assert attrs["refinery"]["arch"] == "demo_cnn" and attrs["refinery"]["input_size"] == 24


def test_store_for_other_images_is_refused(store, tmp_path):
    from .conftest import _write_split
    _write_split(tmp_path, "val", 8, seed=5)
    other = _write_split(tmp_path, "train", 96, seed=6)
    result = run("train", other, "--labels", store, "--arch", "demo_cnn", "--epochs", 1,
                 "--out", tmp_path / "r", ok=False)
    assert_one_line_error(result, "data set mismatch", "image_bytes_sha256")


def test_bad_weights_and_missing_store_give_one_line_errors(tiny_data, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", junk, ok=False)
    assert_one_line_error(result, str(junk), "not a PyTorch checkpoint")
    assert not (tmp_path / "s.zarr").exists()
    result = run("inspect", tmp_path / "nothing.zarr", ok=False)
    assert_one_line_error(result, "no label store there")
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", junk, "--refinery",
                 "resnet9000", ok=False)
    assert_one_line_error(result)


def test_adversarial_jittering_without_an_online_refinery_is_refused(store, tiny_data, tmp_path):
    """Twins are made during training, so no store can hold their labels."""
    result = run("train", tiny_data, "--labels", store, "--adversarial-eta", 1, "--out",
                 tmp_path / "run", ok=False)
    assert_one_line_error(result, "--adversarial-eta 1.0", "--teacher")
    assert not (tmp_path / "run").exists()


def test_negative_precise_bn_is_refused(tiny_data, tmp_path):
    result = run("train", tiny_data, "--precise-bn", -1, "--out", tmp_path / "run", ok=False)
    assert_one_line_error(result, "--precise-bn -1", "number of training batches")
    assert not (tmp_path / "run").exists()


def test_refinery_with_wrong_class_count_is_refused(tiny_data, tmp_path):
    import torch
    from refinery_pipeline.models.registry import create_model
    from refinery_pipeline.models.checkpoints import save_checkpoint
    ckpt = tmp_path / "five.pt"
    save_checkpoint(ckpt, create_model("demo_cnn", 5), "demo_cnn", list("abcde"), 24)
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", ckpt, ok=False)
    assert_one_line_error(result, "weights predict 5 classes but the data set has 10")
    sd = tmp_path / "sd.pt"
    torch.save(create_model("resnet18", 10).state_dict(), sd)
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", sd, "--refinery",
                 "demo_cnn", ok=False)
    assert_one_line_error(result, "do not fit a demo_cnn")


def test_refinery_for_other_classes_is_refused(tiny_data, tmp_path):
    """Same count, other classes (or the same in another order): labels would be silently wrong."""
    from refinery_pipeline.models.registry import create_model
    from refinery_pipeline.models.checkpoints import save_checkpoint
    from refinery_pipeline.paper.synthetic import SHAPES
    ckpt = tmp_path / "reordered.pt"
    save_checkpoint(ckpt, create_model("demo_cnn", 10), "demo_cnn", SHAPES[::-1], 24)
    message = f"output 0 is class {SHAPES[-1]!r} but the data set's class 0 is {SHAPES[0]!r}"
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", ckpt, ok=False)
    assert_one_line_error(result, str(ckpt), message)
    assert not (tmp_path / "s.zarr").exists()
    result = run("train", tiny_data, "--teacher", ckpt, "--out", tmp_path / "run",
                 "--batch-size", 16, ok=False)
    assert_one_line_error(result, str(ckpt), message)
    # a .beton written without class names numbers them: only the count can be checked
    from refinery_pipeline.sources.dataset import ImageDataset
    from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
    from refinery_pipeline.paper.synthetic import make_shapes
    shapes = make_shapes(40, 40, seed=3)
    unnamed = tmp_path / "unnamed_train.beton"
    write_beton(ArraySource(shapes.images, shapes.labels), unnamed, num_workers=1)
    assert ImageDataset(unnamed).classes == [str(i) for i in range(10)]
    run("precompute", unnamed, tmp_path / "u.zarr", "--weights", ckpt, "-K", 1, "--top-k", 2,
        *ONE_THREAD)


def make_tree(root, classes=("cat", "dog"), per_class=6, size=(30, 40)):
    """An ImageFolder tree with JPEG, PNG, grayscale and CMYK files."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "CMYK", "RGB"]
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, size + (3,), dtype=np.uint8)
                image = Image.fromarray(array).convert(modes[i % 4])
                image.save(root / split / c / f"{i}.{'png' if i % 4 == 3 else 'jpg'}")
    return root


def test_convert_writes_the_beton_pair_train_takes(tmp_path):
    """'train' in the folder's name too: the val file is found by the last 'train' only."""
    from refinery_pipeline.sources.dataset import ImageDataset
    tree = make_tree(tmp_path / "mytrainset", size=(30, 40))
    result = run("convert", tree, tmp_path / "betons", "--max-resolution", 20, "--workers", 1)
    train, val = (tmp_path / "betons" / f"mytrainset_{split}.beton" for split in ("train", "val"))
    assert f"{train}: 12 images, 2 classes" in result.output and val.is_file()
    for path in (train, val):
        ds = ImageDataset(path)
        assert ds.classes == ["cat", "dog"] and max(ds.max_size) == 20  # 40 px side capped
    run("train", train, "--arch", "demo_cnn", "--epochs", 1, "--res", 16, "--batch-size", 8,
        "--workers", 1, "--out", tmp_path / "run")
    assert (tmp_path / "run" / "model.pt").is_file()
    before = train.stat().st_mtime_ns
    result = run("convert", tree, tmp_path / "betons", ok=False)
    assert_one_line_error(result, str(train), "already exists")
    assert train.stat().st_mtime_ns == before


def test_image_folder_tree_end_to_end(tmp_path, tiny_refinery_ckpt):
    from refinery_pipeline.models.registry import create_model
    from refinery_pipeline.models.checkpoints import save_checkpoint
    tree = make_tree(tmp_path / "tree")
    ckpt = tmp_path / "two.pt"
    save_checkpoint(ckpt, create_model("demo_cnn", 2), "demo_cnn", ["cat", "dog"], 16)
    run("precompute", tree, tmp_path / "s.zarr", "--weights", ckpt, "-K", 3, *ONE_THREAD)
    run("train", tree, "--labels", tmp_path / "s.zarr", "--arch", "demo_cnn", "--epochs", 1,
        "--batch-size", 4, "--out", tmp_path / "run", *ONE_THREAD)
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    result = run("precompute", tree, tmp_path / "s2.zarr", "--weights", ckpt, ok=False)
    assert_one_line_error(result, "broken.jpg", "cannot be read as an image")


def test_demo_runs_on_tiny_settings(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--train-images", 96, "--epochs", 1,
                 *ONE_THREAD)
    assert "crops that show no pixel of the labelled object" in result.output
    assert "refined labels" in result.output and "ground truth labels" in result.output
    summary = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert 0 < summary["crop_labels"]["crops_missing_object_share"] < 1
    assert (tmp_path / "demo" / "students.png").read_bytes()[:4] == b"\x89PNG"


def test_shared_imagenette_subset_replays_exactly(tmp_path, monkeypatch):
    """Real JPEGs from the shared data set (skipped where it is absent), through the compiled
    pipeline users run."""
    from ffcv.pipeline.compiler import Compiler
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.data_cache import open_dataset
    from .test_replay import plan_arrays, precompute_pixels
    from refinery_pipeline.loaders.crop_sources import ReplayedCrops
    from refinery_pipeline.loaders.replay import make_loader
    monkeypatch.setattr(Compiler, "is_enabled", True)
    source = shared_data_or_skip()
    tree = tmp_path / "nette"
    for c in sorted((source / "train").iterdir())[:3]:
        (tree / "train" / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:12]:
            shutil.copy(f, tree / "train" / c.name / f.name)
    dataset = open_dataset(tree, "train")
    boxes, flips = plan_arrays(dataset, CropPlan(seed=4, crops_per_image=3))
    stored = precompute_pixels(dataset, boxes, flips, 64)
    crops = ReplayedCrops(boxes, flips, seed=1)
    for batch in make_loader(dataset, crops, (64, 64), 8):
        n = batch.indices.numpy()
        assert np.array_equal(batch.images.numpy(), stored[n, batch.slots.numpy()])


def test_audit_reproduces_a_train_mode_store_exactly(store, tiny_data, tiny_refinery_ckpt):
    """Train-mode BN labels depend on batch neighbours; audit rebuilds the same batches."""
    result = run("audit", store, tiny_data, "--weights", tiny_refinery_ckpt, "--sample-crops", 200,
                 *ONE_THREAD)
    assert "top-1 agreement 100.000%" in result.output, result.output
    assert "max 0.00e+00" in result.output


def test_show_draws_the_crops_students_are_shown_with_their_labels(store, tiny_data,
                                                                    tiny_dataset, tmp_path):
    from refinery_pipeline.labelling.shown_crops import sample_stored_crops
    from refinery_pipeline.loaders.replay import make_loader
    from refinery_pipeline.loaders.crop_sources import ReplayedCrops
    result = run("show", store, tiny_data, "--images", 3, "--crops", 4, "--out",
                 tmp_path / "crops.png", *ONE_THREAD)
    assert "3 images x 4 crops" in result.output
    assert (tmp_path / "crops.png").read_bytes()[:4] == b"\x89PNG"
    sample = sample_stored_crops(tiny_dataset, store, num_images=5, seed=1)
    arrays = LabelStore.open(store).read()
    assert np.array_equal(sample.topk_indices, arrays["topk_indices"][sample.images])
    assert np.array_equal(sample.labels, tiny_dataset.labels[sample.images])
    # the pixels are the training loader's for the slot it replays
    crops = ReplayedCrops(arrays["boxes"], arrays["flips"], seed=0)
    size = LabelStore.open(store).attrs["refinery"]["input_size"]
    compared = 0
    for batch in make_loader(tiny_dataset, crops, (size, size), 16, 1, seed=0):
        for image, n in zip(batch.images.numpy(), batch.indices.numpy()):
            if n in sample.images:
                i = list(sample.images).index(n)
                assert np.array_equal(image, sample.pixels[i, crops.slots[n]])
                compared += 1
    assert compared >= 3
    from .conftest import _write_split
    _write_split(tmp_path, "val", 8, seed=5)
    other = _write_split(tmp_path, "train", 96, seed=6)
    result = run("show", store, other, "--out", tmp_path / "other.png", ok=False)
    assert_one_line_error(result, "data set mismatch")
    assert not (tmp_path / "other.png").exists()


def test_audit_flags_labels_from_another_refinery(store, tiny_data, tmp_path):
    import torch
    from refinery_pipeline.models.registry import create_model
    from refinery_pipeline.models.checkpoints import save_checkpoint
    from refinery_pipeline.paper.synthetic import SHAPES
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, create_model("demo_cnn", 10), "demo_cnn", SHAPES, 24)
    result = run("audit", store, tiny_data, "--weights", other, ok=False)
    recorded = LabelStore.open(store).attrs["refinery"]["weights_sha256"]
    assert_one_line_error(result, "refinery differs", "weights_sha256",
                          f"pass the weights that wrote it (SHA-256 {recorded[:16]}")


def test_soft_static_labels_are_the_refinery_on_the_centred_image(tiny_data, tiny_dataset,
                                                                   tiny_refinery_ckpt, tmp_path):
    from refinery_pipeline.labelling.refinery import Refinery
    from refinery_pipeline.loaders.replay import make_loader
    from refinery_pipeline.loaders.crop_sources import FixedCrops
    path = tmp_path / "static.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 3, "--top-k", 3,
        "--bn-mode", "eval", "--soft-static", "--chunk-size", 32, *ONE_THREAD)
    arrays = LabelStore.open(path).read(("static_indices", "static_probs", "topk_indices"))
    assert arrays["static_indices"].shape == (96, 3)
    refinery = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")
    loader = make_loader(tiny_dataset, FixedCrops(tiny_dataset.heights, tiny_dataset.widths),
                         (24, 24), 32, train=False)
    for batch in loader:
        n = batch.indices.numpy()
        idx, probs = refinery.top_k(batch.images, 3)
        assert np.array_equal(idx, arrays["static_indices"][n])
        np.testing.assert_allclose(probs.astype(np.float32),
                                   arrays["static_probs"][n].astype(np.float32), atol=2e-3)
    result = run("audit", path, tiny_data, "--weights", tiny_refinery_ckpt, *ONE_THREAD)
    assert "top-1 agreement 100.000%" in result.output
    result = run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 3,
                 "--top-k", 3, "--bn-mode", "eval", ok=False)
    assert_one_line_error(result, "soft_static mismatch")
