import json

import numpy as np
import pytest

from refinery_pipeline.core.errors import IncompleteStoreError, StoreError, StoreMismatchError
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import FORMAT_VERSION, StoreLayout, default_chunk_size

FINGERPRINT = {"num_images": 10, "classes": ["a", "b"], "image_bytes_sha256": "x" * 64,
               "labels_sha256": "y" * 64}


def make_store(path, num_images=10, chunk_size=4):
    """A store of placeholder attributes (no refinery, a plan of a seed only): for the storage
    mechanics; it fails the checks of opening for reading, so tests reopen it unchecked."""
    layout = StoreLayout(num_images, crops_per_image=3, top_k=2, chunk_size=chunk_size)
    attrs = {"plan": {"seed": 1}, "refinery": {"arch": "r"}, "dataset": FINGERPRINT}
    return LabelStore.create(path, layout, attrs, labels=np.arange(num_images) % 2)


def chunk_arrays(store, c, fill):
    n = len(store.layout.chunk_range(c))
    return {"boxes": np.full((n, 3, 4), fill, np.uint16), "flips": np.full((n, 3), 1, np.uint8),
            "topk_indices": np.full((n, 3, 2), fill, np.uint16),
            "topk_probs": np.full((n, 3, 2), 0.25, np.float16)}


def test_round_trip_and_completion(tmp_path):
    store = make_store(tmp_path / "s")
    assert store.layout.num_chunks == 3 and not store.complete
    for c in range(3):
        store.write_chunk(c, chunk_arrays(store, c, fill=c + 1))
    store.finalize()
    again = LabelStore.open(tmp_path / "s", check=False)
    assert again.complete and again.attrs["complete"] is True
    data = again.read()
    assert data["boxes"].shape == (10, 3, 4) and data["topk_probs"].dtype == np.float16
    assert list(data["boxes"][:, 0, 0]) == [1] * 4 + [2] * 4 + [3] * 2
    assert list(again.read(("labels",))["labels"]) == [0, 1] * 5


def test_partial_store_is_refused_unless_allowed(tmp_path):
    store = make_store(tmp_path / "s")
    store.write_chunk(1, chunk_arrays(store, 1, 7))
    assert list(store.done_images()) == [False] * 4 + [True] * 4 + [False] * 2
    with pytest.raises(IncompleteStoreError, match="2 of 3 chunks"):
        store.require_complete()
    store.require_complete(allow_partial=True)
    store.finalize()
    assert "complete" not in LabelStore.open(tmp_path / "s", check=False).attrs


def test_mismatches_name_what_differs(tmp_path):
    store = make_store(tmp_path / "s")
    store.check_matches(FINGERPRINT, plan={"seed": 1})
    with pytest.raises(StoreMismatchError, match="image_bytes_sha256"):
        store.check_matches({**FINGERPRINT, "image_bytes_sha256": "z" * 64})
    with pytest.raises(StoreMismatchError, match="plan mismatch"):
        store.check_matches(FINGERPRINT, plan={"seed": 2})


def test_newer_format_and_foreign_directories_are_refused(tmp_path):
    make_store(tmp_path / "s")
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = FORMAT_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="newer than this refinery reads"):
        LabelStore.open(tmp_path / "s")
    import zarr
    zarr.open_group(str(tmp_path / "other"), mode="w")
    with pytest.raises(StoreError, match="not a refinery label store"):
        LabelStore.open(tmp_path / "other")
    with pytest.raises(StoreError, match="no label store there"):
        LabelStore.open(tmp_path / "missing")


def test_store_is_readable_with_plain_zarr(tmp_path):
    """The documented format: another team needs only zarr to read a store."""
    import zarr
    store = make_store(tmp_path / "s")
    for c in range(3):
        store.write_chunk(c, chunk_arrays(store, c, fill=5))
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert g.attrs["format"] == "refinery-label-store"
    assert g["topk_indices"].shape == (10, 3, 2) and g["chunk_done"][:].all()
    assert g["boxes"].chunks == (4, 3, 4)


def test_default_chunk_size_targets_about_200k_crops():
    assert default_chunk_size(10) == 16384
    assert default_chunk_size(100) == 2048
    assert default_chunk_size(10**7) == 16  # never below 16 images
