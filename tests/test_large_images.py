"""Bounded memory on any image: decode buffers do not scale with batch size x largest image.

FFCV allocates every buffer a decoder declares ``batch size x (batches ahead + 2)`` times; its
resized-crop decoder declares the largest image as per-sample scratch, so one 6000 x 4000 photo
asked for 147 GB. Ours keeps that scratch per decoding thread. A tree with one 3000 x 2000 JPEG
among small ones stands in for real photos here (``benchmarks/large_image_memory.py`` measures
6000 x 4000 and 12000 x 9000).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from refinery_pipeline.core.errors import DataSetError
from refinery_pipeline.loaders.replay import BATCHES_AHEAD, make_loader, multi_crop_loader
from refinery_pipeline.loaders.crop_sources import ReplayedCrops
from refinery_pipeline.loaders.crop_table import crop_table
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.sources.dataset import BetonOptions
from refinery_pipeline.sources.pixels import read_image_file
from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_replay import plan_arrays
from .test_train_faults import snapshot

LARGE = (2000, 3000)  # height, width
CLASSES = ("disk", "square")  # names the tiny refinery knows: it labels this tree too


def smooth_image(height, width, seed) -> np.ndarray:
    """Broad colour gradients with a few blobs: cheap to encode, not flat."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([127.5 + 127.5 * np.sin(9 * x + 5 * y + p) for p in phase], -1).astype(
        np.uint8)


@pytest.fixture(scope="module")
def large_tree(tmp_path_factory):
    """``train/`` (3 small JPEGs per class, one large in the first) and ``val/``."""
    root = tmp_path_factory.mktemp("large") / "tree"
    for split, count in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (48 + 8 * i, 64 - 4 * i)
                Image.fromarray(smooth_image(*size, seed=10 * c + i)).save(
                    root / split / name / f"{i}.jpg", quality=90)
    Image.fromarray(smooth_image(*LARGE, seed=99)).save(root / "train" / CLASSES[0] / "big.jpg",
                                                        quality=90)
    return root


@pytest.fixture(scope="module")
def large_dataset(large_tree, tmp_path_factory):
    return open_dataset(large_tree, "train", tmp_path_factory.mktemp("cache"), num_workers=1)


def allocated_bytes(buffers) -> int:
    """Bytes of everything FFCV allocates for a pipeline (arrays, tensors, nested)."""
    if isinstance(buffers, dict):
        return sum(allocated_bytes(b) for b in buffers.values())
    if isinstance(buffers, (list, tuple)):
        return sum(allocated_bytes(b) for b in buffers)
    if isinstance(buffers, torch.Tensor):
        return buffers.numel() * buffers.element_size()
    return 0 if buffers is None else int(buffers.nbytes)


@pytest.mark.parametrize("batch", [2, 8])
def test_decode_scratch_is_per_thread_not_per_sample(large_dataset, batch):
    """What FFCV allocates grows with the batch by its crops only; the decoder holds one
    largest-image buffer per decoding thread, whatever the batch size."""
    size, threads, slots = 16, 2, 3
    boxes, flips = plan_arrays(large_dataset, CropPlan(seed=1, crops_per_image=slots))
    ids = np.arange(large_dataset.num_images)
    loader = multi_crop_loader(large_dataset, crop_table(boxes, flips), (size, size), batch, ids,
                               num_workers=threads)
    largest = LARGE[0] * LARGE[1] * 3
    assert large_dataset.max_size == LARGE
    ring = batch * (BATCHES_AHEAD + 2)
    per_sample = slots * size * size * 3 + (2 + slots) * 8  # crops, label row
    assert allocated_bytes(loader.graph.allocate_memory(batch, BATCHES_AHEAD + 2)) \
        <= ring * per_sample + 4096
    decoder = loader.pipeline_specs["image"].decoder
    assert decoder.scratch_bytes == threads * largest
    assert decoder.scratch.nbytes == threads * largest


def replay_epochs(dataset, boxes, flips, batch, epochs, threads=2, size=24):
    """Each epoch's crops of every image as a student's loader delivers them."""
    crops = ReplayedCrops(boxes, flips, seed=4)
    loader = make_loader(dataset, crops, (size, size), batch, threads, seed=4, drop_last=False)
    shown = []
    for _ in range(epochs):
        images = np.zeros((dataset.num_images, size, size, 3), np.uint8)
        slots = np.full(dataset.num_images, -1)
        for b in loader:
            images[b.indices.numpy()] = b.images.numpy()
            slots[b.indices.numpy()] = b.slots.numpy()
        shown.append((images, slots))
    return shown


