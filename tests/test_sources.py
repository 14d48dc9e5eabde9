"""Every form a data set is held in gives the same keys, labels and bytes for the same images."""
import csv
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from refinery_pipeline.dataset import BetonOptions, scan_image_folder, write_beton
from refinery_pipeline.errors import ArgumentError, DataSetError
from refinery_pipeline.keys import join
from refinery_pipeline.pixels import read_image_file
from refinery_pipeline.sources import (BetonSource, ImageSource, WebDatasetSource, open_source,
                                       source_kind)
from refinery_pipeline.sources import shards as shards_module

from .test_precompute_faults import dead_endpoint  # noqa: F401 - a fixture

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")
CLASSES = ["cat", "dog", "owl"]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_image(path: Path, rng, mode: str):
    from PIL import Image
    size = tuple(int(v) for v in rng.integers(9, 20, 2))
    pixels = rng.integers(0, 255, (*size, 3 if mode == "RGB" else 1), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """``data/train/<class>/<class>_<i>.{jpg,png}``: 3 classes x 4 images, sizes 9-19 px, one
    grayscale JPEG; returns ``data``."""
    data = tmp_path_factory.mktemp("tree") / "data"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (data / "train" / name).mkdir(parents=True)
        for i in range(4):
            suffix, mode = (".png", "RGB") if i == 3 else (".jpg", "L" if i == 2 else "RGB")
            write_image(data / "train" / name / f"{name}_{i}{suffix}", rng, mode)
    return data


@pytest.fixture(scope="module")
def truth(tree) -> dict:
    """key -> (SHA-256 of the file's bytes, class name), from the tree itself."""
    root = tree / "train"
    _, files, labels = scan_image_folder(root)
    return {f.relative_to(root).with_suffix("").as_posix(): (digest(f.read_bytes()),
                                                            CLASSES[label])
            for f, label in zip(files, labels)}


def tree_files(tree):
    return sorted((tree / "train").rglob("*.*"))


def shuffled(items, seed=0):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def write_shards(folder: Path, tree, per_shard=5, flat=False) -> str:
    """The tree as WebDataset shards in a shuffled order; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    files = shuffled(tree_files(tree))
    shards = [files[i:i + per_shard] for i in range(0, len(files), per_shard)]
    for s, members in enumerate(shards):
        with wds.TarWriter(str(folder / f"part-{s:03d}.tar")) as writer:
            for f in members:
                key = f.stem if flat else f"{f.parent.name}/{f.stem}"
                writer.write({"__key__": key, f.suffix[1:]: f.read_bytes(),
                              "cls": CLASSES.index(f.parent.name), "json": b"{}"})
    return str(folder / f"part-{{000..{len(shards) - 1:03d}}}.tar")


def hf_table(tree):
    features = datasets.Features({"image": datasets.Image(), "file_name": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=CLASSES[::-1])})
    files = shuffled(tree_files(tree), seed=1)
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
         "file_name": [f"{f.parent.name}/{f.name}" for f in files],
         "label": [CLASSES[::-1].index(f.parent.name) for f in files]}, features=features)


@pytest.fixture(scope="module")
def copies(tree, tmp_path_factory) -> dict:
    """The tree's files in every form a source reads, each in its own order."""
    out = tmp_path_factory.mktemp("copies")
    (out / "flat").mkdir()
    for f in tree_files(tree):
        shutil.copy(f, out / "flat" / f.name)
    files = shuffled(tree_files(tree), seed=2)
    with open(out / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "path"])
        writer.writerows([f.parent.name, os.path.relpath(f, out)] for f in files)
    (out / "list.txt").write_text("# a comment\n" + "\n".join(str(f) for f in files) + "\n\n")
    table = hf_table(tree)
    table.save_to_disk(str(out / "saved"))
    table.to_parquet(str(out / "table.parquet"))
    return {"tree": tree, "flat": out / "flat", "csv": out / "list.csv", "txt": out / "list.txt",
            "python list": [str(f) for f in files],
            "shards": write_shards(out / "shards", tree),
            "flat shards": write_shards(out / "flat-shards", tree, per_shard=7, flat=True),
            "hf object": table, "hf saved": out / "saved", "parquet": out / "table.parquet",
            "arrow": next((out / "saved").glob("*.arrow"))}


