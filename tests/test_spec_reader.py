"""docs/label-store.md is complete: a reader written from it alone (zarr, numpy, simplejpeg,
OpenCV and FFCV's ``Reader`` to find bytes; this package cannot even be imported) reproduces the
replayed crops, the slots of each epoch and the dense targets that refinery itself produces."""
import json
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import refinery_pipeline as refinery
from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery

# Written from docs/label-store.md only. Run in a subprocess where refinery_pipeline is hidden.
SPEC_READER = r'''
import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "refinery_pipeline":
            raise ImportError("the spec reader must not use refinery")
sys.meta_path.insert(0, _Hide())

import cv2, numpy as np, simplejpeg, zarr
from ffcv.reader import Reader

store_path, beton_path, out_path, epochs, seed, policy, rest = sys.argv[1:8]
epochs, seed = int(epochs), int(seed)
g = zarr.open_group(store_path, mode="r")
assert g.attrs["format"] == "refinery-label-store" and g.attrs["format_version"] <= 5
boxes, flips = g["boxes"][:], g["flips"][:]
top_i, top_p = g["topk_indices"][:], g["topk_probs"][:]
bits = g.attrs["layout"].get("prob_bits", 0)  # version 3: plain float16 on a 2^-bits grid
steps = top_p.astype(np.float64) * 2.0 ** bits
assert bits == 0 or np.array_equal(steps, np.round(steps)), "probabilities off their grid"
N, K = flips.shape
C = len(g.attrs["dataset"]["classes"])
S = g.attrs["refinery"]["input_size"]

M64 = (1 << 64) - 1
def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)
def u(seed, stream, a, b, c):
    x = splitmix64(seed ^ (stream << 56))
    for v in (a, b, c):
        x = splitmix64(x ^ v)
    return (x >> 11) * 2.0 ** -53
def slot(e, n):
    if policy == "random":
        return min(int(u(seed, 3, e, n, 0) * K), K - 1)
    cycle, position = divmod(e, K)
    keys = [u(seed, 3, cycle, n, j + 2 ** 32) for j in range(K)]
    return int(np.argsort(keys, kind="stable")[position])

reader = Reader(beton_path)
field = "f%d" % reader.field_names.index("image")
meta = reader.metadata[field]
size_of = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
blob = np.memmap(beton_path, dtype=np.uint8, mode="r")
def image(n):
    m = meta[n]
    data = blob[m["data_ptr"]:m["data_ptr"] + size_of[int(m["data_ptr"])]]
    if m["mode"] == 0:
        return simplejpeg.decode_jpeg(data.tobytes(), colorspace="RGB", fastdct=True,
                                      fastupsample=False)
    return np.asarray(data[:m["height"] * m["width"] * 3]).reshape(m["height"], m["width"], 3)
def crop(n, k):
    y, x, h, w = (int(v) for v in boxes[n, k])
    out = cv2.resize(np.ascontiguousarray(image(n)[y:y + h, x:x + w]), (S, S),
                     interpolation=cv2.INTER_AREA)
    return out[:, ::-1] if flips[n, k] else out
def dense(n, k):
    p = top_p[n, k].astype(np.float32)
    target = np.zeros(C, np.float32)
    kk = len(p)
    s = p[0]
    for v in p[1:]:  # left to right, one float32 addition at a time
        s = np.float32(s + v)
    if rest == "renormalize" or kk == C:
        target[top_i[n, k]] = p / s
        return target
    r = np.float32(max(np.float32(0), np.float32(1) - s) / np.float32(C - kk))
    target[:] = r
    target[top_i[n, k]] = p
    return target / np.float32(s + np.float32(r * np.float32(C - kk)))

slots = np.array([[slot(e, n) for n in range(N)] for e in range(epochs)])
crops = np.stack([[crop(n, slots[e, n]) for n in range(N)] for e in range(epochs)])
targets = np.stack([[dense(n, slots[e, n]) for n in range(N)] for e in range(epochs)])
np.savez(out_path, slots=slots, crops=crops, targets=targets)
print("spec reader done")
'''


@pytest.fixture(scope="module")
def spec_store(labelled_store):
    """K = 3, top-3 of 10 classes (so that --rest uniform has a rest to spread)."""
    return labelled_store(seed=8, crops_per_image=3, top_k=3)


