"""Where the ``.beton`` is: the exact pixel source, named by the API, precompute and inspect."""
import json

import pytest

import refinery_pipeline as refinery
from refinery_pipeline.sources.dataset import ImageDataset

from .test_cli import assert_one_line_error, make_tree, run

CLASSES = ("disk", "square")  # names the tiny refinery knows


@pytest.fixture(scope="module")
def labelled_tree(tiny_refinery_ckpt, tmp_path_factory):
    """A tree, a store precomputed from it with --max-resolution 24, the summary printed."""
    work = tmp_path_factory.mktemp("beton_path")
    tree = make_tree(work / "tree", classes=CLASSES, per_class=4)
    result = run("precompute", tree, work / "s.zarr", "--weights", tiny_refinery_ckpt, "-K", 2,
                 "--top-k", 2, "--batch-size", 8, "--chunk-size", 8, "--max-resolution", 24,
                 "--workers", 1, "--cache-dir", work / "cache")
    return work, tree, result.output


def test_precompute_prints_the_beton_it_labelled(labelled_tree):
    work, tree, output = labelled_tree
    line = [x for x in output.splitlines() if x.startswith("pixels: ")]
    assert len(line) == 1
    beton = line[0].split()[1]
    assert beton.startswith(str(work / "cache")) and beton.endswith(".beton")
    assert ImageDataset(beton).fingerprint()["image_bytes_sha256"] == \
        refinery.open_store(work / "s.zarr").dataset.image_bytes_sha256


def test_beton_path_names_the_stores_beton_without_converting_again(labelled_tree):
    work, tree, output = labelled_tree
    printed = output.split("pixels: ")[1].split()[0]
    betons = sorted((work / "cache").glob("*.beton"))
    stamp = [p.stat().st_mtime_ns for p in betons]
    found = refinery.beton_path(tree, work / "cache", store=work / "s.zarr")
    assert str(found) == printed
    assert refinery.beton_path(found) == found  # a .beton is its own pixel source
    assert sorted((work / "cache").glob("*.beton")) == betons  # nothing converted again
    assert [p.stat().st_mtime_ns for p in betons] == stamp


def test_beton_path_converts_a_tree_on_request(labelled_tree, tmp_path):
    _, tree, _ = labelled_tree
    uncapped = refinery.beton_path(tree, tmp_path)
    capped = refinery.beton_path(tree, tmp_path, max_resolution=16)
    assert uncapped.parent == capped.parent == tmp_path and uncapped != capped
    assert ImageDataset(capped).max_size[1] <= 16 < ImageDataset(uncapped).max_size[1]
    val = refinery.beton_path(tree, tmp_path, split="val")
    assert ImageDataset(val).num_images == 8  # make_tree: 4 per class in val/ too


def test_beton_path_refuses_another_cap_than_the_stores(labelled_tree, tmp_path):
    work, tree, _ = labelled_tree
    with pytest.raises(refinery.DataSetError) as raised:
        refinery.beton_path(tree, tmp_path, store=work / "s.zarr", max_resolution=32)
    assert "--max-resolution 32" in str(raised.value) and "24" in str(raised.value)
    assert not list(tmp_path.glob("*.beton"))


def test_inspect_names_the_cached_beton(labelled_tree):
    work, _, output = labelled_tree
    printed = output.split("pixels: ")[1].split()[0]
    text = run("inspect", work / "s.zarr", "--cache-dir", work / "cache").output
    assert f"beton: {printed}" in text.splitlines()
    summary = json.loads(run("inspect", work / "s.zarr", "--json", "--cache-dir",
                             work / "cache").output)
    assert summary["beton"] == printed


def test_inspect_says_where_it_looked_when_the_cache_has_no_copy(labelled_tree, tmp_path):
    work, _, _ = labelled_tree
    text = run("inspect", work / "s.zarr", "--cache-dir", tmp_path).output
    assert f"beton: not in {tmp_path}" in text
    summary = json.loads(run("inspect", work / "s.zarr", "--json", "--cache-dir",
                             tmp_path).output)
    assert summary["beton"] is None


def test_inspect_of_a_missing_store_is_one_line(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "none.zarr", ok=False), "none.zarr")
