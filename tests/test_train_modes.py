"""Every labelling mode and loss trains end to end; cached labels equal online ones; resume is exact."""
import json

import numpy as np
import pytest
import torch

from refinery_pipeline.core.errors import RefineryError
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.crop_batch import CropBatch
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import ReplayedCrops
from refinery_pipeline.models.tensors import to_pixels
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.training import data as data_module
from refinery_pipeline.training import train as train_module
from refinery_pipeline.training.config import TrainConfig, with_overrides
from refinery_pipeline.training.targets import OnlineTargets, StoredTargets
from refinery_pipeline.training.train import fit


# The subject here is training, not the loader: its pipelines run uncompiled, the same bytes
# at a tenth of the CPU (tests/conftest.py uncompiled_loaders)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


@pytest.fixture(scope="module")
def full_store(labelled_store):
    """BN-eval store with all 10 classes stored (top-k = C) and soft-static labels."""
    return labelled_store(seed=3, crops_per_image=3, top_k=10, soft_static=True)


def config(tiny_data, tmp_path, **kw):
    base = dict(data=str(tiny_data), out_dir=str(tmp_path / "run"), arch="demo_cnn", epochs=1,
                batch_size=16, res=24, workers=1, progress=False, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


MODES = {
    "ground truth": dict(),
    "ground truth, smoothed": dict(label_smoothing=0.1),
    "cached soft": dict(labels="STORE"),
    "cached hard": dict(labels="STORE", label_mode="hard"),
    "soft static": dict(labels="STORE", label_mode="static"),
    "cached soft, renormalised, cycle slots": dict(labels="STORE", rest="renormalize",
                                                   slot_policy="cycle"),
    "online teacher, fresh crops": dict(teacher="CKPT"),
    "online teacher, replayed crops, BN eval": dict(labels="STORE", teacher="CKPT",
                                                    teacher_crops="replay", teacher_bn="eval"),
    "online hard": dict(teacher="CKPT", label_mode="hard"),
    "online, adversarial jittering": dict(teacher="CKPT", adversarial_eta=50.0),
    "online, adversarial twins in the natural BN batch": dict(teacher="CKPT", adversarial_eta=50.0,
                                                               adversarial_bn="shared"),
    "ground truth, a mixing recipe": dict(augment=("trivialaugment", "cutmix:1")),
    "visual category labels": dict(labels="STORE", label_mode="category-visual"),
    "reverse KL": dict(labels="STORE", loss="reverse_kl"),
    "L2 on probabilities": dict(labels="STORE", loss="l2"),
    "soft cross-entropy": dict(labels="STORE", loss="soft_ce"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_and_evaluates(mode, tiny_data, full_store, tiny_refinery_ckpt,
                                         tmp_path):
    kw = {k: {"STORE": str(full_store), "CKPT": str(tiny_refinery_ckpt)}.get(v, v)
          for k, v in MODES[mode].items()}
    record = fit(config(tiny_data, tmp_path, **kw))
    assert np.isfinite(record["train_loss"]) and 0 <= record["val_top1"] <= 100
    assert len(record["val_per_class"]) == 10 and len(record["train_per_class"]) == 10
    if "adversarial_eta" in kw:
        assert np.isfinite(record["adv_loss"]) and record["adv_rms"] > 0


def test_cached_labels_equal_the_online_teacher_on_the_same_crops(tiny_dataset, full_store,
                                                                  tiny_refinery_ckpt):
    """Parity: with top-k = C and BN eval, a cached label is the online label up to float16,
    in every epoch (each replays other slots: the targets must follow them)."""
    arrays = LabelStore.open(full_store).read()
    crops = ReplayedCrops(arrays["boxes"], arrays["flips"], seed=0)
    cached = StoredTargets(arrays["topk_indices"], arrays["topk_probs"], 10, "cpu")
    online = OnlineTargets(Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"))
    loader = make_loader(tiny_dataset, crops, (24, 24), 16, num_workers=1)
    slots_seen = set()
    for _ in range(3):
        for batch in loader:
            pixels = to_pixels(batch.images, "cpu")
            a = cached(batch, pixels)
            b = online(batch, pixels)
            assert torch.allclose(a, b, atol=2e-3)
        slots_seen.add(tuple(crops.slots))
    assert len(slots_seen) > 1  # the epochs did replay different slots


@pytest.mark.parametrize("num_classes, dtype", [(10, torch.int16), (40_000, torch.int32)])
def test_stored_class_indices_are_compact_and_exact(num_classes, dtype):
    """Static labels on the device are held as int16 (int32 for > 32,768 classes); dynamic ones
    stay on the host in the store's dtype; both expand exactly."""
    rng = np.random.default_rng(0)
    top = np.stack([rng.choice(num_classes, 3, replace=False) for _ in range(12)])
    indices = top.reshape(4, 3, 3).astype(np.uint16)  # the store's dtype
    probs = np.tile(np.float16([0.5, 0.3, 0.1]), (4, 3, 1))
    slots = torch.tensor([2, 0, 1, 2])
    targets = StoredTargets(indices, probs, num_classes, "cpu")
    assert isinstance(targets.indices, np.ndarray) and targets.indices.dtype == np.uint16
    static = StoredTargets(indices[:, 0], probs[:, 0], num_classes, "cpu")
    assert static.indices.dtype == dtype
    rows = torch.arange(4)
    for source, expected in [(targets, top.reshape(4, 3, 3)[np.arange(4), slots.numpy()]),
                             (static, top.reshape(4, 3, 3)[:, 0])]:
        dense = source(CropBatch(None, None, rows, slots), None)
        assert torch.equal(dense.topk(3).indices.sort(1).values,
                           torch.from_numpy(np.sort(expected, 1)).long())
        assert torch.allclose(dense.sum(1), torch.ones(4))


def test_static_mode_needs_a_soft_static_store(tiny_data, tmp_path, labelled_store):
    from refinery_pipeline.core.errors import RefineryError
    path = labelled_store()  # K = 2, top-3, no soft-static labels
    with pytest.raises(RefineryError, match="no soft-static labels"):
        fit(config(tiny_data, tmp_path, labels=str(path), label_mode="static"))


@pytest.mark.parametrize("extra", [{}, {"precise_bn": 2}], ids=["plain", "precise BN"])
def test_resume_after_an_interruption_is_bit_for_bit(extra, tiny_data, full_store, tmp_path,
                                                     monkeypatch):
    straight = config(tiny_data, tmp_path / "a", labels=str(full_store), epochs=3, **extra)
    fit(straight)
    resumed = config(tiny_data, tmp_path / "b", labels=str(full_store), epochs=3, resume=True,
                     **extra)
    real_epoch = train_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third epoch
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(with_overrides(resumed, resume=False))  # a fresh run, then resumed
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    fit(resumed)
    a = torch.load(tmp_path / "a" / "run" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "b" / "run" / "metrics.jsonl")
              .read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_partial_store_trains_only_with_allow_partial(tiny_data, labelled_store, tmp_path):
    from refinery_pipeline.core.errors import IncompleteStoreError
    path = labelled_store(only_chunks=[1])
    with pytest.raises(IncompleteStoreError, match="2 of 3 chunks were never written"):
        fit(config(tiny_data, tmp_path, labels=str(path)))
    record = fit(config(tiny_data, tmp_path, labels=str(path), allow_partial=True,
                        batch_size=8))
    assert np.isfinite(record["train_loss"])
    loader_ids = data_module.load_data(
        config(tiny_data, tmp_path, labels=str(path), allow_partial=True), "cpu")[1].indices
    assert sorted(loader_ids.tolist()) == list(range(32, 64))  # chunk 1 only


@pytest.mark.slow
def test_compiled_student_and_teacher_train_with_adversarial_twins(tiny_data, tiny_refinery_ckpt,
                                                                   tmp_path, monkeypatch):
    """--compile wraps both models; input gradients and checkpoints go through the wrappers."""
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m))
    record = fit(config(tiny_data, tmp_path, teacher=str(tiny_refinery_ckpt), compile=True,
                        adversarial_eta=50.0))
    assert np.isfinite(record["train_loss"]) and record["adv_rms"] > 0
    assert len(compiled) == 2  # the student and the online teacher
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    assert not any(k.startswith("_orig_mod") for k in saved)  # loads as a plain refinery


def test_visual_category_labels_are_each_class_mean_stored_label(tiny_data, tiny_dataset,
                                                                 full_store, tmp_path):
    """Table 5's visual level: every crop of class c trains on the mean of the dense targets of
    all stored crops of class-c images, recorded in the run."""
    from refinery_pipeline.loaders.dense_targets import dense_from_sparse
    from refinery_pipeline.training.targets import visual_category_table
    records = LabelStore.open(full_store).read_crops()
    labels = tiny_dataset.labels
    table = visual_category_table(records.topk_indices, records.topk_probs, labels, 10,
                                  crops_per_step=7)  # steps that straddle images
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        dense = dense_from_sparse(torch.from_numpy(records.topk_indices[rows].reshape(-1, 10)
                                                   .astype(np.int64)),
                                  torch.from_numpy(records.topk_probs[rows].reshape(-1, 10)), 10)
        assert torch.allclose(table[c], dense.mean(0), atol=1e-6)
    assert torch.allclose(table.sum(1), torch.ones(10), atol=1e-5)
    fit(config(tiny_data, tmp_path, labels=str(full_store), label_mode="category-visual"))
    saved = np.load(tmp_path / "run" / "category_targets.npy")
    assert np.allclose(saved, table.numpy(), atol=1e-6)


def test_visual_category_labels_need_a_store(tiny_data, tmp_path, tiny_refinery_ckpt):
    with pytest.raises(RefineryError, match="pass --labels STORE"):
        fit(config(tiny_data, tmp_path, label_mode="category-visual"))
    with pytest.raises(RefineryError, match="without --teacher"):
        fit(config(tiny_data, tmp_path, label_mode="category-visual", labels="x.zarr",
                   teacher=str(tiny_refinery_ckpt)))
    assert not (tmp_path / "run").exists()
