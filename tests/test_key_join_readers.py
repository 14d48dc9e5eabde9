"""The plain readers join a keyed store with any copy of its data set by key: any order, any
form, subsets (refused, then skipped), extras, resized copies (approximate, boxes rescaled),
mixing partners the copy lacks; older stores read by position as before."""
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refinery_pipeline as refinery
from refinery_pipeline.sources import open_source
from refinery_pipeline.plan.recipe import plan_augment
from refinery_pipeline.loaders.copies import replayable_slot
from refinery_pipeline.core.errors import (ArgumentError, DataSetError, MissingImagesError,
                                           StoreMismatchError)
from refinery_pipeline.sources.keys import AMBIGUOUS_ROW, NO_ROW, KeyIndex, join
from refinery_pipeline.sources.pixels import box_in_frame, boxes_in_frames, cut_crop, reframed
from refinery_pipeline.paper.synthetic import SHAPES

from .copy_fixtures import (K, N, SIZE, export_files, hf_table, mixing_origin,  # noqa: F401
                            origin, png_pixels, shuffled, subset, write_shards)

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")


def reference(origin) -> dict:
    """store row -> (crop, slot, top-k) at epoch 1 from the store's own .beton, by position
    (the unkeyed store: today's reader)."""
    plain = refinery.StoreCropDataset(origin.plain, origin.beton, epoch=1, crop_format="numpy")
    return {n: (s.image, s.slot, s.topk_indices.tolist()) for n, s in
            ((n, plain[n]) for n in range(N))}


@pytest.fixture(scope="module")
def expected(origin):
    return reference(origin)


@pytest.fixture(scope="module")
def copies(origin, tmp_path_factory) -> dict:
    """The whole data set in every form a source reads, each in its own order."""
    out = tmp_path_factory.mktemp("copies")
    files = export_files(origin, out / "tree")
    export_files(origin, out / "flat", flat=True)
    order = shuffled(files, seed=3)
    (out / "list.txt").write_text("\n".join(str(f) for f in order) + "\n")
    table = hf_table(origin, shuffled(origin.keys, seed=4))
    table.save_to_disk(str(out / "table"))
    return {"tree": out / "tree", "flat": out / "flat", "list": out / "list.txt",
            "python list": [str(f) for f in order],
            "shards": write_shards(origin, out / "shards", shuffled(origin.keys, seed=5)),
            "hf table": table, "hf folder": out / "table", "own beton": origin.beton}


def every_item(dataset) -> dict:
    return {s.index: s for s in (dataset[i] for i in range(len(dataset)))}


@pytest.mark.parametrize("form", ["tree", "flat", "list", "python list", "shards", "hf table",
                                  "hf folder", "own beton"])
def test_every_form_of_the_data_set_gives_every_row_exactly(origin, expected, copies, form):
    data = refinery.StoreCropDataset(origin.keyed, copies[form], epoch=1, crop_format="numpy")
    assert len(data) == N and np.array_equal(data.rows, np.arange(N))
    counts = data.join.counts()
    assert counts["matched"] == counts["used"] == N and counts["missing"] == 0
    assert counts["extra"] == 0
    for n, sample in every_item(data).items():
        crop, slot, top = expected[n]
        assert sample.slot == slot == refinery.slot_of(1, n, K)
        assert np.array_equal(sample.image, crop), (form, n)
        assert sample.topk_indices.tolist() == top and sample.exact
        assert sample.label == refinery.open_store(origin.keyed).read_labels()[n]


def test_a_flat_copy_matches_by_the_file_name(origin, copies):
    data = refinery.StoreCropDataset(origin.keyed, copies["flat"])
    assert data.join.keys.by_suffix == N
    assert any("by a trailing part" in line for line in data.join.findings())


def test_a_subset_is_refused_naming_the_count_and_images_then_skipped(origin, expected,
                                                                      tmp_path):
    kept = subset(origin.keys, 0.9)
    export_files(origin, tmp_path / "subset", kept)
    lost = sorted(set(origin.keys) - set(kept))
    with pytest.raises(MissingImagesError) as refused:
        refinery.StoreCropDataset(origin.keyed, tmp_path / "subset")
    message = str(refused.value)
    assert "\n" not in message and f"lacks {len(lost)} of the {N} images" in message
    assert "allow_missing=True" in message and "--allow-missing" in message
    assert any(repr(key) in message for key in lost)
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "subset", epoch=1,
                                     allow_missing=True, crop_format="numpy")
    keys = refinery.open_store(origin.keyed).read_keys()
    assert sorted(keys[n] for n in data.rows) == sorted(kept) and len(data) == len(kept)
    assert data.join.counts()["missing"] == len(lost) == data.join.skipped
    for n, sample in every_item(data).items():
        assert np.array_equal(sample.image, expected[n][0]) and sample.slot == expected[n][1]


