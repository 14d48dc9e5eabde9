"""Training recipes in the crop plan: TrivialAugment or RandAugment, random erasing, mixup and
cutmix, with every random parameter a pure function of its crop's (image n, slot k).

The store keeps one crop per (n, k) and the refinery's label of the pixels the student is shown.
With a recipe those pixels are the crop *after* the recipe, so the recipe's parameters must be
replayable exactly, whatever batch size, worker count, rank count or visiting order training
uses. They are drawn here from the same counter-based generator as the boxes
(:func:`.crop_plan.counter_uniform`, streams of their own), so nothing per crop is stored: the
plan's seed and the recipe's names (``plan.augment``) determine every parameter, and
``docs/label-store.md`` gives the draws so another team can reproduce them.

Semantics follow torchvision's v2 transforms (and its classification reference, which applies
them in this order after RandomResizedCrop and the flip):

* ``trivialaugment``: ``TrivialAugmentWide``: one of its 14 ops, a magnitude bin of 31, a sign;
* ``randaugment:N:M``: ``RandAugment(num_ops=N, magnitude=M)``: N ops, bin M, a sign each;
  both with bilinear interpolation (the reference's) and black fill;
* ``erasing:P``: ``RandomErasing(p=P)``: scale (0.02, 0.33), ratio (0.3, 3.3), 10 tries; the
  box filled with the ImageNet mean colour, which is what torchvision's ``value=0`` after
  normalisation shows (rounded to whole pixel values, as every crop here is uint8);
* ``mixup:ALPHA``, ``cutmix:ALPHA``: ``MixUp``/``CutMix`` with λ ~ Beta(ALPHA, ALPHA); both
  given: one of the two per crop, each with probability 1/2 (torchvision's ``RandomChoice``).
  The partner is not the batch neighbour (that would tie labels to the batch layout, as
  TinyViT's are) but a crop drawn per (n, k) from the whole data set: image m, slot j, with
  m's own ops and erasing. Mixed pixels are rounded to uint8.

Only the parameter draws are ours, because torchvision draws from a global RNG; the ops
themselves are torchvision's, run on the pixels by the loaders (:mod:`..loaders.recipe_ops`).
This module imports no torch: binding a recipe with ops (:class:`PlanAugment`) reads
torchvision's augmentation space (the op list, signs and magnitudes) at that moment.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ..core.errors import RefineryError
from .crop_plan import counter_uniform

STREAM_AUTO, STREAM_ERASE, STREAM_MIX = 4, 5, 6  # after the plan's boxes, flips and slots
NUM_MAGNITUDE_BINS = 31  # torchvision's default for both TrivialAugmentWide and RandAugment
ERASE_SCALE, ERASE_RATIO, ERASE_TRIES = (0.02, 0.33), (0.3, 3.3), 10
NO_MIX, MIXUP, CUTMIX = 0, 1, 2
MAX_OPS = 16  # randaugment:N: more ops than this per crop leave nothing of the image
AUTO_RECIPES = ("trivialaugment", "randaugment")


class RecipeError(RefineryError):
    """An ``--augment`` value that names no recipe step, or one with impossible parameters."""


def _auto_class(name: str):
    from torchvision.transforms import v2
    return v2.TrivialAugmentWide if name == "trivialaugment" else v2.RandAugment


def op_names() -> tuple:
    """The 14 ops of TrivialAugmentWide and RandAugment, in torchvision's order (op ids)."""
    return tuple(_auto_class("trivialaugment")._AUGMENTATION_SPACE)