@pytest.mark.slow
@pytest.mark.parametrize("policy, rest, seed", [("cycle", "uniform", 0),
                                                ("random", "renormalize", 4)])
def test_a_reader_written_from_the_spec_reproduces_crops_slots_and_targets(
        spec_store, tiny_data, tmp_path, policy, rest, seed):
    epochs = 4
    out = tmp_path / "spec.npz"
    result = subprocess.run([sys.executable, "-c", SPEC_READER, str(spec_store), str(tiny_data),
                             str(out), str(epochs), str(seed), policy, rest],
                            capture_output=True, text=True, timeout=300)
    assert "spec reader done" in result.stdout, result.stderr[-3000:]
    spec = np.load(out)
    loader = refinery.replay_loader(spec_store, tiny_data, batch_size=16, num_workers=1,
                                    seed=seed, slot_policy=policy, drop_last=False)
    for epoch in range(epochs):
        loader.next_epoch = epoch
        for batch in loader:
            n = batch.indices.numpy()
            assert np.array_equal(batch.slots.numpy(), spec["slots"][epoch, n])
            assert np.array_equal(batch.images.numpy(), spec["crops"][epoch, n])
            ours = refinery.dense_targets(batch.targets, 10, rest)
            assert torch.equal(ours, torch.from_numpy(spec["targets"][epoch, n]))  # every bit