KINDS = {"tree": "image_folder", "flat": "paths", "csv": "paths", "txt": "paths",
         "python list": "paths", "shards": "webdataset", "flat shards": "webdataset",
         "hf object": "hf_dataset", "hf saved": "hf_dataset", "parquet": "hf_dataset",
         "arrow": "hf_dataset"}
OPTIONS = {"csv": {"label_column": "label"}, "shards": {"classes": CLASSES},
           "flat shards": {"classes": CLASSES}}


@pytest.mark.parametrize("name", KINDS)
def test_every_source_gives_the_same_bytes_and_labels_by_key(name, copies, truth, tmp_path):
    cache = {"cache_dir": tmp_path} if KINDS[name] in ("webdataset", "hf_dataset") else {}
    source = open_source(copies[name], **cache, **OPTIONS.get(name, {}))
    assert source.kind == KINDS[name] and len(source) == len(truth)
    result = join(list(truth), source.keys())  # flat copies match by the file name
    assert result.matched == len(truth)
    labels, classes = source.labels(), source.classes
    for n, (key, (sha, class_name)) in enumerate(truth.items()):
        i = int(result.rows[n])
        assert digest(source.encoded(i)) == sha, (name, key)
        if labels is not None:
            assert classes[labels[i]] == class_name
    assert (labels is None) == (name in ("flat", "txt", "python list"))
    record = source.record()
    assert record["kind"] == source.kind and record["num_images"] == len(truth)
    assert record["key_rule"] and record["location"]


def test_decoded_images_equal_the_files_pixels(copies):
    source = open_source(copies["shards"], cache_dir=None)
    for i in range(len(source)):
        key = source.keys()[i]
        path = next((copies["tree"] / "train").glob(f"{key}.*"))
        np.testing.assert_array_equal(source.image(i), read_image_file(path))
        assert source.image(i).shape[2] == 3  # grayscale and PNG as RGB


def test_a_torchvision_image_folder_and_a_mapped_data_set(copies, truth):
    from torchvision.datasets import ImageFolder
    folder = open_source(ImageFolder(str(copies["tree"] / "train")))
    assert folder.kind == "image_folder" and sorted(folder.keys()) == sorted(truth)
    assert digest(folder.encoded(0)) == truth[folder.keys()[0]][0]
    plain = ImageFolder(str(copies["tree"] / "train"))
    mapped = open_source(plain, kind="mapped", key_fn=lambda i: Path(plain.samples[i][0]).name)
    assert mapped.kind == "mapped" and not mapped.has_bytes
    assert join(list(truth), mapped.keys()).matched == len(truth)
    np.testing.assert_array_equal(mapped.image(2), np.asarray(plain[2][0]))  # its own pixels
    with pytest.raises(DataSetError, match="not their encoded bytes"):
        mapped.encoded(0)
    assert [mapped.classes[c] for c in mapped.labels()] == [CLASSES[t] for t in plain.targets]


def test_a_beton_is_keyed_by_its_source_files(copies, truth, tmp_path):
    root = copies["tree"] / "train"
    files = scan_image_folder(root)[1]
    beton = tmp_path / "tree.beton"
    write_beton(open_source(copies["tree"]), beton, BetonOptions(jpeg="reencode"), num_workers=1)
    source = open_source(beton)
    assert source.kind == "beton" and source.has_bytes and sorted(source.keys()) == sorted(truth)
    for i, key in enumerate(source.keys()):
        assert source.classes[source.labels()[i]] == truth[key][1]
        image = source.image(i)  # the re-encoded JPEG in the .beton, decoded
        assert image.shape == read_image_file(next(root.glob(f"{key}.*"))).shape
        assert source.encoded(i)[:2] == b"\xff\xd8"


    sidecar = Path(f"{beton}.meta.json")  # a keyed .beton lists its keys itself
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "keys": [f"k/{i}.jpg" for i in range(len(files))]}))
    assert BetonSource(beton).keys() == [f"k/{i}" for i in range(len(files))]
    sidecar.write_text(json.dumps({**meta, "keys": ["k/0"]}))
    with pytest.raises(DataSetError) as caught:
        BetonSource(beton)
    assert_one_line(caught, "lists 1 keys for 12 images")


