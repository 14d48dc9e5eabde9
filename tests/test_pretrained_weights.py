"""torchvision's pretrained weights as a refinery, by the name its reference scripts take.

No network here: the weights file is put where torch's hub cache would have downloaded it (a
random MobileNetV3-small, so the test checks plumbing, not accuracy), and a download is made to
fail on purpose where the test needs one.
"""
import urllib.error

import numpy as np
import pytest
import torch

from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
from refinery_pipeline.core.errors import CheckpointError, RefineryWarning
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.models.checkpoints import file_sha256, load_trained_model
from refinery_pipeline.models.tensors import IMAGENET_NORMALIZATION
from refinery_pipeline.labelling.refinery import Refinery

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

NAME = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
IMAGENET_CLASSES = 1000


@pytest.fixture
def hub_weights(tmp_path, monkeypatch):
    """A MobileNetV3-small state_dict at the path torchvision would download NAME to."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    torch.manual_seed(0)
    state = create_model("mobilenet_v3_small", IMAGENET_CLASSES).state_dict()
    file = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    return file, state


@pytest.fixture
def offline(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def wnid_classes(n=IMAGENET_CLASSES):
    return [f"n{i:08d}" for i in range(n)]


def test_weights_load_by_name_with_their_recorded_facts(hub_weights, offline):
    file, state = hub_weights
    model, ckpt = load_trained_model(NAME, classes=wnid_classes())
    assert ckpt["arch"] == "mobilenet_v3_small" and ckpt["file"] == file
    assert ckpt["input_size"] == 224 and ckpt["normalization"] == IMAGENET_NORMALIZATION
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    refinery = Refinery.from_checkpoint(NAME, classes=wnid_classes(), bn_mode="eval")
    assert refinery.weights_sha256 == file_sha256(file)  # what a label store records
    assert refinery.probabilities(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 1000)


def test_precompute_takes_a_torchvision_weights_name(hub_weights, offline, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(IMAGENET_CLASSES) % IMAGENET_CLASSES
    images = rng.integers(0, 256, (IMAGENET_CLASSES, 20, 20, 3), dtype=np.uint8)
    data = tmp_path / "imagenet_train.beton"
    write_beton(ArraySource(images, labels), data, classes=wnid_classes(), num_workers=1)
    store = tmp_path / "labels.zarr"
    run("precompute", data, store, "--weights", NAME, "-K", 1, "--top-k", 5, "--input-size", 16,
        "--batch-size", 250)
    s = LabelStore.open(store)
    assert s.complete and s.attrs["refinery"]["arch"] == "mobilenet_v3_small"
    assert s.attrs["refinery"]["weights_sha256"] == file_sha256(hub_weights[0])
    assert s.read(("topk_indices",))["topk_indices"].max() >= 10  # all 1000 outputs in play


def test_bad_names_and_mismatches_give_one_line_errors(hub_weights, offline, tiny_data, tmp_path):
    store = tmp_path / "s.zarr"
    result = run("precompute", tiny_data, store, "--weights", "ResNet50_Weights.IMAGENET9K",
                 ok=False)
    assert_one_line_error(result, "ResNet50_Weights.IMAGENET9K", "neither a file nor torchvision")
    result = run("precompute", tiny_data, store, "--weights", NAME, ok=False)
    assert_one_line_error(result, "weights predict 1000 classes but the data set has 10")
    result = run("precompute", tiny_data, store, "--weights", NAME, "--refinery", "resnet18",
                 ok=False)
    assert_one_line_error(result, "weights of a mobilenet_v3_small, not a resnet18")
    result = run("train", tiny_data, "--teacher", NAME, "--out", tmp_path / "run",
                 "--batch-size", 16, ok=False)
    assert_one_line_error(result, NAME, "predict 1000 classes")
    assert not store.exists()


def test_a_failed_download_names_the_file_to_copy(hub_weights, offline):
    hub_weights[0].unlink()
    with pytest.raises(CheckpointError, match="cannot download .*mobilenet_v3_small-047dcff4.pth"
                                              ".*copy that file into .*checkpoints"):
        load_trained_model(NAME, classes=wnid_classes())


def test_a_damaged_cached_file_is_named_for_deletion(hub_weights, offline):
    hub_weights[0].write_bytes(b"half a download")
    with pytest.raises(CheckpointError, match="mobilenet_v3_small-047dcff4.pth does not load .*"
                                              "delete it"):
        load_trained_model(NAME, classes=wnid_classes())


def test_class_order_is_warned_unless_folders_are_imagenet_ids(hub_weights, offline):
    with pytest.warns(RefineryWarning, match="not ImageNet WordNet ids"):
        load_trained_model(NAME, classes=[f"class{i}" for i in range(IMAGENET_CLASSES)])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefineryWarning)
        load_trained_model(NAME, classes=wnid_classes())
