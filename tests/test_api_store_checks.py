"""The public API checks a store as the CLI does (issue 25): every way in refuses a store that
``refine verify`` would refuse, in one line naming the store and the fix, changing no byte.

Before, ``refine verify`` and ``refine train`` refused a store whose mixup recipe had been
dropped from ``plan.augment``, while ``open_store`` + ``StoreCropDataset`` (and
``replay_loader``) replayed its crops without the recipe the labels describe.
"""
from pathlib import Path

import numpy as np
import pytest

import refinery_pipeline as refinery
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.store_tools import verify_store

from .test_cli import assert_one_line_error, run
from .test_store_integrity import copy_store, edit_attributes, store_bytes

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


def drop_recipe(store):
    edit_attributes(store, lambda a: a["plan"].pop("augment"))


def change_temperature(store):
    edit_attributes(store, lambda a: a["refinery"].update(temperature=2.0))


def change_labels(store):
    import zarr
    labels = zarr.open_array(str(store / "labels"), mode="r+")
    labels[5] = (labels[5] + 1) % 10


def drop_recipe_and_digest(store):
    """The edit hidden: without ``attributes_sha256`` nothing would tell the plan changed."""
    edit_attributes(store, lambda a: (a["plan"].pop("augment"), a.pop("attributes_sha256")))


EDITS = {"plan.augment dropped": (drop_recipe, "attributes in zarr.json were edited"),
         "refinery.temperature": (change_temperature, "attributes in zarr.json were edited"),
         "labels array": (change_labels, "array labels does not match"),
         "plan and digest": (drop_recipe_and_digest, "attributes_sha256")}

# Every public way in, each given the store's location (``data``: the tiny .beton).
WAYS = {
    "open_store": lambda path, data: refinery.open_store(path),
    "LabelStore.open": lambda path, data: LabelStore.open(path),
    "StoreCropDataset(path)": lambda path, data: refinery.StoreCropDataset(path, data),
    "StoreCropDataset(unchecked store)": lambda path, data: refinery.StoreCropDataset(
        LabelStore.open(path, check=False), data),
    "replay_loader(path)": lambda path, data: refinery.replay_loader(path, data, 16, 1),
    "replay_loader(unchecked store)": lambda path, data: refinery.replay_loader(
        LabelStore.open(path, check=False), data, 16, 1),
    "read_crops": lambda path, data: LabelStore.open(path, check=False).read_crops(),
    "read_crops(images)": lambda path, data: LabelStore.open(path, check=False).read_crops(
        np.array([3])),
    "read_labels": lambda path, data: LabelStore.open(path, check=False).read_labels(),
}


@pytest.fixture
def edited_copy(mixup_store, tmp_path):
    return copy_store(mixup_store, tmp_path / "labels.zarr")


def test_every_way_in_reads_the_unedited_store(edited_copy, tiny_data):
    """The control: the same calls on the copy before any edit succeed."""
    for name, way in WAYS.items():
        assert way(edited_copy, tiny_data) is not None, name


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("way", WAYS)
def test_every_way_in_refuses_an_edited_store(edited_copy, tiny_data, edit, way):
    change, problem = EDITS[edit]
    change(edited_copy)
    before = store_bytes(edited_copy)
    with pytest.raises(refinery.StoreCorruptError) as refused:
        WAYS[way](edited_copy, tiny_data)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{edited_copy}: ")
    assert problem in message and f"refine verify {edited_copy}" in message  # the fix
    assert store_bytes(edited_copy) == before


@pytest.mark.parametrize("edit", EDITS)
def test_verify_still_lists_and_inspect_refuses_in_one_line(edited_copy, edit):
    """``refine verify`` opens the damaged store to report it; ``refine inspect`` (whose label
    statistics would describe an edited store) refuses it like every other reader."""
    change, problem = EDITS[edit]
    change(edited_copy)
    before = store_bytes(edited_copy)
    assert any(problem in line for line in verify_store(edited_copy).problems)
    assert_one_line_error(run("inspect", edited_copy, ok=False), str(edited_copy), problem,
                          "refine verify")
    assert store_bytes(edited_copy) == before


def test_a_format_2_store_without_a_digest_still_reads(tmp_path):
    """Format-2 stores from before the digest have none: its absence is no edit there."""
    store = copy_store(Path(__file__).parent / "data" / "store_v2.zarr", tmp_path / "v2.zarr")
    edit_attributes(store, lambda a: a.pop("attributes_sha256"))
    assert refinery.open_store(store).read_crops().boxes.shape[0] == 10
    assert verify_store(store).ok
