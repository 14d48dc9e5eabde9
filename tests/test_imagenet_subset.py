"""ImageNet-1k refineries label ImageNet-subset folders (Imagenette, Tiny-ImageNet) by selecting
their classes' outputs, and the store records which outputs were selected.

No network: the stand-in weights have a 1000-way head (a random MobileNetV3-small put where
torch's hub cache would hold torchvision's download, a demo CNN saved in the layouts other
trainers write), with the head's biases spread so that which outputs were selected, and whether
the softmax ran over them or over all 1000, shows in every probability. The data: a 20-image
ImageFolder tree of 4 ImageNet-1k WordNet-id folders.
"""
import argparse
import configparser
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refinery_pipeline.labelling.audit import audit_store
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
from refinery_pipeline.core.errors import CheckpointError, StoreMismatchError
from refinery_pipeline.models.imagenet_classes import (NUM_IMAGENET1K_CLASSES, imagenet1k_outputs,
                                                       imagenet1k_wnids)
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.models.classes import ClassSubset
from refinery_pipeline.models.checkpoints import save_checkpoint
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import ReplayedCrops

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

REPO = Path(__file__).resolve().parents[1]
NAME = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
# spread over the 1000 outputs, none of them the first four: selecting outputs 0-3 fails
SUBSET = [7, 217, 482, 999]
SIZE = 32


def wnids(outputs=SUBSET) -> list:
    return [imagenet1k_wnids()[i] for i in outputs]


def spread_head(model: torch.nn.Module) -> torch.nn.Module:
    """Biases ~ N(0, 2) and a larger last layer: classes' probabilities differ by far more than
    float16 rounding, and depend on the crop."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        head.bias.copy_(2 * torch.randn(head.out_features, generator=generator))
        head.weight.mul_(20)
    return model.eval()


def full_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return spread_head(create_model(arch, NUM_IMAGENET1K_CLASSES))


def subset_probabilities(model, images: torch.Tensor, outputs, temperature=1.0,
                         normalization=None) -> torch.Tensor:
    """The reference, without the package's code paths: the full model's logits for uint8 NHWC
    crops, the selected columns, softmax(z_S / T)."""
    norm = normalization or {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        logits = model.eval()((images.permute(0, 3, 1, 2).float() - mean) / std)
    return torch.softmax(logits[:, list(outputs)] / temperature, dim=1)


@pytest.fixture(scope="module")
def hub_file(tmp_path_factory):
    """A stand-in for NAME's download: (hub dir, the state_dict's model)."""
    import torchvision
    hub = tmp_path_factory.mktemp("hub")
    url = torchvision.models.get_weight(NAME).url
    file = hub / "checkpoints" / Path(url).name
    file.parent.mkdir(parents=True)
    model = full_model("mobilenet_v3_small")
    torch.save(model.state_dict(), file)
    return hub, model


@pytest.fixture
def hub_weights(hub_file, monkeypatch):
    """NAME resolves to the stand-in; a download attempt fails, as without a network."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_file[0]))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return hub_file[1]


@pytest.fixture(scope="module")
def wnid_tree(tmp_path_factory):
    """DATA/{train,val}/<wnid>/*.jpg: 5 + 2 noise images per class, 28x32 px."""
    root = tmp_path_factory.mktemp("imagenette-like")
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 2)):
        for wnid in wnids():
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 256, (28, 32, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / wnid / f"{i}.jpg", quality=95)
    return root


def tiny_betons(directory: Path, classes) -> Path:
    """``other_train.beton`` and ``other_val.beton``, 2 noise images per class; returns train."""
    rng = np.random.default_rng(1)
    for split in ("val", "train"):
        images = rng.integers(0, 256, (2 * len(classes), 24, 24, 3), dtype=np.uint8)
        labels = np.arange(2 * len(classes)) % len(classes)
        path = directory / f"other_{split}.beton"
        write_beton(ArraySource(images, labels), path, classes=list(classes), num_workers=1)
    return path


# ----------------------------------------------------------------------------- the class ids

