"""Checkpoints load as data: a crafted weights file runs nothing on any path that loads weights.

Each crafted file holds a real checkpoint plus one object whose unpickling would create a marker
file (``open(MARKER, "w")`` or ``os.system("touch MARKER")``), as a shared ``model.pt`` could.
Every command that loads weights refuses it in one line naming the file and the opt-in, the
marker never appears, and nothing written before changes; with the opt-in the same file runs
its code (so the refusals above cannot pass for a file that would do nothing). The supported
layouts still load without it. And every message that asks for a missing fact names an option
of the command that printed it.
"""
import argparse
import os
import re
from pathlib import Path

import pytest
import torch

from cli.main import cli
from refinery_pipeline.models.checkpoint_safety import SAFE_NAMES, load_weights_file
from refinery_pipeline.core.errors import CheckpointError, UntrustedCheckpointError
from refinery_pipeline.training.evaluation import evaluate_checkpoint
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.models.checkpoints import (load_checkpoint, load_trained_model,
                                                  save_checkpoint)
from refinery_pipeline.labelling.refinery import Refinery, load_refinery
from refinery_pipeline.paper.synthetic import SHAPES

from .test_cli import assert_one_line_error, run
from .test_ecosystem_models import timm_args, timm_checkpoint, torchvision_reference_checkpoint
from .test_pretrained_weights import NAME
from .test_train_faults import assert_refused, copy_of, snapshot

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

OPT_IN = "--trust-checkpoint"
TRAIN = ("--arch", "demo_cnn", "--batch-size", 16, "--res", 24, "--workers", 1, "--epochs", 1)
# the settings conftest's tiny refinery was trained with, so that --resume gets to its last.pt
RESUME = ("--arch", "demo_cnn", "--batch-size", 16, "--res", 24, "--workers", 1, "--epochs", 6,
          "--lr", 0.1, "--warmup-epochs", 0.5, "--resume")