def test_extra_images_are_ignored_and_counted(origin, copies, tmp_path):
    shutil.copytree(copies["tree"], tmp_path / "tree")
    for i in range(3):  # images the store never labelled
        shutil.copy(next((tmp_path / "tree" / SHAPES[0]).glob("*.jpg")),
                    tmp_path / "tree" / SHAPES[0] / f"new_{i}.jpg")
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "tree")
    assert len(data) == N and data.join.counts()["extra"] == 3
    assert any(line.startswith("extra: 3") for line in data.join.findings())


def test_a_resized_copy_is_approximate_and_its_boxes_are_rescaled(origin, tmp_path):
    files = export_files(origin, tmp_path / "half", resize=0.5)
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "half", epoch=2,
                                     crop_format="numpy")
    store = refinery.open_store(origin.keyed)
    records, sizes, keys = store.read_crops(), store.read_image_sizes(), store.read_keys()
    by_key = {f.relative_to(tmp_path / "half").with_suffix("").as_posix(): f for f in files}
    for n, sample in every_item(data).items():
        pixels = png_pixels(by_key[keys[n]])
        assert pixels.shape[:2] != tuple(sizes[n]) and not sample.exact
        box = box_in_frame(records.boxes[n, sample.slot], sizes[n], pixels.shape[:2])
        assert np.array_equal(sample.image, cut_crop(pixels, box, bool(
            records.flips[n, sample.slot]), SIZE))


def test_a_rotated_image_is_refused_in_one_line_as_it_is_read(origin, copies, tmp_path):
    from PIL import Image
    shutil.copytree(copies["tree"], tmp_path / "tree")
    store = refinery.open_store(origin.keyed)
    n = int(np.flatnonzero(np.diff(store.read_image_sizes(), axis=1)[:, 0] != 0)[0])
    victim = tmp_path / "tree" / f"{store.read_keys()[n]}.jpg"
    Image.open(victim).transpose(Image.Transpose.ROTATE_90).save(victim, quality=95)
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "tree")
    i = int(np.flatnonzero(data.rows == n)[0])
    with pytest.raises(DataSetError, match="rotated, cropped or padded") as refused:
        data[i]
    assert str(victim) in str(refused.value) and "\n" not in str(refused.value)


def test_a_copy_with_other_classes_is_refused_by_name(origin, copies, tmp_path):
    import csv
    labels = dict(zip(origin.keys, origin.labels.tolist()))
    victim = origin.keys[7]
    wrong = SHAPES[(labels[victim] + 1) % len(SHAPES)]
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for key in origin.keys:
            name = wrong if key == victim else SHAPES[labels[key]]
            writer.writerow([copies["flat"] / f"{key.rsplit('/', 1)[-1]}.jpg", name])
    refinery.StoreCropDataset(origin.keyed, origin.stored())  # the classes as stored: fine
    with pytest.raises(StoreMismatchError, match="other classes") as refused:
        refinery.StoreCropDataset(origin.keyed, open_source(
            tmp_path / "list.csv", label_column="label"))
    assert repr(victim) in str(refused.value) and repr(wrong) in str(refused.value)


def test_class_numbers_without_names_must_renumber_one_to_one(origin, tmp_path):
    import webdataset as wds
    from .copy_fixtures import stored_bytes
    data, labels = stored_bytes(origin), dict(zip(origin.keys, origin.labels.tolist()))
    for name, change in (("renumbered", lambda key, c: (c + 3) % 10),
                         ("wrong", lambda key, c: c + 1 if key == origin.keys[7] else c)):
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as writer:
            for key in origin.keys:
                writer.write({"__key__": key, "jpg": data[key],
                              "cls": change(key, labels[key])})
    assert len(refinery.StoreCropDataset(origin.keyed, tmp_path / "renumbered.tar")) == N
    with pytest.raises(StoreMismatchError, match="other classes"):
        refinery.StoreCropDataset(origin.keyed, tmp_path / "wrong.tar")


def test_a_table_numbering_its_classes_otherwise_is_matched_by_name(origin, copies):
    table = copies["hf table"]
    assert table.features["label"].names != list(SHAPES)  # reversed numbering
    data = refinery.StoreCropDataset(origin.keyed, table)
    labels = refinery.open_store(origin.keyed).read_labels()
    assert all(data[i].label == labels[data.rows[i]] for i in range(0, N, 7))


