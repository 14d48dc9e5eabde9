"""A recipe's pixels: the crops after the recipe whose parameters :mod:`..plan.recipe` draws.

The ops are torchvision's public functional ones (:func:`apply_op`, the calls its private
``_AutoAugmentBase._apply_image_or_video_transform`` makes; ``F.erase``), each crop computed
alone by the same calls, so the bytes depend neither on the batch nor on the thread count.
Both sides run them here: precompute on every planned crop (:func:`planned_crops`), the loaders
on each batch after the loader (:class:`BatchRecipe`), ``StoreCropDataset`` per item
(:func:`recipe_crops`).

torchvision loads when a recipe first runs, not when this module is imported.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..plan.recipe import MIXUP, NO_MIX, CropAugment, PlanAugment, op_names
from .crop_batch import MixedLabels

# torchvision's RandomErasing(value=0) runs after Normalize, so it shows the normalisation mean.
ERASE_FILL = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))
# Crops smaller than this run the recipe on one thread: two threads were 0.75-0.9x as fast at
# 32 px, 0.8-1.2x at 96 and 1.1-1.6x at 224 (benchmarks/results/recipe_cost_cpu.md).
POOL_MIN_SIZE = 128


def recipe_crops(own, partner, params: tuple, threads: int = 1):
    """Crops after the recipe: ``own`` and ``partner`` are ``(M, S, S, 3)`` uint8 tensors
    (``partner`` None unless the recipe mixes) of crops (n, k) and of their partners (m, j),
    ``params`` (:meth:`.PlanAugment.pair_params`) the draws of (n, k) and, for the partners'
    own ops, of (m, j).

    ``threads`` > 1 splits the crops over a thread pool (torchvision's kernels release the
    GIL), for crops of :data:`POOL_MIN_SIZE` pixels and more: smaller ones ran slower on
    two threads than on one (Python's share of the work). Each crop is computed alone, by
    the same calls, so the bytes do not depend on the thread count."""
    out = torch.empty_like(own)
    rows = range(len(own))
    if threads <= 1 or len(own) < 2 * threads or own.shape[1] < POOL_MIN_SIZE:
        for i in rows:
            _recipe_crop(own, partner, params, i, out)
        return out
    parts = [rows[t::threads] for t in range(threads)]
    list(_pool(threads).map(
        lambda part: [_recipe_crop(own, partner, params, i, out) for i in part], parts))
    return out


def _recipe_crop(own, partner, params: tuple, i: int, out):
    """Crop ``i`` through its ops and erasing, mixed with its partner's (through the
    partner's own) where it mixes, written to ``out[i]``."""
    own_params, partner_params = params
    a = _one(own[i], own_params, i)
    if partner is not None and own_params.mix[i] != NO_MIX:
        a = mix_pair(a, _one(partner[i], partner_params, i), int(own_params.mix[i]),
                     float(own_params.weight[i]), own_params.cut_box[i])
    out[i] = a.permute(1, 2, 0)


def _one(crop_hwc, params: CropAugment, i: int):
    image = crop_hwc.permute(2, 0, 1).contiguous()
    return transform_crop(image, params.ops[i], params.magnitudes[i], params.erase[i])


_POOLS = {}  # (process id, threads) -> ThreadPoolExecutor: a forked worker makes its own


def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` recipe threads, made once (every loader and epoch of
    that width shares it)."""
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS.setdefault(key, ThreadPoolExecutor(threads, "recipe"))
    return pool


def transform_crop(image, ops, magnitudes, erase):
    """``image`` ``(3, S, S)`` uint8 through the ops ``ops`` (ids) at ``magnitudes``
    (:func:`apply_op`), then ``F.erase`` of ``erase`` ``(i, j, h, w)`` (nothing when ``h``
    is 0)."""
    from torchvision.transforms.v2 import functional as F
    names = op_names()
    for op, magnitude in zip(ops, magnitudes):
        image = apply_op(image, names[int(op)], float(magnitude))
    i, j, h, w = (int(v) for v in erase)
    if h:
        fill = torch.tensor(ERASE_FILL, dtype=torch.uint8)[:, None, None]
        image = F.erase(image, i, j, h, w, fill)
    return image


def apply_op(image, name: str, magnitude: float):
    """Op ``name`` of TrivialAugmentWide / RandAugment at ``magnitude`` on a ``(3, S, S)``
    uint8 tensor, with bilinear interpolation and black fill: torchvision's public functional
    calls, with the arguments its private ``_AutoAugmentBase._apply_image_or_video_transform``
    passes them (``docs/label-store.md`` lists them). Calling the private method instead would
    let a torchvision release change replayed pixels unnoticed; ``tests/test_torchvision_ops.py``
    fails loudly if the two ever differ, or the augmentation spaces change."""
    return _OPS[name](image, magnitude)


def _affine(image, **placement):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    return F.affine(image, angle=0.0, scale=1.0, interpolation=InterpolationMode.BILINEAR,
                    fill=None, **placement)


def _functional(name: str):
    from torchvision.transforms.v2 import functional as F
    return getattr(F, name)


def _rotate(image, magnitude):
    from torchvision.transforms.v2 import InterpolationMode
    return _functional("rotate")(image, angle=magnitude,
                                 interpolation=InterpolationMode.BILINEAR, fill=None)


_OPS = {
    "Identity": lambda image, m: image,
    "ShearX": lambda image, m: _affine(image, translate=[0, 0], center=[0, 0],
                                       shear=[math.degrees(math.atan(m)), 0.0]),
    "ShearY": lambda image, m: _affine(image, translate=[0, 0], center=[0, 0],
                                       shear=[0.0, math.degrees(math.atan(m))]),
    "TranslateX": lambda image, m: _affine(image, translate=[int(m), 0], shear=[0.0, 0.0]),
    "TranslateY": lambda image, m: _affine(image, translate=[0, int(m)], shear=[0.0, 0.0]),
    "Rotate": _rotate,
    "Brightness": lambda image, m: _functional("adjust_brightness")(image, 1.0 + m),
    "Color": lambda image, m: _functional("adjust_saturation")(image, 1.0 + m),
    "Contrast": lambda image, m: _functional("adjust_contrast")(image, 1.0 + m),
    "Sharpness": lambda image, m: _functional("adjust_sharpness")(image, 1.0 + m),
    "Posterize": lambda image, m: _functional("posterize")(image, bits=int(m)),
    "Solarize": lambda image, m: _functional("solarize")(image, threshold=255.0 * m),  # uint8
    "AutoContrast": lambda image, m: _functional("autocontrast")(image),
    "Equalize": lambda image, m: _functional("equalize")(image),
}


def mix_pair(own, partner, kind: int, weight: float, cut_box):
    """``own`` mixed with ``partner`` (both ``(3, S, S)`` uint8): mixup blends the pixels
    ``weight * own + (1 - weight) * partner``, rounded; cutmix pastes the partner's box."""
    if kind == MIXUP:
        blended = own.float().mul_(weight).add_(partner.float().mul_(1.0 - weight))
        return blended.round_().clamp_(0, 255).to(own.dtype)
    x1, y1, x2, y2 = (int(v) for v in cut_box)
    out = own.clone()
    out[:, y1:y2, x1:x2] = partner[:, y1:y2, x1:x2]
    return out


class BatchRecipe:
    """A recipe run on loader batches (:class:`.crop_batch.CropBatch`): crops ``(B, S, S, 3)``,
    or ``(B, 2, S, S, 3)`` crop-and-partner pairs when the recipe mixes, become the recipe's
    ``(B, S, S, 3)`` crops, with one slot per crop and, when mixed, :class:`MixedLabels`.

    ``fresh``: the crops are fresh draws (ground-truth and online modes, a plan of K = 1 per
    epoch), whose parameters are those of slot 0; otherwise each crop's stored slot's.
    """

    def __init__(self, augment: PlanAugment, labels: np.ndarray, fresh: bool = False,
                 threads: int = 1):
        self.augment, self.labels, self.fresh = augment, np.asarray(labels), fresh
        self.threads = threads

    def __call__(self, batch):
        mixes = self.augment.recipe.mixes
        slots = batch.slots[:, 0] if batch.slots.ndim == 2 else batch.slots
        own, partner = (batch.images[:, 0], batch.images[:, 1]) if mixes else (batch.images, None)
        indices = batch.indices.numpy()
        drawn = np.zeros(len(indices), np.int64) if self.fresh else slots.numpy()
        params = self.augment.pair_params(indices, drawn)
        mix = MixedLabels.of_crops(params[0], self.labels) if mixes else None
        images = recipe_crops(own, partner, params, self.threads)
        return batch._replace(images=images, slots=slots, mix=mix)


def planned_crops(augment: PlanAugment, images, image_ids, crops_per_image: int,
                  threads: int = 1):
    """A multi-crop loader batch ``(B, S, H, W, 3)`` of images ``image_ids`` cut from a crop
    table made by :func:`..labelling.chunk_labeller.build_crop_table` with this recipe, as the
    refinery labels it: the K planned crops after the recipe (the partners, columns K to
    2K - 1, mixed in and dropped), then any further column (a soft-static centred square) as
    it is."""
    K, mixes = crops_per_image, augment.recipe.mixes
    if images.ndim == 4:
        images = images[:, None]
    B, crop_shape = len(images), tuple(images.shape[2:])
    n, k = np.repeat(np.asarray(image_ids), K), np.tile(np.arange(K), B)
    own = images[:, :K].reshape((B * K,) + crop_shape)
    partner = images[:, K:2 * K].reshape(own.shape) if mixes else None
    crops = recipe_crops(own, partner, augment.pair_params(n, k), threads)
    rest = images[:, 2 * K if mixes else K:]
    return torch.cat([crops.reshape((B, K) + crop_shape), rest], dim=1)
