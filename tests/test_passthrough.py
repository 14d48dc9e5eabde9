"""Passthrough conversion: a JPEG that FFCV decodes exactly as refinery reads the original keeps
its own bytes in the ``.beton``, so the original files (and any byte-identical copy) give
exactly the labelled pixels; everything else is decoded and re-encoded as before, and
``reencode`` writes the ``.beton`` of old stores byte for byte."""
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from refinery_pipeline.core.errors import DataSetError
from refinery_pipeline.loaders.replay import multi_crop_loader
from refinery_pipeline.loaders.crop_table import crop_table
from refinery_pipeline.plan.crop_plan import CropPlan, sample_boxes, sample_flips
from refinery_pipeline.sources import BetonSource
from refinery_pipeline.sources import beton_writer as writer_module
from refinery_pipeline.sources import open_source
from refinery_pipeline.sources.beton_writer import FFCV_PAGE_SIZE, page_size_for, write_beton
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.sources.dataset import BetonOptions, ImageDataset, conversion_options
from refinery_pipeline.sources.pixels import cut_crop, read_image_file
from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

# Each file of the tree and whether its bytes pass through: JPEGs in every chroma subsampling,
# grey and progressive do; CMYK (FFCV's decoder cannot make RGB of it), PNG, and a JPEG that
# libjpeg-turbo reads only with a warning (PIL reads it) are decoded and re-encoded.
# Class folders are named as shapes the tiny refinery knows, so it labels this tree too.
FILES = {"disk/s444.jpg": True, "disk/s422.jpg": True, "disk/s420.jpg": True,
         "disk/grey.jpg": True, "disk/progressive.jpg": True, "disk/cmyk.jpg": False,
         "square/image.png": False, "square/extraneous.jpg": False, "square/large.jpg": True,
         "square/other.jpg": True}
LARGE = (36, 48)  # square/large.jpg; the others are at most 30 x 30


def smooth_image(rng, height: int, width: int) -> np.ndarray:
    """Gradients plus a little noise: JPEG-friendly, and every crop differs."""
    y, x = np.mgrid[:height, :width]
    base = np.stack([y * 7, x * 5, (x + y) * 3], -1) % 256
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **save)
    return out.getvalue()


def with_extraneous_bytes(data: bytes) -> bytes:
    """Three stray bytes before the scan: libjpeg-turbo warns, PIL reads it as it is."""
    scan = data.index(b"\xff\xda")
    return data[:scan] + b"\0\0\0" + data[scan:]


def write_file(path: Path, rng):
    size = LARGE if path.stem == "large" else tuple(rng.integers(20, 31, 2))
    pixels = smooth_image(rng, *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path)
        return
    data = {"s444": lambda: jpeg_bytes(pixels, subsampling=0),
            "s422": lambda: jpeg_bytes(pixels, subsampling=1),
            "grey": lambda: jpeg_bytes(pixels[..., 0]),
            "progressive": lambda: jpeg_bytes(pixels, progressive=True),
            "extraneous": lambda: with_extraneous_bytes(jpeg_bytes(pixels))}.get(path.stem)
    if path.stem == "cmyk":
        image.convert("CMYK").save(path, "JPEG")
    else:
        path.write_bytes(data() if data else jpeg_bytes(pixels))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """``data/train`` with :data:`FILES`, ``data/val`` with two JPEGs per class."""
    data = tmp_path_factory.mktemp("passthrough") / "data"
    rng = np.random.default_rng(0)
    for name in FILES:
        write_file(data / "train" / name, rng)
    for name in ("disk/v0.jpg", "disk/v1.jpg", "square/v0.jpg", "square/v1.jpg"):
        write_file(data / "val" / name, rng)
    return data


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> ImageDataset:
    return open_dataset(tree, cache_dir=tmp_path_factory.mktemp("cache"), num_workers=2)


def stored_bytes(dataset: ImageDataset) -> dict:
    source = BetonSource(dataset.path)
    return {key: source.encoded(i) for i, key in enumerate(source.keys())}


def file_of(tree: Path, key: str) -> Path:
    return next((tree / "train").glob(f"{key}.*"))


def test_eligible_jpegs_are_stored_as_their_own_bytes(converted, tree):
    stored = stored_bytes(converted)
    for name, passes in FILES.items():
        key = name.rsplit(".", 1)[0]
        assert (stored[key] == (tree / "train" / name).read_bytes()) == passes, name
    assert converted.meta["passed_through"] == sum(FILES.values())
    assert converted.options.jpeg == "passthrough"
    assert converted.source()["conversion"] == {"jpeg": "passthrough"}


