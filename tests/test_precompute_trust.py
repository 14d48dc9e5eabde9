"""Precompute is trustworthy: rank count and interruptions never change a single stored byte."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.models.checkpoints import save_checkpoint
from refinery_pipeline.paper.synthetic import SHAPES

REPO = Path(__file__).resolve().parents[1]


def store_files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def precompute_cmd(data, store, ckpt, chunk=16, extra=()):
    return ["-m", "cli.main", "precompute", str(data), str(store), "--weights", str(ckpt),
            "-K", "6", "--top-k", "3", "--batch-size", "24", "--chunk-size", str(chunk),
            "--workers", "1", *extra]


def run_python(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def run_here(args):
    """``python3 -m cli.main ARGS`` (as ``precompute_cmd`` spells them) in this process: for the
    runs whose process is not what is tested (references, resumes), without a torch import."""
    from .test_cli import run
    assert args[:2] == ["-m", "cli.main"], args
    return run(*args[2:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_write_the_same_bytes_as_one(tiny_data, tiny_refinery_ckpt, tmp_path):
    run_here(precompute_cmd(tiny_data, tmp_path / "one.zarr", tiny_refinery_ckpt))
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(free_port()),
                      *precompute_cmd(tiny_data, tmp_path / "two.zarr", tiny_refinery_ckpt)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert LabelStore.open(tmp_path / "two.zarr").layout.num_chunks == 6
    assert store_files(tmp_path / "one.zarr") == store_files(tmp_path / "two.zarr")


@pytest.fixture(scope="module")
def slow_refinery(tmp_path_factory):
    """A ResNet-18 at 32 px: slow enough on the CPU that a kill (once a chosen number of chunks
    is flagged done, then within 0.2 s) lands mid-run; a quarter of the pixels of 64 px."""
    path = tmp_path_factory.mktemp("slow") / "r18.pt"
    save_checkpoint(path, create_model("resnet18", len(SHAPES)), "resnet18", SHAPES, 32)
    return path


def done_flags(store: Path) -> int:
    flags = store / "chunk_done" / "c"
    return len(list(flags.iterdir())) if flags.is_dir() else 0


@pytest.mark.slow
def test_kill_at_random_points_then_resume_is_byte_identical(tiny_data, slow_refinery, tmp_path):
    reference = tmp_path / "reference.zarr"
    run_here(precompute_cmd(tiny_data, reference, slow_refinery, chunk=8))
    expected = store_files(reference)
    chunks = LabelStore.open(reference).layout.num_chunks
    rng = random.Random(1234)
    killed_mid_run = 0
    for trial in range(3):
        store = tmp_path / f"killed{trial}.zarr"
        target = rng.randint(1, chunks - 1)  # kill once this many chunks are flagged done
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, *precompute_cmd(tiny_data, store, slow_refinery,
                                                                 chunk=8)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and done_flags(store) < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))  # somewhere inside the next chunk
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and 0 < done_flags(store) < chunks:
            killed_mid_run += 1
        run_here(precompute_cmd(tiny_data, store, slow_refinery, chunk=8))  # the process is gone
        assert store_files(store) == expected, f"trial {trial} (killed after {target} chunks)"
    assert killed_mid_run >= 1, "no kill landed mid-run; the test proved nothing"


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["store", "online teacher with adversarial twins"])
def test_torchrun_ddp_training_shards_images_across_ranks(labels, tiny_data, tiny_refinery_ckpt,
                                                          tmp_path):
    if labels == "store":
        store = tmp_path / "s.zarr"
        run_here(precompute_cmd(tiny_data, store, tiny_refinery_ckpt))
        options = ["--labels", str(store), "--precise-bn", "2"]  # statistics averaged over ranks
    else:  # two backward passes per step: gradients reduced once (no_sync), ranks stay in step
        options = ["--teacher", str(tiny_refinery_ckpt), "--adversarial-eta", "50"]
    out = tmp_path / "ddp"
    result = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                         "-m", "cli.main", "train", str(tiny_data), *options,
                         "--arch", "demo_cnn", "--epochs", "2", "--batch-size", "8",
                         "--workers", "1", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # only rank 0 logs
    if labels == "store":
        assert json.loads(lines[-1])["precise_bn_batches"] == 2
    assert (out / "model.pt").is_file()


def test_staging_a_loader_batch_on_the_host_changes_no_byte(tiny_dataset, tiny_refinery_ckpt,
                                                            tmp_path, monkeypatch):
    """Loader batches over the device staging budget are shuffled on the host: same store."""
    from refinery_pipeline.labelling import chunk_labeller
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.labelling.refinery import Refinery

    def make(name):
        refinery = Refinery.from_checkpoint(tiny_refinery_ckpt)  # BN train: batches matter
        precompute(tiny_dataset, tmp_path / name, refinery, CropPlan(seed=2, crops_per_image=5),
                   top_k=4, crop_batch=24, chunk_size=32, progress=False, num_workers=1)
        return store_files(tmp_path / name)

    on_device = make("device.zarr")
    monkeypatch.setattr(chunk_labeller, "DEVICE_STAGING_BYTES", 0)
    assert make("host.zarr") == on_device
