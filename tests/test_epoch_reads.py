"""Training reads only what an epoch replays (issue 27, item 3): a process reads its rows' slot
of each epoch from the chunks holding them, not the whole crop table, and replays exactly what
the whole-table lookups it replaces gave: the same slots, boxes, flips, partners and labels,
epoch after epoch, under both slot policies, with and without a mixing recipe, on the FFCV
backend (one process or a rank of several) and the plain one (``StoreCropDataset``, with a
``DistributedSampler`` too).

The references below are what the code before per-epoch reads computed: the store's whole
arrays (``read_crops()``) indexed by :func:`epoch_slots` and the recipe's partners."""
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refinery_pipeline as refinery
from refinery_pipeline.plan.recipe import plan_augment
from refinery_pipeline.plan.crop_plan import CropPlan, epoch_slots
from refinery_pipeline.loaders.epoch_reads import (CUT_ARRAYS, LABEL_ARRAYS, ArraySlots,
                                                   EpochReader, StoreSlots, chunk_spans,
                                                   read_epoch)
from refinery_pipeline.core.errors import ArgumentError, RefineryError, StoreCorruptError
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.sources.pixels import cut_crop
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.replay import replay_loader
from refinery_pipeline.loaders.crop_sources import replayed_crops
from refinery_pipeline.loaders.crop_table import TABLE_FIELDS
from refinery_pipeline.training.targets import store_category_table, visual_category_table

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

EPOCHS = 4  # more than K of either store: the cycle policy starts a second round
POLICIES = ("cycle", "random")


@pytest.fixture(scope="module")
def plain_store(tiny_dataset, tiny_refinery_ckpt, tmp_path_factory):
    """96 images, K = 3, top-4, chunks of 16 images (6 chunks), no recipe."""
    path = tmp_path_factory.mktemp("epoch_reads") / "plain.zarr"
    precompute(tiny_dataset, path, Refinery.from_checkpoint(tiny_refinery_ckpt),
               CropPlan(seed=1, crops_per_image=3), top_k=4, crop_batch=32, chunk_size=16,
               progress=False, num_workers=1)
    return path


@pytest.fixture(scope="module", params=["plain", "mixup"])
def any_store(request, plain_store, mixup_store):
    return plain_store if request.param == "plain" else mixup_store


_WHOLE = {}  # store path -> its whole arrays, read once: the stores here are never changed


def whole(path) -> dict:
    """The store's whole crop table, read from the store once; each caller gets its own copy
    (a test that wrote into a shared one would change every later test's reference)."""
    if str(path) not in _WHOLE:
        _WHOLE[str(path)] = LabelStore.open(path).read_crops().arrays()
    return {name: values.copy() for name, values in _WHOLE[str(path)].items()}


def reference_epoch(path, seed: int, policy: str, epoch: int, rows=None) -> dict:
    """What the whole-table code replayed in ``epoch``: each row's slot, box, flip and label,
    and under a mixing recipe its partner (m, j) with the partner's box and flip."""
    store = LabelStore.open(path)
    arrays, lay = whole(path), store.layout
    rows = np.arange(lay.num_images) if rows is None else np.asarray(rows)
    slots = epoch_slots(seed, epoch, lay.num_images, lay.crops_per_image, policy)[rows]
    out = {"rows": rows, "slots": slots,
           **{name: arrays[name][rows, slots] for name in CUT_ARRAYS + LABEL_ARRAYS}}
    recipe = plan_augment(store.plan, lay.num_images, store.refinery.input_size)
    if recipe is not None and recipe.recipe.mixes:
        m, j = recipe.partners(rows, slots)
        out.update(partner_rows=m, partner_slots=j, partner_boxes=arrays["boxes"][m, j],
                   partner_flips=arrays["flips"][m, j])
    return out


