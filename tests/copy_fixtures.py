"""A keyed label store and copies of its data set in many forms, for the readers' tests.

The original data set is a ``.beton`` of procedural shapes in three frames (48 x 48, 48 x 36,
36 x 48) whose sidecar names a file per image (``<class>/<class>_<i>``), so it has keys. Its
store is precomputed (keyed: precompute records keys and digests), and copied without them
(a store as made before format 5, read by position).
Copies are made from the ``.beton``'s own stored bytes, so a copy holding them is *exact*
whatever the conversion does: files in a tree, a flat folder, a shuffled list, WebDataset
shards, a Hugging Face table; and ``.beton`` copies written from the same pixels (FFCV encodes
the same pixels to the same bytes). Resized copies are PNGs of the decoded pixels halved, so
their pixels are known exactly and their crops are approximate.
"""
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.sources.beton_writer import write_beton
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import ATTRIBUTES_DIGEST, SEALED_ARRAYS
from refinery_pipeline.sources.pixels import decode_jpeg
from refinery_pipeline.sources import BetonSource
from refinery_pipeline.sources.mapped import MappedSource
from refinery_pipeline.paper.synthetic import SHAPES, make_shapes

N, K, TOP_K, SIZE = 48, 3, 4, 24
FRAMES = ((48, 48), (48, 36), (36, 48))  # height, width of image n: FRAMES[n % 3]


@dataclass
class Origin:
    """The original data set: its pixels, labels, keys and ``.beton``, and stores of it."""
    images: list        # (H, W, 3) uint8 pixels as written to the .beton
    labels: np.ndarray  # class of each image, in the pixels' order
    keys: list          # key of each image, in the pixels' order
    beton: Path         # the .beton (stored in its own shuffled order)
    plain: Path         # a store without keys (format 5 layout, no image_keys)
    keyed: Path         # the same labels, with keys and digests

    def stored(self) -> BetonSource:
        return BetonSource(self.beton)


def original_pixels(count: int = N, seed: int = 11) -> tuple:
    """``(images, labels, keys)``: shapes cut to three frames, keyed ``<class>/<class>_<i>``."""
    shapes = make_shapes(count, 48, seed)
    images = [np.ascontiguousarray(image[:FRAMES[n % 3][0], :FRAMES[n % 3][1]])
              for n, image in enumerate(shapes.images)]
    keys = [f"{SHAPES[c]}/{SHAPES[c]}_{n:03d}" for n, c in enumerate(shapes.labels)]
    return images, np.asarray(shapes.labels), keys


class KeyedPixels:
    """Pixels with labels and class names, as a map-style data set (``MappedSource`` keys it)."""

    def __init__(self, images, labels):
        self.images, self.targets, self.classes = images, [int(c) for c in labels], list(SHAPES)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def write_keyed_beton(path: Path, images, labels, keys) -> Path:
    """A ``.beton`` of ``images`` whose sidecar names each by its key."""
    source = MappedSource(KeyedPixels(images, labels), key_fn=lambda i: keys[i])
    write_beton(source, path, classes=SHAPES, num_workers=1)
    return path


def precompute_store(beton: Path, path: Path, checkpoint, augment=()) -> Path:
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery
    precompute(open_dataset(beton), path, Refinery.from_checkpoint(checkpoint, bn_mode="eval"),
               CropPlan(seed=5, crops_per_image=K, augment=tuple(augment)), top_k=TOP_K,
               crop_batch=16, chunk_size=16, progress=False, num_workers=1)
    return path


def without_keys(keyed: Path, path: Path) -> Path:
    """``keyed`` as a store at ``path`` that names no images (as stores before format 5 did):
    its labels and chunks unchanged, no ``image_keys`` or ``image_digests``."""
    old = LabelStore.open(keyed)
    left_out = {"format", "format_version", "layout", "complete", ATTRIBUTES_DIGEST,
                *SEALED_ARRAYS.values()}
    attrs = {k: v for k, v in old.attrs.items() if k not in left_out}
    new = LabelStore.create(path, old.layout, attrs, labels=old.read_labels(),
                            image_sizes=old.read_image_sizes())
    for c in range(old.layout.num_chunks):
        new.write_chunk(c, {name: old.read_chunk(name, c) for name in old.layout.array_names})
    new.finalize()
    return path


