"""Every public API argument is checked (issue 25): a wrong kind or range is an
``ArgumentError`` (a ``RefineryError`` and a ``ValueError``) of one line naming the argument
and the fix, never a raw torch/numpy error nor a silent answer; in range, the call works.

``BAD_CALLS`` goes through ``refinery_pipeline.__all__`` systematically (a test keeps it
complete); the property tests sweep the ranges.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refinery_pipeline as refinery
from refinery_pipeline.plan.crop_plan import epoch_slots
from refinery_pipeline.store.label_store import LabelStore

from .test_store_integrity import store_bytes

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
NOT_WHOLE = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                      st.none(), st.just([1]))


def assert_argument_error(call, name: str):
    """``call()`` raises ArgumentError whose one line starts with ``name=`` and says a fix."""
    with pytest.raises(refinery.ArgumentError) as refused:
        call()
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value,
                                                                refinery.RefineryError)
    assert "\n" not in message and message.startswith(f"{name}="), message
    assert "; pass " in message, message  # the fix
    return message


@pytest.fixture(scope="module")
def store(mixup_store):
    return refinery.open_store(mixup_store)


@pytest.fixture(scope="module")
def dataset(store, tiny_data):
    return refinery.StoreCropDataset(store, tiny_data)


def sparse(indices, k=2):
    indices = torch.as_tensor(indices).reshape(-1, k)
    return refinery.SparseLabels(indices, torch.full(indices.shape, 1 / k, dtype=torch.float16))


# ----------------------------------------------------------------------------- each public call

def bad_calls(store, dataset, data, location):
    """One wrong argument per public callable of ``__all__`` (name -> [(argument, call)])."""
    logits = torch.zeros(4, 10)
    return {
        "open_store": [("location", lambda: refinery.open_store(5))],
        "LabelStore": [("mode", lambda: LabelStore.open(location, mode="w")),
                       ("images", lambda: store.read_crops(np.array([0, 96]))),
                       ("images", lambda: store.read_crops(np.array([1.0]))),
                       ("static", lambda: store.read_crops(static="no")),
                       ("images", lambda: store.read_labels(np.array([-1])))],
        "slot_of": [("epoch", lambda: refinery.slot_of(-1, 3, 4)),
                    ("images", lambda: refinery.slot_of(0, [1, -3], 4)),
                    ("crops_per_image", lambda: refinery.slot_of(0, 3, 0)),
                    ("policy", lambda: refinery.slot_of(0, 3, 4, "sequential")),
                    ("seed", lambda: refinery.slot_of(0, 3, 4, seed=-1))],
        "dense_targets": [("num_classes", lambda: refinery.dense_targets(sparse([0, 12]), 10)),
                          ("num_classes", lambda: refinery.dense_targets(sparse([0, 1]), 0)),
                          ("num_classes", lambda: refinery.dense_targets(sparse([0, 1]), -3)),
                          ("rest", lambda: refinery.dense_targets(sparse([0, 1]), 10, "even")),
                          ("labels", lambda: refinery.dense_targets(torch.ones(2, 7) / 7, 10)),
                          ("labels", lambda: refinery.dense_targets(sparse([0, -1]), 10)),
                          ("labels", lambda: refinery.dense_targets(
                              (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2)), 10))],
        "visual_category_table": [
            ("num_classes", lambda: refinery.visual_category_table(
                np.full((4, 2, 3), 11, np.uint16), np.full((4, 2, 3), 0.3, np.float16),
                np.zeros(4, np.int64), 10)),
            ("labels", lambda: refinery.visual_category_table(
                np.zeros((4, 2, 3), np.uint16), np.zeros((4, 2, 3), np.float16),
                np.zeros(3, np.int64), 10)),
            ("rest", lambda: refinery.visual_category_table(
                np.zeros((4, 2, 3), np.uint16), np.zeros((4, 2, 3), np.float16),
                np.zeros(4, np.int64), 10, rest="flat"))],
        "wordnet_category_table": [
            ("temperature", lambda: refinery.wordnet_category_table(["n01440764"], 0.0)),
            ("classes", lambda: refinery.wordnet_category_table("n01440764"))],
        "get_loss": [("name", lambda: refinery.get_loss("hinge"))],
        "kl_divergence": [("target", lambda: refinery.kl_divergence(logits, torch.zeros(4)))],
        "soft_cross_entropy": [("target", lambda: refinery.soft_cross_entropy(
            logits, torch.zeros(4, 7)))],
        "reverse_kl": [("target", lambda: refinery.reverse_kl(logits, torch.zeros(3, 10)))],
        "l2_on_probabilities": [("logits", lambda: refinery.l2_on_probabilities(
            torch.zeros(10), torch.zeros(4, 10)))],
        "StoreCropDataset": [
            ("epoch", lambda: dataset.set_epoch(-1)),
            ("epoch", lambda: refinery.StoreCropDataset(store, data, epoch=-2)),
            ("seed", lambda: refinery.StoreCropDataset(store, data, seed=1.5)),
            ("size", lambda: refinery.StoreCropDataset(store, data, size=0)),
            ("slot_policy", lambda: refinery.StoreCropDataset(store, data, slot_policy="x")),
            ("crop_format", lambda: refinery.StoreCropDataset(store, data, crop_format="jpg")),
            ("transform", lambda: refinery.StoreCropDataset(store, data, "not callable")),
            ("store", lambda: refinery.StoreCropDataset(42, data)),
            ("images", lambda: refinery.StoreCropDataset(store, 42)),
            ("allow_missing", lambda: refinery.StoreCropDataset(store, data,
                                                                allow_missing="yes")),
            ("key_fn", lambda: refinery.StoreCropDataset(store, data, key_fn="name")),
            ("key_fn", lambda: refinery.StoreCropDataset(store, data, key_fn=str)),
            ("num_replicas", lambda: refinery.StoreCropDataset(store, data, num_replicas=0)),
            ("items", lambda: dataset.set_epoch(1, [len(dataset)]))],
        "StoreCrops": [("store", lambda: refinery.StoreCrops(store)),  # names no images
                       ("epoch", lambda: refinery.StoreCrops(store, epoch=-1)),
                       ("allow_missing", lambda: refinery.StoreCrops(store, allow_missing=1))],
        "CropCollate": [("num_classes", lambda: refinery.CropCollate(0)),
                        ("rest", lambda: refinery.CropCollate(10, "spread"))],
        "BetonImages": [("path", lambda: refinery.BetonImages(3))],
        "FolderImages": [("root", lambda: refinery.FolderImages(None))],
        "MappedImages": [("images", lambda: refinery.MappedImages(3))],
        "replay_loader": [
            ("batch_size", lambda: refinery.replay_loader(store, data, 0)),
            ("num_workers", lambda: refinery.replay_loader(store, data, 8, 0)),
            ("seed", lambda: refinery.replay_loader(store, data, 8, seed=-1)),
            ("slot_policy", lambda: refinery.replay_loader(store, data, 8, slot_policy="y")),
            ("size", lambda: refinery.replay_loader(store, data, 8, size=-4)),
            ("drop_last", lambda: refinery.replay_loader(store, data, 8, drop_last="no")),
            ("allow_missing", lambda: refinery.replay_loader(store, data, 8,
                                                             allow_missing="no")),
            ("data", lambda: refinery.replay_loader(store, 7, 8)),
            ("store", lambda: refinery.replay_loader(None, data, 8))],
        "beton_path": [("data", lambda: refinery.beton_path(5)),
                       ("split", lambda: refinery.beton_path(data, split="test")),
                       ("max_resolution", lambda: refinery.beton_path(data, max_resolution=-1)),
                       ("num_workers", lambda: refinery.beton_path(data, num_workers=0))],
        "check_copy": [("sample", lambda: refinery.check_copy(store, data, sample=0)),
                       ("seed", lambda: refinery.check_copy(store, data, seed=-1)),
                       ("allow_missing", lambda: refinery.check_copy(store, data,
                                                                     allow_missing=1)),
                       ("key_fn", lambda: refinery.check_copy(store, data, key_fn="name")),
                       ("num_workers", lambda: refinery.check_copy(store, data, num_workers=0))],
    }


# Public names that are no calls a user makes with arguments to check: typed views a store
# hands out (built from its attributes, whose edits `open_store` refuses), batch records the
# backends build, constants and errors.
NOT_CALLS = {"StoreLayout", "CropPlan", "RefineryInfo", "DatasetInfo", "Batching", "CropRecords",
             "FORMAT_VERSION", "SLOT_POLICIES", "REST_POLICIES", "LOSSES", "CropBatch",
             "SparseLabels", "NOT_STORED", "CropSample",
             "CopyJoin",  # what a reader's join found (dataset.join, loader.join)
             "CopyReport"}  # what check_copy found


def test_every_public_call_is_covered(store, dataset, tiny_data, mixup_store):
    errors = {name for name in refinery.__all__
              if isinstance(getattr(refinery, name), type)
              and issubclass(getattr(refinery, name), (Exception, Warning))}
    covered = set(bad_calls(store, dataset, tiny_data, mixup_store))
    assert set(refinery.__all__) - NOT_CALLS - errors == covered


def test_every_public_call_names_its_wrong_argument(store, dataset, tiny_data, mixup_store):
    before = store_bytes(mixup_store)
    for calls in bad_calls(store, dataset, tiny_data, mixup_store).values():
        for name, call in calls:
            assert_argument_error(call, name)
    assert store_bytes(mixup_store) == before  # mode="w" would have replaced the store
    assert dataset.epoch == 0  # a refused set_epoch changes nothing


def test_a_replay_loader_epoch_is_checked_too(store, tiny_data):
    loader = refinery.replay_loader(store, tiny_data, 16, 1)
    assert_argument_error(lambda: loader.set_epoch(-1), "epoch")
    loader.set_epoch(np.int64(3))
    assert loader.next_epoch == 3


# ----------------------------------------------------------------------------- ranges

@PROPERTY
@given(epoch=st.integers(-50, 50), image=st.integers(-20, 200), k=st.integers(-2, 12),
       seed=st.integers(-3, 2 ** 40), policy=st.sampled_from(refinery.SLOT_POLICIES))
def test_slot_of_answers_in_range_and_refuses_out_of_it(epoch, image, k, seed, policy):
    call = lambda: refinery.slot_of(epoch, image, k, policy, seed)
    for name, bad in (("epoch", epoch < 0), ("images", image < 0), ("crops_per_image", k < 1),
                      ("seed", seed < 0)):
        if bad:
            assert_argument_error(call, name)
            return
    slot = call()
    assert 0 <= slot < k and slot == epoch_slots(seed, epoch, 0, k, policy, images=[image])[0]


@PROPERTY
@given(epoch=st.one_of(st.integers(-10, 10), NOT_WHOLE))
def test_set_epoch_takes_whole_epochs_from_zero(dataset, epoch):
    dataset.set_epoch(0)
    if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
        dataset.set_epoch(epoch)
        assert dataset.epoch == epoch and dataset[5].slot == refinery.slot_of(epoch, 5, 2)
    else:
        assert_argument_error(lambda: dataset.set_epoch(epoch), "epoch")
        assert dataset.epoch == 0


@PROPERTY
@given(num_classes=st.integers(-3, 14), top=st.integers(0, 12), k=st.integers(1, 4),
       rest=st.one_of(st.sampled_from(refinery.REST_POLICIES), st.text(max_size=4)))
def test_dense_targets_need_a_class_for_every_index(num_classes, top, k, rest):
    labels = sparse(list(range(top, top - k, -1)) if top >= k - 1 else list(range(k)), k)
    call = lambda: refinery.dense_targets(labels, num_classes, rest)
    highest = int(labels.indices.max())
    if num_classes < 1 or (rest in refinery.REST_POLICIES and highest >= num_classes):
        assert_argument_error(call, "num_classes")
    elif rest not in refinery.REST_POLICIES:
        assert_argument_error(call, "rest")
    else:
        dense = call()
        assert dense.shape == (1, num_classes) and torch.allclose(dense.sum(1), torch.ones(1))


@PROPERTY
@given(width=st.integers(1, 12), num_classes=st.integers(1, 12))
def test_dense_input_of_another_width_is_refused(width, num_classes):
    dense = torch.full((3, width), 1 / width)
    if width == num_classes:
        assert refinery.dense_targets(dense, num_classes) is dense
    else:
        assert_argument_error(lambda: refinery.dense_targets(dense, num_classes), "labels")


@PROPERTY
@given(rows=st.lists(st.integers(-5, 120), max_size=6))
def test_read_crops_reads_exactly_the_rows_that_exist(store, rows):
    call = lambda: store.read_crops(np.array(rows, dtype=np.int64))
    if any(not 0 <= r < 96 for r in rows):
        assert_argument_error(call, "images")
        return
    whole = store.read_crops()
    some = call()
    assert np.array_equal(some.boxes, whole.boxes[rows])
    assert np.array_equal(some.topk_probs, whole.topk_probs[rows])


@PROPERTY
@given(temperature=st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan),
                             st.booleans(), st.text(max_size=2)))
def test_wordnet_temperature_must_be_a_positive_number(temperature):
    assert_argument_error(lambda: refinery.wordnet_category_table(["n01440764"], temperature),
                          "temperature")


@PROPERTY
@given(batch_size=st.integers(-5, 0), workers=st.integers(-3, 0))
def test_replay_loader_counts_are_refused_before_any_work(store, tiny_data, batch_size,
                                                          workers):
    assert_argument_error(lambda: refinery.replay_loader(store, tiny_data, batch_size),
                          "batch_size")
    assert_argument_error(lambda: refinery.replay_loader(store, tiny_data, 8, workers),
                          "num_workers")