def test_a_map_style_data_set_needs_a_key_function(origin):
    source = origin.stored()
    items = [(source.image(i), 0) for i in range(len(source))]
    with pytest.raises(ArgumentError, match="key_fn"):
        refinery.StoreCropDataset(origin.keyed, items)
    keys = source.keys()
    data = refinery.StoreCropDataset(origin.keyed, items, key_fn=lambda i: keys[i], epoch=1,
                                     crop_format="numpy")
    plain = refinery.StoreCropDataset(origin.plain, origin.beton, epoch=1, crop_format="numpy")
    for i in range(0, N, 5):
        sample = data[i]
        assert not sample.exact  # decoded pixels: no bytes to compare
        assert np.array_equal(sample.image, plain[sample.index].image)


def test_an_unkeyed_store_reads_by_position_as_before(origin, copies):
    data = refinery.StoreCropDataset(origin.plain, origin.beton)
    assert data.join.keys is None and len(data) == N and data[0].exact
    with pytest.raises(DataSetError, match="names no images"):
        refinery.StoreCropDataset(origin.plain, copies["flat"])
    with pytest.raises(ArgumentError, match="key_fn"):
        refinery.StoreCropDataset(origin.plain, origin.beton, key_fn=str)


def test_batches_carry_the_exact_verdict(origin, copies, tmp_path):
    export_files(origin, tmp_path / "mixed")  # exact files...
    half = export_files(origin, tmp_path / "half", origin.keys[:6], resize=0.5)
    for f in half:  # ...six of them replaced by resized PNGs
        (tmp_path / "mixed" / f.relative_to(tmp_path / "half")).with_suffix(".jpg").unlink()
        shutil.copy(f, tmp_path / "mixed" / f.relative_to(tmp_path / "half"))
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "mixed")
    loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=1,
                                         collate_fn=refinery.CropCollate())
    exact = torch.cat([batch.exact for batch in loader])
    assert exact.dtype == torch.bool and len(exact) == N and int((~exact).sum()) == 6


# ----------------------------------------------------------------------------- mixing partners

def test_a_mixing_partner_missing_from_the_copy_moves_the_slot(mixing_origin, tmp_path):
    """Crop (n, s) mixes with the partner crop (m, j): where the copy lacks m, image n replays
    the next slot (s + i) mod K whose partner it holds, and is skipped if none is."""
    origin = mixing_origin
    kept = subset(origin.keys, 0.5, seed=1)
    export_files(origin, tmp_path / "half", kept)
    full = refinery.StoreCropDataset(origin.keyed, origin.beton, epoch=3, crop_format="numpy")
    data = refinery.StoreCropDataset(origin.keyed, tmp_path / "half", epoch=3,
                                     allow_missing=True, crop_format="numpy")
    store = refinery.open_store(origin.keyed)
    keys = store.read_keys()
    present = np.isin(keys, kept)
    recipe = plan_augment(store.plan, N, SIZE)
    moved = skipped = 0
    for n in range(N):
        first = refinery.slot_of(3, n, K)
        usable = [s for s in ((first + i) % K for i in range(K))
                  if present[recipe.partners([n], [s])[0][0]]]
        if not present[n] or not usable:
            skipped += present[n]
            assert n not in data.rows
            continue
        sample = data[int(np.flatnonzero(data.rows == n)[0])]
        assert sample.slot == usable[0]
        moved += usable[0] != first
        assert np.array_equal(sample.image, full.crop(n, sample.slot))
        assert sample.partner_label == store.read_labels()[
            recipe.partners([n], [sample.slot])[0][0]]
    assert moved > 0  # the case under test happened
    assert data.join.unreplayable == skipped > 0
    lone = present & (data.join.copy_index < 0)  # held, unreplayable: still a partner's pixels
    assert (data.join.item[lone] >= 0).all() and (data.join.item[~present] < 0).all()


@given(st.integers(1, 6), st.data())
@settings(max_examples=60, deadline=None)
def test_the_replayable_slot_is_the_first_usable_one_from_the_epochs(k, data):
    usable = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=k, max_size=k),
                                         min_size=1, max_size=8)))
    rows = np.arange(len(usable))
    slots = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=len(rows),
                                        max_size=len(rows))))
    got = replayable_slot(slots, rows, usable)
    for n, s in enumerate(slots):
        options = [(s + i) % k for i in range(k) if usable[n, (s + i) % k]]
        assert got[n] == (options[0] if options else s)


# ----------------------------------------------------------------------------- frames and keys

@pytest.mark.parametrize("stored, actual, expected", [
    ((170, 256), (2000, 3000), False),   # a store capped at 256 px, the original file
    ((500, 7), (1000, 15), False),       # a narrow image halved (floor)
    ((1000, 15), (15, 1000), True),      # rotated
    ((100, 100), (100, 120), True),      # padded
    ((100, 150), (80, 150), True)])      # cropped
def test_the_reframed_rule_on_known_cases(stored, actual, expected):
    assert bool(reframed(stored, actual)) == expected == bool(reframed(actual, stored))