def test_replayed_crops_of_passed_through_images_are_cut_from_the_original_files(converted,
                                                                                  tree):
    """FFCV's own decoder on the stored bytes gives the pixels simplejpeg (fast DCT) gives for
    the original file: crop for crop, byte for byte."""
    ids = np.arange(converted.num_images)
    plan = CropPlan(seed=3, crops_per_image=3)
    boxes = sample_boxes(plan, ids, converted.heights, converted.widths)
    flips = sample_flips(plan, ids)
    crops = np.zeros((len(ids), 3, 16, 16, 3), np.uint8)
    for batch in multi_crop_loader(converted, crop_table(boxes, flips), (16, 16), 4, ids, 2):
        crops[batch.indices.numpy()] = batch.images.numpy()
    keys = converted.keys()
    for n, key in enumerate(keys):
        if not FILES[file_of(tree, key).relative_to(tree / "train").as_posix()]:
            continue
        original = read_image_file(file_of(tree, key))
        assert original.shape[:2] == (converted.heights[n], converted.widths[n])
        for k in range(3):
            assert np.array_equal(crops[n, k], cut_crop(original, boxes[n, k], flips[n, k], 16))


def test_each_images_digest_is_the_sha256_of_its_stored_bytes(converted, tmp_path):
    source = BetonSource(converted.path)
    expected = np.stack([np.frombuffer(hashlib.sha256(source.encoded(i)).digest(), np.uint8)
                         for i in range(len(source))])
    assert np.array_equal(converted.image_digests(), expected)  # written by the conversion
    copy = tmp_path / "copy.beton"  # no sidecars: computed from the file, then kept
    shutil.copy(converted.path, copy)
    assert np.array_equal(ImageDataset(copy).image_digests(), expected)
    assert np.array_equal(np.load(f"{copy}.sha256.npy"), expected)
    Path(f"{copy}.sha256.npy").write_bytes(b"damaged")
    assert np.array_equal(ImageDataset(copy).image_digests(), expected)


def test_a_cap_passes_only_the_images_within_it(tree, tmp_path):
    capped = open_dataset(tree, cache_dir=tmp_path, options=BetonOptions(max_resolution=30),
                          num_workers=1)
    stored = stored_bytes(capped)
    assert stored["square/large"] != (tree / "train/square/large.jpg").read_bytes()
    assert stored["square/other"] == (tree / "train/square/other.jpg").read_bytes()
    n = capped.keys().index("square/large")
    assert (capped.heights[n], capped.widths[n]) == (22, 30)  # 36 x 48 capped at 30, floored
    assert capped.meta["passed_through"] == sum(FILES.values()) - 1


def test_reencode_converts_as_before_beside_passthrough(tree, converted, tmp_path):
    cache = converted.path.parent
    old = open_dataset(tree, cache_dir=cache, options=BetonOptions(jpeg="reencode"),
                       num_workers=1)
    assert old.path != converted.path and converted.path.is_file()  # both kept in the cache
    assert old.meta["passed_through"] == 0 and old.options.jpeg == "reencode"
    stored = stored_bytes(old)
    assert all(stored[name.rsplit(".", 1)[0]] != (tree / "train" / name).read_bytes()
               for name in FILES)


def test_a_store_from_before_passthrough_still_trains_from_its_tree(tree, tiny_refinery_ckpt,
                                                                    tmp_path, monkeypatch):
    """Stores written before the option record no ``jpeg``: their tree converts with
    ``reencode`` again, to the very .beton (fingerprint) they were labelled from."""
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery
    cache, store = tmp_path / "cache", tmp_path / "old.zarr"
    with monkeypatch.context() as patched:  # what stores recorded before the option existed
        patched.setattr(BetonOptions, "recorded", lambda self: {
            k: v for k, v in self.__dict__.items()
            if k != "jpeg" and getattr(BetonOptions(), k) != v})
        old = open_dataset(tree, cache_dir=cache, options=BetonOptions(jpeg="reencode"),
                           num_workers=1)
        refinery = Refinery.from_checkpoint(tiny_refinery_ckpt, classes=old.classes,
                                            bn_mode="eval")
        precompute(old, store, refinery,
                   CropPlan(seed=0, crops_per_image=2), top_k=2, crop_batch=16, progress=False,
                   num_workers=1)
    recorded = LabelStore.open(store).dataset.source
    assert "conversion" not in recorded and conversion_options(recorded).jpeg == "reencode"
    run("train", tree, "--labels", store, "--arch", "demo_cnn", "--epochs", 1, "--batch-size",
        5, "--workers", 1, "--out", tmp_path / "run", "--cache-dir", cache,
        "--warmup-epochs", 0)
    assert list(cache.glob("data-train-*.beton")) == [old.path]  # no passthrough copy made
    # `refine evaluate RUN` converts the run's own data as the run did, so files it as its own
    # (with the run's record, and for runs from before it was kept, as their store says)
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["conversion"] == {"jpeg": "reencode"}
    for recorded in (True, False):
        if not recorded:  # a run from before the record: converted as its store says
            config_path.write_text(json.dumps({k: v for k, v in config.items()
                                               if k != "conversion"}))
        result = run("evaluate", tmp_path / "run", "--workers", 1, "--cache-dir", cache)
        assert "eval_val.json" in result.output and "note:" not in result.output
    assert not list(cache.glob("data-val-*.beton"))[1:]  # val converted once, as trained