def test_a_beton_without_keys_says_so_in_one_line(tiny_data):
    with pytest.raises(DataSetError) as caught:
        BetonSource(tiny_data)
    assert_one_line(caught, str(tiny_data), "has no image keys", "refine convert")


def test_remote_shards_read_the_same_as_local_ones(copies, s3_server, tmp_path):
    pytest.importorskip("s3fs")
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    local = open_source(copies["shards"], cache_dir=tmp_path)
    for shard in local.shards:
        fs.put(shard, f"labels/shards/{Path(shard).name}")
    pattern = f"{s3_server}/shards/part-{{000..{len(local.shards) - 1:03d}}}.tar"
    remote = open_source(pattern, classes=CLASSES, cache_dir=tmp_path)
    assert remote.keys() == local.keys() and remote.record()["shards"] == pattern
    np.testing.assert_array_equal(remote.labels(), local.labels())
    assert [digest(remote.encoded(i)) for i in (3, 0, 11)] == \
           [digest(local.encoded(i)) for i in (3, 0, 11)]
    assert list(remote.iter_encoded()) == list(local.iter_encoded())
    again = pickle.loads(pickle.dumps(remote))  # as a DataLoader worker gets it
    assert again.encoded(5) == local.encoded(5)


def test_a_shard_is_indexed_once_until_it_changes(copies, tmp_path, monkeypatch):
    first = open_source(copies["shards"], cache_dir=tmp_path)
    scans = []
    real_scan = shards_module._scan
    monkeypatch.setattr(shards_module, "_scan", lambda shard: scans.append(shard) or
                        real_scan(shard))
    second = open_source(copies["shards"], cache_dir=tmp_path)
    assert scans == [] and second.keys() == first.keys()
    touched = first.shards[0]
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    open_source(copies["shards"], cache_dir=tmp_path)
    assert scans == [touched]


def test_local_shards_pickle_and_reopen(copies, tmp_path):
    source = open_source(copies["shards"], cache_dir=tmp_path)
    before = source.encoded(4)
    again = pickle.loads(pickle.dumps(source))
    assert not again._files  # no descriptor crosses processes
    assert again.encoded(4) == before


def test_our_reading_of_a_shard_is_webdatasets(copies):
    """The key rule and grouping written in shards.py against webdataset's own reader."""
    from webdataset.tariterators import base_plus_ext
    for name in ("n01/x.jpg", "a.b.c.png", "dir.v1/x_1.JPEG", "noext", "__meta__.json"):
        ours = shards_module.KEY_AND_EXTENSION.match(name)
        assert (ours.groups() if ours else (None, None)) == base_plus_ext(name)
    source = open_source(copies["shards"], cache_dir=None)
    shards = source.shards
    theirs = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    samples = [(s["__key__"], s.get("jpg", s.get("png"))) for s in theirs]
    assert [k for k, _ in samples] == source.keys()
    assert [b for _, b in samples] == list(source.iter_encoded())


def test_the_options_of_each_kind(copies, truth, tmp_path):
    files = tree_files(copies["tree"])
    rooted = open_source([str(f) for f in files], root=copies["tree"])
    assert sorted(rooted.keys()) == sorted(f"train/{k}" for k in truth)
    paths_only = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": f"{f.parent.name}/{f.name}"}
                   for f in files]}).cast_column("image", datasets.Image())
    by_path = open_source(paths_only)  # no key column: the image column's kept paths
    assert by_path.keys() == [f"{f.parent.name}/{f.stem}" for f in files]
    assert by_path.labels() is None and "file paths" in by_path.key_rule
    binary = datasets.Dataset.from_dict({"jpg": [f.read_bytes() for f in files],
                                         "__key__": [f.stem for f in files]})
    raw = open_source(binary, image_column="jpg")
    assert [digest(raw.encoded(i)) for i in range(len(raw))] == \
           [digest(f.read_bytes()) for f in files]
    both = tmp_path / "both.tar"  # a sample with two images: image_ext picks one
    with wds.TarWriter(str(both)) as writer:
        writer.write({"__key__": "x", "jpg": b"J", "png": b"P"})
    assert open_source(both, cache_dir=tmp_path).encoded(0) == b"J"
    assert open_source(both, cache_dir=tmp_path, image_ext="png").encoded(0) == b"P"


