"""The ImageNet-sized store benchmark at tiny scale, and training's label path at any scale:
each batch's labels gathered on the host (nothing store-sized on a GPU), the same targets as
the whole-store lookup they replace (each rank's epoch reads: tests/test_epoch_reads.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.loaders.dense_targets import dense_from_sparse
from refinery_pipeline.training.data import load_data
from refinery_pipeline.training.config import TrainConfig

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "imagenet_store.py"


def test_the_imagenet_store_benchmark_reports_what_it_wrote(tmp_path):
    """2,000 images × K = 4 × top-10 of 1,000 classes through the full-size code path (local
    and moto S3): the bytes it reports are the bytes on disk, every check it makes passes."""
    pytest.importorskip("moto.server")
    done = subprocess.run([sys.executable, str(BENCHMARK), "--images", "2000", "-K", "4",
                           "--rounds", "1", "--dir", str(tmp_path), "--results-dir",
                           str(tmp_path), "--tag", "tiny", "--keep"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    local, read = result["local"], result["local"]["read"]
    store = Path(result["config"]["store"])
    files = {p: p.stat().st_size for p in store.rglob("*") if p.is_file()}
    assert local["store_bytes"] == sum(files.values())
    assert sum(local["per_array_bytes"].values()) == local["store_bytes"] - (store / "zarr.json"
                                                                            ).stat().st_size
    assert result["s3"]["store_bytes"] == local["store_bytes"]  # the same objects, remotely
    crops, k = 2000 * 4, 10
    assert read["decoded_bytes"] == crops * (4 * 2 + 1 + k * 2 + k * 2)
    assert read["device_bytes_before"] == crops * k * 4 and read["device_bytes_now"] == 0
    for where in (read, result["s3"]["read"]):
        assert where["read_back_equal"] and where["fill_correct"]
    assert local["verify"]["verify_exit"] == 0 == result["s3"]["verify"]["verify_exit"]
    assert "2,000 images × K = 4" in (tmp_path / "tiny.md").read_text()


@pytest.fixture(scope="module")
def dynamic_store(tiny_dataset, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn") / "s.zarr"
    precompute(tiny_dataset, path, Refinery.from_checkpoint(tiny_refinery_ckpt),
               CropPlan(seed=1, crops_per_image=3), top_k=4, crop_batch=32, chunk_size=16,
               progress=False)
    return path


def whole_store_targets(arrays, batch, rest):
    """The lookup training did before: the whole store's labels indexed by image and slot."""
    indices = torch.from_numpy(arrays["topk_indices"].astype(np.int16))
    probs = torch.from_numpy(arrays["topk_probs"])
    return dense_from_sparse(indices[batch.indices, batch.slots],
                             probs[batch.indices, batch.slots], 10, rest)


@pytest.mark.parametrize("rest", ["uniform", "renormalize"])
def test_training_targets_are_the_whole_store_lookup(rest, tiny_data, dynamic_store, tmp_path):
    """The training loader brings each batch's labels (gathered on the host), the targets hold
    no tensor of the store's, and every target of two epochs is bit for bit the old lookup's."""
    cfg = TrainConfig(data=str(tiny_data), out_dir=str(tmp_path), labels=str(dynamic_store),
                      res=24, batch_size=16, workers=1, rest=rest, progress=False)
    _, loader, _, targets, _ = load_data(cfg, torch.device("cpu"))
    arrays = LabelStore.open(dynamic_store).read()
    assert not any(isinstance(v, torch.Tensor) for v in vars(targets).values())
    batches = 0
    for epoch in range(2):
        loader.next_epoch = epoch
        for batch in loader:
            assert batch.targets is not None
            assert torch.equal(targets(batch, None), whole_store_targets(arrays, batch, rest))
            batches += 1
    assert batches == 2 * (96 // 16)


def test_default_chunks_stay_near_200k_crops_and_bounded_in_bytes():
    """ImageNet at K = 40, top-10 keeps 4,096-image chunks (313 at 1.28M, 3,467 at 14.2M);
    wide labels get smaller chunks so one chunk's decoded values stay within the cap."""
    from refinery_pipeline.store.schema import CHUNK_VALUE_BYTES, default_chunk_size
    assert default_chunk_size(40) == default_chunk_size(40, 10) == 4096
    for K, top_k in [(40, 1000), (1, 10_000), (400, 200), (40, 100)]:
        size = default_chunk_size(K, top_k)
        assert size * K * (9 + 4 * top_k) <= CHUNK_VALUE_BYTES < 2 * size * K * (9 + 4 * top_k)
    assert default_chunk_size(40, 1000) == 256
