"""A damaged or edited label store is refused in one line, never trained on (issue 16).

Every case checks the exit status, a single ``error:`` line without a traceback, that no
``model.pt`` appears, and that the failing command changed no byte of the store.
"""
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from refinery_pipeline.core.errors import StoreCorruptError
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import CROP_ARRAYS

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

FEW = settings(max_examples=12, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    """One precomputed store (and its zip) per module; tests damage copies of them."""
    root = tmp_path_factory.mktemp("pristine")
    path = root / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 3, "--top-k", 10,
        "--batch-size", 32, "--chunk-size", 32)
    run("pack", path, root / "labels.zip")
    return path


@pytest.fixture
def store(pristine, tmp_path):
    return copy_store(pristine, tmp_path / "labels.zarr")


@pytest.fixture
def zipped(pristine, tmp_path):
    return Path(shutil.copy(pristine.with_suffix(".zip"), tmp_path / "labels.zip"))


def copy_store(source: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def store_bytes(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def train_args(data, labels, out):
    return ("train", data, "--labels", labels, "--arch", "demo_cnn", "--epochs", 1,
            "--batch-size", 16, "--res", 24, "--workers", 1, "--out", out)


def assert_train_refuses(labels, data, out, *fragments, extra=()):
    before = store_bytes(labels)
    result = run(*train_args(data, labels, out), *extra, ok=False)
    assert_one_line_error(result, *fragments)
    assert not (out / "model.pt").exists()
    assert store_bytes(labels) == before
    return result


def assert_verify_reports(labels, *fragments):
    before = store_bytes(labels)
    result = run("verify", labels, ok=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines and all(line.startswith(f"error: {labels}: ") for line in lines), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert store_bytes(labels) == before
    return result


def edit_attributes(path: Path, edit):
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"])
    meta.write_text(json.dumps(doc, indent=2))


def rezip(source: Path, target: Path, drop=(), add=(), change=None):
    """Copy a zip entry by entry, dropping names, adding (name, bytes) and changing bytes."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            if info.filename not in drop:
                data = old.read(info)
                new.writestr(info, change(info.filename, data) if change else data)
        for name, data in add:
            new.writestr(name, data)
    return target


def chunk_file(store: Path, name: str, c: int) -> Path:
    """Chunk ``c``'s file of a per-image array (``flips`` is 2-d, the others 3-d)."""
    return store / (f"{name}/c/{c}" + "/0" * (1 if name == "flips" else 2))


# ----------------------------------------------------------------------------- chunks

def test_a_healthy_store_verifies_and_trains(store, tiny_data, tmp_path):
    assert "3/3 chunks verified" in run("verify", store).output
    run(*train_args(tiny_data, store, tmp_path / "run"))
    assert (tmp_path / "run" / "model.pt").exists()


def test_a_deleted_chunk_is_refused_not_trained_on_as_zeros(store, tiny_data, tmp_path):
    """It used to train with exit 0 and a NaN loss into a NaN model.pt."""
    chunk_file(store, "topk_probs", 1).unlink()
    assert_verify_reports(store, "chunk 1: topk_probs (key topk_probs/c/1/0/0) is missing")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "chunk 1", "topk_probs",
                         "key topk_probs/c/1/0/0", "is missing", "refine verify",
                         "delete chunk_done/c/1", "refine precompute")


def test_reading_some_images_checks_just_their_chunks(store):
    whole = LabelStore.open(store).read_crops()
    some = LabelStore.open(store).read_crops(np.array([70, 3, 40, 3]))
    assert np.array_equal(some.topk_probs, whole.topk_probs[[70, 3, 40, 3]])
    chunk_file(store, "boxes", 1).unlink()
    assert LabelStore.open(store).read_crops(np.array([3, 70])).boxes.shape == (2, 3, 4)
    with pytest.raises(StoreCorruptError, match="chunk 1: boxes"):
        LabelStore.open(store).read_crops(np.array([3, 40]))


def test_a_flipped_byte_is_refused(store, tiny_data, tmp_path):
    path = chunk_file(store, "topk_indices", 2)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10
    path.write_bytes(bytes(blob))
    assert_verify_reports(store, "chunk 2: topk_indices (key topk_indices/c/2/0/0)")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "chunk 2", "topk_indices",
                         "refine verify")


def test_a_truncated_chunk_is_one_line_not_a_codec_traceback(store, tiny_data, tmp_path):
    path = chunk_file(store, "boxes", 0)
    path.write_bytes(path.read_bytes()[:20])
    assert_verify_reports(store, "chunk 0: boxes (key boxes/c/0/0/0) cannot be decoded")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "chunk 0: boxes",
                         "cannot be decoded", "restore the file")


