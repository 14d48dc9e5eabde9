"""Precompute under faults and odd settings: any chunk size, shared work, bad counts, full disks,
creation races and dead object-store endpoints. Each fails in one line or gives the right store."""
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.core.errors import DataSetError, RefineryError, StoreError
from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_precompute_trust import REPO, precompute_cmd, store_files

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

# one loader worker: FFCV then compiles its pipeline serially, a third of a run's CPU less
ARGS = ["-K", 4, "--top-k", 3, "--batch-size", 32, "--workers", 1]


def args_for(ckpt, chunk):
    return ["--weights", ckpt, *ARGS, "--chunk-size", chunk]


@pytest.mark.parametrize("chunk", [3, 50, 7])  # 3 and 7 do not divide 96; 50 is no power of two
def test_any_chunk_size_gives_a_store_that_verifies_audits_and_resumes(chunk, tiny_data,
                                                                       tiny_refinery_ckpt,
                                                                       tmp_path, monkeypatch):
    reference = tmp_path / "reference.zarr"
    run("precompute", tiny_data, reference, *args_for(tiny_refinery_ckpt, chunk))
    store = LabelStore.open(reference)
    assert store.complete and store.layout.chunk_size == chunk
    assert "chunks verified" in run("verify", reference, "--data", tiny_data).output
    audit = run("audit", reference, tiny_data, "--weights", tiny_refinery_ckpt,
                "--sample-crops", 96 * 4, "--workers", 1).output  # every batch, short ones too
    assert "top-1 agreement 100.000%" in audit and "max 0.00e+00" in audit, audit

    real_write = LabelStore.write_chunk

    def interrupted(self, c, records):
        if c == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, c, records)

    monkeypatch.setattr(LabelStore, "write_chunk", interrupted)
    resumed = tmp_path / "resumed.zarr"
    assert_one_line_error(run("precompute", tiny_data, resumed,
                              *args_for(tiny_refinery_ckpt, chunk), ok=False),
                          "No space left on device")
    monkeypatch.setattr(LabelStore, "write_chunk", real_write)
    run("precompute", tiny_data, resumed, *args_for(tiny_refinery_ckpt, chunk))
    assert store_files(resumed) == store_files(reference)


SLOW_LABELS = ("import sys, time, refinery_pipeline.labelling.chunk_labeller as p; real = p.label_loader_batch; "
               "p.label_loader_batch = lambda *a, **k: (time.sleep(0.25), real(*a, **k))[1]; "
               "from cli.main import cli; sys.argv[0] = 'refine'; cli()")


@pytest.mark.slow  # two precompute processes, each slowed to share the chunks
def test_two_processes_split_the_chunks_and_write_the_same_bytes(tiny_data, tiny_refinery_ckpt,
                                                                 tmp_path):
    reference = tmp_path / "reference.zarr"
    command = precompute_cmd(tiny_data, reference, tiny_refinery_ckpt, chunk=8)[2:]
    run(*command)
    store = tmp_path / "shared.zarr"
    command = precompute_cmd(tiny_data, store, tiny_refinery_ckpt, chunk=8)[2:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_LABELS, *command], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    written = [int(re.search(r"(\d+) chunks written", out).group(1)) for out, _ in outputs]
    assert min(written) >= 1 and sum(written) == 12, outputs  # both worked, no chunk twice
    assert LabelStore.open(store).complete
    assert store_files(store) == store_files(reference)


@pytest.mark.parametrize("option, values", [("crops_per_image", {"crops_per_image": 0}),
                                            ("crops_per_image", {"crops_per_image": -3}),
                                            ("top_k", {"top_k": 0}), ("top_k", {"top_k": -1}),
                                            ("crop_batch", {"crop_batch": 0}),
                                            ("chunk_size", {"chunk_size": 0})])