@dataclass(frozen=True)
class Recipe:
    """What is applied to every crop after its box and flip (see the module docstring).

    Build it from ``--augment`` values with :meth:`parse`; :meth:`names` gives them back in
    canonical form, which is what a store records (``plan.augment``).
    """

    auto: Optional[str] = None  # "trivialaugment", "randaugment" or None
    num_ops: int = 2            # randaugment: ops per crop
    magnitude: int = 9          # randaugment: magnitude bin (0 .. 30)
    erasing: float = 0.0        # probability of erasing a box
    mixup: float = 0.0          # Beta alpha; 0: off
    cutmix: float = 0.0         # Beta alpha; 0: off

    @classmethod
    def parse(cls, specs) -> "Recipe":
        """A recipe from values such as ``["randaugment:2:9", "erasing:0.25", "mixup:0.2"]``.

        Raises :class:`RecipeError` (one line, naming the value and the fix) for anything else.
        """
        fields = {}
        for spec in specs or ():
            name, _, rest = str(spec).strip().lower().partition(":")
            values = rest.split(":") if rest else []
            if name in fields or (name in AUTO_RECIPES and "auto" in fields):
                raise RecipeError(f"--augment {spec}: {name} is given twice; pass each step once "
                                  "(one of trivialaugment or randaugment)")
            if name == "trivialaugment" and not values:
                fields["auto"] = name
            elif name == "randaugment" and len(values) <= 2:
                n, m = values + ["2", "9"][len(values):]
                n, m = _whole(spec, n, 0, MAX_OPS), _whole(spec, m, 0, NUM_MAGNITUDE_BINS - 1)
                fields.update(auto=name, num_ops=n, magnitude=m)
            elif name == "erasing" and len(values) == 1:
                fields["erasing"] = _number(spec, values[0], 0, 1, "a probability in (0, 1]")
            elif name in ("mixup", "cutmix") and len(values) == 1:
                fields[name] = _number(spec, values[0], 0, math.inf, "an alpha > 0, e.g. 0.2")
            else:
                raise RecipeError(
                    f"--augment {spec}: not a recipe step; pass trivialaugment, "
                    "randaugment[:N[:M]], erasing:P, mixup:ALPHA or cutmix:ALPHA")
        return cls(**fields)

    def names(self) -> tuple:
        """The canonical ``--augment`` values of this recipe (empty: crop and flip only)."""
        names = []
        if self.auto == "trivialaugment":
            names.append("trivialaugment")
        elif self.auto == "randaugment":
            names.append(f"randaugment:{self.num_ops}:{self.magnitude}")
        names += [f"{name}:{getattr(self, name):g}" for name in ("erasing", "mixup", "cutmix")
                  if getattr(self, name)]
        return tuple(names)

    @property
    def mixes(self) -> bool:
        """Whether crops are mixed with a partner crop (mixup or cutmix)."""
        return bool(self.mixup or self.cutmix)

    def __bool__(self) -> bool:
        return bool(self.names())


