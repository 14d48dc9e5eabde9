"""The public API: typed store views, the plain-PyTorch backend against the FFCV replay, slots,
dense targets, and the plain path where FFCV cannot be imported."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import refinery_pipeline as refinery
from refinery_pipeline.crop_plan import CropPlan
from refinery_pipeline.dataset import open_dataset
from refinery_pipeline.precompute import precompute
from refinery_pipeline.refinery import Refinery
from refinery_pipeline.synthetic import SHAPES, make_shapes
from refinery_pipeline.targets import StoredTargets

K, TOP_K, SIZE = 3, 4, 24


@pytest.fixture(scope="module")
def api_store(tiny_data, tiny_refinery_ckpt, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "labels.zarr"
    refinery_ = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")
    precompute(open_dataset(tiny_data), path, refinery_, CropPlan(seed=5, crops_per_image=K),
               top_k=TOP_K, crop_batch=32, chunk_size=32, progress=False)
    return path


def write_tree(root: Path, count: int = 40, suffix: str = ".png") -> Path:
    """An ImageFolder tree of shapes (``root/train/<class>/i.png``) with a ``val`` split."""
    for split, seed in (("train", 3), ("val", 4)):
        shapes = make_shapes(count, 40, seed)
        for i, (image, label) in enumerate(zip(shapes.images, shapes.labels)):
            folder = root / split / SHAPES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}{suffix}", quality=95)
    for name in SHAPES:  # every class needs an image in both splits
        for split in ("train", "val"):
            folder = root / split / name
            if not folder.is_dir():
                folder.mkdir(parents=True)
                Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / f"pad{suffix}")
    return root


@pytest.fixture(scope="module")
def tree_store(tiny_refinery_ckpt, tmp_path_factory):
    """A PNG tree and a store made from it (so original files decode exactly like the tree
    was read; the .beton still re-encodes them)."""
    root = write_tree(tmp_path_factory.mktemp("tree"))
    cache = tmp_path_factory.mktemp("cache")
    dataset = open_dataset(root, "train", cache)
    path = tmp_path_factory.mktemp("stores") / "tree.zarr"  # its own: other modules make one
    precompute(dataset, path, Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=2, crops_per_image=K), top_k=TOP_K, crop_batch=32, chunk_size=16,
               progress=False)
    return root, path, dataset


def crops_by_index(batches) -> dict:
    """(image index) -> (crop bytes, slot, stored top-k) over an epoch of CropBatches."""
    out = {}
    for b in batches:
        images = b.images.permute(0, 2, 3, 1) if b.images.shape[1] == 3 else b.images
        for i, n in enumerate(b.indices.tolist()):
            out[n] = (images[i].numpy().copy(), int(b.slots[i]), b.targets.indices[i].tolist())
    return out


def test_public_names_and_typed_store_views(api_store, tiny_dataset):
    for name in refinery.__all__:
        assert hasattr(refinery, name), name
    store = refinery.open_store(api_store)
    assert isinstance(store.plan, refinery.CropPlan) and store.plan.seed == 5
    assert store.plan.crops_per_image == K == store.layout.crops_per_image
    assert isinstance(store.refinery, refinery.RefineryInfo) and store.refinery.input_size == SIZE
    assert store.refinery.bn_mode == "eval" and store.refinery.arch == "demo_cnn"
    assert isinstance(store.dataset, refinery.DatasetInfo)
    assert store.dataset.classes == list(SHAPES) and store.dataset.num_images == 96
    assert isinstance(store.batching, refinery.Batching) and store.batching.crop_batch == 32
    assert store.format_version == refinery.FORMAT_VERSION == 5
    sizes = store.read_image_sizes()
    assert np.array_equal(sizes, np.stack([tiny_dataset.heights, tiny_dataset.widths], -1))
    one = store.read_crops(np.array([7]))
    every = store.read_crops()
    assert one.boxes.shape == (1, K, 4) and one.topk_probs.shape == (1, K, TOP_K)
    assert np.array_equal(one.topk_indices[0], every.topk_indices[7])
    assert np.array_equal(every.slot(2).boxes, every.boxes[:, 2])
    assert np.array_equal(store.read_labels(), tiny_dataset.labels)


def test_plain_backend_reproduces_the_ffcv_replay_byte_for_byte(api_store, tiny_data):
    """Same .beton bytes, two backends: the same crop, slot and label for every (epoch, n)."""
    plain = refinery.StoreCropDataset(api_store, tiny_data)
    ffcv = refinery.replay_loader(api_store, tiny_data, batch_size=16, num_workers=1,
                                  drop_last=False)
    compared = set()
    for epoch in range(K + 1):  # a whole cycle and the start of the next
        plain.set_epoch(epoch)
        ffcv.next_epoch = epoch
        replayed = crops_by_index(ffcv)
        assert len(replayed) == 96
        for n, (pixels, slot, top) in replayed.items():
            sample = plain[n]
            assert sample.slot == slot == refinery.slot_of(epoch, n, K)
            assert np.array_equal(sample.image.permute(1, 2, 0).numpy(), pixels)
            assert sample.topk_indices.tolist() == top
            compared.add((n, slot))
    assert len(compared) == 96 * K  # every stored crop was compared


@pytest.mark.parametrize("batch_size, workers", [(5, 0), (16, 2)])
def test_plain_backend_is_independent_of_batch_size_and_workers(api_store, tiny_data,
                                                                 batch_size, workers):
    plain = refinery.StoreCropDataset(api_store, tiny_data, epoch=1)
    reference = {n: (plain[n].image.numpy(), plain[n].slot) for n in range(96)}
    loader = DataLoader(plain, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=refinery.CropCollate(),
                        generator=torch.Generator().manual_seed(batch_size))
    seen = crops_by_index(loader)
    assert sorted(seen) == list(range(96))
    for n, (pixels, slot, _) in seen.items():
        assert slot == reference[n][1]
        assert np.array_equal(pixels, reference[n][0].transpose(1, 2, 0))


def test_set_epoch_reaches_persistent_workers(api_store, tiny_data):
    plain = refinery.StoreCropDataset(api_store, tiny_data)
    loader = DataLoader(plain, batch_size=96, num_workers=2, persistent_workers=True,
                        collate_fn=refinery.CropCollate())
    for epoch in range(3):
        plain.set_epoch(epoch)
        batch = next(iter(loader))
        expected = refinery.slot_of(epoch, batch.indices.numpy(), K)
        assert np.array_equal(batch.slots.numpy(), expected)


def test_distributed_sampler_shards_keep_the_slots(api_store, tiny_data):
    plain = refinery.StoreCropDataset(api_store, tiny_data, epoch=2)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(plain, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(2)
        shards.append(crops_by_index(DataLoader(plain, batch_size=7, sampler=sampler,
                                                collate_fn=refinery.CropCollate())))
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == 96
    for shard in shards:
        for n, (_, slot, _) in shard.items():
            assert slot == refinery.slot_of(2, n, K)


@pytest.mark.parametrize("rest", refinery.REST_POLICIES)
def test_dense_targets_are_the_training_targets(api_store, tiny_data, rest):
    store = refinery.open_store(api_store)
    records = store.read_crops()
    trained = StoredTargets(records.topk_indices, records.topk_probs, 10, "cpu", rest)
    batch = next(iter(DataLoader(refinery.StoreCropDataset(store, tiny_data, epoch=1),
                                 batch_size=32, collate_fn=refinery.CropCollate(10, rest))))
    assert torch.equal(batch.targets, trained(batch, None))
    assert torch.allclose(batch.targets.sum(1), torch.ones(32))
    sparse = next(iter(DataLoader(refinery.StoreCropDataset(store, tiny_data, epoch=1),
                                  batch_size=32, collate_fn=refinery.CropCollate())))
    assert torch.equal(refinery.dense_targets(sparse.targets, 10, rest), batch.targets)


def test_transforms_and_crop_formats(api_store, tiny_data):
    from torchvision.transforms import v2
    transform = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.25] * 3)])
    sample = refinery.StoreCropDataset(api_store, tiny_data, transform)[3]
    assert sample.image.dtype == torch.float32 and sample.image.shape == (3, SIZE, SIZE)
    pil = refinery.StoreCropDataset(api_store, tiny_data, crop_format="pil")[3].image
    raw = refinery.StoreCropDataset(api_store, tiny_data, crop_format="numpy")[3].image
    assert pil.size == (SIZE, SIZE) and np.array_equal(np.asarray(pil), raw)


def test_original_files_in_the_store_order(tree_store):
    """From the tree's own files: the store's order, checked against its record; torchvision's
    ImageFolder is put in that order by itself."""
    from torchvision.datasets import ImageFolder
    root, path, dataset = tree_store
    store = refinery.open_store(path)
    assert store.dataset.source["num_files"] == dataset.num_images
    from_tree = refinery.StoreCropDataset(store, root)
    from_split = refinery.StoreCropDataset(store, root / "train")
    from_torchvision = refinery.StoreCropDataset(store, ImageFolder(root / "train"))
    for n in (0, 5, dataset.num_images - 1):
        a, b, c = from_tree[n], from_split[n], from_torchvision[n]
        assert a.label == b.label == c.label == dataset.labels[n]
        assert torch.equal(a.image, b.image) and torch.equal(a.image, c.image)
    # the .beton re-encoded the PNGs as JPEG: close to the replay, not equal
    exact = refinery.StoreCropDataset(store, dataset.path)
    difference = (exact[5].image.int() - from_tree[5].image.int()).abs()
    assert 0 < difference.float().mean() < 8


def test_a_changed_tree_is_refused_in_one_line(tree_store, tmp_path):
    import shutil
    root, path, _ = tree_store
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = sorted((copy / "train" / SHAPES[0]).iterdir())[0]
    victim.rename(victim.with_name("renamed" + victim.suffix))  # same count, other names
    with pytest.raises(refinery.StoreMismatchError, match="not the tree"):
        refinery.StoreCropDataset(path, copy)
    with pytest.raises(refinery.StoreMismatchError, match="images but the pixel source"):
        refinery.StoreCropDataset(path, [(np.zeros((8, 8, 3), np.uint8), 0)] * 3)


def test_a_format_1_store_still_reads():
    store = refinery.open_store(Path(__file__).parent / "data" / "store_v1.zarr")
    assert store.format_version == 1 and store.read_image_sizes() is None
    assert store.dataset.source is None and isinstance(store.plan, refinery.CropPlan)
    assert store.read_crops().boxes.shape[1] == store.layout.crops_per_image


BLOCK_FFCV = """
import sys
class _NoFFCV:
    def find_spec(self, name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError("ffcv is hidden for this test")
sys.meta_path.insert(0, _NoFFCV())
"""


def test_the_plain_path_runs_where_ffcv_cannot_be_imported(tree_store):
    root, path, _ = tree_store
    script = BLOCK_FFCV + textwrap.dedent(f"""
        import torch
        import refinery_pipeline as refinery
        data = refinery.StoreCropDataset({str(path)!r}, {str(root)!r})
        loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=1,
                                             collate_fn=refinery.CropCollate(10))
        batch = next(iter(loader))
        assert batch.targets.shape == (8, 10), batch.targets.shape
        assert not any(m == "ffcv" or m.startswith("ffcv.") for m in sys.modules)
        try:
            import ffcv
        except ImportError:
            print("plain path ok without ffcv")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert "plain path ok without ffcv" in result.stdout, result.stderr[-2000:]
