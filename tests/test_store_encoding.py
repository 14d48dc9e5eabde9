"""Format 3's encoding: probabilities rounded to multiples of 2^-prob_bits (still plain float16),
codecs from the Zarr v3 spec only; stores of formats 1 and 2 keep reading exactly as written."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from refinery_pipeline.core.errors import StoreError
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import (DEFAULT_PROB_BITS, FORMAT_VERSION, MAX_PROB_BITS,
                                            PROB_ARRAYS, CropRecords, StoreLayout,
                                            round_probabilities)

from .test_cli import assert_one_line_error, run
from .test_precompute_trust import store_files

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

DATA = Path(__file__).parent / "data"
V2_STORE = DATA / "store_v2.zarr"
# The codecs of the Zarr v3 core spec and its registered extensions that every v3 reader has.
SPEC_CODECS = {"bytes", "blosc", "zstd", "gzip", "transpose", "crc32c", "sharding_indexed"}


def v2_expected():
    spec = importlib.util.spec_from_file_location("make_store_v2", DATA / "make_store_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.expected_values()


def test_checked_in_v2_store_reads_exactly_as_written():
    _, arrays, sizes, labels = v2_expected()
    store = LabelStore.open(V2_STORE)
    assert store.format_version == 2 < FORMAT_VERSION and store.complete
    assert store.layout.prob_bits == 0  # format 2 never rounded
    read = store.read_crops(static=True).arrays()
    for name, values in arrays.items():
        assert read[name].dtype == values.dtype and np.array_equal(read[name], values), name
    assert np.array_equal(store.read_image_sizes(), sizes)
    assert np.array_equal(store.read_labels(), labels)
    assert "3/3 chunks verified" in run("verify", V2_STORE).output


def test_rounding_is_a_float16_grid_within_half_a_step():
    p = np.random.default_rng(0).dirichlet(np.full(200, 0.05), 2000).astype(np.float16)
    p = -np.sort(-p, axis=1)[:, :10]
    assert np.array_equal(round_probabilities(p, 0), p)
    for bits in (MAX_PROB_BITS, 9, 4):
        q = round_probabilities(p, bits)
        assert q.dtype == np.float16
        steps = q.astype(np.float64) * 2 ** bits
        assert np.array_equal(steps, np.round(steps))  # exact multiples: nothing to decode
        assert np.abs(q.astype(np.float64) - p).max() <= 2.0 ** -(bits + 1)
        assert (np.diff(q.astype(np.float32), axis=1) <= 0).all()  # most probable still first


def test_writer_stores_rounded_values_that_verify_and_repeat_byte_for_byte(tmp_path):
    """The v2 fixture's labels (every float16 mantissa bit in use) through today's writer."""
    import zarr
    _, arrays, sizes, labels = v2_expected()
    old = LabelStore.open(V2_STORE)
    attrs = {key: old.attrs[key] for key in ("plan", "refinery", "dataset", "batching", "software")}

    def write(path, bits):
        layout = StoreLayout(**{**old.layout.__dict__, "prob_bits": bits})
        store = LabelStore.create(path, layout, attrs, labels=labels, image_sizes=sizes)
        for c in range(layout.num_chunks):
            rows = layout.chunk_range(c)
            store.write_chunk(c, CropRecords(**{name: values[rows.start:rows.stop]
                                                for name, values in arrays.items()}))
        store.finalize()
        return path

    a, b = write(tmp_path / "a.zarr", 7), write(tmp_path / "b.zarr", 7)
    assert store_files(a) == store_files(b)
    g = zarr.open_group(str(a), mode="r")  # plain zarr: float16 on the grid, no decoding
    assert g.attrs["format_version"] == FORMAT_VERSION and g.attrs["layout"]["prob_bits"] == 7
    for name in PROB_ARRAYS:
        expected = round_probabilities(arrays[name], 7)
        assert g[name].dtype == np.float16 and np.array_equal(g[name][:], expected), name
        assert not np.array_equal(expected, arrays[name])  # it did round
    assert "3/3 chunks verified" in run("verify", a).output
    unrounded = LabelStore.open(write(tmp_path / "c.zarr", 0)).read_crops(static=True)
    assert all(np.array_equal(getattr(unrounded, name), arrays[name]) for name in PROB_ARRAYS)


def test_every_array_uses_only_codecs_of_the_v3_spec(tmp_path):
    layout = StoreLayout(4, 2, 3, chunk_size=2, soft_static=True)
    LabelStore.create(tmp_path / "s.zarr", layout, {"dataset": {"classes": list("abc")}})
    for meta in (tmp_path / "s.zarr").glob("*/zarr.json"):
        names = {codec["name"] for codec in json.loads(meta.read_text())["codecs"]}
        assert names <= SPEC_CODECS, (meta.parent.name, names)


@pytest.mark.parametrize("bits", [-1, MAX_PROB_BITS + 1, True])
def test_a_layout_with_impossible_prob_bits_is_refused_before_writing(tmp_path, bits):
    with pytest.raises(StoreError, match="prob_bits must be a whole number in 0"):
        LabelStore.create(tmp_path / "s.zarr", StoreLayout(4, 2, 3, 2, prob_bits=bits), {})
    assert not (tmp_path / "s.zarr").exists()


def test_an_edited_prob_bits_attribute_is_named(tmp_path):
    store = tmp_path / "s.zarr"
    LabelStore.create(store, StoreLayout(4, 2, 3, 2), {"dataset": {"classes": list("abc")}})
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["layout"]["prob_bits"] = "11"
    meta.write_text(json.dumps(doc))
    before = store_files(store)
    assert_one_line_error(run("verify", store, ok=False), "layout attribute is malformed",
                          "prob_bits 0 ... 11")
    assert store_files(store) == before


@pytest.fixture(scope="module")
def rounded_store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 3, "--top-k", 4,
        "--batch-size", 32, "--chunk-size", 32, "--prob-bits", 6, "--bn-mode", "eval")
    return path


def test_precompute_prob_bits_is_recorded_and_audit_compares_like_with_like(rounded_store,
                                                                           tiny_data,
                                                                           tiny_refinery_ckpt):
    store = LabelStore.open(rounded_store)
    assert store.layout.prob_bits == 6
    steps = store.read_crops().topk_probs.astype(np.float64) * 64
    assert np.array_equal(steps, np.round(steps))
    out = run("audit", rounded_store, tiny_data, "--weights", tiny_refinery_ckpt,
              "--sample-crops", 64).output
    assert "agreement 100.000%" in out and "probability error max 0.00e+00" in out


def test_resuming_with_other_prob_bits_is_refused_and_changes_nothing(rounded_store, tiny_data,
                                                                      tiny_refinery_ckpt):
    before = store_files(rounded_store)
    result = run("precompute", tiny_data, rounded_store, "--weights", tiny_refinery_ckpt, "-K", 3,
                 "--top-k", 4, "--batch-size", 32, "--chunk-size", 32, "--bn-mode", "eval",
                 ok=False)
    assert_one_line_error(result, "prob_bits mismatch (store: 6, this run: "
                          f"{DEFAULT_PROB_BITS})")
    assert store_files(rounded_store) == before


@pytest.mark.parametrize("value", ["12", "-1", "x"])
def test_out_of_range_prob_bits_is_one_line_and_creates_nothing(tiny_data, tiny_refinery_ckpt,
                                                                tmp_path, value):
    result = run("precompute", tiny_data, tmp_path / "s.zarr", "--weights", tiny_refinery_ckpt,
                 "--prob-bits", value, ok=False)
    assert_one_line_error(result, f"--prob-bits {value}")
    assert not (tmp_path / "s.zarr").exists()