def test_lost_checksums_and_flags_are_named(store, tiny_data, tmp_path):
    (store / "chunk_sha256" / "c" / "1" / "0" / "0").unlink()
    assert_verify_reports(store, "chunk 1: its checksums (key chunk_sha256/c/1/0/0) are missing")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "chunk 1: its checksums")


def test_a_zip_with_a_bad_crc_or_a_missing_chunk_is_refused(zipped, tiny_data, tmp_path):
    """A bad CRC used to end in a BadZipFile traceback."""
    key = "topk_probs/c/1/0/0"
    missing = rezip(zipped, tmp_path / "missing.zip", drop={key})
    assert_verify_reports(missing, f"(key {key}) is missing")
    assert_train_refuses(missing, tiny_data, tmp_path / "run", f"key {key}", "is missing")
    flip_in_zip_entry(zipped, key, 10)
    assert_verify_reports(zipped, f"chunk 1: topk_probs (key {key}) cannot be decoded",
                          "BadZipFile")
    assert_train_refuses(zipped, tiny_data, tmp_path / "run2", f"key {key}", "restore the zip")


def flip_in_zip_entry(path: Path, name: str, offset: int):
    """Flip one byte of entry ``name``'s stored data in place: its CRC no longer matches."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    blob = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(blob[header + 26:header + 28], "little")
    extra_len = int.from_bytes(blob[header + 28:header + 30], "little")
    blob[header + 30 + name_len + extra_len + offset] ^= 0xFF
    path.write_bytes(bytes(blob))


# ----------------------------------------------------------------------------- attributes

LAYOUT_EDITS = {"crops_per_image": 4, "top_k": 2, "num_images": 95, "chunk_size": 16}


@pytest.mark.parametrize("key", LAYOUT_EDITS)
def test_layout_attributes_that_contradict_the_arrays_are_named(store, tiny_data, tmp_path, key):
    edit_attributes(store, lambda a: a["layout"].update({key: LAYOUT_EDITS[key]}))
    assert_verify_reports(store, "the layout attribute", f"{key} {LAYOUT_EDITS[key]}")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "the layout attribute",
                         "refine verify")


@pytest.mark.parametrize("edit", [lambda a: a["plan"].update(seed=7),
                                  lambda a: a["refinery"].update(temperature=2.0),
                                  lambda a: a["dataset"]["classes"].reverse()],
                         ids=["plan.seed", "temperature", "classes"])
def test_edited_attributes_fail_their_digest(store, tiny_data, tmp_path, edit):
    edit_attributes(store, edit)
    assert_verify_reports(store, "attributes in zarr.json were edited", "attributes_sha256")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "attributes in zarr.json were edited")


def test_without_a_digest_an_edited_plan_shows_in_the_boxes(store):
    """Stores written before the digest (format 2; from format 3 on every store has one):
    boxes redrawn from the plan must be the stored ones."""
    edit_attributes(store, lambda a: (a.pop("attributes_sha256"), a.update(format_version=2)))
    assert "3/3 chunks verified" in run("verify", store).output
    edit_attributes(store, lambda a: a["plan"].update(seed=7))
    assert_verify_reports(store, "not the ones the plan attribute draws")


def test_complete_may_change_and_a_malformed_layout_is_named(store):
    edit_attributes(store, lambda a: a.pop("complete"))  # outside the digest: rewritten later
    assert "3/3 chunks verified" in run("verify", store).output
    edit_attributes(store, lambda a: a["layout"].update(top_k="3"))
    result = run("verify", store, ok=False)
    assert_one_line_error(result, "the layout attribute is malformed", "top_k")


def test_changed_or_deleted_labels_are_named(store, tiny_data, tmp_path):
    import zarr
    labels = zarr.open_array(str(store / "labels"), mode="r+")
    labels[5] = (labels[5] + 1) % 10
    assert_verify_reports(store, "array labels does not match dataset.labels_sha256")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "array labels does not match")
    shutil.rmtree(store / "labels")
    assert_verify_reports(store, "array labels is missing")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "array labels is missing")


def test_changed_image_sizes_are_named(store):
    (store / "image_sizes" / "c" / "2" / "0").unlink()
    assert_verify_reports(store, "array image_sizes does not match image_sizes_sha256")


def test_extra_or_escaping_zip_entries_are_named(zipped, tiny_data, tmp_path):
    extra = rezip(zipped, tmp_path / "extra.zip", add=[("notes.txt", b"hi")])
    assert_verify_reports(extra, "zip entry 'notes.txt' is not part of the label store")
    assert_train_refuses(extra, tiny_data, tmp_path / "run", "zip entry 'notes.txt'")
    escaping = rezip(zipped, tmp_path / "escaping.zip", add=[("../evil.sh", b"rm -rf /")])
    assert_verify_reports(escaping, "zip entry '../evil.sh' has an unsafe name")
    meta = zipfile.ZipFile(zipped).read("labels/zarr.json")
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile allows it, warning
        twice = rezip(zipped, tmp_path / "twice.zip", add=[("labels/zarr.json", meta)])
        other = rezip(zipped, tmp_path / "other.zip", add=[("labels/zarr.json", b"{}")])
    assert_verify_reports(twice, "zip entry 'labels/zarr.json' appears twice")
    assert_verify_reports(other, "the metadata of array labels (key labels/zarr.json)")
    assert_train_refuses(other, tiny_data, tmp_path / "run", "key labels/zarr.json")


# ----------------------------------------------------------------------------- skipping the check

SKIP = ("--skip-store-check",)


@pytest.mark.parametrize("packed", [False, True], ids=["directory", "zip"])
def test_the_check_is_skipped_only_after_a_verify_of_the_same_bytes(store, zipped, tiny_data,
                                                                    tmp_path, packed):
    labels = zipped if packed else store
    assert_train_refuses(labels, tiny_data, tmp_path / "run", "--skip-store-check needs a "
                         "passing `refine verify", extra=SKIP)
    run("verify", labels)
    run(*train_args(tiny_data, labels, tmp_path / "run"), *SKIP)
    assert (tmp_path / "run" / "model.pt").exists()
    damaged = labels if packed else chunk_file(store, "topk_probs", 0)
    blob = bytearray(damaged.read_bytes())
    middle = len(blob) // 2
    if packed:  # a byte inside a chunk's entry, wherever the entries' sizes put it
        with zipfile.ZipFile(labels) as z:
            entry = z.getinfo("topk_probs/c/0/0/0")
        data = entry.header_offset + 30 + len(entry.filename) + len(entry.extra)
        middle = data + entry.compress_size // 2
    blob[middle] ^= 0x01  # the verified bytes changed: the record no longer holds
    damaged.write_bytes(bytes(blob))
    assert_train_refuses(labels, tiny_data, tmp_path / "run2", "or the store changed since",
                         extra=SKIP)


def test_a_failed_verify_records_nothing(store, tiny_data, tmp_path):
    chunk_file(store, "flips", 1).unlink()
    assert_verify_reports(store, "chunk 1: flips")
    assert_train_refuses(store, tiny_data, tmp_path / "run", "--skip-store-check needs",
                         extra=SKIP)


def test_the_identity_of_a_store_on_s3_is_its_objects_etags(s3_server, pristine):
    import boto3
    from refinery_pipeline.core.errors import StoreError
    from refinery_pipeline.store.store_tools import require_verified, store_identity
    s3 = boto3.client("s3")
    for path in pristine.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "labels", f"stamped.zarr/{path.relative_to(pristine)}")
    url = f"{s3_server}/stamped.zarr"
    identity = store_identity(url)
    assert identity is not None
    with pytest.raises(StoreError, match="none is recorded"):
        require_verified(url)
    run("verify", url)
    require_verified(url)
    s3.put_object(Bucket="labels", Key="stamped.zarr/labels/c/0", Body=b"other")
    assert store_identity(url) != identity
    with pytest.raises(StoreError, match="store changed since"):
        require_verified(url)


# ----------------------------------------------------------------------------- packing

def test_pack_refuses_a_damaged_store_and_leaves_no_zip(store, tmp_path):
    chunk_file(store, "topk_probs", 2).unlink()
    before = store_bytes(store)
    result = run("pack", store, tmp_path / "out.zip", ok=False)
    assert_one_line_error(result, "chunk 2: topk_probs", "is missing", "not packed",
                          "refine verify")
    assert store_bytes(store) == before
    assert not list(tmp_path.glob("out.zip*"))


def test_pack_never_overwrites(store, tmp_path):
    out = tmp_path / "out.zip"
    out.write_bytes(b"precious")
    result = run("pack", store, out, ok=False)
    assert_one_line_error(result, "already exists", "remove it or choose another name")
    assert out.read_bytes() == b"precious" and not list(tmp_path.glob("out.zip.*"))
    result = run("pack", store, store / "inside.zip", ok=False)
    assert_one_line_error(result, "inside the store")


# ----------------------------------------------------------------------------- properties

def _crop_chunk_files(pristine: Path) -> list:
    return sorted(p.relative_to(pristine).as_posix() for name in CROP_ARRAYS
                  for p in (pristine / name / "c").rglob("*") if p.is_file())


def _decoded_chunk(path: Path, name: str, c: int):
    """The chunk's values as plain zarr decodes them, or None when it cannot."""
    import zarr
    try:
        return zarr.open_array(str(path / name), mode="r")[c * 32:(c + 1) * 32]
    except Exception:  # noqa: BLE001 - any decoder failure counts as "cannot"
        return None


