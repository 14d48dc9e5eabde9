"""Label stores as shared artifacts: packing, verification, read-only use, faults, concurrency."""
import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_precompute_trust import REPO, precompute_cmd, store_files

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

V1_STORE = Path(__file__).parent / "data" / "store_v1.zarr"


# one loader worker: FFCV then compiles its pipeline serially, a third of a run's CPU less
STORE_ARGS = ["-K", 3, "--top-k", 3, "--batch-size", 32, "--chunk-size", 32, "--workers", 1]


@pytest.fixture(scope="module")
def pristine(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    """The module's store (3 chunks), labelled once; tests read it or change a copy."""
    path = tmp_path_factory.mktemp("sharing") / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, *STORE_ARGS)
    return path


@pytest.fixture
def store(pristine, tmp_path):
    """A copy of the module's store that a test may corrupt, lock or serve."""
    import shutil
    return Path(shutil.copytree(pristine, tmp_path / "labels.zarr"))


def test_checked_in_v1_store_still_loads():
    """Format compatibility: a store written by format version 1 keeps loading."""
    s = LabelStore.open(V1_STORE)
    assert s.attrs["format_version"] == 1 and s.complete
    data = s.read()
    ids = np.arange(10)
    assert np.array_equal(data["boxes"][:, 1, 2], ids * 10 + 1 + 2)
    assert np.array_equal(data["topk_indices"][:, :, 0], np.full((10, 3), 2))
    assert data["topk_probs"][0, 0, 0] == np.float16(0.75)
    assert run("verify", V1_STORE).exit_code == 0


def test_pack_is_reproducible_and_the_zip_is_used_in_place(store, tiny_data, tiny_refinery_ckpt,
                                                           tmp_path):
    run("pack", store, tmp_path / "a.zip")
    run("pack", store, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    zipped = tmp_path / "a.zip"
    assert "complete: True" in run("inspect", zipped).output
    assert "3/3 chunks verified" in run("verify", zipped).output
    assert "agreement 100.000%" in run("audit", zipped, tiny_data, "--weights", tiny_refinery_ckpt,
                                       "--sample-crops", 64, "--workers", 1).output
    result = run("train", tiny_data, "--labels", zipped, "--arch", "demo_cnn", "--epochs", 1,
                 "--batch-size", 16, "--workers", 1, "--out", tmp_path / "run")
    assert "val top-1" in result.output


def test_verify_names_a_corrupted_chunk(store, tiny_data):
    assert "3/3 chunks verified, data set fingerprint matches" in \
        run("verify", store, "--data", tiny_data).output
    chunk_file = store / "topk_probs" / "c" / "1" / "0" / "0"
    blob = bytearray(chunk_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(blob))
    result = run("verify", store, ok=False)
    assert result.exit_code == 1
    assert "chunk 1: topk_probs (key topk_probs/c/1/0/0)" in result.output
    assert "chunk 0" not in result.output and "chunk 2" not in result.output


def test_verify_reports_unwritten_chunks(store):
    (store / "chunk_done" / "c" / "2").unlink()
    result = run("verify", store, ok=False)
    assert "chunk 2: never written" in result.output


def test_read_only_store_serves_many_readers(store, tiny_data, tmp_path):
    for path in [store, *store.rglob("*")]:
        path.chmod(stat.S_IREAD | stat.S_IRGRP | stat.S_IROTH
                   | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0))
    try:
        expected = LabelStore.open(store).read()
        results, errors = [], []

        def reader():
            try:
                results.append(LabelStore.open(store).read())
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors and len(results) == 8
        assert all(np.array_equal(r["topk_probs"], expected["topk_probs"]) for r in results)
        assert run("verify", store).exit_code == 0
        run("train", tiny_data, "--labels", store, "--arch", "demo_cnn", "--epochs", 1,
            "--batch-size", 16, "--workers", 1, "--out", tmp_path / "run")
    finally:
        for path in [store, *store.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_disk_full_mid_write_keeps_finished_chunks_and_resumes(pristine, tiny_data,
                                                               tiny_refinery_ckpt, tmp_path,
                                                               monkeypatch):
    reference = pristine  # labelled with the same arguments
    args = ["--weights", tiny_refinery_ckpt, *STORE_ARGS]
    real_write = LabelStore.write_chunk

    def failing_write(self, c, arrays):
        if c == 1:  # half of chunk 1 reaches the disk, then the disk is full
            rows = self.layout.chunk_range(c)
            self.group["boxes"][rows.start:rows.stop] = arrays.boxes
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, c, arrays)

    monkeypatch.setattr(LabelStore, "write_chunk", failing_write)
    store = tmp_path / "full.zarr"
    result = run("precompute", tiny_data, store, *args, ok=False)
    assert_one_line_error(result, "No space left on device", "rerun the same command")
    assert list(LabelStore.open(store).done_chunks()) == [True, False, True]
    assert "never written" in run("verify", store, ok=False).output
    monkeypatch.setattr(LabelStore, "write_chunk", real_write)
    run("precompute", tiny_data, store, *args)
    assert store_files(store) == store_files(reference)