# Also from docs/label-store.md only ("A recipe's pixels"): appended to the reader's functions
# above (hash, decode, cut), it reproduces every (n, k) crop of a recipe store after the recipe.
RECIPE_READER = SPEC_READER.split("slots = np.array(")[0] + r'''
import math
import torch
from scipy.special import betaincinv
from torchvision.transforms.v2 import InterpolationMode, functional as F

plan = g.attrs["plan"]
pseed, steps = plan["seed"], plan.get("augment", [])
auto, erase_p, alphas = None, 0.0, {}
for step in steps:
    name, *values = step.split(":")
    if name == "trivialaugment":
        auto = ("trivial", None)
    elif name == "randaugment":
        auto = ("rand", (int(values[0]), int(values[1])))
    elif name == "erasing":
        erase_p = float(values[0])
    else:
        alphas[name] = float(values[0])

# The spec's table: op, signed, its 31 magnitudes (TrivialAugmentWide, RandAugment), its call.
lin = lambda a, b: torch.linspace(a, b, 31)
post = lambda d: (8 - (torch.arange(31) / ((31 - 1) / d))).round().int()
BIL = InterpolationMode.BILINEAR
OPS = [("Identity", False, None, None, lambda img, m: img),
       ("ShearX", True, lin(0, 0.99), lin(0, 0.3), lambda img, m: F.affine(
           img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
           interpolation=BIL, fill=None, center=[0, 0])),
       ("ShearY", True, lin(0, 0.99), lin(0, 0.3), lambda img, m: F.affine(
           img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
           interpolation=BIL, fill=None, center=[0, 0])),
       ("TranslateX", True, lin(0, 32), lin(0, 150 / 331 * S), lambda img, m: F.affine(
           img, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0],
           interpolation=BIL, fill=None)),
       ("TranslateY", True, lin(0, 32), lin(0, 150 / 331 * S), lambda img, m: F.affine(
           img, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0],
           interpolation=BIL, fill=None)),
       ("Rotate", True, lin(0, 135), lin(0, 30), lambda img, m: F.rotate(
           img, angle=m, interpolation=BIL, fill=None)),
       ("Brightness", True, lin(0, 0.99), lin(0, 0.9), lambda img, m: F.adjust_brightness(img, 1.0 + m)),
       ("Color", True, lin(0, 0.99), lin(0, 0.9), lambda img, m: F.adjust_saturation(img, 1.0 + m)),
       ("Contrast", True, lin(0, 0.99), lin(0, 0.9), lambda img, m: F.adjust_contrast(img, 1.0 + m)),
       ("Sharpness", True, lin(0, 0.99), lin(0, 0.9), lambda img, m: F.adjust_sharpness(img, 1.0 + m)),
       ("Posterize", False, post(6), post(4), lambda img, m: F.posterize(img, bits=int(m))),
       ("Solarize", False, lin(1, 0), lin(1, 0), lambda img, m: F.solarize(img, threshold=255.0 * m)),
       ("AutoContrast", False, None, None, lambda img, m: F.autocontrast(img)),
       ("Equalize", False, None, None, lambda img, m: F.equalize(img))]

def ops_and_erasing(img, n, k):
    if auto is not None:
        kind, fixed = auto
        for r in range(1 if fixed is None else fixed[0]):
            _, signed, trivial, rand, call = OPS[int(u(pseed, 4, n, k, 3 * r) * 14)]
            b = int(u(pseed, 4, n, k, 3 * r + 1) * 31) if fixed is None else fixed[1]
            values = trivial if kind == "trivial" else rand
            magnitude = 0.0 if values is None else float(values[b])
            if signed and u(pseed, 4, n, k, 3 * r + 2) <= 0.5:
                magnitude = -magnitude
            img = call(img, magnitude)
    if erase_p and u(pseed, 5, n, k, 0) < erase_p:
        for t_ in range(10):
            area = S * S * (0.02 + 0.31 * u(pseed, 5, n, k, 1 + 4 * t_))
            aspect = np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * u(pseed, 5, n, k, 2 + 4 * t_))
            h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if h < S and w < S:
                i = int(u(pseed, 5, n, k, 3 + 4 * t_) * (S - h + 1))
                j = int(u(pseed, 5, n, k, 4 + 4 * t_) * (S - w + 1))
                fill = torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None]
                img = F.erase(img, i, j, h, w, fill)
                break
    return img

def as_tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()

def recipe_crop(n, k):
    img = ops_and_erasing(as_tensor(crop(n, k)), n, k)
    if alphas:
        m = min(int(u(pseed, 6, n, k, 2) * N), N - 1)
        j = min(int(u(pseed, 6, n, k, 3) * K), K - 1)
        partner = ops_and_erasing(as_tensor(crop(m, j)), m, j)
        both = len(alphas) == 2
        kind = ("mixup" if u(pseed, 6, n, k, 0) < 0.5 else "cutmix") if both else next(iter(alphas))
        a = alphas[kind]
        lam = float(betaincinv(a, a, u(pseed, 6, n, k, 1)))
        if kind == "mixup":
            img = (img.float() * lam + partner.float() * (1 - lam)).round().clamp(0, 255).to(torch.uint8)
        else:
            cx, cy = int(u(pseed, 6, n, k, 4) * S), int(u(pseed, 6, n, k, 5) * S)
            half = int(0.5 * np.sqrt(1 - lam) * S)
            x1, y1, x2, y2 = max(cx - half, 0), max(cy - half, 0), min(cx + half, S), min(cy + half, S)
            img = img.clone()
            img[:, y1:y2, x1:x2] = partner[:, y1:y2, x1:x2]
    return img.permute(1, 2, 0).numpy()

np.save(out_path, np.stack([[recipe_crop(n, k) for k in range(K)] for n in range(N)]))
print("recipe reader done")
'''


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [("trivialaugment", "erasing:0.5", "mixup:0.4", "cutmix:1"),
                                    ("randaugment:2:9", "cutmix:1")])
def test_a_reader_written_from_the_spec_reproduces_recipe_crops(recipe, tiny_data,
                                                                labelled_store, tmp_path):
    # test_augment's settings: the session labels each recipe once
    path = labelled_store(seed=5, crops_per_image=2, augment=recipe, top_k=4)
    out = tmp_path / "recipe.npy"
    result = subprocess.run([sys.executable, "-c", RECIPE_READER, str(path), str(tiny_data),
                             str(out), "1", "0", "cycle", "renormalize"],
                            capture_output=True, text=True, timeout=300)
    assert "recipe reader done" in result.stdout, result.stderr[-3000:]
    spec = np.load(out)
    ours = refinery.StoreCropDataset(path, tiny_data)
    for n in range(len(ours)):
        for k in range(2):
            assert np.array_equal(spec[n, k], ours.crop(n, k)), (n, k)


# ------------------------------------------------------------------------------- format 5