def test_bad_counts_are_refused_before_anything_is_created(option, values, tiny_dataset,
                                                           tiny_refinery_ckpt, tmp_path):
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery
    names = {"crops_per_image": "-K", "top_k": "--top-k", "crop_batch": "--batch-size",
             "chunk_size": "--chunk-size"}
    plan = CropPlan(seed=0, crops_per_image=values.pop("crops_per_image", 2))
    kwargs = {"top_k": 3, "crop_batch": 16, "chunk_size": 32, **values}
    refinery = Refinery.from_checkpoint(tiny_refinery_ckpt)
    with pytest.raises(RefineryError) as caught:
        precompute(tiny_dataset, tmp_path / "s.zarr", refinery, plan, progress=False, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and names[option] in message and ">= 1" in message
    assert list(tmp_path.iterdir()) == []  # no store, no .creating-PID, no locks


def test_a_failed_creation_leaves_no_building_directory(tiny_dataset, tmp_path, monkeypatch):
    from refinery_pipeline.store.schema import StoreLayout

    def broken(location, *args):
        (location / "half").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LabelStore, "_create_at", staticmethod(broken))
    with pytest.raises(OSError):
        LabelStore.create(tmp_path / "s.zarr", StoreLayout(96, 2, 3, 32), {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="top_k must be a whole number >= 1"):
        LabelStore.create(tmp_path / "s.zarr", StoreLayout(96, 2, 0, 32), {})
    assert list(tmp_path.iterdir()) == []


def test_two_processes_creating_one_s3_store_share_it(s3_server, tiny_dataset,
                                                      tiny_refinery_ckpt, tmp_path):
    """Object stores have no rename: the loser of a creation race joins the winner's store."""
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery
    url = f"{s3_server}/race/labels.zarr"
    plan, results, errors = CropPlan(seed=0, crops_per_image=3), [], []
    barrier = threading.Barrier(2)

    def one():
        try:
            refinery = Refinery.from_checkpoint(tiny_refinery_ckpt)
            barrier.wait()
            results.append(precompute(tiny_dataset, url, refinery, plan, top_k=3, crop_batch=32,
                                      chunk_size=32, progress=False, num_workers=1))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    assert not errors, errors
    local = tmp_path / "local.zarr"
    precompute(tiny_dataset, local, Refinery.from_checkpoint(tiny_refinery_ckpt), plan, top_k=3,
               crop_batch=32, chunk_size=32, progress=False, num_workers=1)
    remote, ours = LabelStore.open(url), LabelStore.open(local)
    assert remote.complete
    assert all(np.array_equal(a, b) for a, b in zip(remote.read().values(), ours.read().values()))


def test_full_cache_dir_is_refused_in_one_line_without_a_partial_beton(tiny_refinery_ckpt,
                                                                      tmp_path, monkeypatch):
    from .test_cli import make_tree
    tree = make_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    result = run("precompute", tree, tmp_path / "s.zarr", "--weights", tiny_refinery_ckpt,
                 "--cache-dir", cache, ok=False)
    assert_one_line_error(result, str(cache), "not enough free space", "--cache-dir")
    assert not list(cache.glob("*.beton*")) and not (tmp_path / "s.zarr").exists()


def test_disk_filling_up_during_conversion_fails_fast_without_a_partial_beton(tmp_path,
                                                                             monkeypatch):
    """FFCV's writer waits forever for a writer process that died; ours must not."""
    import ffcv.memory_allocator
    from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
    from refinery_pipeline.paper.synthetic import make_shapes
    real = ffcv.memory_allocator.MemoryAllocator.flush_page

    def full(self):
        if self.my_page >= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(ffcv.memory_allocator.MemoryAllocator, "flush_page", full)
    data = make_shapes(200, 40, 0)
    started = time.monotonic()
    with pytest.raises(DataSetError) as caught:  # writer processes are forked: they fail too
        write_beton(ArraySource(data.images, data.labels), tmp_path / "x.beton", num_workers=2)
    assert time.monotonic() - started < 60
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def dead_endpoint(monkeypatch):
    """An S3 endpoint that accepts connections and never answers (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "REFINERY_STORAGE_TIMEOUT": "1",
                       "REFINERY_STORAGE_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    yield "s3://hung/labels.zarr"
    listener.close()


def test_a_dead_endpoint_is_reported_in_one_line_within_bounded_time(dead_endpoint):
    pytest.importorskip("s3fs")
    started = time.monotonic()
    result = run("inspect", dead_endpoint, ok=False)
    assert time.monotonic() - started < 30
    assert_one_line_error(result, dead_endpoint, "does not answer", "check the connection")
