"""A mapped data set is checked like a tree (issue 25): a torchvision ``ImageFolder`` or
``DatasetFolder`` by its file names against the store's record of its source, as the same
tree given by path is; any other map-style data set by count and labels.

Before, ``StoreCropDataset(store, ImageFolder("DATA/val"))`` was accepted for a store made from
``DATA/train`` whenever the class counts matched.
"""
import shutil

import pytest
from torchvision.datasets import DatasetFolder, ImageFolder

import refinery_pipeline as refinery
from refinery_pipeline.crop_plan import CropPlan
from refinery_pipeline.dataset import open_dataset
from refinery_pipeline.pixels import read_image_file
from refinery_pipeline.precompute import precompute
from refinery_pipeline.refinery import Refinery

from .test_api import write_tree


@pytest.fixture(scope="module")
def tree_and_store(tiny_refinery_ckpt, tmp_path_factory):
    """``DATA/train`` and a store made from it; ``DATA/val`` is the same images under other
    names (so class counts and labels in store order match: only the names differ)."""
    root = write_tree(tmp_path_factory.mktemp("tree"), count=24)
    shutil.rmtree(root / "val")
    for path in sorted((root / "train").rglob("*.png")):
        target = root / "val" / path.parent.name / f"v{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    dataset = open_dataset(root, "train", tmp_path_factory.mktemp("cache"))
    store = tmp_path_factory.mktemp("stores") / "tree.zarr"  # its own: other modules make one
    precompute(dataset, store, Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=2, crops_per_image=2), top_k=3, crop_batch=32, chunk_size=16,
               progress=False)
    return root, store


def png_folder(root):
    return DatasetFolder(str(root), loader=read_image_file, extensions=(".png",))


@pytest.mark.parametrize("make", [ImageFolder, png_folder], ids=["ImageFolder", "DatasetFolder"])
def test_a_folder_data_set_of_other_files_is_refused_like_the_tree(tree_and_store, make):
    root, store = tree_and_store
    val = root / "val"
    with pytest.raises(refinery.StoreMismatchError, match="not the tree") as by_path:
        refinery.StoreCropDataset(store, val)
    with pytest.raises(refinery.StoreMismatchError, match="not the tree") as mapped:
        refinery.StoreCropDataset(store, make(val))
    assert str(mapped.value) == str(by_path.value)  # one check, one message
    message = str(mapped.value)
    assert "\n" not in message and str(val) in message and "pass that tree, or its .beton" in message
    train = refinery.StoreCropDataset(store, make(root / "train"))  # the tree it was made from
    assert train[0].label == train.labels[0]


def test_a_data_set_without_file_names_is_checked_by_count_and_labels(tree_and_store):
    root, store = tree_and_store
    tree = refinery.StoreCropDataset(store, root)
    pairs = [(read_image_file(tree.images.files[n]), int(tree.labels[n]))
             for n in range(len(tree))]
    assert refinery.StoreCropDataset(store, pairs)[3].slot == tree[3].slot  # nothing to compare
    relabelled = [(image, (label + 1) % 10) for image, label in pairs]
    with pytest.raises(refinery.StoreMismatchError, match="image 0 has another class"):
        refinery.StoreCropDataset(store, _Labelled(relabelled))  # listed: refused up front
    unlisted = refinery.StoreCropDataset(store, relabelled)
    with pytest.raises(refinery.StoreMismatchError, match="image 3 has another class"):
        unlisted[3]  # read item by item: refused as it is read
    with pytest.raises(refinery.StoreMismatchError, match="images but the pixel source"):
        refinery.StoreCropDataset(store, pairs[:-1])


class _Labelled(list):
    """A list of ``(image, label)`` that also lists its labels, as ``targets`` (torchvision's
    name), so they are compared with the store's."""

    @property
    def targets(self):
        return [label for _, label in self]


@pytest.mark.parametrize("images", [5, None, object()], ids=["int", "None", "object"])
def test_something_that_is_no_data_set_is_an_argument_error(tree_and_store, images):
    _, store = tree_and_store
    with pytest.raises(refinery.ArgumentError, match="images=.*map-style data set"):
        refinery.StoreCropDataset(store, images)
