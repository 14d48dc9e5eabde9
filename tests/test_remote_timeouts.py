"""Every remote read is bounded: a server that accepts the connection and never answers is
reported in one line naming the URL and the fix within the timeout of REFINERY_STORAGE_TIMEOUT,
over HTTP(S), S3 and FTP alike; and a packed store under a URL is read in place."""
import functools
import io
import os
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import refinery_pipeline as refinery
from refinery_pipeline.core.errors import ArgumentError, StoreError
from refinery_pipeline.core.object_storage import ATTEMPTS_ENV, TIMEOUT_ENV
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.store.store_tools import pack_store

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

TIMEOUT = 0.5  # seconds per request in these tests (the default is 10)
BOUND = 15.0   # a hang is anything longer: aiohttp's own default is 300 s per request


@pytest.fixture(scope="module")
def silent_server():
    """``host:port`` of a server that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # closed at teardown
                return
    threading.Thread(target=accept, daemon=True).start()
    yield "127.0.0.1:%d" % listener.getsockname()[1]
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.fixture
def short_timeouts(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, str(TIMEOUT))
    monkeypatch.setenv(ATTEMPTS_ENV, "1")


def within(seconds: float, call, *args):
    """``(result, exception or None, seconds taken)`` of ``call(*args)``, run in a thread so
    that a hang fails the test after ``seconds`` instead of stalling the suite."""
    outcome = {"result": None, "error": None}

    def attempt():
        start = time.perf_counter()
        try:
            outcome["result"] = call(*args)
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.perf_counter() - start
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{call.__name__}{args} still waits after {seconds:.0f} s"
    return outcome["result"], outcome["error"], outcome["seconds"]


def opened_within(location, seconds: float):
    """``(exception or None, seconds taken)`` of ``open_store(location)``."""
    _, error, taken = within(seconds, refinery.open_store, location)
    return error, taken


def cli_within(seconds: float, *args):
    return within(seconds, lambda: run(*args, ok=False))[0]


@pytest.mark.parametrize("url", ["http://{}/labels.zarr", "https://{}/labels.zarr",
                                 "http://{}/labels.zip", "ftp://{}/labels.zarr"])
def test_a_silent_server_is_one_line_within_the_timeout(url, silent_server, short_timeouts):
    location = url.format(silent_server)
    error, seconds = opened_within(location, BOUND)
    assert isinstance(error, StoreError) and not isinstance(error, refinery.StoreNotFoundError)
    message = str(error)
    assert message.startswith(location) and "does not answer" in message
    assert TIMEOUT_ENV in message and "\n" not in message
    assert seconds < 8 * TIMEOUT  # a zip over HTTP asks twice (HEAD, then GET)


def test_a_silent_s3_endpoint_is_bounded_too(silent_server, short_timeouts, monkeypatch):
    pytest.importorskip("s3fs")
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": f"http://{silent_server}"}.items():
        monkeypatch.setenv(name, value)
    for location in ("s3://labels/labels.zarr", "s3://labels/labels.zip"):
        error, _ = opened_within(location, BOUND)
        assert isinstance(error, StoreError) and "AWS_ENDPOINT_URL" in str(error)


def test_the_cli_names_the_url_and_the_fix(silent_server, short_timeouts):
    location = f"http://{silent_server}/labels.zarr"
    result = cli_within(BOUND, "inspect", location)
    assert_one_line_error(result, location, "does not answer", TIMEOUT_ENV)


@pytest.mark.parametrize("name, value", [(TIMEOUT_ENV, "abc"), (TIMEOUT_ENV, "0"),
                                         (TIMEOUT_ENV, "inf"), (ATTEMPTS_ENV, "0"),
                                         (ATTEMPTS_ENV, "1.5")])
def test_a_bad_timeout_setting_is_one_line(name, value, silent_server, monkeypatch):
    monkeypatch.setenv(name, value)
    _, error, _ = within(BOUND, refinery.open_store, f"http://{silent_server}/labels.zarr")
    assert isinstance(error, ArgumentError) and str(error).startswith(f"${name}={value}: not")
    result = cli_within(BOUND, "inspect", f"http://{silent_server}/labels.zarr")
    assert_one_line_error(result, f"${name}={value}")


class _RangedFiles(SimpleHTTPRequestHandler):
    """A static file server that answers HTTP range requests (Python's own ignores them)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        path, ranged = self.translate_path(self.path), self.headers.get("Range")
        if not ranged or not os.path.isfile(path):
            return super().send_head()
        data = open(path, "rb").read()
        start, end = ranged.split("=")[1].split("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:end + 1])


def test_a_packed_store_under_a_url_is_read_in_place(tiny_dataset, tiny_refinery_ckpt, tmp_path):
    """`refine pack`'s zip served over HTTP reads as the local zip does (it was taken for a
    local path before: 'no label store there')."""
    store, packed = tmp_path / "labels.zarr", tmp_path / "site" / "labels.zip"
    precompute(tiny_dataset, store, Refinery.from_checkpoint(tiny_refinery_ckpt),
               CropPlan(crops_per_image=2), top_k=3, crop_batch=32, progress=False)
    packed.parent.mkdir()
    pack_store(store, packed)
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_RangedFiles, directory=str(packed.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = refinery.open_store(f"http://127.0.0.1:{server.server_port}/labels.zip")
        local = refinery.open_store(packed)
        assert remote.layout == local.layout
        for name, values in local.read_crops().arrays().items():
            assert np.array_equal(remote.read_crops().arrays()[name], values), name
    finally:
        server.shutdown()
