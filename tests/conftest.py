"""Tiny data made in tmp_path: procedural shapes written to real .beton files, a tiny refinery."""
import os
from pathlib import Path

# numba compiles each loader's FFCV pipeline afresh (refinery_pipeline/loaders/replay.py says
# why), and that compilation is most of the CPU of every tiny training run or precompute in this
# suite; without LLVM's optimisation passes it costs about a quarter less. The compiled code
# computes the same (the pixel work is OpenCV's; numba's parts move bytes and integers). Set
# before numba is first imported; NUMBA_OPT=3 python3 -m pytest tests runs what users run.
os.environ.setdefault("NUMBA_OPT", "0")

import numpy as np
import pytest
import torch

from refinery_pipeline.sources.dataset import ImageDataset
from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
from refinery_pipeline.paper.synthetic import SHAPES, make_shapes

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette-96"


def _write_split(directory: Path, split: str, count: int, seed: int, size: int = 40):
    data = make_shapes(count, size, seed)
    path = directory / f"shapes_{split}.beton"
    write_beton(ArraySource(data.images, data.labels), path, classes=SHAPES, num_workers=1)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """``shapes_train.beton`` (96 images) and ``shapes_val.beton`` (32 images); returns train."""
    directory = tmp_path_factory.mktemp("data")
    _write_split(directory, "val", 32, seed=1)
    return _write_split(directory, "train", 96, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data) -> ImageDataset:
    return ImageDataset(tiny_data)


@pytest.fixture(scope="session")
def tiny_refinery_ckpt(tiny_data, tmp_path_factory) -> Path:
    """A demo CNN trained for 6 epochs on the tiny shapes (~3 s), saved by `refine train`.

    Trained, not random, so that its labels tell crops apart: a random init gives every crop of
    an image nearly the same label (max difference ~1e-4, under the tests' float16 tolerance),
    and label-level fidelity tests could not fail when the wrong crop is labelled. This one's
    labels of two crops of one image differ by ~0.05 (median) and by > 0.007 for every image.
    """
    from refinery_pipeline.training.train import fit
    from refinery_pipeline.training.config import TrainConfig
    out = tmp_path_factory.mktemp("refinery")
    fit(TrainConfig(data=str(tiny_data), out_dir=str(out), arch="demo_cnn", epochs=6,
                    batch_size=16, lr=0.1, res=24, workers=1, warmup_epochs=0.5,
                    progress=False))
    return out / "model.pt"


@pytest.fixture(scope="session")
def labelled_store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    """``labelled_store(seed=, crops_per_image=, augment=, top_k=, soft_static=, only_chunks=)``:
    the path of a store of the tiny shapes labelled by the tiny refinery with BN in eval mode
    (each label depends on its crop alone), in 3 chunks of 32 images, complete unless
    ``only_chunks`` names the chunks written.

    Each distinct setting is labelled once per test process, so files that agree on a setting
    share the store, and uncompiled (see :func:`uncompiled_loaders`: the same bytes, without
    seconds of numba compilation each). Shared means read-only: a test that changes a byte copies
    it first (``shutil.copytree`` into tmp_path).
    """
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.data_cache import open_dataset
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery
    from refinery_pipeline.plan.recipe import Recipe
    made = {}

    def make(seed=0, crops_per_image=2, augment=(), top_k=3, soft_static=False,
             only_chunks=None) -> Path:
        augment = Recipe.parse(augment).names()  # one store per recipe, however it is spelt
        only_chunks = None if only_chunks is None else tuple(only_chunks)
        settings = (seed, crops_per_image, augment, top_k, soft_static, only_chunks)
        if settings not in made:
            path = tmp_path_factory.mktemp("labelled") / "labels.zarr"
            with pytest.MonkeyPatch.context() as patch:
                uncompile_loaders(patch)
                precompute(open_dataset(tiny_data), path,
                           Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
                           CropPlan(seed=seed, crops_per_image=crops_per_image, augment=augment),
                           top_k=top_k, crop_batch=32, chunk_size=32, progress=False,
                           num_workers=1, soft_static=soft_static, only_chunks=only_chunks)
            made[settings] = path
        return made[settings]

    return make


@pytest.fixture(scope="session")
def mixup_store(labelled_store) -> Path:
    """A complete store of the tiny shapes whose recipe mixes (``mixup:0.4``), K = 2, top-4:
    the store the public API's entry checks and both backends' ``CropBatch.mix`` are tested on
    (tests copy it before changing a byte)."""
    return labelled_store(seed=5, crops_per_image=2, augment=("mixup:0.4",), top_k=4)


@pytest.fixture(scope="module")
def uncompiled_loaders():
    """FFCV's pipelines run as plain Python, not compiled by numba, for the rest of a module.

    For modules whose subject is training, the CLI or a refusal, not the loader: compiling each
    loader's pipeline is ~90% of the CPU of a tiny training run (2.5 s; 0.25 s uncompiled), and
    the uncompiled pipeline gives the same bytes (tests/test_uncompiled_loaders.py checks it).
    The compiled path stays the one the loader's own tests (test_replay, test_augment,
    test_spec_reader, ...) run. Use it as ``pytestmark = pytest.mark.usefixtures(...)``, so it
    comes before the module's own fixtures."""
    with pytest.MonkeyPatch.context() as patch:
        uncompile_loaders(patch)
        yield


def uncompile_loaders(patch: pytest.MonkeyPatch):
    """FFCV's pipelines built from now on run uncompiled, until ``patch`` is undone: one test's
    share of :func:`uncompiled_loaders` (``uncompile_loaders(monkeypatch)``)."""
    from ffcv.pipeline.compiler import Compiler
    patch.setattr(Compiler, "is_enabled", False)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_or_skip() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data set not found at {SHARED_DATA}")
    return SHARED_DATA


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; clients find it via AWS_ENDPOINT_URL."""
    moto_server = pytest.importorskip("moto.server")
    import boto3
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="labels")
    yield "s3://labels"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
