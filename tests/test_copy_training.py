"""The FFCV backend and `refine train` replay a keyed store from a copy of its data set: the
same store rows, slots and crops as the plain backend, subsets refused then skipped, resized
copies approximate with rescaled boxes, mixing partners the copy lacks; unkeyed stores as
before."""
import json

import numpy as np
import pytest

import refinery_pipeline as refinery
from refinery_pipeline.sources import open_source
from refinery_pipeline.core.errors import MissingImagesError
from refinery_pipeline.sources.pixels import box_in_frame, cut_crop, decode_jpeg

from .copy_fixtures import (K, N, SIZE, beton_copy, export_files, mixing_origin,  # noqa: F401
                            origin, shuffled, subset)
from .test_cli import assert_one_line_error, run
from .test_train_faults import snapshot


def ffcv_epoch(loader, epoch: int) -> dict:
    """store row -> (crop, slot, top-k, exact, label) over one epoch of an FFCV loader."""
    loader.set_epoch(epoch)
    out = {}
    for batch in loader:
        for i, n in enumerate(batch.indices.tolist()):
            out[n] = (batch.images[i].numpy().copy(), int(batch.slots[i]),
                      batch.targets.indices[i].tolist(), bool(batch.exact[i]),
                      int(batch.labels[i]))
    return out


def plain_epoch(dataset, epoch: int) -> dict:
    dataset.set_epoch(epoch)
    return {s.index: (s.image, s.slot, s.topk_indices.tolist(), s.exact, s.label)
            for s in (dataset[i] for i in range(len(dataset)))}


@pytest.fixture(scope="module")
def shuffled_subset(origin, tmp_path_factory):
    """A keyed .beton of a shuffled 90% of the images, flat names (joined by file name)."""
    kept = subset(origin.keys, 0.9, seed=2)
    return kept, beton_copy(origin, tmp_path_factory.mktemp("copy") / "flat_train.beton", kept,
                            flat=True)


def test_both_backends_replay_the_same_rows_slots_and_crops_from_a_copy(origin,
                                                                         shuffled_subset):
    kept, beton = shuffled_subset
    with pytest.raises(MissingImagesError, match="allow_missing=True"):
        refinery.replay_loader(origin.keyed, beton, batch_size=8, num_workers=1)
    ffcv = refinery.replay_loader(origin.keyed, beton, batch_size=8, num_workers=1,
                                  drop_last=False, allow_missing=True)
    plain = refinery.StoreCropDataset(origin.keyed, beton, allow_missing=True,
                                      crop_format="numpy")
    keys = refinery.open_store(origin.keyed).read_keys()
    labels = refinery.open_store(origin.keyed).read_labels()
    assert ffcv.join.counts() == {**plain.join.counts(), "exact": len(kept), "approximate": 0}
    reference = refinery.StoreCropDataset(origin.plain, origin.beton, crop_format="numpy")
    for epoch in (0, K + 1):
        a, b = ffcv_epoch(ffcv, epoch), plain_epoch(plain, epoch)
        assert sorted(a) == sorted(b) == sorted(keys.index(k) for k in kept)
        for n, (crop, slot, top, exact, label) in a.items():
            assert slot == b[n][1] == refinery.slot_of(epoch, n, K)
            assert np.array_equal(crop, b[n][0]) and top == b[n][2]
            assert exact and b[n][3] and label == b[n][4] == labels[n]
            reference.set_epoch(epoch)  # the same bytes as the store's own .beton
            assert np.array_equal(crop, reference[n].image)


def test_a_tree_copy_is_converted_once_and_joined_by_key(origin, tmp_path):
    """The FFCV backend converts a tree copy to a keyed .beton (as the store's was converted)
    and joins it; exact where the conversion kept the refinery's bytes (passthrough)."""
    kept = subset(origin.keys, 0.9, seed=6)
    export_files(origin, tmp_path / "copy" / "train", kept)
    ffcv = refinery.replay_loader(origin.keyed, tmp_path / "copy", batch_size=8, num_workers=1,
                                  drop_last=False, allow_missing=True)
    beton = refinery.beton_path(tmp_path / "copy", store=origin.keyed)  # the cached conversion
    plain = refinery.StoreCropDataset(origin.keyed, beton, allow_missing=True,
                                      crop_format="numpy")
    store = refinery.open_store(origin.keyed)
    digests, keys = store.read_image_digests(), store.read_keys()
    copy = open_source(beton)
    kept_bytes = dict(zip(copy.keys(), copy.digests().tolist()))
    a, b = ffcv_epoch(ffcv, 2), plain_epoch(plain, 2)
    assert sorted(a) == sorted(b) == sorted(keys.index(k) for k in kept)
    for n, (crop, slot, top, exact, _) in a.items():
        assert slot == b[n][1] and np.array_equal(crop, b[n][0]) and exact == b[n][3]
        assert exact == (kept_bytes[keys[n]] == digests[n].tolist())
    files = refinery.StoreCropDataset(origin.keyed, tmp_path / "copy", allow_missing=True)
    assert all(files[i].exact for i in range(0, len(files), 5))  # the refinery's own bytes


