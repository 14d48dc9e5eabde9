"""The crop plan: which box and flip every (image n, slot k) gets, and which slot each epoch uses.

Every random number here comes from a counter-based generator: a 64-bit hash of
``(seed, stream, a, b, draw)``. A crop therefore depends only on its own coordinates, never on
batch size, worker count, rank count or visiting order, which is what lets a label computed
offline be replayed exactly, and lets several ranks write one store byte-identically.

Boxes follow ``torchvision.transforms.RandomResizedCrop.get_params``: area scale uniform in
``scale``, log-uniform aspect ratio in ``ratio``, 10 tries, then the centre fallback. They are
drawn in the pixel frame of the image *as stored in the .beton*, since that is what is decoded.
"""
from dataclasses import asdict, dataclass

import numpy as np

from ..core.validators import index_array, one_of, whole_number

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Distinct streams keep boxes, flips and slot choices statistically independent.
STREAM_BOX, STREAM_FLIP, STREAM_SLOT = 1, 2, 3
TRIES = 10  # torchvision's number of attempts before the centre fallback


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed 64-bit hash (vectorised, wraps on overflow)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, stream: int, a, b, draw) -> np.ndarray:
    """Uniform floats in [0, 1) that are a pure function of their (broadcast) integer coordinates."""
    with np.errstate(over="ignore"):
        x = _splitmix64(np.uint64(seed) ^ (np.uint64(stream) << np.uint64(56)))
        for coord in (a, b, draw):
            x = _splitmix64(x ^ np.asarray(coord, dtype=np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Most times each stored crop may be replayed (epochs / K, slots visited in turn) at parity with
# an online refinery. At 1 (K = epochs, cycle policy) the student sees what an online student sees:
# a fresh RandomResizedCrop every epoch, labelled by the refinery (top-k). Replaying twice or
# more cost 0.6 and 1.4 points: benchmarks/results/parity_cpu32.md.
PARITY_VIEWS_PER_CROP = 1


def crops_for_parity(epochs: int) -> int:
    """The smallest K whose stored crops serve ``epochs`` epochs at parity with online labels."""
    return -(-epochs // PARITY_VIEWS_PER_CROP)


# Enough crops for the reference schedule (40-epoch students) at parity.
DEFAULT_CROPS_PER_IMAGE = crops_for_parity(40)


@dataclass(frozen=True)
class CropPlan:
    """How crops are sampled; recorded verbatim in every label store."""

    seed: int = 0
    crops_per_image: int = DEFAULT_CROPS_PER_IMAGE
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    # The training recipe applied after box and flip, as canonical ``--augment`` values
    # (:class:`.recipe.Recipe`); empty: crop and flip only. Its parameters are drawn per
    # (n, k) like the boxes, so the store records only these names (format 4).
    augment: tuple = ()

    def to_dict(self) -> dict:
        """The plan as the store's ``plan`` attribute records it (JSON: lists, no empty recipe)."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        if self.augment:
            d["augment"] = list(self.augment)
        else:  # plans without a recipe read as they did before format 4
            del d["augment"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CropPlan":
        """The plan a store's ``plan`` attribute records (the inverse of :meth:`to_dict`)."""
        return cls(seed=int(d["seed"]), crops_per_image=int(d["crops_per_image"]),
                   scale=tuple(d["scale"]), ratio=tuple(d["ratio"]), flip=bool(d["flip"]),
                   augment=tuple(d.get("augment", ())))


def sample_boxes(plan: CropPlan, image_ids: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray) -> np.ndarray:
    """Boxes ``(y, x, h, w)`` as uint16, shape ``(len(image_ids), K, 4)``, for every slot of each image.

    Vectorised over images, slots and the 10 tries; the first try that fits wins, exactly as in
    torchvision's loop, and images where none fits get the centre fallback.
    """
    ids = np.asarray(image_ids)
    return boxes_at(plan, ids[:, None], np.arange(plan.crops_per_image)[None, :],
                    np.asarray(heights)[:, None], np.asarray(widths)[:, None])


def boxes_at(plan: CropPlan, images, slots, heights, widths) -> np.ndarray:
    """The boxes of crops ``(images, slots)`` (broadcast together, with each crop's image
    ``heights`` and ``widths``), uint16 ``(..., 4)``: :func:`sample_boxes` for any set of crops,
    e.g. the partners a mixing recipe pairs with (image m, slot j)."""
    n = np.asarray(images, dtype=np.uint64)[..., None]
    k = np.asarray(slots, dtype=np.uint64)[..., None]
    t = np.arange(TRIES, dtype=np.uint64)
    H = np.asarray(heights, dtype=np.float64)[..., None]
    W = np.asarray(widths, dtype=np.float64)[..., None]

    def draw(j):  # four independent draws per try
        return counter_uniform(plan.seed, STREAM_BOX, n, k, t * np.uint64(4) + np.uint64(j))

    log_lo, log_hi = np.log(plan.ratio[0]), np.log(plan.ratio[1])
    target_area = H * W * (plan.scale[0] + (plan.scale[1] - plan.scale[0]) * draw(0))
    aspect = np.exp(log_lo + (log_hi - log_lo) * draw(1))
    w = np.round(np.sqrt(target_area * aspect))
    h = np.round(np.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    y = np.floor(draw(2) * (H - h + 1))
    x = np.floor(draw(3) * (W - w + 1))

    first = np.argmax(fits, axis=-1)[..., None]  # index of the first fitting try
    any_fit = np.take_along_axis(fits, first, axis=-1)[..., 0]
    pick = lambda a: np.take_along_axis(np.broadcast_to(a, fits.shape), first, axis=-1)[..., 0]
    boxes = np.stack([pick(y), pick(x), pick(h), pick(w)], axis=-1)

    shape = any_fit.shape
    fallback = centre_fallback(np.broadcast_to(np.asarray(heights), shape).reshape(-1),
                               np.broadcast_to(np.asarray(widths), shape).reshape(-1),
                               plan.ratio).reshape(shape + (4,))
    boxes = np.where(any_fit[..., None], boxes, fallback)
    return boxes.astype(np.uint16)


def centre_fallback(heights: np.ndarray, widths: np.ndarray, ratio) -> np.ndarray:
    """torchvision's fallback box per image, ``(N, 4)``: the largest centred crop within ``ratio``."""
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    in_ratio = W / H
    lo, hi = min(ratio), max(ratio)
    w = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.round(H * hi), W)).astype(np.int64)
    h = np.where(in_ratio < lo, np.round(W / lo), H).astype(np.int64)
    return np.stack([(H - h) // 2, (W - w) // 2, h, w], axis=-1)


def centre_square(heights, widths) -> np.ndarray:
    """The largest centred square of each image, ``(N, 4)``: how images are shown for evaluation
    and for soft-static labels."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    side = np.minimum(heights, widths)
    return np.stack([(heights - side) // 2, (widths - side) // 2, side, side], -1)


def sample_flips(plan: CropPlan, image_ids: np.ndarray) -> np.ndarray:
    """Horizontal flip flags, uint8 ``(len(image_ids), K)``; all zero when the plan has no flips."""
    return flips_at(plan, np.asarray(image_ids)[:, None],
                    np.arange(plan.crops_per_image)[None, :])


def flips_at(plan: CropPlan, images, slots) -> np.ndarray:
    """The flip flags of crops ``(images, slots)`` (broadcast together), uint8."""
    u = counter_uniform(plan.seed, STREAM_FLIP, np.asarray(images, dtype=np.uint64),
                        np.asarray(slots, dtype=np.uint64), 0)
    return ((u < 0.5) & plan.flip).astype(np.uint8)


SLOT_POLICIES = ("random", "cycle")
"""Which stored crop an epoch replays (``--slot-policy``, :func:`slot_of`): ``cycle`` shows
each of an image's K crops once before any repeats (the default), ``random`` draws one per
epoch."""
# Each slot once before any repeats: no stored crop waits while another repeats, so E = K epochs
# show every crop once (random leaves ~1/e unseen); it led random at K = 2 and 4 in the CPU
# parity sweep (docs/design.md, "Choosing K and the slot policy").
DEFAULT_SLOT_POLICY = "cycle"


def epoch_slots(seed: int, epoch: int, num_images: int, crops_per_image: int,
                policy: str = DEFAULT_SLOT_POLICY, images=None) -> np.ndarray:
    """Which stored slot each image replays in ``epoch``, int64 ``(num_images,)``, or for the
    image indices ``images`` only (``num_images`` is then ignored): a pure function of
    ``(seed, epoch, n)``, so any subset, order or process gets the same slots.

    ``random``: an independent uniform slot per (epoch, image). ``cycle``: each image visits its K
    slots in a fresh random order every K epochs, so no slot repeats before all were used.
    """
    n = np.arange(num_images, dtype=np.uint64) if images is None else \
        np.atleast_1d(np.asarray(images)).astype(np.uint64)
    K = crops_per_image
    if policy == "random":
        u = counter_uniform(seed, STREAM_SLOT, epoch, n, 0)
        return np.minimum((u * K).astype(np.int64), K - 1)
    if policy == "cycle":
        cycle, position = divmod(epoch, K)
        slots = np.empty(len(n), np.int64)
        for part, order in _cycle_blocks(seed, cycle, n, K):  # one column kept: 8 B per image
            slots[part] = order[:, position]
        return slots
    raise ValueError(f"unknown slot policy {policy!r}; choose one of {SLOT_POLICIES}")


CYCLE_BLOCK_KEYS = 1 << 23  # keys hashed at once by cycle_order (~64 MB per temporary)


def cycle_order(seed: int, cycle: int, images: np.ndarray, crops_per_image: int) -> np.ndarray:
    """The ``cycle`` policy's slot order of each of ``images`` in round ``cycle`` (epochs
    ``cycle * K`` to ``cycle * K + K - 1``): ``(n, K)``, column ``epoch % K`` is the epoch's slot.
    One round's order serves K epochs, so a caller may keep it (at ImageNet size, drawing it
    costs ~3 s on a CPU core: 51M keys sorted in rows)."""
    K, images = crops_per_image, np.asarray(images, dtype=np.uint64)
    order = np.empty((len(images), K), np.uint8 if K <= 256 else np.int64)
    for part, block in _cycle_blocks(seed, cycle, images, K):
        order[part] = block
    return order


def _cycle_blocks(seed: int, cycle: int, images: np.ndarray, K: int):
    """:func:`cycle_order` of ``images`` in blocks of rows, ``(slice, order)`` each: the hash's
    temporaries are 8 bytes per key, several at once (GBs each at ImageNet-21k, K = 40, 568M
    keys), so they are made a block at a time."""
    slots = np.arange(K, dtype=np.uint64)[None, :] + np.uint64(1 << 32)
    step = CYCLE_BLOCK_KEYS // K + 1
    for start in range(0, len(images), step):
        part = slice(start, start + step)
        keys = counter_uniform(seed, STREAM_SLOT, cycle, images[part, None], slots)
        yield part, np.argsort(keys, axis=1, kind="stable")


class SlotSchedule:
    """Every image's slot epoch after epoch: :func:`epoch_slots` of all ``num_images``, the
    ``cycle`` policy's order drawn once per round of K epochs and kept (at ImageNet size,
    K = 40: a draw costs 5 s, the round's order 51 MB), not redrawn each epoch. What both
    loader backends fill their epoch's slots from."""

    def __init__(self, seed: int, num_images: int, crops_per_image: int,
                 policy: str = DEFAULT_SLOT_POLICY):
        self.seed, self.num_images, self.crops_per_image = seed, num_images, crops_per_image
        self.policy = policy
        self._round = (None, None)  # (cycle, its slot order)

    def __call__(self, epoch: int, rows=None) -> np.ndarray:
        """``(num_images,)`` slots of ``epoch`` (a view of the kept round under ``cycle``), or
        those of the image indices ``rows``: a process replaying a share of the images draws
        only theirs (its share changes every epoch, so no round is kept for it)."""
        n, k = self.num_images, self.crops_per_image
        if rows is not None and (self.policy != "cycle" or len(rows) < n):
            return epoch_slots(self.seed, epoch, 0, k, self.policy, images=rows)
        if self.policy != "cycle":
            return epoch_slots(self.seed, epoch, n, k, self.policy)
        cycle, position = divmod(epoch, k)
        if self._round[0] != cycle:
            self._round = (cycle, cycle_order(self.seed, cycle, np.arange(n), k))
        slots = self._round[1][:, position]
        return slots if rows is None else slots[np.asarray(rows, np.int64)]

    def __getstate__(self):
        return dict(self.__dict__, _round=(None, None))  # redrawn where needed, not shipped


def slot_of(epoch: int, images, crops_per_image: int, policy: str = DEFAULT_SLOT_POLICY,
            seed: int = 0):
    """The stored slot that image(s) ``images`` replay in ``epoch``, as ``refine train`` does.

    Parameters
    ----------
    epoch : int
        Epoch number, from 0.
    images : int or array_like of int
        Image indices (rows of the store).
    crops_per_image : int
        The store's K.
    policy : {"cycle", "random"}
        ``cycle`` (default): every slot once per K epochs, in a fresh order each round;
        ``random``: an independent uniform slot every epoch.
    seed : int
        The training run's seed (``refine train --seed``), not the plan's.

    Returns
    -------
    int or numpy.ndarray
        An int for a single image, else int64 slots shaped like ``images``.

    Raises
    ------
    ArgumentError
        A negative epoch, image index or seed, ``crops_per_image`` below 1, an unknown policy.
    """
    epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")
    images = index_array("images", images)
    crops_per_image = whole_number("crops_per_image", crops_per_image, 1,
                                   "pass the store's K (store.layout.crops_per_image)")
    one_of("policy", policy, SLOT_POLICIES)
    seed = whole_number("seed", seed, 0, "pass the training run's seed, 0 or more")
    slots = epoch_slots(seed, epoch, 0, crops_per_image, policy, images=images)
    return int(slots[0]) if np.ndim(images) == 0 else slots.reshape(np.shape(images))
