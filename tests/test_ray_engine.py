"""precompute --engine ray on a local Ray cluster (CPU, one per module): the same store, byte for
byte, as the local engine's (with and without a recipe, with and without an ensemble), and the
faults of a cluster: an actor killed mid-chunk, a driver killed, two drivers on one store, a
store that cannot be written, options refused in one line."""
import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_precompute_trust import REPO, store_files

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray cluster, and an actor process per run

ARGS = ["-K", 3, "--top-k", 3, "--batch-size", 32, "--chunk-size", 16, "--workers", 1]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """One local Ray cluster for the module; drivers started by the tests join it, and its
    actors reach the moto S3 server as the tests do."""
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **aws}})
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


# one actor where the pool's size is not what is tested: each actor compiles its own loader;
# plain: 3 actors on 2 CPUs, so one waits for resources that never come, and the run finishes
@pytest.mark.parametrize("extra, actors", [((), 3), (("--augment", "mixup:0.4", "--soft-static"),
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


# ----------------------------------------------------------------------------- faults
def drive(data, store, ckpt, address, delay=0.0, **kwargs):
    """:func:`.ray_faults.drive` in this process."""
    from .ray_faults import drive as in_process
    in_process(data, store, ckpt, address, delay, **kwargs)


def driver_process(data, store, ckpt, address, delay, *gate):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.ray_faults", str(data), str(store),
                             str(ckpt), address, str(delay), *map(str, gate)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    """The local engine's store of the plan the fault tests run (chunks of 8: 12 chunks)."""
    path = tmp_path_factory.mktemp("reference") / "labels.zarr"
    drive(tiny_data, path, tiny_refinery_ckpt, "local")
    return path


def same_store(location, reference: Path) -> bool:
    """Every file alike; for a store on S3, every array alike (the attributes record nothing
    of the location)."""
    if "://" not in str(location):
        return store_files(location) == store_files(reference)
    ours, theirs = LabelStore.open(location), LabelStore.open(reference)
    names = list(theirs.group.array_keys())
    return ours.complete and ours.attrs == theirs.attrs and all(
        (ours.group[n][...] == theirs.group[n][...]).all() for n in names)


def wait_for_done_chunks(store: Path, count: int, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if LabelStore.open(store, mode="r+").done_chunks().sum() >= count:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{store}: fewer than {count} chunks done after {timeout} s")


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_an_actor_killed_mid_chunk_is_restarted_and_its_chunk_retried(where, cluster, tiny_data,
                                                                       tiny_refinery_ckpt,
                                                                       reference, tmp_path,
                                                                       s3_server):
    """On S3 the restarted actor takes back the chunk claim its predecessor held (its run's)."""
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.dataset import ImageDataset
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.ray_engine import RayOptions
    from refinery_pipeline.labelling.refinery import Refinery
    from .ray_faults import FaultyRefinery
    marker = tmp_path / "died"
    store = tmp_path / "labels.zarr" if where == "disk" else f"{s3_server}/{tmp_path.name}.zarr"
    # 8 images x 3 crops, 32 per forward pass: one pass per chunk; the 4th pass is chunk 3's
    refinery = FaultyRefinery(Refinery.from_checkpoint(tiny_refinery_ckpt), marker, die_after=3)
    summary = precompute(ImageDataset(tiny_data), store, refinery,
                         CropPlan(seed=0, crops_per_image=3), top_k=3, crop_batch=32,
                         chunk_size=8, num_workers=1, progress=False,
                         ray_options=RayOptions(actors=1))
    assert marker.exists()  # the actor did die
    assert summary.chunks_written == 12 and summary.crops == 96 * 3
    assert same_store(store, reference)


def test_a_killed_driver_costs_only_unfinished_chunks(cluster, tiny_data, tiny_refinery_ckpt,
                                                      reference, tmp_path):
    store = tmp_path / "labels.zarr"
    driver = driver_process(tiny_data, store, tiny_refinery_ckpt, cluster, delay=0.5)
    try:
        wait_for_done_chunks(store, 2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    done = LabelStore.open(store, mode="r+").done_chunks().sum()
    assert 2 <= done < 12
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 3,
                 "--top-k", 3, "--batch-size", 32, "--workers", 1, "--engine", "ray")
    assert "already done" in result.output
    assert same_store(store, reference)


def test_two_drivers_on_one_store_split_its_chunks(cluster, tiny_data, tiny_refinery_ckpt,
                                                   reference, tmp_path):
    """One driver in a process of its own, one here: no chunk written twice, the same bytes."""
    store = tmp_path / "labels.zarr"
    gate = tmp_path / "gate"  # the two drivers' actors start labelling together
    other = driver_process(tiny_data, store, tiny_refinery_ckpt, cluster, 0.3, gate)
    ours = io.StringIO()
    with redirect_stdout(ours):
        drive(tiny_data, store, tiny_refinery_ckpt, cluster, delay=0.3, gate=str(gate))
    theirs, errors = other.communicate(timeout=300)
    assert other.returncode == 0, errors[-2000:]
    counts = [tuple(int(n) for n in line.replace(",", "").split() if n.isdigit())
              for line in (theirs.strip().splitlines()[-1], ours.getvalue().strip())]
    written = [c[0] for c in counts]
    assert min(written) >= 1 and sum(written) + counts[1][1] == 12, counts
    assert same_store(store, reference)


def test_a_store_that_cannot_be_written_fails_in_one_line_without_retries(cluster, tiny_data,
                                                                          tiny_refinery_ckpt,
                                                                          reference, tmp_path):
    store = tmp_path / "labels.zarr"
    drive(tiny_data, store, tiny_refinery_ckpt, "local", only_chunks=[0])
    before = store_files(store)
    blocked = store / "topk_probs" / "c"
    blocked.mkdir(parents=True, exist_ok=True)
    (blocked / "1").write_text("not a directory")  # chunk 1's data cannot be written under it
    started = time.monotonic()
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 3,
                 "--top-k", 3, "--batch-size", 32, "--workers", 1, "--engine", "ray", ok=False)
    assert_one_line_error(result, str(store))
    assert time.monotonic() - started < 120
    after = store_files(store)
    assert {k: v for k, v in after.items() if k in before} == before  # chunk 0 untouched
    assert LabelStore.open(store, mode="r+").done_chunks().tolist() == [True] + [False] * 11


@pytest.mark.parametrize("options, fragment", [
    (["--ray-actors", 2], "--ray-actors 2: it sets up the Ray engine's pool; add --engine ray"),
    (["--engine", "ray", "--compile"], "--compile True: a compiled refinery cannot be sent"),
    (["--engine", "ray", "--ray-gpus-per-actor", 64], "--ray-gpus-per-actor 64: the Ray cluster"),
])
def test_ray_options_are_refused_in_one_line(options, fragment, cluster, tiny_data,
                                             tiny_refinery_ckpt, tmp_path):
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", tiny_refinery_ckpt,
                 *ARGS, *options, ok=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "s.zarr").exists()


class ElsewhereDataset:
    """The data set, at a path the actors cannot open (a .beton not on a shared file system)."""

    def __init__(self, dataset, path):
        self.dataset, self.path = dataset, path

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def test_an_actor_that_cannot_load_stops_the_run_in_one_line(cluster, tiny_dataset,
                                                              tiny_refinery_ckpt, tmp_path):
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.core.errors import RefineryError
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.ray_engine import RayOptions
    from refinery_pipeline.labelling.refinery import Refinery
    missing = tmp_path / "not-on-this-node.beton"
    with pytest.raises(RefineryError) as caught:
        precompute(ElsewhereDataset(tiny_dataset, missing), tmp_path / "labels.zarr",
                   Refinery.from_checkpoint(tiny_refinery_ckpt),
                   CropPlan(seed=0, crops_per_image=2), top_k=3, crop_batch=32, chunk_size=16, num_workers=1, progress=False,
                   ray_options=RayOptions(actors=2))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{missing}: no such .beton file")