# --------------------------------------------------------------------------- pages and sizes

def with_comments(data: bytes, total: int) -> bytes:
    """``data`` with about ``total`` bytes of JPEG comment segments after its SOI marker."""
    segment = b"\xff\xfe" + (65535).to_bytes(2, "big") + b"x" * 65533
    return data[:2] + segment * (total // len(segment) + 1) + data[2:]


@pytest.fixture(scope="module")
def heavy_tree(tmp_path_factory) -> Path:
    """A 16 x 16 JPEG carrying 9 MB of comments (more than FFCV's 8 MiB page), and a small one."""
    root = tmp_path_factory.mktemp("heavy") / "train"
    rng = np.random.default_rng(1)
    (root / "c").mkdir(parents=True)
    (root / "c" / "heavy.jpg").write_bytes(with_comments(jpeg_bytes(smooth_image(rng, 16, 16)),
                                                         9_000_000))
    (root / "c" / "light.jpg").write_bytes(jpeg_bytes(smooth_image(rng, 20, 20)))
    return root


def test_pages_hold_the_largest_file_passed_through(heavy_tree, tmp_path):
    beton = tmp_path / "heavy.beton"
    write_beton(open_source(heavy_tree), beton, num_workers=1)
    dataset = ImageDataset(beton)
    assert dataset.reader.page_size == 16 << 20 and dataset.meta["passed_through"] == 2
    assert stored_bytes(dataset)["c/heavy"] == (heavy_tree / "c" / "heavy.jpg").read_bytes()


def test_a_sample_larger_than_its_page_is_named_with_its_fix(heavy_tree, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(writer_module, "page_size_for", lambda *args, **kw: FFCV_PAGE_SIZE)
    with pytest.raises(DataSetError) as raised:
        write_beton(open_source(heavy_tree), tmp_path / "heavy.beton", num_workers=1)
    message = str(raised.value)
    assert "\n" not in message and "heavy.jpg" in message and "--jpeg reencode" in message
    assert not list(tmp_path.iterdir())  # no partial .beton, no sidecars, no logs


@settings(max_examples=200, deadline=None)
@given(sample=st.integers(0, 10**9), exact=st.booleans(), nbytes=st.integers(0, 10**9))
def test_a_page_holds_the_largest_sample_it_is_sized_for(sample, exact, nbytes):
    page = page_size_for(sample, exact, nbytes)
    need = max(sample if exact else 2 * sample, nbytes) + (1 << 20)
    assert page >= FFCV_PAGE_SIZE and page & (page - 1) == 0  # FFCV needs a power of two
    assert page >= need and page < 2 * max(need, FFCV_PAGE_SIZE)


# --------------------------------------------------------------------------- what is refused

def test_a_truncated_jpeg_is_named_and_nothing_is_written(tmp_path):
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    whole = jpeg_bytes(smooth_image(np.random.default_rng(2), 24, 24))
    (root / "good.jpg").write_bytes(whole)
    (root / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataSetError) as raised:
        open_dataset(tmp_path / "data", cache_dir=tmp_path / "cache", num_workers=1)
    message = str(raised.value)
    assert "\n" not in message and "cut.jpg" in message and "replace the file" in message
    assert not list((tmp_path / "cache").glob("*"))


def test_a_flat_folder_converts_without_labels_but_is_not_labelled(tree, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in FILES:
        shutil.copy(tree / "train" / name, flat / Path(name).name)
    with pytest.raises(DataSetError) as raised:
        open_dataset(flat, cache_dir=tmp_path / "cache")
    assert "\n" not in str(raised.value) and str(flat) in str(raised.value)
    assert "label" in str(raised.value) and not (tmp_path / "cache").exists()
    copy = open_dataset(flat, cache_dir=tmp_path / "cache", labels_required=False,
                        num_workers=1)
    assert not copy.has_labels and (copy.labels == -1).all()
    source = BetonSource(copy.path)
    assert source.labels() is None and source.classes is None
    assert sorted(source.keys()) == sorted(Path(name).stem for name in FILES)
    assert copy.meta["passed_through"] == sum(FILES.values())


def test_refine_convert_says_how_many_images_passed_through(tree, tmp_path):
    result = run("convert", tree, tmp_path / "out", "--workers", 1)
    assert f"{sum(FILES.values())} of {len(FILES)} images are their source's own bytes" in \
        result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.beton")) == [
        "data_train.beton", "data_val.beton"]
    refused = run("convert", tree, tmp_path / "raw", "--jpeg", "reencode", "--write-mode", "raw",
                  ok=False)
    assert_one_line_error(refused, "--jpeg reencode", "--write-mode jpg")
    assert not (tmp_path / "raw").exists()