# Also from docs/label-store.md only ("Image keys and the join", "Decoding an image's bytes",
# "Reading a copy of the data"): given a keyed store and a copy (image files listed in any
# order), it joins them by key, tells exact from approximate, carries the boxes into each
# file's frame and cuts every stored crop.
COPY_READER = SPEC_READER.split("reader = Reader(")[0].replace(
    "store_path, beton_path, out_path, epochs, seed, policy, rest = sys.argv[1:8]",
    "store_path, listing, root, out_path = sys.argv[1:5]\nepochs, seed = 0, 0") + r'''
import hashlib, io, json, os, unicodedata
from PIL import Image

keys = [bytes(row).rstrip(b"\0").decode("utf-8") for row in g["image_keys"][:]]
digests, sizes = g["image_digests"][:], g["image_sizes"][:]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

def clean(path):
    return "/".join(p for p in path.replace("\\", "/").split("/") if p not in ("", "."))

def normalize(name):
    key, previous = clean(name), None
    while key != previous:
        previous = key
        stem = key.rsplit("/", 1)[-1]
        for ext in EXTENSIONS:
            if stem.lower().endswith(ext) and len(stem) > len(ext):
                key = clean(key[:-len(ext)])
                break
    return unicodedata.normalize("NFC", key)

def join(store_keys, copy_keys):
    row_of = {k: n for n, k in enumerate(store_keys)}
    ends = {}
    for n, k in enumerate(store_keys):
        parts = k.split("/")
        for j in range(1, len(parts)):
            s = "/".join(parts[-j:])
            ends[s] = n if s not in ends else -2
    claim = [row_of.get(c, ends.get(c, -1)) for c in copy_keys]
    rows = [-1] * len(store_keys)
    for n in range(len(store_keys)):
        items = [i for i, r in enumerate(claim) if r == n]
        if len(items) == 1:
            rows[n] = items[0]
    return rows

def decode(data):
    if data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("Gray", "YCbCr", "RGB"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True,
                                              fastupsample=False)
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return np.asarray(image.convert("RGB"))  # the 8-bit modes this copy holds

def reframed(stored, actual):
    (H, W), (h2, w2) = stored, actual
    if H >= W:
        return abs(round(W * h2 / H) - w2) > 1
    return abs(round(H * w2 / W) - h2) > 1

def carried(box, stored, actual):
    (H, W), (h2, w2) = stored, actual
    if (H, W) == (h2, w2):
        return [int(v) for v in box]
    fy, fx = h2 / H, w2 / W
    y, x, h, w = (float(v) for v in box)
    y0, x0 = round(y * fy), round(x * fx)
    return [y0, x0, max(1, min(h2 - y0, round(h * fy))), max(1, min(w2 - x0, round(w * fx)))]

files = json.load(open(listing))
rows = join(keys, [normalize(os.path.relpath(f, root)) for f in files])  # names under root
matched, exact, lost, crops = [], [], [], []
for n, i in enumerate(rows):
    if i < 0:
        continue
    data = open(files[i], "rb").read()
    image = decode(data)
    if reframed(sizes[n], image.shape[:2]):
        lost.append(n)
        continue
    matched.append(n)
    exact.append(hashlib.sha256(data).digest() == bytes(digests[n]))
    out = []
    for k in range(K):
        y, x, h, w = carried(boxes[n, k], sizes[n], image.shape[:2])
        c = cv2.resize(np.ascontiguousarray(image[y:y + h, x:x + w]), (S, S),
                       interpolation=cv2.INTER_AREA)
        out.append(c[:, ::-1] if flips[n, k] else c)
    crops.append(out)
np.savez(out_path, rows=np.array(matched), exact=np.array(exact), reframed=np.array(lost),
         crops=np.array(crops))
print("copy reader done")
'''


