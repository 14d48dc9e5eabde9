"""docs/label-store.md is complete: a reader written from it alone (zarr, numpy, simplejpeg,
OpenCV and FFCV's ``Reader`` to find bytes; this package cannot even be imported) reproduces the
replayed crops, the slots of each epoch and the dense targets that refinery itself produces."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import refinery_pipeline as refinery
from refinery_pipeline.crop_plan import CropPlan
from refinery_pipeline.dataset import open_dataset
from refinery_pipeline.precompute import precompute
from refinery_pipeline.refinery import Refinery

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
    if rest == "renormalize" or kk == C:
        target[top_i[n, k]] = p / p.sum()
        return target
    target[:] = max(0.0, 1.0 - float(p.sum())) / (C - kk)
    target[top_i[n, k]] = p
    return target / target.sum()

slots = np.array([[slot(e, n) for n in range(N)] for e in range(epochs)])
crops = np.stack([[crop(n, slots[e, n]) for n in range(N)] for e in range(epochs)])
targets = np.stack([[dense(n, slots[e, n]) for n in range(N)] for e in range(epochs)])
np.savez(out_path, slots=slots, crops=crops, targets=targets)
print("spec reader done")
'''


@pytest.fixture(scope="module")
def spec_store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "labels.zarr"
    precompute(open_dataset(tiny_data), path,
               Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=8, crops_per_image=3), top_k=3, crop_batch=32, chunk_size=32,
               progress=False)
    return path


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
            assert torch.allclose(ours, torch.from_numpy(spec["targets"][epoch, n]), atol=1e-6)


# Also from docs/label-store.md only ("A recipe's pixels"): appended to the reader's functions
# above (hash, decode, cut), it reproduces every (n, k) crop of a recipe store after the recipe.
RECIPE_READER = SPEC_READER.split("slots = np.array(")[0] + r'''
import torch
from scipy.special import betaincinv
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode, functional as F

plan = g.attrs["plan"]
pseed, steps = plan["seed"], plan.get("augment", [])
auto, erase_p, alphas = None, 0.0, {}
for step in steps:
    name, *values = step.split(":")
    if name == "trivialaugment":
        auto = (v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR), None)
    elif name == "randaugment":
        auto = (v2.RandAugment(interpolation=InterpolationMode.BILINEAR),
                (int(values[0]), int(values[1])))
    elif name == "erasing":
        erase_p = float(values[0])
    else:
        alphas[name] = float(values[0])

def ops_and_erasing(img, n, k):
    if auto is not None:
        t, fixed = auto
        space = type(t)._AUGMENTATION_SPACE
        names = list(space)
        for r in range(1 if fixed is None else fixed[0]):
            op = names[int(u(pseed, 4, n, k, 3 * r) * 14)]
            magnitudes_fn, signed = space[op]
            b = int(u(pseed, 4, n, k, 3 * r + 1) * 31) if fixed is None else fixed[1]
            values = magnitudes_fn(31, S, S)
            magnitude = 0.0 if values is None else float(values[b])
            if signed and u(pseed, 4, n, k, 3 * r + 2) <= 0.5:
                magnitude = -magnitude
            img = t._apply_image_or_video_transform(img, op, magnitude,
                                                    interpolation=InterpolationMode.BILINEAR,
                                                    fill=t._fill)
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


@pytest.mark.parametrize("recipe", [("trivialaugment", "erasing:0.5", "mixup:0.4", "cutmix:1"),
                                    ("randaugment:2:9", "cutmix:1")])
def test_a_reader_written_from_the_spec_reproduces_recipe_crops(recipe, tiny_data,
                                                                tiny_refinery_ckpt, tmp_path):
    path = tmp_path / "labels.zarr"
    precompute(open_dataset(tiny_data), path,
               Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=8, crops_per_image=2, augment=recipe), top_k=3, crop_batch=32,
               chunk_size=32, progress=False, num_workers=1)
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