def test_the_packaged_ids_are_imagenet1k_in_torchvision_output_order():
    ids = imagenet1k_wnids()
    assert len(ids) == len(set(ids)) == NUM_IMAGENET1K_CLASSES and list(ids) == sorted(ids)
    assert all(re.fullmatch(r"n\d{8}", i) for i in ids)
    timm = pytest.importorskip("timm")
    info = Path(timm.__file__).parent / "data" / "_info"
    assert list(ids) == (info / "imagenet_synsets.txt").read_text().split()
    # output i of torchvision's ImageNet weights is named as id i's WordNet lemmas name it
    import torchvision
    lemmas = dict(line.split("\t", 1) for line in
                  (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    categories = torchvision.models.get_weight(NAME).meta["categories"]
    differ = [c for i, c in zip(ids, categories)
              if c.lower() not in [x.strip().lower() for x in lemmas[i].split(",")]]
    assert differ == ["crane bird", "maillot tank suit"]  # torchvision's two disambiguations


def test_the_ids_ship_as_package_data():
    """A non-editable install must carry the file, not only this checkout."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "imagenet1k_wnids.txt" in cfg["options.package_data"]["refinery_pipeline.models"].split()


def test_outputs_follow_the_data_sets_class_order():
    assert imagenet1k_outputs(wnids()) == SUBSET
    assert imagenet1k_outputs(wnids(SUBSET[::-1])) == SUBSET[::-1]
    assert imagenet1k_outputs(wnids() + ["n99999999"]) is None
    assert imagenet1k_outputs(["circle", "square"]) is None


# ----------------------------------------------------------------------------- loading

def bare_state_dict(path):
    model = full_model("demo_cnn")
    torch.save(model.state_dict(), path)
    return model, {"weights": path, "arch": "demo_cnn"}


def refine_train_checkpoint(path):
    model = full_model("demo_cnn")
    save_checkpoint(path, model, "demo_cnn", imagenet1k_wnids(), SIZE)
    return model, {"weights": path}


def torchvision_reference_checkpoint(path):
    model = full_model("demo_cnn")
    torch.save({"model": model.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="demo_cnn", val_crop_size=SIZE)}, path)
    return model, {"weights": path}


def timm_train_checkpoint(path):
    """What timm's train.py saves for one of its ImageNet models (timm's own tiny test net)."""
    pytest.importorskip("timm")
    model = full_model("timm/test_resnet")
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": model.state_dict(),
                "args": argparse.Namespace(model="test_resnet", img_size=SIZE)}, path)
    return model, {"weights": path}


@pytest.mark.parametrize("layout", [bare_state_dict, refine_train_checkpoint,
                                    torchvision_reference_checkpoint, timm_train_checkpoint])
@pytest.mark.parametrize("outputs", [SUBSET, [999, 7, 482]], ids=["sorted", "any order"])
def test_a_1000_way_checkpoint_labels_a_subset_with_the_renormalised_softmax(layout, outputs,
                                                                             tmp_path):
    model, where = layout(tmp_path / "weights.pt")
    refinery = Refinery.from_checkpoint(where["weights"], where.get("arch"), wnids(outputs),
                                        input_size=SIZE, bn_mode="eval", temperature=2.0)
    assert isinstance(refinery.model, ClassSubset)
    assert refinery.describe()["selected_outputs"] == outputs
    images = torch.randint(0, 256, (6, SIZE, SIZE, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    expected = subset_probabilities(model, images, outputs, temperature=2.0,
                                    normalization=refinery.normalization)
    torch.testing.assert_close(refinery.probabilities(images), expected, atol=1e-5, rtol=1e-4)
    assert (expected.max(1).values - expected.min(1).values).min() > 0.05  # the test can fail


def test_a_checkpoint_naming_its_classes_selects_by_name(tmp_path):
    """A refinery trained on Tiny-ImageNet's 200 classes labels a subset of them."""
    classes = [f"n{i:08d}" for i in range(200)]  # any names: these are not ImageNet-1k ids
    torch.manual_seed(0)
    model = spread_head(create_model("demo_cnn", 200))
    save_checkpoint(tmp_path / "tiny.pt", model, "demo_cnn", classes, SIZE)
    picked = [classes[i] for i in (150, 3, 42)]
    refinery = Refinery.from_checkpoint(tmp_path / "tiny.pt", classes=picked, bn_mode="eval")
    assert refinery.selected_outputs == [150, 3, 42]
    images = torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)
    torch.testing.assert_close(refinery.probabilities(images),
                               subset_probabilities(model, images, [150, 3, 42]),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match="predict 200 classes but the data set has 2, and "
                                              "its class 'n99999999' is not one of theirs"):
        Refinery.from_checkpoint(tmp_path / "tiny.pt", classes=[classes[0], "n99999999"])


def test_the_full_class_set_in_order_is_not_wrapped(hub_weights):
    refinery = Refinery.from_checkpoint(NAME, classes=list(imagenet1k_wnids()))
    assert not isinstance(refinery.model, ClassSubset) and refinery.selected_outputs is None
    assert "selected_outputs" not in refinery.describe()  # stores written before still match


# ----------------------------------------------------------------------------- end to end

