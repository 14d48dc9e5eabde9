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
assert g.attrs["format"] == "refinery-label-store" and g.attrs["format_version"] <= 3
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