def _number(spec: str, text: str, low: float, high: float, wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (low < value <= high) or not math.isfinite(value):
        raise RecipeError(f"--augment {spec}: {text!r} is not {wanted}")
    return value


def _whole(spec: str, text: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise RecipeError(f"--augment {spec}: {text!r} is not a whole number from {low} to {high}")
    return int(text)


class CropAugment(NamedTuple):
    """The recipe's parameters of M crops (row i is crop i), as :meth:`PlanAugment.params`
    draws them."""

    ops: np.ndarray         # (M, R) int64 op ids (index into :func:`op_names`); R = ops per crop
    magnitudes: np.ndarray  # (M, R) float64 signed magnitudes, torchvision's values
    erase: np.ndarray       # (M, 4) int64 (i, j, h, w) erasing box; h == 0: nothing erased
    mix: np.ndarray         # (M,) int64 NO_MIX, MIXUP or CUTMIX
    partner: np.ndarray     # (M,) int64 the partner crop's image m
    partner_slot: np.ndarray  # (M,) int64 and slot j
    weight: np.ndarray      # (M,) float64 the crop's own share of a mixed label (1: not mixed)
    cut_box: np.ndarray     # (M, 4) int64 cutmix box (x1, y1, x2, y2) pasted from the partner


class PlanAugment:
    """A recipe bound to one crop plan: its seed, the data set's size, K and the crop side.

    Parameters of crop (n, k) depend on nothing else, so precompute, every training backend and
    any reader draw the same ones; :func:`..loaders.recipe_ops.recipe_crops` runs them on the
    pixels.
    """

    def __init__(self, recipe: Recipe, seed: int, num_images: int, crops_per_image: int,
                 size: int):
        self.recipe, self.seed = recipe, int(seed)
        self.num_images, self.crops_per_image, self.size = num_images, crops_per_image, int(size)
        self._magnitudes = magnitude_table(recipe, self.size) if recipe.auto else None

    def _uniform(self, stream: int, images, slots, draw) -> np.ndarray:
        return counter_uniform(self.seed, stream, images, slots, draw)

    def params(self, images, slots) -> CropAugment:
        """Every parameter of crops ``(images[i], slots[i])`` (1-D arrays of equal length)."""
        n = np.asarray(images, dtype=np.uint64).reshape(-1)
        k = np.asarray(slots, dtype=np.uint64).reshape(-1)
        ops, magnitudes = self._auto(n, k)
        partner, partner_slot = self.partners(n, k)
        mix, weight, cut_box = self._mixing(n, k)
        return CropAugment(ops, magnitudes, self._erasing(n, k), mix, partner, partner_slot,
                           weight, cut_box)

    def partners(self, images, slots):
        """The partner crop ``(m, j)`` of each crop (meaningful only where the recipe mixes)."""
        n = np.asarray(images, dtype=np.uint64).reshape(-1)
        k = np.asarray(slots, dtype=np.uint64).reshape(-1)
        m = np.floor(self._uniform(STREAM_MIX, n, k, 2) * self.num_images).astype(np.int64)
        j = np.floor(self._uniform(STREAM_MIX, n, k, 3) * self.crops_per_image).astype(np.int64)
        return np.minimum(m, self.num_images - 1), np.minimum(j, self.crops_per_image - 1)

    def _auto(self, n, k):
        """TrivialAugmentWide: one op, a random bin; RandAugment: N ops at bin M. Draws per op
        r: 3r (op), 3r + 1 (bin), 3r + 2 (sign: negative when u <= 0.5, as torchvision)."""
        recipe = self.recipe
        count = 0 if not recipe.auto else 1 if recipe.auto == "trivialaugment" else recipe.num_ops
        r = np.arange(count, dtype=np.uint64)[None, :]
        ops = np.floor(self._uniform(STREAM_AUTO, n[:, None], k[:, None], 3 * r) *
                       len(op_names())).astype(np.int64)
        if recipe.auto == "trivialaugment":
            bins = np.floor(self._uniform(STREAM_AUTO, n[:, None], k[:, None], 3 * r + 1) *
                            NUM_MAGNITUDE_BINS).astype(np.int64)
        else:
            bins = np.full(ops.shape, recipe.magnitude, dtype=np.int64)
        if not count:
            return ops, np.zeros(ops.shape)
        values = self._magnitudes[ops, bins]  # uniforms are < 1, so ids and bins are in range
        negative = self._uniform(STREAM_AUTO, n[:, None], k[:, None], 3 * r + 2) <= 0.5
        return ops, np.where(_signed_ops(recipe)[ops] & negative, -values, values)

    def _erasing(self, n, k) -> np.ndarray:
        """torchvision's RandomErasing box on the crop: draw 0 decides; try t uses draws
        1 + 4t .. 4 + 4t (area, log-ratio, row, column); the first that fits wins, none: none."""
        boxes = np.zeros((len(n), 4), dtype=np.int64)
        if not self.recipe.erasing:
            return boxes
        S = self.size
        on = self._uniform(STREAM_ERASE, n, k, 0) < self.recipe.erasing
        t = np.arange(ERASE_TRIES, dtype=np.uint64)[None, :]
        draw = lambda j: self._uniform(STREAM_ERASE, n[:, None], k[:, None], 1 + 4 * t + j)
        area = S * S * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * draw(0))
        lo, hi = np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1])
        aspect = np.exp(lo + (hi - lo) * draw(1))
        h, w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
        fits = (h < S) & (w < S)
        i, j = np.floor(draw(2) * (S - h + 1)), np.floor(draw(3) * (S - w + 1))
        first = np.argmax(fits, axis=1)[:, None]
        pick = lambda a: np.take_along_axis(a, first, axis=1)[:, 0]
        found = on & pick(fits)
        boxes[found] = np.stack([pick(i), pick(j), pick(h), pick(w)], -1)[found].astype(np.int64)
        return boxes

    def _mixing(self, n, k):
        """Draw 0: mixup or cutmix (u < 1/2: mixup, when both); 1: λ by Beta's inverse CDF;
        4, 5: cutmix's centre column and row (torchvision's ``randint(W)``, ``randint(H)``)."""
        recipe, S, M = self.recipe, self.size, len(n)
        mix, weight = np.full(M, NO_MIX, np.int64), np.ones(M)
        cut_box = np.zeros((M, 4), np.int64)
        if not recipe.mixes:
            return mix, weight, cut_box
        from scipy.special import betaincinv
        use_mixup = (self._uniform(STREAM_MIX, n, k, 0) < 0.5) if recipe.mixup and recipe.cutmix \
            else np.full(M, bool(recipe.mixup))
        mix = np.where(use_mixup, MIXUP, CUTMIX)
        alpha = np.where(use_mixup, recipe.mixup or 1.0, recipe.cutmix or 1.0)
        lam = betaincinv(alpha, alpha, self._uniform(STREAM_MIX, n, k, 1))
        r_x = np.floor(self._uniform(STREAM_MIX, n, k, 4) * S)
        r_y = np.floor(self._uniform(STREAM_MIX, n, k, 5) * S)
        half = np.floor(0.5 * np.sqrt(1.0 - lam) * S)  # int(r * W) of a non-negative r
        x1, y1 = np.maximum(r_x - half, 0), np.maximum(r_y - half, 0)
        x2, y2 = np.minimum(r_x + half, S), np.minimum(r_y + half, S)
        cut_box = np.stack([x1, y1, x2, y2], -1).astype(np.int64)
        cut_weight = 1.0 - (x2 - x1) * (y2 - y1) / (S * S)
        weight = np.where(use_mixup, lam, cut_weight)
        cut_box[use_mixup] = 0
        return mix, weight, cut_box

    def pair_params(self, images, slots):
        """``(params of (n, k), params of their partners (m, j))``, as
        :func:`..loaders.recipe_ops.recipe_crops` takes them."""
        own = self.params(images, slots)
        partner = self.params(own.partner, own.partner_slot) if self.recipe.mixes else own
        return own, partner


def _signed_ops(recipe: Recipe) -> np.ndarray:
    space = _auto_class(recipe.auto or "trivialaugment")._AUGMENTATION_SPACE
    return np.array([signed for _, signed in space.values()], dtype=bool)


def magnitude_table(recipe: Recipe, size: int) -> np.ndarray:
    """``(14, 31)`` float64: torchvision's magnitude of each op and bin on ``size``-pixel crops
    (0 for ops without one), computed by torchvision's own functions of its augmentation space."""
    space = _auto_class(recipe.auto)._AUGMENTATION_SPACE
    table = np.zeros((len(space), NUM_MAGNITUDE_BINS))
    for row, (magnitudes_fn, _) in enumerate(space.values()):
        values = magnitudes_fn(NUM_MAGNITUDE_BINS, size, size)
        if values is not None:
            table[row] = [float(v) for v in values]
    return table


def plan_augment(plan, num_images: int, size: int) -> Optional[PlanAugment]:
    """The recipe of a crop plan (a store's ``plan``) on ``size``-pixel crops, or None for a plan
    of crop and flip only."""
    if not plan.augment:
        return None
    return PlanAugment(Recipe.parse(plan.augment), plan.seed, num_images, plan.crops_per_image,
                       size)
