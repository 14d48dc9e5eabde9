"""`refine train` and `refine check-copy` read a copy with the source options precompute and
convert take: a CSV list's class column (``--label-column``), the class names that shards'
``cls`` numbers index (``--classes``). Without them such a copy is refused in one line that
names the option (its classes cannot be compared with the store's), and nothing is written."""
import csv
import json

import pytest

from refinery_pipeline.paper.synthetic import SHAPES

from .copy_fixtures import N, beton_copy, export_files, origin  # noqa: F401
from .test_cli import assert_one_line_error, run
from .test_train_faults import snapshot

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

wds = pytest.importorskip("webdataset")


def train(*args, ok=True):
    return run("train", *args, "--epochs", 1, "--batch-size", 8, "--workers", 1, "--arch",
               "demo_cnn", "--lr", 0.05, "--warmup-epochs", 0, ok=ok)


@pytest.fixture(scope="module")
def copies(origin, tmp_path_factory) -> dict:
    """The data set as a flat folder with a CSV list (path, class name) and as a folder of
    WebDataset shards (cls: the class number in SHAPES), both in a reversed order; and a
    validation ``.beton``."""
    base = tmp_path_factory.mktemp("copies")
    files = export_files(origin, base / "flat", origin.keys, flat=True)  # in keys' order
    with open(base / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for n in reversed(range(N)):
            writer.writerow([f"flat/{files[n].name}", SHAPES[origin.labels[n]]])
    (base / "shards").mkdir()
    with wds.TarWriter(str(base / "shards" / "part-000.tar")) as writer:
        for n in reversed(range(N)):
            writer.write({"__key__": origin.keys[n], "jpg": files[n].read_bytes(),
                          "cls": int(origin.labels[n])})
    return {"csv": base / "list.csv", "shards": base / "shards",
            "val": beton_copy(origin, base / "v_val.beton", origin.keys[:16])}


# copy -> (its source options, a fragment of the refusal without them)
OPTIONS = {"csv": (("--label-column", "label"), "--label-column"),
           "shards": (("--classes", ",".join(SHAPES)), "other classes")}


@pytest.mark.parametrize("name", OPTIONS)
def test_train_reads_a_copy_with_its_source_options_and_refuses_it_without(
        origin, copies, name, tmp_path):
    options, refusal = OPTIONS[name]
    common = ("--labels", origin.keyed, "--val", copies["val"], "--cache-dir", tmp_path / "c")
    out = tmp_path / "run"
    before = snapshot(out)
    result = train(copies[name], *common, "--out", out, ok=False)
    assert_one_line_error(result, refusal)
    assert snapshot(out) == before
    train(copies[name], *common, *options, "--out", out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["crops_exact"] == N // 8 * 8 and record["crops_approximate"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["copy"]["matched"] == N
    recorded = {"csv": {"label_column": "label"}, "shards": {"classes": list(SHAPES)}}
    assert config["source_options"] == recorded[name]


def test_train_refuses_a_source_option_the_copy_does_not_take(origin, copies, tmp_path):
    out = tmp_path / "run"
    result = train(copies["shards"], "--labels", origin.keyed, "--val", copies["val"],
                   "--label-column", "label", "--out", out, ok=False)
    assert_one_line_error(result, "--label-column label", "webdataset", "drop the option")
    assert snapshot(out) is None


def test_check_copy_reads_a_copy_with_its_source_options(origin, copies):
    result = run("check-copy", origin.keyed, copies["csv"], "--label-column", "label")
    assert result.exit_code == 0 and f"matched: {N} of {N} store images" in result.output
    result = run("check-copy", origin.keyed, copies["csv"], "--classes", "a,b", ok=False)
    assert_one_line_error(result, "--classes a,b", "paths")
