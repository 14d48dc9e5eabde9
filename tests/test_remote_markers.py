"""Markers on object stores (moto S3): the creation marker and chunk claims name an owner and
expire, so a creator or writer that died never leaves a state that needs deleting by hand."""
import json
import time

import numpy as np
import pytest

from refinery_pipeline.core.errors import StoreError
from refinery_pipeline.core.object_storage import remote_filesystem
from refinery_pipeline.labelling.precompute import ChunkClaims, precompute
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.store import creation, remote_storage
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.remote_storage import CREATION_MARKER
from refinery_pipeline.store.schema import StoreLayout

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

PLAN = CropPlan(seed=0, crops_per_image=2)


def label(dataset, ckpt, location):
    return precompute(dataset, location, Refinery.from_checkpoint(ckpt), PLAN, top_k=3,
                      crop_batch=32, chunk_size=48, progress=False, num_workers=1)


def leave_marker(url, body: bytes):
    fs, path = remote_filesystem(url)
    fs.pipe_file(path + CREATION_MARKER, body)
    return fs, path + CREATION_MARKER


def same_labels(url, local) -> bool:
    remote, ours = LabelStore.open(url), LabelStore.open(local)
    return remote.complete and all(np.array_equal(a, b) for a, b in
                                   zip(remote.read().values(), ours.read().values()))


@pytest.fixture(scope="module")
def local_store(tiny_dataset, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "labels.zarr"
    label(tiny_dataset, tiny_refinery_ckpt, path)
    return path


@pytest.mark.parametrize("marker", [
    json.dumps({"owner": "gone:1:dead", "expires": time.time() - 1}).encode(),
    b"12345",  # an older version's marker: a process id, no expiry
], ids=["expired", "older-version"])
def test_a_dead_creators_marker_and_remains_are_taken_over(marker, s3_server, tiny_dataset,
                                                           tiny_refinery_ckpt, local_store):
    import zarr
    url = f"{s3_server}/dead-{len(marker)}/labels.zarr"
    zarr.open_group(url, mode="w-", zarr_format=3)  # the creator began, then died
    fs, path = leave_marker(url, marker)
    summary = label(tiny_dataset, tiny_refinery_ckpt, url)
    assert summary.chunks_written == 2
    assert same_labels(url, local_store)
    assert not fs.exists(path)  # the new creator removed its own marker


def test_a_live_creation_elsewhere_is_waited_for_and_never_cleared(s3_server, monkeypatch):
    import zarr
    url = f"{s3_server}/live/labels.zarr"
    zarr.open_group(url, mode="w-", zarr_format=3)  # another process is creating it right now
    record = {"owner": "busy:2:live", "expires": time.time() + 3600}
    fs, path = leave_marker(url, json.dumps(record).encode())
    monkeypatch.setattr(creation, "CREATION_MARKER_SECONDS", 0.0)
    monkeypatch.setattr(creation, "CREATION_WAIT_SECONDS", 0.5)
    with pytest.raises(StoreError, match="has not finished after 0 s"):
        LabelStore._create_remote(url, StoreLayout(8, 2, 3, 4), {})
    assert json.loads(fs.cat_file(path)) == record  # their marker and group are theirs
    assert fs.exists(url.split("://")[1] + "/zarr.json")


def test_other_data_at_the_location_is_never_cleared(s3_server):
    import zarr
    url = f"{s3_server}/foreign/labels.zarr"
    zarr.open_group(url, mode="w-", zarr_format=3).attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="holds other data than a label store"):
        LabelStore._create_remote(url, StoreLayout(8, 2, 3, 4), {})
    assert zarr.open_group(url, mode="r").attrs["format"] == "something-else"


def test_chunk_claims_on_s3_admit_one_writer_until_they_expire(s3_server, monkeypatch):
    url = f"{s3_server}/claims/labels.zarr"
    first, second = ChunkClaims(url), ChunkClaims(url)
    assert first.claim(3) and not second.claim(3)
    assert second.claim(4)  # another chunk
    second.release(3)  # not its claim: first's stays
    assert not ChunkClaims(url).claim(3)
    first.release(3)
    assert second.claim(3)  # released: free again
    monkeypatch.setenv(remote_storage.CLAIM_SECONDS_ENV, "0.3")
    alive = ChunkClaims(url)
    assert alive.claim(7)
    time.sleep(1.0)  # three expiries: a live holder keeps renewing its claim
    assert not ChunkClaims(url).claim(7)
    alive.release(7)
    fs, path = remote_filesystem(url)
    dead = json.dumps({"owner": "gone:1:dead", "expires": time.time() + 0.3})
    fs.pipe_file(path + ".locks/8", dead.encode())  # a holder that died: nothing renews it
    assert not ChunkClaims(url).claim(8)
    time.sleep(0.4)
    taker = ChunkClaims(url)
    assert taker.claim(8)  # expired: taken over
    assert json.loads(fs.cat_file(path + ".locks/8"))["owner"] == taker.locks[8].owner
    taker.release(8)


def test_an_owner_shared_by_processes_takes_back_its_own_claim(s3_server):
    """A Ray run's actors share their driver's owner: an actor restarted after a crash claims
    the chunk its dead predecessor held; another run's actors still cannot."""
    url = f"{s3_server}/owners/labels.zarr"
    dead, restarted = ChunkClaims(url, owner="run-a"), ChunkClaims(url, owner="run-a")
    assert dead.claim(0)
    assert not ChunkClaims(url, owner="run-b").claim(0)
    assert restarted.claim(0)