def smooth(rng, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    base = np.stack([y * 6, x * 4, (x + 2 * y) * 3], -1) % 256
    return np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def keyed_store(tiny_refinery_ckpt, tmp_path_factory):
    """A tree of JPEGs (and one PNG per class) labelled into a keyed store: ``(tree's split
    folder, store, the .beton)``."""
    from PIL import Image
    base = tmp_path_factory.mktemp("keyed")
    root = base / "data" / "train"
    rng = np.random.default_rng(3)
    for c in ("disk", "square"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            image = Image.fromarray(smooth(rng, *(int(v) for v in rng.integers(26, 44, 2))))
            image.save(root / c / f"{c}_{i}.{'png' if i == 7 else 'jpg'}")
    dataset = open_dataset(base / "data", cache_dir=base / "cache", num_workers=1)
    store = base / "labels.zarr"
    precompute(dataset, store, Refinery.from_checkpoint(tiny_refinery_ckpt, classes=dataset.classes,
                                                        bn_mode="eval"),
               CropPlan(seed=2, crops_per_image=2), top_k=2, crop_batch=16, progress=False,
               num_workers=1)
    return root, store, dataset


def read_copy(store, files, root, tmp_path) -> dict:
    """The spec reader's view of the copy ``files`` named by their paths under ``root``."""
    listing, out = tmp_path / "files.json", tmp_path / "copy.npz"
    listing.write_text(json.dumps([str(f) for f in files]))
    result = subprocess.run([sys.executable, "-c", COPY_READER, str(store), str(listing),
                             str(root), str(out)], capture_output=True, text=True, timeout=300)
    assert "copy reader done" in result.stdout, result.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_a_reader_from_the_spec_joins_a_shuffled_subset_and_cuts_exact_crops(keyed_store,
                                                                              tmp_path):
    """A flat copy of three quarters of the files, in another order: joined by the files'
    names, every JPEG exact (its bytes were passed through), and its crops byte for byte the
    ones the refinery labelled (FFCV's replay of the store's .beton)."""
    from refinery_pipeline.loaders.replay import multi_crop_loader
    from refinery_pipeline.loaders.crop_table import crop_table
    root, store_path, dataset = keyed_store
    files = sorted(root.rglob("*.*"))
    random.Random(0).shuffle(files)
    (tmp_path / "flat").mkdir()
    kept = [shutil.copy(f, tmp_path / "flat" / f.name) for f in files[:12]]
    spec = read_copy(store_path, kept, tmp_path / "flat", tmp_path)
    store = refinery.open_store(store_path)
    keys = store.read_keys()
    assert sorted(spec["rows"].tolist()) == sorted(keys.index(f"{f.parent.name}/{f.stem}")
                                                   for f in files[:12])
    assert spec["exact"].tolist() == [not keys[n].endswith("_7") for n in spec["rows"]]
    records = store.read_crops()
    labelled = np.zeros((dataset.num_images, 2, 24, 24, 3), np.uint8)
    for batch in multi_crop_loader(dataset, crop_table(records.boxes, records.flips), (24, 24),
                                   4, np.arange(dataset.num_images), 1):
        labelled[batch.indices.numpy()] = batch.images.numpy()
    for row, exact, crops in zip(spec["rows"], spec["exact"], spec["crops"]):
        if exact:
            assert np.array_equal(crops, labelled[row]), keys[row]


@pytest.mark.slow
def test_a_reader_from_the_spec_carries_boxes_into_a_resized_copy(keyed_store, tmp_path):
    """A copy at 70 % size, re-encoded as PNG, one image turned on its side: all approximate,
    the turned one reframed, every other crop cut from the box as refinery carries it over."""
    from PIL import Image

    from refinery_pipeline.sources.pixels import box_in_frame, cut_crop, read_image_file
    root, store_path, _ = keyed_store
    copies = []
    for f in sorted(root.rglob("*.*")):
        target = tmp_path / "copy" / f.parent.name / f"{f.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as image:
            small = image.resize((round(image.width * 0.7), round(image.height * 0.7)))
            (small.transpose(Image.Transpose.ROTATE_90) if f.stem == "square_2" else small
             ).save(target)
        copies.append(target)
    spec = read_copy(store_path, copies, tmp_path / "copy", tmp_path)
    store = refinery.open_store(store_path)
    keys, sizes, records = store.read_keys(), store.read_image_sizes(), store.read_crops()
    assert [keys[n] for n in spec["reframed"]] == ["square/square_2"]
    assert len(spec["rows"]) == 15 and not spec["exact"].any()
    for row, crops in zip(spec["rows"], spec["crops"]):
        image = read_image_file(tmp_path / "copy" / f"{keys[row]}.png")
        for k in range(2):
            box = box_in_frame(records.boxes[row, k], sizes[row], image.shape[:2])
            assert np.array_equal(crops[k], cut_crop(image, box, records.flips[row, k], 24))