def labelled_crops(dataset, boxes, flips, batch, threads=2, size=24):
    """All K crops of every image as precompute cuts them for the refinery."""
    out = np.zeros((dataset.num_images, boxes.shape[1], size, size, 3), np.uint8)
    for b in multi_crop_loader(dataset, crop_table(boxes, flips), (size, size), batch,
                               np.arange(dataset.num_images), num_workers=threads):
        out[b.indices.numpy()] = b.images.numpy()
    return out


@pytest.mark.parametrize("cap", [0, 256])
def test_replayed_crops_of_a_large_image_are_the_labelled_ones(large_tree, tmp_path, cap):
    """Byte for byte, at other batch sizes and thread counts than precompute's, uncapped and
    with the longer side capped (boxes then drawn in the capped frame)."""
    dataset = open_dataset(large_tree, "train", tmp_path, BetonOptions(max_resolution=cap),
                           num_workers=1)
    assert dataset.max_size == (LARGE if not cap else (170, 256))  # INTER_AREA, floored
    boxes, flips = plan_arrays(dataset, CropPlan(seed=7, crops_per_image=3))
    stored = labelled_crops(dataset, boxes, flips, batch=4, threads=2)
    for batch, threads in ((3, 1), (5, 2)):
        for images, slots in replay_epochs(dataset, boxes, flips, batch, 2, threads):
            assert np.array_equal(images, stored[np.arange(dataset.num_images), slots])


def test_an_abandoned_epoch_never_decodes_beside_the_next(large_dataset):
    """The decoder's per-thread buffers belong to the loader: breaking out of an epoch, then
    iterating again, gives that epoch's crops exactly (the old epoch is stopped first)."""
    boxes, flips = plan_arrays(large_dataset, CropPlan(seed=3, crops_per_image=2))
    expected = replay_epochs(large_dataset, boxes, flips, batch=2, epochs=2)
    crops = ReplayedCrops(boxes, flips, seed=4)
    loader = make_loader(large_dataset, crops, (24, 24), 2, 2, seed=4, drop_last=False)
    for epoch in range(2):
        abandoned = []
        for _ in range(2):  # start the epoch, take one batch, walk away; twice over
            loader.set_epoch(epoch)
            abandoned.append(iter(loader))
            next(abandoned[-1])
        loader.set_epoch(epoch)
        images = np.zeros_like(expected[epoch][0])
        for b in loader:
            assert not any(old.epoch.is_alive() for old in abandoned)  # FFCV's threads
            images[b.indices.numpy()] = b.images.numpy()
        assert np.array_equal(images, expected[epoch][0])


# --------------------------------------------------------------------------- the CLI, end to end

@pytest.fixture(scope="module")
def capped_store(large_tree, tiny_refinery_ckpt, tmp_path_factory):
    """``refine precompute TREE --max-resolution 256``: the store and its cache."""
    work = tmp_path_factory.mktemp("capped")
    result = run("precompute", large_tree, work / "s.zarr", "--weights", tiny_refinery_ckpt,
                 "-K", 2, "--top-k", 2, "--batch-size", 8, "--chunk-size", 8,
                 "--max-resolution", 256, "--workers", 1, "--cache-dir", work / "cache")
    return work, result.output


def test_precompute_caps_the_frame_and_records_it(capped_store):
    work, _ = capped_store
    store = LabelStore.open(work / "s.zarr")
    assert store.read_image_sizes().max() == 256
    assert store.dataset.source["conversion"] == {"max_resolution": 256, "jpeg": "passthrough"}


def test_store_commands_convert_the_tree_as_the_store_records(capped_store, large_tree):
    """No --max-resolution again: train, verify and audit find the store's .beton."""
    work, _ = capped_store
    cache = ["--cache-dir", work / "cache"]
    assert "fingerprint matches" in run("verify", work / "s.zarr", "--data", large_tree,
                                        *cache).output
    run("train", large_tree, "--labels", work / "s.zarr", "--arch", "demo_cnn", "--epochs", 1,
        "--batch-size", 4, "--workers", 1, "--out", work / "run", *cache)
    assert len(list((work / "cache").glob("*.beton"))) == 2  # train and val, capped: no others
    evaluated = run("evaluate", work / "run", "--workers", 1, *cache).output
    assert "not the data" not in evaluated and (work / "run" / "eval_val.json").is_file()
    assert len(list((work / "cache").glob("*.beton"))) == 2  # evaluated on the run's own frames


def test_a_cap_other_than_the_stores_is_refused_in_one_line(capped_store, large_tree, tmp_path):
    work, _ = capped_store
    before = snapshot(work)
    result = run("train", large_tree, "--labels", work / "s.zarr", "--max-resolution", 128,
                 "--out", tmp_path / "run", "--cache-dir", work / "cache", ok=False)
    assert_one_line_error(result, "--max-resolution 128", "--max-resolution 256")
    assert not (tmp_path / "run").exists() and snapshot(work) == before