@given(st.integers(8, 400), st.integers(8, 400), st.floats(0.2, 3.0), st.data())
@settings(max_examples=150, deadline=None)
def test_box_rescaling_is_one_rule_for_a_box_and_for_tables(h, w, scale, data):
    """Any box, any rescale: the same box from the scalar and the table form, inside the new
    frame, and neither way round a reframed frame (a rotated one is)."""
    actual = (max(1, round(h * scale)), max(1, round(w * scale)))
    y, x = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    box = (y, x, data.draw(st.integers(1, h - y)), data.draw(st.integers(1, w - x)))
    one = box_in_frame(box, (h, w), actual)
    table = boxes_in_frames(np.array([[box]]), np.array([[h, w]]), np.array([actual]))
    assert one.tolist() == table[0, 0].tolist()
    y0, x0, h0, w0 = one.tolist()
    assert 0 <= y0 and 0 <= x0 and h0 >= 1 and w0 >= 1
    assert y0 + h0 <= max(actual[0], y0 + 1) and x0 + w0 <= max(actual[1], x0 + 1)
    assert y0 == round(y * actual[0] / h)  # Python's round: half to even
    assert not reframed((h, w), actual)  # a rescaled frame is never reframed
    assert not reframed(actual, (h, w))  # nor the original of a capped store's frame
    if abs(h - w) > 2 and min(h, w) * scale > 2:
        assert reframed((h, w), actual[::-1])  # rotated


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_looking_up_keys_one_by_one_agrees_with_the_join(data):
    names = data.draw(st.lists(st.lists(st.sampled_from(["a", "b", "c", "x"]), min_size=1,
                                        max_size=3).map("/".join), min_size=1, max_size=12,
                               unique=True))
    probe = data.draw(st.lists(st.lists(st.sampled_from(["a", "b", "c", "x", "y"]),
                                        min_size=1, max_size=3).map("/".join), min_size=1,
                               max_size=6, unique=True))
    index = KeyIndex(names)
    for key in probe:
        joined = join(names, [key])
        row = index.row(key)
        if joined.copy_rows[0] >= 0:
            assert row == joined.copy_rows[0]
        elif joined.ambiguous:
            assert row == AMBIGUOUS_ROW
        else:
            assert row == NO_ROW


# ----------------------------------------------------------------------------- streams

def test_webdataset_streams_map_samples_to_their_crops(origin, expected, tmp_path):
    keys = shuffled(origin.keys, seed=9)[:40]
    pattern = write_shards(origin, tmp_path / "shards", keys)
    stage = refinery.StoreCrops(origin.keyed, epoch=1, crop_format="numpy")
    samples = [s for s in wds.WebDataset(pattern, shardshuffle=False).map(stage)]
    store_keys = refinery.open_store(origin.keyed).read_keys()
    assert sorted(store_keys[s.index] for s in samples) == sorted(keys)
    for sample in samples:
        crop, slot, top = expected[sample.index]
        assert sample.slot == slot and np.array_equal(sample.image, crop) and sample.exact
        assert sample.topk_indices.tolist() == top
    assert stage.counts["used"] == stage.counts["exact"] == 40


def test_a_stream_skips_and_counts_extras_and_follows_the_epoch(origin, tmp_path):
    from .copy_fixtures import stored_bytes
    data = stored_bytes(origin)
    with wds.TarWriter(str(tmp_path / "s.tar")) as writer:
        for key in origin.keys[:5]:
            writer.write({"__key__": key, "jpg": data[key]})
        writer.write({"__key__": "elsewhere/unknown", "jpg": data[origin.keys[0]]})
    stage = refinery.StoreCrops(origin.keyed)
    loader = torch.utils.data.DataLoader(wds.WebDataset(str(tmp_path / "s.tar"),
                                                        shardshuffle=False).map(stage),
                                         batch_size=5, num_workers=1, persistent_workers=True,
                                         collate_fn=refinery.CropCollate())
    for epoch in (0, 2):
        stage.set_epoch(epoch)
        batch = next(iter(loader))
        assert np.array_equal(batch.slots.numpy(), refinery.slot_of(epoch, batch.indices.numpy(),
                                                                    K))
        assert bool(batch.exact.all())
    assert stage(dict(__key__="elsewhere/unknown", jpg=b"")) is None
    assert stage.counts["extra"] == 1


def test_a_stream_refuses_a_mixing_store_and_an_unkeyed_one(origin, mixing_origin):
    with pytest.raises(ArgumentError, match="partner"):
        refinery.StoreCrops(mixing_origin.keyed)
    with pytest.raises(ArgumentError, match="names no images"):
        refinery.StoreCrops(origin.plain)