# --------------------------------------------------------------------------- the reader

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 2)), max_size=60))
def test_any_crops_read_are_the_whole_tables_and_only_their_chunks_are_read(plain_store, picks):
    store = LabelStore.open(plain_store)
    arrays = whole(plain_store)
    spans = []
    real = store.read_chunk_span
    store.read_chunk_span = lambda chunks, *a: spans.append(chunks) or real(chunks, *a)
    rows = np.array([p[0] for p in picks], np.int64)
    slots = np.array([p[1] for p in picks], np.int64)
    got = StoreSlots(store).read(rows, slots, CUT_ARRAYS + LABEL_ARRAYS)
    for name, values in got.items():
        assert values.dtype == arrays[name].dtype
        assert np.array_equal(values, arrays[name][rows, slots]), name
    read = sorted(c for span in spans for c in span)
    assert read == sorted(set((rows // 16).tolist()))  # each needed chunk once, no other


def test_chunk_spans_split_runs_of_consecutive_chunks():
    assert [list(s) for s in chunk_spans(np.array([0, 1, 2, 3, 4, 7, 9, 10]), 2)] == \
        [[0, 1], [2, 3], [4], [7], [9, 10]]


@pytest.mark.parametrize("policy", POLICIES)
def test_an_epochs_crops_and_partners_are_the_whole_tables(any_store, policy):
    store = LabelStore.open(any_store)
    lay = store.layout
    recipe = plan_augment(store.plan, lay.num_images, store.refinery.input_size)
    partners = recipe.partners if recipe is not None and recipe.recipe.mixes else None
    slots_of = lambda e, rows: epoch_slots(7, e, 0, lay.crops_per_image, policy, images=rows)
    rows = np.random.default_rng(0).permutation(lay.num_images)[:37]  # a shuffled share
    for epoch in range(EPOCHS):
        crops = read_epoch(StoreSlots(store), epoch, rows, slots_of, partners=partners)
        expected = reference_epoch(any_store, 7, policy, epoch, np.sort(rows))
        assert np.array_equal(crops.rows, expected["rows"])
        assert np.array_equal(crops.slots, expected["slots"])
        for name in CUT_ARRAYS + LABEL_ARRAYS:
            assert np.array_equal(crops.arrays[name], expected[name]), name
            assert crops.arrays[name].shape[0] == 37  # one slot per row: no K axis held
        if partners is not None:
            assert np.array_equal(crops.partner_rows, expected["partner_rows"])
            assert np.array_equal(crops.partner_slots, expected["partner_slots"])
            assert np.array_equal(crops.partner_arrays["boxes"], expected["partner_boxes"])
            assert np.array_equal(crops.partner_arrays["flips"], expected["partner_flips"])
        in_memory = read_epoch(ArraySlots(whole(any_store)), epoch, rows, slots_of,
                               partners=partners)
        assert all(np.array_equal(in_memory.arrays[n], crops.arrays[n]) for n in crops.arrays)


def test_what_a_process_holds_grows_with_its_rows_not_with_K(plain_store):
    store = LabelStore.open(plain_store)
    slots_of = lambda e, rows: epoch_slots(0, e, 0, 3, "random", images=rows)
    half = read_epoch(StoreSlots(store), 0, np.arange(0, 96, 2), slots_of).nbytes
    all_rows = read_epoch(StoreSlots(store), 0, np.arange(96), slots_of).nbytes
    assert all_rows == 2 * half
    arrays = whole(plain_store)
    one_crop = sum(arrays[name].nbytes for name in CUT_ARRAYS + LABEL_ARRAYS) // (96 * 3)
    assert all_rows == 96 * (one_crop + 8 + 8)  # a crop per row, its row and slot: no K


def test_a_damaged_chunk_stops_the_epochs_read(plain_store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(plain_store, damaged)
    chunk = damaged / "topk_probs" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"\0\0\0")
    store = LabelStore.open(damaged)
    slots_of = lambda e, rows: epoch_slots(0, e, 0, 3, "cycle", images=rows)
    read_epoch(StoreSlots(store), 0, np.arange(16), slots_of)  # chunk 0 alone: fine
    with pytest.raises(StoreCorruptError, match="chunk 2: topk_probs") as caught:
        read_epoch(StoreSlots(store), 0, np.arange(96), slots_of)
    assert "\n" not in str(caught.value)


def test_the_next_epoch_is_read_ahead_and_its_failure_raises_when_asked_for():
    calls = []

    def read(epoch, rows=None):
        calls.append(epoch)
        if epoch == 3:
            raise StoreCorruptError("chunk 1: boxes differ")
        return epoch * 10

    reader = EpochReader(read)
    reader.prefetch(1)
    reader.wait()
    assert reader(1) == 10 and calls == [1]  # the read ahead, not a second one
    reader.prefetch(2)
    reader.prefetch(2)  # already under way: not restarted
    assert reader(1) == 10 and reader(2) == 20 and calls == [1, 2]  # epoch 1 again: kept
    reader.prefetch(2, rows=np.arange(3))
    reader.wait()
    assert reader(2, rows=np.arange(4)) == 20 and calls == [1, 2, 2, 2]  # other rows: again
    reader.prefetch(3)
    with pytest.raises(StoreCorruptError, match="chunk 1"):
        reader(3)


# --------------------------------------------------------------------------- the FFCV backend

@pytest.mark.parametrize("policy", POLICIES)
def test_the_crop_table_of_each_epoch_is_the_whole_table_rewrite(any_store, tiny_dataset,
                                                                policy):
    """``ReplayedCrops.fill`` (FFCV's table) and the labels each batch gets, epoch after epoch,
    bit for bit as from the whole arrays."""
    store = LabelStore.open(any_store)
    crops, _ = replayed_crops(store, tiny_dataset, 7, policy, store.refinery.input_size)
    table = np.zeros((96, crops.table_slots, TABLE_FIELDS), np.int32)
    for epoch in range(EPOCHS):
        crops.fill(table, epoch)
        ref = reference_epoch(any_store, 7, policy, epoch)
        expected = np.zeros_like(table)
        expected[:, 0, :4], expected[:, 0, 4], expected[:, 0, 5] = \
            ref["boxes"], ref["flips"], ref["slots"]
        if crops.table_slots == 2:
            crops._fill_partners(expected, ref["partner_boxes"], ref["partner_flips"],
                                 ref["partner_rows"], ref["partner_slots"])
        assert np.array_equal(table, expected), epoch
        assert np.array_equal(crops.slots, ref["slots"])
        labels = crops.sparse_labels(ref["rows"][::-1], ref["slots"][::-1])
        assert np.array_equal(labels.indices.numpy(), ref["topk_indices"][::-1].astype(np.int64))
        assert np.array_equal(labels.probs.numpy(), ref["topk_probs"][::-1])


def test_a_batch_of_another_epoch_is_refused_in_one_line(plain_store, tiny_dataset):
    store = LabelStore.open(plain_store)
    crops, _ = replayed_crops(store, tiny_dataset, 7, "cycle", 24)
    crops.fill(np.zeros((96, 1, TABLE_FIELDS), np.int32), 0)
    other = (crops.slots[:2] + 1) % 3
    with pytest.raises(RefineryError, match="not one epoch 0 replays") as caught:
        crops.sparse_labels(np.arange(2), other)
    assert "\n" not in str(caught.value)


def batches_of(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return [(b.indices.clone(), b.slots.clone(), b.targets, b.images.clone()) for b in loader]


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_loader_batches_carry_the_epochs_slots_and_labels(any_store, tiny_data, policy):
    loader = replay_loader(any_store, tiny_data, 16, 1, seed=3, slot_policy=policy)
    for epoch in range(3):
        ref = reference_epoch(any_store, 3, policy, epoch)
        seen = []
        for indices, slots, targets, _ in batches_of(loader, epoch):
            seen += indices.tolist()
            assert torch.equal(slots, torch.from_numpy(ref["slots"][indices.numpy()]))
            assert np.array_equal(targets.indices.numpy(),
                                  ref["topk_indices"][indices.numpy()].astype(np.int64))
            assert np.array_equal(targets.probs.numpy(), ref["topk_probs"][indices.numpy()])
        assert sorted(seen) == list(range(96))


@pytest.fixture
def two_ranks(monkeypatch):
    """``set_rank(r)``: FFCV's ``distributed=True`` shards as rank r of 2 (DistributedSampler
    asks torch.distributed for both)."""
    import torch.distributed as dist
    rank = [0]
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank[0])
    return lambda r: rank.__setitem__(0, r)


@pytest.mark.parametrize("policy", POLICIES)
def test_each_rank_reads_only_its_share_of_each_epoch(mixup_store, tiny_data, two_ranks, policy):
    """Under ``distributed=True`` a rank reads (and holds) just the rows FFCV gives it that
    epoch, and its batches are those rows with the whole table's slots and labels."""
    shares = {}
    for rank in (0, 1):
        two_ranks(rank)
        loader = replay_loader(mixup_store, tiny_data, 8, 1, seed=3, slot_policy=policy,
                               distributed=True, drop_last=False)
        for epoch in range(3):
            batches = batches_of(loader, epoch)
            items = np.concatenate([b[0].numpy() for b in batches])
            held = loader.crops.current
            assert np.array_equal(held.rows, np.unique(items)) and len(held.rows) == 48
            ref = reference_epoch(mixup_store, 3, policy, epoch, held.rows)
            assert np.array_equal(held.slots, ref["slots"])
            assert np.array_equal(held.partner_arrays["boxes"], ref["partner_boxes"])
            for indices, _, targets, _ in batches:
                where = np.searchsorted(held.rows, indices.numpy())
                assert np.array_equal(targets.probs.numpy(), ref["topk_probs"][where])
            shares[rank, epoch] = set(held.rows.tolist())
    for epoch in range(3):
        assert shares[0, epoch] | shares[1, epoch] == set(range(96))
        assert not shares[0, epoch] & shares[1, epoch]
    assert shares[0, 0] != shares[0, 1]  # FFCV reshuffles the shards every epoch


# --------------------------------------------------------------------------- the plain backend

def reference_crop(data, arrays, n: int, slot: int) -> np.ndarray:
    """Crop ``(n, slot)`` cut and put through the recipe from the whole arrays."""
    def cut(m, j):
        image, _ = data.pixels.read(m)
        return cut_crop(image, arrays["boxes"][m, j], bool(arrays["flips"][m, j]), data.size)
    return data._through_recipe(cut(n, slot), n, slot, cut)[0]


@pytest.mark.parametrize("policy", POLICIES)
def test_store_crop_dataset_replays_each_epoch_as_from_the_whole_table(any_store, tiny_data,
                                                                      policy):
    data = refinery.StoreCropDataset(any_store, tiny_data, slot_policy=policy, seed=5,
                                     crop_format="numpy")
    arrays = whole(any_store)
    for epoch in range(EPOCHS):
        data.set_epoch(epoch)
        ref = reference_epoch(any_store, 5, policy, epoch)
        held = data._crops.arrays()
        for name in ("slots",) + CUT_ARRAYS + LABEL_ARRAYS:
            assert np.array_equal(held[name], ref[name]), name
        if "partner_rows" in ref:
            for name in ("partner_rows", "partner_slots", "partner_boxes", "partner_flips"):
                assert np.array_equal(held[name], ref[name]), name
        for i in (0, 17, 50, 95):  # a few items' pixels (all items' records are checked above)
            sample = data[i]
            n = int(data.rows[i])
            assert sample.slot == ref["slots"][n] == data.slot(n)
            assert np.array_equal(sample.topk_indices, ref["topk_indices"][n].astype(np.int64))
            assert np.array_equal(sample.topk_probs, ref["topk_probs"][n])
            assert np.array_equal(sample.image, reference_crop(data, arrays, n, sample.slot))
        other = (int(ref["slots"][3]) + 1) % data.store.layout.crops_per_image
        assert np.array_equal(data.crop(3, other), reference_crop(data, arrays, 3, other))


def test_a_sampler_share_is_read_per_epoch_and_workers_see_it(mixup_store, tiny_data):
    """With ``num_replicas``, ``set_epoch(epoch, sampler)`` reads the sampler's items alone;
    persistent workers replay them with the whole table's slots; other items are refused."""
    from torch.utils.data import DataLoader, DistributedSampler
    data = refinery.StoreCropDataset(mixup_store, tiny_data, seed=2, num_replicas=2,
                                     crop_format="numpy")
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4)
    loader = DataLoader(data, batch_size=12, sampler=sampler, num_workers=1,
                        persistent_workers=True, collate_fn=refinery.CropCollate())
    assert data._crops.capacity == 48  # a rank's share, not the data set
    for epoch in range(3):
        sampler.set_epoch(epoch)
        data.set_epoch(epoch, sampler)
        rows = data.rows[list(sampler)]
        assert np.array_equal(data._crops.arrays()["rows"], np.sort(rows))
        ref = reference_epoch(mixup_store, 2, "cycle", epoch)
        seen = []
        for batch in loader:
            seen += batch.indices.tolist()
            assert torch.equal(batch.slots, torch.from_numpy(ref["slots"][batch.indices]))
            assert np.array_equal(batch.targets.probs.numpy(),
                                  ref["topk_probs"][batch.indices.numpy()])
        assert sorted(seen) == sorted(rows.tolist())
    missing = next(i for i in range(len(data)) if i not in set(sampler))
    with pytest.raises(RefineryError, match=f"item {missing} .*set_epoch") as caught:
        data[missing]
    assert "\n" not in str(caught.value)


def test_a_sharded_data_set_needs_its_items_each_epoch(plain_store, tiny_data):
    data = refinery.StoreCropDataset(plain_store, tiny_data, num_replicas=4)
    with pytest.raises(ArgumentError, match="items.*set_epoch"):
        data.set_epoch(1)
    with pytest.raises(ArgumentError, match="items"):
        data.set_epoch(1, [0, 96])
    with pytest.raises(RefineryError, match="more than the 24"):
        data.set_epoch(1, range(30))
    with pytest.raises(ArgumentError, match="num_replicas"):
        refinery.StoreCropDataset(plain_store, tiny_data, num_replicas=0)


# --------------------------------------------------------------------------- labels per class

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.integers(1, 400), rest=st.sampled_from(["uniform", "renormalize"]))
def test_the_visual_category_table_read_chunk_by_chunk_is_the_whole_ones(plain_store, step,
                                                                          rest):
    store = LabelStore.open(plain_store)
    arrays, labels, classes = whole(plain_store), store.read_labels(), store.num_classes
    expected = visual_category_table(arrays["topk_indices"], arrays["topk_probs"], labels,
                                     classes, rest, crops_per_step=step)
    got = store_category_table(store, labels, classes, rest, crops_per_step=step)
    assert torch.equal(got, expected)
