"""Models from the ecosystem: torchvision's and timm's training checkpoints, DDP and compiled
state_dicts, timm model names (and which library a shared name means), and the one-line errors
for a checkpoint without a crop size and for an architecture that cannot take the crop size.

All on the CPU with small models; tests that build timm models skip where timm is missing.
"""
import argparse

import pytest
import torch
from torch import nn

from refinery_pipeline.core.errors import CheckpointError
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.registry import (available_models, check_input_size, create_model,
                                               resolve_arch)
from refinery_pipeline.models.checkpoints import (load_checkpoint, load_trained_model,
                                                  save_checkpoint, strip_wrapper_prefixes)
from refinery_pipeline.models.tensors import IMAGENET_NORMALIZATION
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.paper.synthetic import SHAPES

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

CLASSES = 3


def make(arch: str, num_classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, num_classes).eval()


def assert_same_outputs(loaded: nn.Module, original: nn.Module, size: int = 32):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), original.eval()(x))


def assert_refinery_matches(refinery: Refinery, original: nn.Module, size: int = 32):
    """The refinery's probabilities are the original model's softmax on the same crops."""
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(refinery.normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(refinery.normalization["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = original.eval()((images.permute(0, 3, 1, 2).float() - mean) / std).softmax(1)
    torch.testing.assert_close(refinery.probabilities(images), expected, atol=1e-5, rtol=1e-4)


def torchvision_reference_checkpoint(network: nn.Module, **args) -> dict:
    """What torchvision's references/classification/train.py saves (``model_ema`` with
    ``--model-ema``: an AveragedModel's state_dict, keys under ``module.`` plus ``n_averaged``)."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    ema = torch.optim.swa_utils.AveragedModel(network)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)  # EMA weights differ from the plain ones
    return {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "model_ema": ema.state_dict(),
            "args": argparse.Namespace(**args)}


def timm_checkpoint(model: nn.Module, arch: str, args=None) -> dict:
    """What timm's train.py (CheckpointSaver) saves: ``arch`` is ``args.model``, or the model's
    class name when no ``args`` are given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"epoch": 3, "arch": arch if args else type(model).__name__.lower(),
             "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "version": 2,
             "state_dict_ema": {k: v + 1 if v.is_floating_point() else v
                                for k, v in model.state_dict().items()}}
    return {**state, "args": args} if args else state


def timm_args(model: str, img_size=None, input_size=None, mean=None, std=None):
    return argparse.Namespace(model=model, img_size=img_size, input_size=input_size, mean=mean,
                              std=std, num_classes=CLASSES, epochs=10)


# ----------------------------------------------------------------------------- layouts

def test_torchvision_reference_checkpoint_loads_with_its_arch_and_crop_size(tmp_path):
    original = make("resnet18")
    path = tmp_path / "checkpoint.pth"
    torch.save(torchvision_reference_checkpoint(original, model="resnet18", val_crop_size=40,
                                                train_crop_size=32), path)
    model, ckpt = load_trained_model(path)
    assert ckpt["arch"] == "resnet18" and ckpt["input_size"] == 40  # the evaluation crop
    assert_same_outputs(model, original)
    refinery = Refinery.from_checkpoint(path, bn_mode="eval")
    assert refinery.input_size == 40 and refinery.normalization == IMAGENET_NORMALIZATION
    assert_refinery_matches(refinery, original)


def test_torchvision_reference_ema_weights_load_when_asked(tmp_path):
    original = make("demo_cnn")
    path = tmp_path / "checkpoint.pth"
    torch.save(torchvision_reference_checkpoint(original, model="demo_cnn", train_crop_size=24),
               path)
    ema = torch.optim.swa_utils.AveragedModel(original)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    model, ckpt = load_trained_model(path, ema=True)
    assert ckpt["input_size"] == 24
    assert_same_outputs(model, ema.module)
    plain, _ = load_trained_model(path)
    assert_same_outputs(plain, original)
    sd = tmp_path / "sd.pt"
    torch.save(original.state_dict(), sd)
    with pytest.raises(CheckpointError, match="no EMA weights inside"):
        load_checkpoint(sd, ema=True)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_ddp_and_compiled_state_dicts_load(tmp_path, prefix):
    original = make("resnet18")
    path = tmp_path / "sd.pt"
    torch.save({prefix + k: v for k, v in original.state_dict().items()}, path)
    model, ckpt = load_trained_model(path, "resnet18")
    assert_same_outputs(model, original)
    ref = tmp_path / "ref.pth"  # the same inside a reference-script checkpoint
    torch.save({**torchvision_reference_checkpoint(original, model="resnet18"),
                "model": torch.load(path)}, ref)
    assert_same_outputs(load_trained_model(ref)[0], original)


def test_a_real_torch_compile_state_dict_loads(tmp_path):
    original = make("demo_cnn")
    path = tmp_path / "compiled.pt"
    torch.save(torch.compile(original).state_dict(), path)  # no compilation until called
    assert next(iter(torch.load(path))).startswith("_orig_mod.")
    assert_same_outputs(load_trained_model(path, "demo_cnn")[0], original)


def test_a_submodule_called_module_is_not_a_wrapper():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.module, self.head = nn.Linear(2, 2), nn.Linear(2, 2)
    keys = list(strip_wrapper_prefixes(Net().state_dict()))
    assert keys == ["module.weight", "module.bias", "head.weight", "head.bias"]


def test_timm_checkpoint_loads_as_timm_with_its_crop_size_and_normalization(tmp_path):
    timm = pytest.importorskip("timm")
    original = make("resnet18d")
    path = tmp_path / "last.pth.tar"
    torch.save(timm_checkpoint(original, "resnet18d", timm_args("resnet18d", img_size=48)), path)
    model, ckpt = load_trained_model(path)
    assert ckpt["arch"] == "timm/resnet18d" and ckpt["input_size"] == 48
    assert isinstance(model, type(timm.create_model("resnet18d")))
    assert_same_outputs(model, original)
    # no size in args: timm trained at the model's default size, with its normalisation
    torch.save(timm_checkpoint(make("timm/vit_tiny_patch16_224"), "vit_tiny_patch16_224",
                               timm_args("vit_tiny_patch16_224")), path)
    refinery = Refinery.from_checkpoint(path, bn_mode="eval")
    assert refinery.input_size == 224
    assert refinery.normalization == {"mean": [127.5] * 3, "std": [127.5] * 3}


def test_timm_checkpoint_of_a_shared_name_is_timms_model(tmp_path):
    timm = pytest.importorskip("timm")
    original = make("timm/resnet18")
    path = tmp_path / "model_best.pth.tar"
    torch.save(timm_checkpoint(original, "resnet18", timm_args("resnet18", input_size=[3, 32, 32])),
               path)
    model, ckpt = load_trained_model(path)
    assert ckpt["arch"] == "timm/resnet18" and ckpt["input_size"] == 32
    assert type(model).__module__.startswith("timm.")
    assert_same_outputs(model, original)
    with pytest.raises(CheckpointError, match="checkpoint is a timm/resnet18, not a resnet18; "
                                              "pass arch=timm/resnet18 or weights of a resnet18"):
        load_trained_model(path, "resnet18")
    ema, _ = load_trained_model(path, ema=True)
    assert not torch.equal(ema.fc.weight, original.fc.weight)


def test_timm_checkpoint_without_args_needs_arch_and_size(tmp_path):
    pytest.importorskip("timm")
    original = make("resnet18d")
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(timm_checkpoint(original, "resnet18d"), path)  # arch: 'resnet', names no model
    with pytest.raises(CheckpointError, match="does not name its architecture; pass arch=ARCH"):
        load_trained_model(path)
    with pytest.raises(CheckpointError, match="records no input size; pass .*input_size=N"):
        Refinery.from_checkpoint(path, "resnet18d")
    refinery = Refinery.from_checkpoint(path, "timm/resnet18d", input_size=32, bn_mode="eval")
    assert refinery.arch == "timm/resnet18d"
    assert_refinery_matches(refinery, original)


def test_unknown_layouts_are_still_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="no state_dict inside.*torchvision's or timm's"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- names

def test_a_name_both_libraries_have_is_torchvisions_unless_prefixed():
    timm = pytest.importorskip("timm")
    assert resolve_arch("resnet50") == "resnet50" and resolve_arch("convnext_tiny") == \
        "convnext_tiny"
    assert resolve_arch("timm/convnext_tiny") == "timm/convnext_tiny"
    assert timm.is_model("resnet18")
    assert type(make("resnet18")).__module__.startswith("torchvision.")
    assert type(make("timm/resnet18")).__module__.startswith("timm.")
    assert resolve_arch("resnet18d") == resolve_arch("timm/resnet18d") == "timm/resnet18d"
    assert make("resnet18d").fc.out_features == CLASSES


def test_available_models_lists_ours_torchvisions_and_timms():
    pytest.importorskip("timm")
    names = available_models()
    assert {"demo_cnn", "resnet50", "timm/resnet50", "timm/resnet18d"} <= set(names)
    assert "resnet18d" not in names  # timm's always prefixed: one spelling per network


def test_timm_architecture_round_trips_through_checkpoints(tmp_path):
    pytest.importorskip("timm")
    for given, recorded in (("resnet18d", "timm/resnet18d"), ("timm/resnet18", "timm/resnet18")):
        original = make(given, len(SHAPES))
        path = tmp_path / "model.pt"
        save_checkpoint(path, original, given, SHAPES, 32)
        assert torch.load(path, weights_only=False)["arch"] == recorded
        model, ckpt = load_trained_model(path, classes=SHAPES)
        assert ckpt["arch"] == recorded and type(model) is type(original)
        assert_same_outputs(model, original)
        assert load_trained_model(path, given)[1]["arch"] == recorded  # --refinery as trained


def test_a_store_records_the_prefixed_timm_name(tiny_data, tmp_path):
    pytest.importorskip("timm")
    path = tmp_path / "timm.pth.tar"
    torch.save(timm_checkpoint(make("resnet18d", len(SHAPES)), "resnet18d",
                               timm_args("resnet18d", img_size=16)), path)
    store = tmp_path / "labels.zarr"
    run("precompute", tiny_data, store, "--weights", path, "-K", 1, "--top-k", 3,
        "--batch-size", 32)
    recorded = LabelStore.open(store).attrs["refinery"]
    assert recorded["arch"] == "timm/resnet18d" and recorded["input_size"] == 16
    run("audit", store, tiny_data, "--weights", path, "--sample-crops", 32)


def test_unknown_names_mention_both_libraries(monkeypatch):
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet9000'; .*torchvision"
                                              ".*timm"):
        resolve_arch("resnet9000")
    from refinery_pipeline.models import registry as models
    monkeypatch.setattr(models, "_timm", lambda: None)
    with pytest.raises(CheckpointError, match=r"torchvision .*pip install refinery\[timm\]"):
        resolve_arch("resnet18d")
    with pytest.raises(CheckpointError, match=r"'timm/resnet50' is timm's and timm is not "
                                              r"installed; pip install refinery\[timm\]"):
        create_model("timm/resnet50", CLASSES)
    assert resolve_arch("resnet50") == "resnet50"  # torchvision names never need timm


# ----------------------------------------------------------------------------- sizes

def test_a_checkpoint_without_a_size_asks_for_one(tiny_data, tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(make("demo_cnn", len(SHAPES)).state_dict(), sd)
    store = tmp_path / "s.zarr"
    result = run("precompute", tiny_data, store, "--weights", sd, "--refinery", "demo_cnn",
                 ok=False)
    assert_one_line_error(result, str(sd), "records no input size", "--input-size N")
    assert not store.exists()
    run("precompute", tiny_data, store, "--weights", sd, "--refinery", "demo_cnn",
        "--input-size", 16, "-K", 1, "--top-k", 3, "--batch-size", 32)
    assert LabelStore.open(store).attrs["refinery"]["input_size"] == 16
    ref = tmp_path / "ref.pth"  # names its arch (a teacher needs that) but no crop size
    torch.save(torchvision_reference_checkpoint(make("demo_cnn", len(SHAPES)), model="demo_cnn"),
               ref)
    result = run("train", tiny_data, "--teacher", ref, "--out", tmp_path / "run",
                 "--batch-size", 16, ok=False)
    assert_one_line_error(result, str(ref), "records no input size", "--res N")


def test_fixed_size_architectures_refuse_other_sizes():
    check_input_size("vit_b_16", 224)
    check_input_size("resnet18", 32)
    check_input_size("regnet_y_400mf", 32)  # meta tensors fail on it; the CPU pass decides
    with pytest.raises(CheckpointError, match="unknown architecture"):
        check_input_size("resnet9000", 32)


def test_training_a_vit_at_32_px_fails_before_training(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny_data, "--arch", "vit_b_16", "--res", 32, "--epochs", 1, "--out",
                 out, "--batch-size", 16, ok=False)
    assert_one_line_error(result, "--arch vit_b_16 does not accept 32 px inputs",
                          "Expected 224 but got 32", "pass --res N")
    assert not (out / "model.pt").exists() and not (out / "metrics.jsonl").exists()