@FEW
@given(data=st.data(), truncate=st.booleans())
def test_any_damaged_chunk_file_is_reported_and_refused(pristine, tiny_data, tmp_path, data,
                                                        truncate):
    key = data.draw(st.sampled_from(_crop_chunk_files(pristine)), label="chunk file")
    name, c = key.split("/")[0], int(key.split("/")[2])
    store = copy_store(pristine, tmp_path / "damaged.zarr")
    path = store / key
    blob = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, len(blob) - 1), label="offset")
    if truncate:
        blob = blob[:at]
    else:
        blob[at] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(blob))
    decoded = _decoded_chunk(store, name, c)
    event("undecodable" if decoded is None else "decodes")
    if decoded is not None and np.array_equal(decoded, _decoded_chunk(pristine, name, c)):
        event("no value changed")
        assert "3/3 chunks verified" in run("verify", store).output  # a byte no value depends on
        return
    assert_verify_reports(store, f"chunk {c}: {name} (key {key})")
    with pytest.raises(StoreCorruptError, match=f"chunk {c}: {name}"):
        LabelStore.open(store).read_crops()
    assert_train_refuses(store, tiny_data, tmp_path / "run", f"chunk {c}: {name}")


ATTRIBUTE_VALUES = st.one_of(st.integers(-3, 200), st.floats(allow_nan=False), st.booleans(),
                             st.text(max_size=3))
EDITABLE = [("layout", "num_images"), ("layout", "crops_per_image"), ("layout", "top_k"),
            ("layout", "chunk_size"), ("layout", "soft_static"), ("plan", "seed"),
            ("plan", "crops_per_image"), ("plan", "flip"), ("refinery", "temperature"),
            ("refinery", "bn_mode"), ("batching", "crop_batch")]


@FEW
@given(where=st.sampled_from(EDITABLE), value=ATTRIBUTE_VALUES)
def test_any_edited_layout_or_plan_value_is_reported(pristine, tiny_data, tmp_path, where,
                                                     value):
    store = copy_store(pristine, tmp_path / "edited.zarr")
    section, key = where
    original = json.loads((store / "zarr.json").read_text())["attributes"][section][key]
    if value == original and type(value) is type(original):
        return
    edit_attributes(store, lambda a: a[section].update({key: value}))
    before = store_bytes(store)
    result = run("verify", store, ok=False)
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    assert all(line.startswith("error: ") for line in result.output.strip().splitlines())
    assert store_bytes(store) == before
    assert_train_refuses(store, tiny_data, tmp_path / "run")
