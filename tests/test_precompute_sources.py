"""``refine precompute`` and ``refine convert`` from every form a data set is held in: the store
names each image by key, records the SHA-256 of the bytes its labels were made from (the source
file's own, for JPEGs passed through) and where the images came from."""
import csv
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refinery_pipeline.sources.dataset import ImageDataset
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.core.errors import DataSetError
from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, run
from .test_train_faults import snapshot

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")
CLASSES = ["disk", "square", "triangle"]  # names the tiny refinery knows


def image_bytes(rng, fmt: str) -> bytes:
    height, width = (int(v) for v in rng.integers(18, 29, 2))
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([y * 9, x * 7, (x * y) % 255], -1) + rng.integers(0, 30, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def forms(tmp_path_factory, tiny_refinery_ckpt) -> dict:
    """One data set of 12 images (a PNG per class, JPEGs otherwise) in every form, each in an
    order of its own; ``truth``: key -> (SHA-256 of the file, class name)."""
    base = tmp_path_factory.mktemp("forms")
    rng = np.random.default_rng(0)
    files = {}
    for c in CLASSES:
        for i in range(4):
            name = f"{c}/{c}_{i}.{'png' if i == 3 else 'jpg'}"
            files[name] = image_bytes(rng, "PNG" if i == 3 else "JPEG")
            (base / "tree" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
            (base / "tree" / "train" / name).write_bytes(files[name])
    names = list(files)
    random.Random(1).shuffle(names)
    with open(base / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([f"tree/train/{n}", n.split("/")[0]] for n in names)
    (base / "shards").mkdir()
    for s in range(3):
        with wds.TarWriter(str(base / "shards" / f"part-{s:03d}.tar")) as writer:
            for n in names[4 * s:4 * s + 4]:
                stem, ext = n.rsplit(".", 1)
                writer.write({"__key__": stem, ext: files[n],
                              "cls": CLASSES.index(n.split("/")[0])})
    features = datasets.Features({"image": datasets.Image(), "file_name": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_dict(
        {"image": [{"bytes": files[n], "path": None} for n in names[::-1]],
         "file_name": names[::-1], "label": [CLASSES.index(n.split("/")[0]) for n in names[::-1]]},
        features=features).save_to_disk(str(base / "saved"))
    truth = {n.rsplit(".", 1)[0]: (hashlib.sha256(b).hexdigest(), n.split("/")[0])
             for n, b in files.items()}
    return {"base": base, "truth": truth, "ckpt": tiny_refinery_ckpt, "tree": base / "tree",
            "csv": base / "list.csv",
            "shards": str(base / "shards" / "part-{000..002}.tar"), "hf": base / "saved"}


# form -> (extra options, the kind recorded)
FORMS = {"tree": ((), "image_folder"),
         "csv": (("--label-column", "label"), "paths"),
         "shards": (("--classes", ",".join(CLASSES)), "webdataset"),
         "hf": (("--key-column", "file_name"), "hf_dataset")}
PRECOMPUTE = ("-K", 2, "--top-k", 2, "--batch-size", 16, "--workers", 1)


def precompute(forms, name, store, *extra, ok=True):
    options, _ = FORMS[name]
    return run("precompute", forms[name], store, "--weights", forms["ckpt"], *PRECOMPUTE,
               "--cache-dir", forms["base"] / "cache", *options, *extra, ok=ok)


@pytest.fixture(scope="module")
def stores(forms, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("stores")
    return {name: (out / f"{name}.zarr", precompute(forms, name, out / f"{name}.zarr").output)
            for name in FORMS}


@pytest.mark.parametrize("name", FORMS)
def test_a_store_from_any_form_names_its_images_and_their_bytes(stores, forms, name):
    store = LabelStore.open(stores[name][0])
    truth = forms["truth"]
    keys, digests, labels = store.read_keys(), store.read_image_digests(), store.read_labels()
    assert store.keyed and sorted(keys) == sorted(truth)
    for n, key in enumerate(keys):
        file_digest, class_name = truth[key]
        exact = bytes(digests[n]).hex() == file_digest  # labelled on the file's own bytes
        assert exact == (not key.endswith("_3")), key  # JPEGs passed through, PNGs re-encoded
        assert store.classes[labels[n]] == class_name
    source = store.dataset.source
    assert source["kind"] == FORMS[name][1] and source["conversion"] == {"jpeg": "passthrough"}
    assert source["num_images"] == 12 and source["key_rule"]
    assert "9 of 12 images are their source's own bytes" in stores[name][1]


def test_a_tree_store_records_its_split_and_the_tables_its_columns(stores):
    tree = LabelStore.open(stores["tree"][0]).dataset.source
    assert tree["split"] == "train" and tree["root"].endswith("tree/train")
    table = LabelStore.open(stores["hf"][0]).dataset.source
    assert (table["key_column"], table["label_column"]) == ("file_name", "label")
    shards = LabelStore.open(stores["shards"][0]).dataset.source
    assert shards["num_shards"] == 3 and shards["shards"].endswith("part-{000..002}.tar")


def test_inspect_says_whether_a_store_is_keyed_and_from_what(stores, tiny_data,
                                                             tiny_refinery_ckpt, tmp_path):
    shown = run("inspect", stores["shards"][0]).output
    assert "images_named: keyed from a webdataset source" in shown
    unnamed = tmp_path / "unnamed.zarr"  # the tiny .beton was written from arrays: no names
    run("precompute", tiny_data, unnamed, "--weights", tiny_refinery_ckpt, *PRECOMPUTE)
    assert "images_named: not keyed:" in run("inspect", unnamed).output


def test_a_resume_goes_on_with_the_same_images_by_name(stores, forms, tmp_path):
    result = precompute(forms, "tree", stores["tree"][0])
    assert "0 chunks written, 1 already done" in result.output
    # the same files as a CSV listing them in the tree's order: the same .beton bytes, but
    # another kind of source
    scanned = sorted((forms["tree"] / "train").rglob("*.*"))
    listed = tmp_path / "same.csv"
    listed.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in scanned))
    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["tree"][0], copy)
    before = snapshot(copy)
    refused = run("precompute", listed, copy, "--weights", forms["ckpt"], *PRECOMPUTE,
                  "--cache-dir", forms["base"] / "cache", "--label-column", "label", ok=False)
    assert_one_line_error(refused, str(copy), "image_folder source", "paths source")
    assert snapshot(copy) == before


def test_a_resume_with_the_same_bytes_under_other_names_is_refused(stores, forms, tmp_path):
    store = LabelStore.open(stores["tree"][0])
    beton = next((forms["base"] / "cache").glob("tree-train-*.beton"))
    renamed = tmp_path / "renamed.beton"
    shutil.copy(beton, renamed)
    meta = json.loads(Path(f"{beton}.meta.json").read_text())
    meta["files"] = [str(Path(f).with_name(Path(f).name.replace("_", "-")))  # other names,
                     for f in meta["files"]]  # the same bytes
    Path(f"{renamed}.meta.json").write_text(json.dumps(meta))
    assert ImageDataset(renamed).fingerprint()["image_bytes_sha256"] == \
        store.dataset.image_bytes_sha256
    before = snapshot(stores["tree"][0])
    refused = run("precompute", renamed, stores["tree"][0], "--weights", forms["ckpt"],
                  *PRECOMPUTE, ok=False)
    assert_one_line_error(refused, str(stores["tree"][0]), "named otherwise")
    assert snapshot(stores["tree"][0]) == before


def test_images_without_classes_cannot_be_precomputed(forms, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (forms["tree"] / "train").rglob("*.*"):
        shutil.copy(f, flat / f.name)
    refused = run("precompute", flat, tmp_path / "s.zarr", "--weights", forms["ckpt"],
                  *PRECOMPUTE, "--cache-dir", tmp_path / "cache", ok=False)
    assert_one_line_error(refused, str(flat), "label")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "cache").exists()
    # converted anyway (a copy to train from with a store's labels): still no store from it
    unlabelled = open_dataset(flat, cache_dir=tmp_path / "cache", labels_required=False,
                              num_workers=1)
    refused = run("precompute", unlabelled.path, tmp_path / "s.zarr", "--weights",
                  forms["ckpt"], *PRECOMPUTE, ok=False)
    assert_one_line_error(refused, str(unlabelled.path), "no classes")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("args, fragments", [
    (("tree", "--key-column", "name"), ("--key-column name", "image_folder source")),
    (("shards", "--split", "val"), ("--split val", "webdataset source")),
    (("csv", "--classes", "a,b"), ("--classes a,b", "paths source")),
    (("missing", ), ("no such file or folder",)),
])
def test_an_option_the_data_does_not_take_is_refused(forms, tmp_path, args, fragments):
    data = forms.get(args[0], tmp_path / args[0])
    refused = run("precompute", data, tmp_path / "s.zarr", "--weights", forms["ckpt"],
                  *args[1:], ok=False)
    assert_one_line_error(refused, *fragments)
    assert not (tmp_path / "s.zarr").exists()


def test_convert_writes_a_keyed_beton_of_shards_and_tables(forms, tmp_path):
    for name, options in (("shards", ()), ("hf", ("--key-column", "file_name"))):
        result = run("convert", forms[name], tmp_path / name, "--workers", 1, *options)
        written = next((tmp_path / name).glob("*.beton"))
        assert f"{written}: 12 images, 3 classes" in result.output
        dataset = ImageDataset(written)
        assert sorted(dataset.keys()) == sorted(forms["truth"])
        for n, key in enumerate(dataset.keys()):
            exact = bytes(dataset.image_digests()[n]).hex() == forms["truth"][key][0]
            assert exact == (not key.endswith("_3"))


def test_precompute_reads_shards_from_an_object_store(forms, stores, s3_server):
    import boto3
    client = boto3.client("s3")
    for shard in sorted((forms["base"] / "shards").glob("*.tar")):
        client.upload_file(str(shard), "labels", f"shards/{shard.name}")
    remote = f"{s3_server}/shards/part-{{000..002}}.tar"
    store = forms["base"] / "remote.zarr"
    run("precompute", remote, store, "--weights", forms["ckpt"], *PRECOMPUTE, "--cache-dir",
        forms["base"] / "cache", "--classes", ",".join(CLASSES))
    ours, local = LabelStore.open(store), LabelStore.open(stores["shards"][0])
    assert ours.dataset.source["shards"] == remote
    assert ours.read_keys() == local.read_keys()  # the same shards, in the same order
    assert np.array_equal(ours.read_image_digests(), local.read_image_digests())
    assert all(np.array_equal(a, b) for a, b in zip(ours.read().values(), local.read().values()))


def test_the_library_refuses_to_label_images_without_classes(forms, tmp_path, tiny_refinery_ckpt):
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.labelling.precompute import precompute as label
    from refinery_pipeline.labelling.refinery import Refinery
    flat = tmp_path / "flat"
    shutil.copytree(forms["tree"] / "train" / "disk", flat)
    unlabelled = open_dataset(flat, cache_dir=tmp_path, labels_required=False, num_workers=1)
    with pytest.raises(DataSetError, match="no classes"):
        label(unlabelled, tmp_path / "s.zarr", Refinery.from_checkpoint(tiny_refinery_ckpt),
              CropPlan(seed=0, crops_per_image=2), progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_a_mapped_data_set_converts_with_its_keys_every_time(forms, tmp_path):
    """Decoded images (no bytes to pass through), keyed by the user's function; such a data set
    cannot tell whether it changed, so each open converts it again (to the same file)."""
    from refinery_pipeline.sources import open_source

    class Pairs:  # a map-style data set of (PIL image, label), as torchvision's are
        def __init__(self, root):
            self.files = sorted(root.rglob("*.*"))
            self.classes = CLASSES
            self.targets = [CLASSES.index(f.parent.name) for f in self.files]

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            return Image.open(self.files[i]).convert("RGB"), self.targets[i]

    pairs = Pairs(forms["tree"] / "train")
    names = [f"{f.parent.name}/{f.stem}" for f in pairs.files]
    source = open_source(pairs, key_fn=names.__getitem__)
    first = open_dataset(source, cache_dir=tmp_path, num_workers=1)
    stamp, fingerprint = first.path.stat().st_mtime_ns, first.fingerprint()
    assert sorted(first.keys()) == sorted(forms["truth"]) and first.meta["passed_through"] == 0
    assert [first.classes[c] for c in first.labels] == [forms["truth"][k][1] for k in first.keys()]
    again = open_dataset(source, cache_dir=tmp_path, num_workers=1)
    assert again.path == first.path and again.path.stat().st_mtime_ns != stamp
    assert again.fingerprint() == fingerprint  # the same bytes, in the same order