def make_origin(directory: Path, checkpoint, augment=()) -> Origin:
    images, labels, keys = original_pixels()
    beton = write_keyed_beton(directory / "original_train.beton", images, labels, keys)
    keyed = precompute_store(beton, directory / "keyed.zarr", checkpoint, augment)
    return Origin(images, labels, keys, beton, without_keys(keyed, directory / "plain.zarr"),
                  keyed)


@pytest.fixture(scope="module")
def origin(tiny_refinery_ckpt, tmp_path_factory) -> Origin:
    return make_origin(tmp_path_factory.mktemp("origin"), tiny_refinery_ckpt)


@pytest.fixture(scope="module")
def mixing_origin(tiny_refinery_ckpt, tmp_path_factory) -> Origin:
    """The same images under a recipe that mixes each crop with a partner crop (mixup)."""
    return make_origin(tmp_path_factory.mktemp("mixing"), tiny_refinery_ckpt, ("mixup:0.4",))


# ----------------------------------------------------------------------------- copies

def stored_bytes(origin: Origin) -> dict:
    """key -> the ``.beton``'s stored bytes of that image (what the refinery decoded)."""
    source = origin.stored()
    return {key: source.encoded(i) for i, key in enumerate(source.keys())}


def export_files(origin: Origin, folder: Path, keys=None, flat: bool = False,
                 resize: float = None) -> list:
    """Write images ``keys`` (default all) as files under ``folder``: ``<key>.jpg`` (a tree),
    or ``<name>.jpg`` with ``flat``; with ``resize``, the decoded pixels scaled by it (OpenCV
    INTER_AREA) as lossless PNG. Returns the files, in ``keys``' order."""
    import cv2
    from PIL import Image
    data = stored_bytes(origin)
    files = []
    for key in keys if keys is not None else list(data):
        name = key.rsplit("/", 1)[-1] if flat else key
        if resize is None:
            path = folder / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])
        else:
            pixels = decode_jpeg(data[key])
            h, w = pixels.shape[:2]
            small = cv2.resize(pixels, (round(w * resize), round(h * resize)),
                               interpolation=cv2.INTER_AREA)
            path = folder / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(small).save(path)
        files.append(path)
    return files


def shuffled(items, seed: int = 0) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def subset(keys, share: float, seed: int = 0) -> list:
    """A shuffled ``share`` of ``keys`` (the rest lost)."""
    keys = shuffled(keys, seed)
    return keys[:round(len(keys) * share)]


def beton_copy(origin: Origin, path: Path, keys, flat: bool = False, scale: float = None):
    """A keyed ``.beton`` of images ``keys`` written from the original pixels (the same bytes
    as the original's for each image), or their copy scaled by ``scale`` (other bytes)."""
    import cv2
    where = {key: n for n, key in enumerate(origin.keys)}
    images = [origin.images[where[k]] for k in keys]
    if scale is not None:
        images = [cv2.resize(im, (round(im.shape[1] * scale), round(im.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA) for im in images]
    names = [k.rsplit("/", 1)[-1] for k in keys] if flat else list(keys)
    return write_keyed_beton(path, images, origin.labels[[where[k] for k in keys]], names)


def write_shards(origin: Origin, folder: Path, keys, per_shard: int = 10) -> str:
    """Images ``keys`` as WebDataset shards (their stored bytes, ``cls`` labels); returns the
    brace pattern."""
    import webdataset as wds
    data = stored_bytes(origin)
    label = dict(zip(origin.keys, origin.labels.tolist()))
    folder.mkdir(parents=True, exist_ok=True)
    parts = [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]
    for s, part in enumerate(parts):
        with wds.TarWriter(str(folder / f"part-{s:03d}.tar")) as writer:
            for key in part:
                writer.write({"__key__": key, "jpg": data[key], "cls": label[key]})
    return str(folder / f"part-{{000..{len(parts) - 1:03d}}}.tar")


def hf_table(origin: Origin, keys):
    """Images ``keys`` as a Hugging Face table: stored bytes, a ``file_name`` column and a
    ``ClassLabel`` naming the classes in reverse (the copy numbers them otherwise)."""
    import datasets
    data = stored_bytes(origin)
    label = dict(zip(origin.keys, origin.labels.tolist()))
    names = list(SHAPES)[::-1]
    features = datasets.Features({"image": datasets.Image(),
                                  "file_name": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": data[k], "path": None} for k in keys],
         "file_name": [f"{k}.jpg" for k in keys],
         "label": [names.index(SHAPES[label[k]]) for k in keys]}, features=features)


def png_pixels(path) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
        return np.asarray(image.convert("RGB"))