def test_a_cap_on_a_beton_is_refused_in_one_line(large_dataset, tiny_refinery_ckpt, tmp_path):
    result = run("precompute", large_dataset.path, tmp_path / "s.zarr", "--weights",
                 tiny_refinery_ckpt, "--max-resolution", 256, ok=False)
    assert_one_line_error(result, "--max-resolution 256", str(large_dataset.path),
                          "ImageFolder tree")
    assert not (tmp_path / "s.zarr").exists()


def test_the_tree_path_rescales_boxes_from_the_capped_frame(capped_store, large_tree):
    """StoreCropDataset over the original files: the box of the 3000 x 2000 file scaled from
    the store's 256 x 170 frame, so its crops show what the labelled ones show."""
    from refinery_pipeline import BetonImages, StoreCropDataset, beton_path
    work, _ = capped_store
    store = work / "s.zarr"
    exact = StoreCropDataset(store, BetonImages(beton_path(large_tree, work / "cache",
                                                           store=store)), crop_format="numpy")
    files = StoreCropDataset(store, large_tree, crop_format="numpy")
    big = [n for n, f in enumerate(files.images.files) if f.name == "big.jpg"][0]
    for slot in range(2):
        difference = np.abs(exact.crop(big, slot).astype(int) - files.crop(big, slot)).mean()
        assert difference < 8, difference


# --------------------------------------------------------------------------- decompression bombs

@pytest.fixture
def small_pil_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered so that the 3000 x 2000 image is above it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # refused above 2,000,000


def test_an_image_above_the_limit_is_refused_in_one_line(large_tree, small_pil_limit, tmp_path):
    big = large_tree / "train" / CLASSES[0] / "big.jpg"
    result = run("convert", large_tree, tmp_path / "out", "--workers", 1, ok=False)
    assert_one_line_error(result, str(big), "6,000,000 pixels", "downscale the file")
    assert not list(tmp_path.glob("out/*.beton"))
    with pytest.raises(DataSetError, match="decompression-bomb"):
        read_image_file(big)  # the tree path, through libjpeg-turbo: the same limit


def test_an_image_under_the_limit_reads_without_pils_warning(large_tree, monkeypatch):
    """PIL warns at half its limit; decode memory is bounded per thread, so that is noise."""
    import warnings
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # warns above, refuses above 8M
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from refinery_pipeline.sources.pixels import open_image_file
        assert open_image_file(large_tree / "train" / CLASSES[0] / "big.jpg").shape == LARGE + (3,)


# --------------------------------------------------------------------------- .beton pages

def big_raw_images():
    """An image of 9.7 MB raw, more than FFCV's default 8 MiB page, and a small one."""
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (1800, 1800, 3), dtype=np.uint8),
            rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)]


def test_an_image_larger_than_ffcvs_default_page_converts(tmp_path):
    """FFCV's writer process raised on a sample over its 8 MiB page and its main process
    waited forever; pages are sized from the largest image now."""
    from refinery_pipeline.loaders.pixel_readers import BetonImages
    from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
    from refinery_pipeline.sources.dataset import ImageDataset
    images = big_raw_images()
    order = write_beton(ArraySource(images, [0, 1]), tmp_path / "big.beton",
                        BetonOptions(write_mode="raw"), num_workers=1)
    assert ImageDataset(tmp_path / "big.beton").reader.page_size == 16 << 20
    read = BetonImages(tmp_path / "big.beton")
    assert all(np.array_equal(read.image(n), images[order[n]]) for n in range(2))


def test_a_sample_larger_than_its_page_fails_fast_in_one_line(tmp_path, monkeypatch):
    import signal

    from refinery_pipeline.sources import beton_writer as dataset
    monkeypatch.setattr(dataset, "page_size_for", lambda *args, **kw: dataset.FFCV_PAGE_SIZE)
    previous = signal.signal(signal.SIGALRM, lambda *args: pytest.fail("the conversion hangs"))
    signal.alarm(120)
    try:
        with pytest.raises(DataSetError) as raised:
            dataset.write_beton(dataset.ArraySource(big_raw_images(), [0, 1]),
                                tmp_path / "big.beton", BetonOptions(write_mode="raw"),
                                num_workers=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = str(raised.value)
    assert "\n" not in message and "9,720,000 bytes" in message and "--max-resolution" in message
    assert not list(tmp_path.iterdir())  # no partial .beton, no logs