def test_a_resized_beton_copy_is_approximate_with_boxes_in_its_frame(origin, tmp_path):
    beton = beton_copy(origin, tmp_path / "small_train.beton", shuffled(origin.keys), scale=0.5)
    loader = refinery.replay_loader(origin.keyed, beton, batch_size=8, num_workers=1,
                                    drop_last=False)
    store = refinery.open_store(origin.keyed)
    records, sizes = store.read_crops(), store.read_image_sizes()
    copy = open_source(beton)
    item = {key: i for i, key in enumerate(copy.keys())}
    keys = store.read_keys()
    replayed = ffcv_epoch(loader, 1)
    assert len(replayed) == N and loader.join.counts()["approximate"] == N
    for n, (crop, slot, _, exact, _) in replayed.items():
        pixels = decode_jpeg(copy.encoded(item[keys[n]]))
        box = box_in_frame(records.boxes[n, slot], sizes[n], pixels.shape[:2])
        assert not exact and pixels.shape[0] < sizes[n][0]
        assert np.array_equal(crop, cut_crop(pixels, box, bool(records.flips[n, slot]), SIZE))


def test_mixing_partners_missing_from_a_copy_are_replaced_alike_in_both_backends(
        mixing_origin, tmp_path):
    origin = mixing_origin
    kept = subset(origin.keys, 0.5, seed=1)
    beton = beton_copy(origin, tmp_path / "half_train.beton", kept)
    ffcv = refinery.replay_loader(origin.keyed, beton, batch_size=8, num_workers=1,
                                  drop_last=False, allow_missing=True)
    plain = refinery.StoreCropDataset(origin.keyed, beton, allow_missing=True,
                                      crop_format="numpy")
    assert ffcv.join.unreplayable == plain.join.unreplayable > 0
    a, b = ffcv_epoch(ffcv, 3), plain_epoch(plain, 3)
    assert sorted(a) == sorted(b) and len(a) == plain.join.used
    moved = 0
    for n, (crop, slot, top, exact, _) in a.items():
        assert slot == b[n][1] and np.array_equal(crop, b[n][0]) and top == b[n][2]
        moved += slot != refinery.slot_of(3, n, K)
    assert moved > 0


# ----------------------------------------------------------------------------- refine train

def train(*args, ok=True):
    return run("train", *args, "--epochs", 1, "--batch-size", 8, "--workers", 1, "--arch",
               "demo_cnn", "--lr", 0.05, "--warmup-epochs", 0, ok=ok)


@pytest.fixture(scope="module")
def val_beton(origin, tmp_path_factory):
    """A validation split: some images of the data set as their own keyed .beton."""
    return beton_copy(origin, tmp_path_factory.mktemp("val") / "v_val.beton", origin.keys[:16])


def test_train_refuses_a_subset_in_one_line_then_trains_with_allow_missing(
        origin, shuffled_subset, val_beton, tmp_path):
    kept, beton = shuffled_subset
    out = tmp_path / "run"
    before = snapshot(out)
    result = train(beton, "--labels", origin.keyed, "--val", val_beton, "--out", out, ok=False)
    assert_one_line_error(result, str(beton), f"lacks {N - len(kept)} of the {N} images",
                          "--allow-missing")
    assert snapshot(out) == before
    train(beton, "--labels", origin.keyed, "--val", val_beton, "--out", out, "--allow-missing")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    trained = len(kept) // 8 * 8  # incomplete batches are dropped
    assert record["crops_exact"] == trained and record["crops_approximate"] == 0
    assert record["images_missing"] == N - len(kept) == record["images_skipped"]
    config = json.loads((out / "config.json").read_text())
    assert config["copy"]["matched"] == len(kept) and config["copy"]["missing"] == N - len(kept)
    assert config["train_images"] == len(kept) and config["allow_missing"] is True


def test_train_from_a_resized_copy_counts_approximate_crops(origin, val_beton, tmp_path):
    beton = beton_copy(origin, tmp_path / "small_train.beton", origin.keys, scale=0.5)
    out = tmp_path / "run"
    train(beton, "--labels", origin.keyed, "--val", val_beton, "--out", out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["crops_exact"] == 0 and record["crops_approximate"] == N // 8 * 8


def test_a_copy_without_a_validation_split_needs_val(origin, shuffled_subset, tmp_path):
    _, beton = shuffled_subset
    lonely = tmp_path / "lonely.beton"  # no '<name>val.beton' beside it
    lonely.write_bytes(beton.read_bytes())
    lonely.with_name("lonely.beton.meta.json").write_bytes(
        beton.with_name(beton.name + ".meta.json").read_bytes())
    result = train(lonely, "--labels", origin.keyed, "--allow-missing", "--out",
                   tmp_path / "run", ok=False)
    assert_one_line_error(result, "--val")


def test_an_unkeyed_store_still_trains_from_its_own_beton(origin, val_beton, tmp_path):
    out = tmp_path / "run"
    train(origin.beton, "--labels", origin.plain, "--val", val_beton, "--out", out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["crops_exact"] == N // 8 * 8 and "images_missing" not in record