class RunsCode:
    """Unpickling this calls ``call(*args)``: what a crafted checkpoint does to whoever loads
    it with plain pickle."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def payload(kind: str, marker: Path) -> RunsCode:
    if kind == "open":
        return RunsCode(open, str(marker), "w")
    return RunsCode(os.system, f"touch '{marker}'")


def craft(path: Path, base: Path, marker: Path, kind: str = "open", legacy: bool = False):
    """``base``'s contents (a real checkpoint) plus an object that creates ``marker`` when
    unpickled. ``legacy``: torch.save's pre-1.6 format, which is not a zip."""
    state = torch.load(base, map_location="cpu", weights_only=True)
    torch.save({**state, "note": payload(kind, marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def marker(tmp_path):
    """The file a crafted checkpoint creates when its code runs."""
    return tmp_path / "MARKER"


@pytest.fixture
def evil(tmp_path, tiny_refinery_ckpt, marker):
    """The tiny refinery with code attached."""
    return craft(tmp_path / "evil.pt", tiny_refinery_ckpt, marker)


@pytest.fixture
def finished(tiny_refinery_ckpt):
    """The finished `refine train` run of the tiny refinery (trained with :data:`RESUME`)."""
    return tiny_refinery_ckpt.parent


@pytest.fixture(scope="module")
def store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 2, "--top-k", 3,
        "--batch-size", 32, "--chunk-size", 32, "--workers", 1)
    return path


def assert_untrusted(result, path, marker):
    assert_one_line_error(result, str(path), "io.open", OPT_IN)
    assert not marker.exists()


# ----------------------------------------------------------------------------- every path

def test_precompute_refuses_a_crafted_refinery(evil, marker, tiny_data, tmp_path):
    out = tmp_path / "labels.zarr"
    result = run("precompute", tiny_data, out, "--weights", evil, "-K", 2, ok=False)
    assert_untrusted(result, evil, marker)
    assert not out.exists()


@pytest.mark.parametrize("option", ["--teacher", "--init"])
def test_train_refuses_a_crafted_teacher_or_init(option, evil, marker, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny_data, *TRAIN, option, evil, "--out", out, ok=False)
    assert_untrusted(result, evil, marker)
    assert not out.exists()


def test_resume_refuses_a_crafted_last_pt(finished, marker, tiny_data, tmp_path):
    out = copy_of(finished, tmp_path)
    craft(out / "last.pt", finished / "last.pt", marker)
    before = snapshot(out)
    result = run("train", tiny_data, *RESUME, "--out", out, ok=False)
    assert_refused(result, out, before, str(out / "last.pt"), "io.open", OPT_IN)
    assert not marker.exists()


def test_audit_refuses_crafted_weights(store, evil, marker, tiny_data):
    before = snapshot(store)
    result = run("audit", store, tiny_data, "--weights", evil, "--workers", 1, ok=False)
    assert_refused(result, store, before, str(evil), "io.open", OPT_IN)
    assert not marker.exists()


def test_evaluate_refuses_a_run_with_a_crafted_model_pt(finished, marker, tmp_path):
    out = copy_of(finished, tmp_path)
    craft(out / "model.pt", finished / "model.pt", marker)
    before = snapshot(out)
    result = run("evaluate", out, "--workers", 1, ok=False)
    assert_refused(result, out, before, str(out / "model.pt"), "io.open", OPT_IN)
    assert not marker.exists()


def test_evaluate_refuses_a_crafted_checkpoint_file(evil, marker, tiny_data):
    result = run("evaluate", evil, tiny_data, "--workers", 1, ok=False)
    assert_untrusted(result, evil, marker)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind, names", [("open", "io.open"), ("system", "posix.system")])
def test_python_loaders_refuse_and_the_opt_in_runs_it(kind, names, legacy, tiny_refinery_ckpt,
                                                      marker, tmp_path):
    """Every Python way in refuses, naming what would run; ``trust_checkpoint=True`` runs it
    (which is what the crafted file does to a plain ``torch.load``)."""
    if kind == "system" and os.name != "posix":
        pytest.skip("os.system pickles as posix.system on POSIX only")
    path = craft(tmp_path / "evil.pt", tiny_refinery_ckpt, marker, kind, legacy)
    loaders = [load_weights_file, load_checkpoint, load_trained_model, Refinery.from_checkpoint,
               load_refinery]
    for load in loaders:
        with pytest.raises(UntrustedCheckpointError, match=re.escape(f"{path}: loading it would "
                                                                     f"call {names}")) as caught:
            load(path)
        assert "trust_checkpoint=True" in str(caught.value) and not marker.exists(), load
    refinery = Refinery.from_checkpoint(path, trust_checkpoint=True)
    assert marker.exists() and refinery.arch == "demo_cnn"


def test_evaluate_checkpoint_refuses_and_the_opt_in_evaluates(evil, marker, tiny_data):
    with pytest.raises(UntrustedCheckpointError, match="evil.pt: loading it would call io.open"):
        evaluate_checkpoint(evil, tiny_data, num_workers=1)
    assert not marker.exists()
    metrics = evaluate_checkpoint(evil, tiny_data, num_workers=1, trust_checkpoint=True)
    assert marker.exists() and metrics["images"] == 32


def test_the_cli_opt_in_loads_a_trusted_file(finished, marker, tmp_path):
    out = copy_of(finished, tmp_path)
    craft(out / "model.pt", finished / "model.pt", marker)
    result = run("evaluate", out, "--workers", 1, OPT_IN)
    assert marker.exists() and "val top-1" in result.output


def test_a_crafted_torchvision_cache_file_is_refused(tmp_path, monkeypatch, marker):
    """Weights by name load from torch's hub cache, a file anyone with write access to it could
    have replaced: read as data before torchvision unpickles it."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    file = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    file.parent.mkdir(parents=True)
    torch.save({"note": payload("open", marker)}, file)
    with pytest.raises(UntrustedCheckpointError, match=re.escape(f"{file}: loading it would call "
                                                                 "io.open")):
        load_trained_model(NAME)
    assert not marker.exists()


# ----------------------------------------------------------------------------- what still loads

def test_refine_train_checkpoints_need_nothing_beyond_torchs_allow_list(finished):
    """model.pt and last.pt (configs, optimizer, schedule, RNG state) are plain data, so they
    load without the opt-in, as do those written before this check existed (same writer)."""
    for name in ("model.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(finished / name) == []
        state = load_weights_file(finished / name)
        assert state["arch"] == "demo_cnn" and state["classes"] == list(SHAPES)
    assert set(load_weights_file(finished / "last.pt")) >= {"optimizer", "scheduler", "torch_rng"}


def test_training_script_checkpoints_load_with_their_namespace(tmp_path):
    """torchvision's reference scripts and timm's train.py save ``args`` as an argparse
    Namespace, the one type beyond torch's own that the allow-list adds."""
    assert SAFE_NAMES == {"argparse.Namespace"}
    network = create_model("demo_cnn", len(SHAPES))
    reference = tmp_path / "checkpoint.pth"
    torch.save(torchvision_reference_checkpoint(network, model="demo_cnn", val_crop_size=24,
                                                device="cuda", data_path="/data", amp=True),
               reference)
    assert load_checkpoint(reference)["arch"] == "demo_cnn"
    pytest.importorskip("timm")
    timm_file = tmp_path / "model_best.pth.tar"
    torch.save(timm_checkpoint(create_model("timm/resnet10t", 3), "resnet10t",
                               timm_args("resnet10t", img_size=32)), timm_file)
    ckpt = load_checkpoint(timm_file)
    assert ckpt["arch"] == "timm/resnet10t" and ckpt["input_size"] == 32


def test_a_type_beyond_the_allow_list_needs_the_opt_in(tmp_path):
    """A harmless type the allow-list does not hold (a Path in ``args``) is refused by name, and
    loads when the user trusts the file."""
    path = tmp_path / "checkpoint.pth"
    network = create_model("demo_cnn", len(SHAPES))
    torch.save(torchvision_reference_checkpoint(network, model="demo_cnn",
                                                output_dir=Path("/runs")), path)
    with pytest.raises(UntrustedCheckpointError, match=r"would call pathlib\.\w*Path"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_checkpoint=True)["arch"] == "demo_cnn"


def test_a_file_that_is_no_checkpoint_is_still_named_so(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as caught:
        load_checkpoint(junk)
    assert not isinstance(caught.value, UntrustedCheckpointError)


# ----------------------------------------------------------------------------- options asked for

def options_of(command: str) -> set:
    return {opt for param in cli.commands[command].params for opt in param.opts}


def assert_asks_for_own_options(result, command: str, *fragments):
    """One line, and every ``--option`` it names is one ``command`` takes."""
    assert_one_line_error(result, *fragments)
    line = result.output.strip().splitlines()[-1]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert named <= options_of(command), (named - options_of(command), line)


@pytest.fixture(scope="module")
def bare(tiny_refinery_ckpt, tmp_path_factory):
    """The tiny refinery as a bare state_dict: no architecture, no input size."""
    path = tmp_path_factory.mktemp("bare") / "state_dict.pt"
    torch.save(torch.load(tiny_refinery_ckpt, weights_only=True)["model"], path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A refine train checkpoint of another architecture than the demo_cnn."""
    path = tmp_path_factory.mktemp("wide") / "model.pt"
    save_checkpoint(path, create_model("demo_cnn_wide", len(SHAPES)), "demo_cnn_wide", SHAPES, 24)
    return path


def test_evaluate_asks_for_its_own_arch_and_res(bare, tiny_data):
    result = run("evaluate", bare, tiny_data, "--workers", 1, ok=False)
    assert_asks_for_own_options(result, "evaluate", "does not name its architecture", "--arch")
    result = run("evaluate", bare, tiny_data, "--workers", 1, "--arch", "demo_cnn", ok=False)
    assert_asks_for_own_options(result, "evaluate", "records no input size", "--res N")
    result = run("evaluate", bare, tiny_data, "--workers", 1, "--arch", "demo_cnn", "--res", 24)
    assert "val top-1" in result.output


def test_train_asks_for_the_teachers_arch_and_res(bare, tiny_data, tmp_path):
    common = ("train", tiny_data, "--arch", "demo_cnn", "--batch-size", 16, "--workers", 1,
              "--epochs", 1, "--teacher", bare)
    result = run(*common, "--out", tmp_path / "a", ok=False)
    assert_asks_for_own_options(result, "train", "--teacher-arch ARCH")
    result = run(*common, "--teacher-arch", "demo_cnn", "--out", tmp_path / "b", ok=False)
    assert_asks_for_own_options(result, "train", "records no input size", "--res N")
    run(*common, "--teacher-arch", "demo_cnn", "--res", 24, "--out", tmp_path / "c")
    assert (tmp_path / "c" / "model.pt").is_file()


@pytest.mark.parametrize("command", ["precompute", "train --init", "train --teacher", "audit"])
def test_weights_of_another_architecture_name_the_commands_own_fix(command, wide, bare, store,
                                                                   tiny_data, tmp_path):
    if command == "precompute":
        result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", wide,
                     "--refinery", "demo_cnn", ok=False)
    elif command == "audit":  # the store records a demo_cnn
        result = run("audit", store, tiny_data, "--weights", wide, ok=False)
    else:
        option = command.split()[1]
        arch = "--arch" if option == "--init" else "--teacher-arch"
        result = run("train", tiny_data, *TRAIN, option, wide, arch, "demo_cnn",
                     "--out", tmp_path / "run", ok=False)
    assert_asks_for_own_options(result, command.split()[0], str(wide), "demo_cnn_wide, not a "
                                "demo_cnn", "weights of a demo_cnn")


def test_precompute_asks_for_refinery_and_input_size(bare, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    result = run("precompute", tiny_data, out, "--weights", bare, ok=False)
    assert_asks_for_own_options(result, "precompute", "--refinery ARCH")
    result = run("precompute", tiny_data, out, "--weights", bare, "--refinery", "demo_cnn",
                 ok=False)
    assert_asks_for_own_options(result, "precompute", "--input-size N")
    assert not out.exists()