def test_precompute_labels_an_imagenet_subset_tree_with_torchvision_weights(hub_weights,
                                                                           wnid_tree, tmp_path):
    store = tmp_path / "labels.zarr"
    run("precompute", wnid_tree, store, "--weights", NAME, "-K", 3, "--top-k", 3,
        "--input-size", SIZE, "--bn-mode", "eval", "--batch-size", 30, "--workers", 1)
    s = LabelStore.open(store)
    assert s.complete and s.classes == wnids()
    assert s.attrs["refinery"]["selected_outputs"] == SUBSET
    assert s.refinery.selected_outputs == SUBSET
    arrays = s.read()
    dataset = open_dataset(wnid_tree, "train")
    loader = make_loader(dataset, ReplayedCrops(arrays["boxes"], arrays["flips"], seed=0),
                         (SIZE, SIZE), 10, num_workers=1)
    seen = 0
    for batch in loader:
        n, k = batch.indices.numpy(), batch.slots.numpy()
        expected = subset_probabilities(hub_weights, batch.images, SUBSET).numpy()
        stored_i = arrays["topk_indices"][n, k].astype(np.int64)
        stored_p = arrays["topk_probs"][n, k].astype(np.float32)
        np.testing.assert_allclose(np.take_along_axis(expected, stored_i, 1), stored_p, atol=2e-3)
        np.testing.assert_allclose(-np.sort(-expected, 1)[:, :3], stored_p, atol=2e-3)
        seen += len(n)
    assert seen == 20
    # the audit recomputes the same labels through the same loading path
    refinery = Refinery.from_checkpoint(NAME, classes=dataset.classes, input_size=SIZE,
                                        bn_mode="eval")
    report = audit_store(dataset, store, refinery, sample_crops=60, num_workers=1)
    assert report.top1_agreement == 1.0 and report.max_probability_error < 2e-3
    whole = Refinery.from_checkpoint(NAME, input_size=SIZE, bn_mode="eval")  # all 1000 outputs
    with pytest.raises(StoreMismatchError, match="selected_outputs"):
        audit_store(dataset, store, whole, sample_crops=60, num_workers=1)
    # and so does the command, which loads the refinery for the store's classes
    result = run("audit", store, wnid_tree, "--weights", NAME, "--sample-crops", 60,
                 "--workers", 1)
    assert "agree" in result.output.lower() and "100" in result.output


def test_stores_of_different_subsets_are_told_apart(hub_weights, wnid_tree, tmp_path):
    store = tmp_path / "labels.zarr"
    run("precompute", wnid_tree, store, "--weights", NAME, "-K", 1, "--top-k", 2,
        "--input-size", SIZE, "--workers", 1)
    s = LabelStore.open(store)
    ours = s.attrs["refinery"]
    s.check_matches(refinery=ours)
    other = {**ours, "selected_outputs": [7, 217, 482, 998]}
    whole = {k: v for k, v in ours.items() if k != "selected_outputs"}
    for differs in (other, whole):
        with pytest.raises(StoreMismatchError, match="refinery mismatch"):
            s.check_matches(refinery=differs)


def test_train_with_an_online_imagenet_teacher(hub_weights, wnid_tree, tmp_path):
    out = tmp_path / "run"
    run("train", wnid_tree, "--teacher", NAME, "--arch", "demo_cnn", "--epochs", 1,
        "--res", SIZE, "--batch-size", 5, "--workers", 1, "--out", out)
    assert (out / "model.pt").is_file() and (out / "metrics.jsonl").read_text().strip()


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("classes, named", [
    (["circle", "square", "star"], "'circle' is not an ImageNet-1k WordNet id"),
    (wnids() + ["n99999999"], "'n99999999' is not an ImageNet-1k WordNet id")])
def test_folders_that_are_not_imagenet1k_ids_are_refused_in_one_line(classes, named,
                                                                      hub_weights, tmp_path):
    data = tiny_betons(tmp_path, classes)
    store = tmp_path / "s.zarr"
    bare = tmp_path / "bare.pt"
    torch.save(full_model("demo_cnn").state_dict(), bare)
    for weights in (["--weights", NAME], ["--weights", bare, "--refinery", "demo_cnn"]):
        result = run("precompute", data, store, *weights, "--input-size", SIZE, ok=False)
        assert_one_line_error(result, f"weights predict 1000 classes but the data set has "
                              f"{len(classes)}", named, "name each class folder by its ImageNet-1k")
    result = run("train", data, "--teacher", NAME, "--out", tmp_path / "run", "--res", SIZE,
                 "--batch-size", 2, ok=False)
    assert_one_line_error(result, NAME, named)
    assert not store.exists() and not (tmp_path / "run" / "model.pt").exists()


def test_imagenet_ids_read_as_their_first_lemma_in_plots():
    from refinery_pipeline.models.imagenet_classes import _imagenet1k_table, readable_name
    assert all(lemmas for _, lemmas in _imagenet1k_table())  # every id has a name
    assert readable_name("n02123394") == "Persian cat"
    assert readable_name("n01440764") == "tench"
    assert readable_name("circle") == "circle"  # other names stay as they are