@pytest.mark.slow  # three precomputes, two of them processes of their own
def test_two_processes_on_one_store_do_not_collide(tiny_data, tiny_refinery_ckpt, tmp_path):
    reference = tmp_path / "reference.zarr"
    run("precompute", tiny_data, reference, "--weights", tiny_refinery_ckpt, "-K", 6,
        "--top-k", 3, "--batch-size", 24, "--chunk-size", 16, "--workers", 1)
    store = tmp_path / "shared.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *precompute_cmd(tiny_data, store,
                                                               tiny_refinery_ckpt)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    if not LabelStore.open(store).complete:  # one process skipped chunks the other still held
        run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 6,
            "--top-k", 3, "--batch-size", 24, "--chunk-size", 16, "--workers", 1)
    assert store_files(store) == store_files(reference)
    assert not list(tmp_path.glob(".shared.zarr.creating-*"))


def test_empty_class_folder_is_named(tmp_path, tiny_refinery_ckpt):
    from .test_cli import make_tree
    tree = make_tree(tmp_path / "tree")
    (tree / "train" / "zebra").mkdir()
    result = run("precompute", tree, tmp_path / "s.zarr", "--weights", tiny_refinery_ckpt,
                 ok=False)
    assert_one_line_error(result, "zebra", "class folder holds no images")


@pytest.mark.slow  # every command on an S3 store: precompute, resume, verify, audit, train
def test_store_on_s3_is_written_resumed_verified_and_trained_from(s3_server, store, tiny_data,
                                                                   tiny_refinery_ckpt, tmp_path):
    url = f"{s3_server}/team/labels.zarr"
    args = ["--weights", tiny_refinery_ckpt, *STORE_ARGS]
    result = run("precompute", tiny_data, url, *args)
    assert "3 chunks written" in result.output
    assert "0 chunks written, 3 already done" in run("precompute", tiny_data, url, *args).output
    remote, local = LabelStore.open(url).read(), LabelStore.open(store).read()
    assert all(np.array_equal(remote[k], local[k]) for k in local)  # same labels as on disk
    assert "3/3 chunks verified" in run("verify", url, "--data", tiny_data).output
    assert "complete: True" in run("inspect", url).output
    assert "agreement 100.000%" in run("audit", url, tiny_data, "--weights", tiny_refinery_ckpt,
                                       "--sample-crops", 64, "--workers", 1).output
    run("train", tiny_data, "--labels", url, "--arch", "demo_cnn", "--epochs", 1,
        "--batch-size", 16, "--workers", 1, "--out", tmp_path / "run")
    result = run("inspect", f"{s3_server}/team/missing.zarr", ok=False)
    assert_one_line_error(result, "no label store there")


def test_store_over_http_is_read_only_and_usable(store, tiny_data, tmp_path):
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(store.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{store.name}"
        assert "complete: True" in run("inspect", url).output
        run("train", tiny_data, "--labels", url, "--arch", "demo_cnn", "--epochs", 1,
            "--batch-size", 16, "--workers", 1, "--out", tmp_path / "run")
    finally:
        server.shutdown()


def test_network_failure_mid_write_to_s3_keeps_chunks_and_resumes(s3_server, store, tiny_data,
                                                                   tiny_refinery_ckpt,
                                                                   monkeypatch):
    from botocore.exceptions import EndpointConnectionError
    url = f"{s3_server}/flaky/labels.zarr"
    args = ["--weights", tiny_refinery_ckpt, *STORE_ARGS]
    real_write = LabelStore.write_chunk

    def flaky_write(self, c, arrays):
        if c == 2:
            raise EndpointConnectionError(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        return real_write(self, c, arrays)

    monkeypatch.setattr(LabelStore, "write_chunk", flaky_write)
    result = run("precompute", tiny_data, url, *args, ok=False)
    assert_one_line_error(result, "writing failed", "Could not connect", "rerun the same command")
    assert list(LabelStore.open(url).done_chunks()) == [True, True, False]
    monkeypatch.setattr(LabelStore, "write_chunk", real_write)
    assert "1 chunks written, 2 already done" in run("precompute", tiny_data, url, *args).output
    remote, local = LabelStore.open(url).read(), LabelStore.open(store).read()
    assert all(np.array_equal(remote[k], local[k]) for k in local)


def test_a_data_set_with_other_classes_is_named(tmp_path):
    from refinery_pipeline.models.registry import create_model
    from refinery_pipeline.models.checkpoints import save_checkpoint
    from .test_cli import make_tree
    ours = make_tree(tmp_path / "ours", classes=("cat", "dog"))
    theirs = make_tree(tmp_path / "theirs", classes=("cat", "fox"))
    ckpt = tmp_path / "two.pt"
    save_checkpoint(ckpt, create_model("demo_cnn", 2), "demo_cnn", ["cat", "dog"], 16)
    run("precompute", ours, tmp_path / "s.zarr", "--weights", ckpt, "-K", 2, "--workers", 1)
    result = run("train", theirs, "--labels", tmp_path / "s.zarr", "--arch", "demo_cnn",
                 "--epochs", 1, "--out", tmp_path / "run", ok=False)
    assert_one_line_error(result, "data set mismatch in 'classes'", "'dog'", "'fox'")