def test_source_kinds_are_told_from_the_form(copies):
    for name, kind in KINDS.items():
        assert source_kind(copies[name]) == kind, name
    assert source_kind("s3://bucket/train-{000..099}.tar") == "webdataset"
    assert source_kind(["a.parquet", "b.parquet"]) == "hf_dataset"
    assert source_kind([1, 2]) == "mapped"


def test_an_image_source_passes_through():
    class Mine(ImageSource):
        kind = "mapped"
    mine = Mine("here", ["a"])
    assert open_source(mine) is mine


# ------------------------------------------------------------------------ one-line refusals

def assert_one_line(caught, *fragments):
    message = str(caught.value)
    assert "\n" not in message and ";" in message, message  # one line, with the fix
    for fragment in fragments:
        assert fragment in message, message


def write_tar(path: Path, members: dict):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def refusals(tree, s3_server, tmp_path_factory) -> dict:
    """name -> (spec, options, fragments its message must hold), written in a temporary
    folder."""
    tmp = tmp_path_factory.mktemp("refusals")
    jpg = next((tree / "train" / "cat").glob("*.jpg")).read_bytes()
    (tmp / "twins" / "cat").mkdir(parents=True)
    (tmp / "twins" / "cat" / "x.jpg").write_bytes(jpg)
    (tmp / "twins" / "cat" / "x.png").write_bytes(jpg)
    (tmp / "mixed" / "cat").mkdir(parents=True)
    (tmp / "mixed" / "top.jpg").write_bytes(jpg)
    (tmp / "twice.txt").write_text(f"{tree}/train/cat/cat_0.jpg\n{tree}/train/cat/cat_0.jpg\n")
    (tmp / "gone.txt").write_text("missing_1.jpg\nmissing_2.jpg\n")
    (tmp / "nopath.csv").write_text("name,label\nx.jpg,cat\n")
    (tmp / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    (tmp / "empty").mkdir()
    cls_only = {"s/a.cls": b"1", "s/a.json": b"{}", "s/b.cls": b"0"}
    table = datasets.Dataset.from_dict({"image": [jpg], "caption": ["a cat"],
                                        "label": ["cat"]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp / "nokey"))
    cases = [
        ("missing path", tmp / "nowhere", {}, ["nowhere", "no such file or folder"]),
        ("missing remote shard", f"{s3_server}/absent-{{0..1}}.tar", {"cache_dir": tmp},
         ["absent-0.tar", "no such shard"]),
        ("empty shard", write_tar(tmp / "empty.tar", {}), {}, ["empty.tar", "empty shard"]),
        ("tar without images", write_tar(tmp / "meta.tar", cls_only), {},
         ["meta.tar", "holds no images (members: cls, json)", "image_ext="]),
        ("sample without image", write_tar(tmp / "part.tar", {"a.jpg": jpg, "b.json": b"{}"}),
         {}, ["part.tar", "1 samples have no image member, e.g. 'b' (members: json)"]),
        ("not a tar", tmp / "junk.tar", {}, ["junk.tar", "not a readable tar file"]),
        ("compressed", write_tar(tmp / "s.tar.gz", {}), {}, ["s.tar.gz", "decompress"]),
        ("no such shard", str(tmp / "s-{0..1}.tar"), {}, ["s-0.tar", "no such shard"]),
        ("duplicate keys in a tree", tmp / "twins", {}, ["'cat/x' names two images",
                                                         "x.jpg", "x.png", "rename one"]),
        ("duplicate keys in a list", tmp / "twice.txt", {}, ["'cat_0' names two images"]),
        ("listed files missing", tmp / "gone.txt", {}, ["2 of 2 listed files do not exist",
                                                        "missing_1.jpg"]),
        ("csv without a path column", tmp / "nopath.csv", {},
         ["nopath.csv", "no column 'of paths'", "path_column="]),
        ("images beside folders", tmp / "mixed", {}, ["mixed", "kind='image_folder'"]),
        ("empty folder", tmp / "empty", {}, ["empty", "holds no images"]),
        ("HF table without a key column", tmp / "nokey", {}, ["nokey", "no key column",
                                                              "caption", "key_column="]),
        ("HF table without the named column", tmp / "nokey", {"key_column": "file"},
         ["no column 'file'", "key_column="]),
        ("HF labels that are names", tmp / "nokey",
         {"key_column": "caption", "label_column": "label"}, ["'label' holds string"]),
        ("HF image column of text", tmp / "nokey",
         {"key_column": "caption", "image_column": "caption"}, ["'caption' holds",
                                                                "image_column="]),
        ("URL of a table", "s3://bucket/table.parquet", {}, ["only WebDataset shards"]),
        ("local and remote shards", [str(tmp / "part.tar"), "s3://bucket/b.tar"], {},
         ["mixes local shards and URLs"]),
        ("labels outside the classes", write_shards(tmp / "few", tree),
         {"classes": ["cat"]}, ["is outside the 1 named classes", "classes=[...]"]),
    ]
    return {name: case for name, *case in cases}


REFUSALS = ["missing path", "missing remote shard", "empty shard", "tar without images",
            "sample without image", "not a tar", "compressed", "no such shard",
            "duplicate keys in a tree", "duplicate keys in a list", "listed files missing",
            "csv without a path column", "images beside folders", "empty folder",
            "HF table without a key column", "HF table without the named column",
            "HF labels that are names", "HF image column of text", "URL of a table",
            "local and remote shards", "labels outside the classes"]


@pytest.mark.parametrize("name", REFUSALS)
def test_unusable_data_is_refused_in_one_line(name, refusals):
    spec, options, fragments = refusals[name]
    with pytest.raises(DataSetError) as caught:
        open_source(spec, **options)
    assert_one_line(caught, *fragments)


def test_every_refusal_is_tested(refusals):
    assert sorted(refusals) == sorted(REFUSALS)


def test_a_dead_endpoint_is_reported_within_bounded_time(dead_endpoint,  # noqa: F811
                                                          monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("REFINERY_STORAGE_ATTEMPTS", "1")
    started = time.monotonic()
    with pytest.raises(DataSetError) as caught:
        WebDatasetSource("s3://hung/shard-000.tar")
    assert time.monotonic() - started < 30
    assert_one_line(caught, "s3://hung/shard-000.tar", "does not answer")


@pytest.mark.parametrize("spec, options, fragment", [
    ("tree", {"key_column": "x"}, "key_column: not an option of a image_folder source"),
    ("tree", {"kind": "zip"}, "kind='zip': not a kind of source"),
    ("mapped", {}, "key_fn: a map-style data set has no keys"),
    ("object", {}, "spec: cannot open a object"),
])
def test_wrong_arguments_are_refused(spec, options, fragment, copies):
    target = {"tree": copies["tree"], "mapped": [np.zeros((2, 2, 3))], "object": object()}[spec]
    with pytest.raises(ArgumentError, match=fragment):
        open_source(target, **options)


def test_every_subpackage_ships():
    """A non-editable install carries only the packages setup.cfg lists: a new subpackage
    (sources/) missing there works in this checkout and fails everywhere else."""
    import configparser
    repo = Path(__file__).parents[1]
    config = configparser.ConfigParser()
    config.read(repo / "setup.cfg")
    listed = {p.strip() for p in config["options"]["packages"].split(",")}
    found = {".".join(init.parent.relative_to(repo).parts)
             for init in (repo / "refinery_pipeline").rglob("__init__.py")}
    assert found <= listed
