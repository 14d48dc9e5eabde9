"""Procedural shapes-on-clutter images for the demo: a ground truth we can check crop by crop.

Each image shows one labelled object (the class is its *shape*, its colour is random) and a
smaller object of another class, on a cluttered background: the paper's "incompleteness"
(Fig. 2a). Small random crops often hold only the second object or only clutter, so the image
label is wrong for them (Fig. 2b). Because we draw the objects, we know for every crop how much of
the labelled object it shows, which the paper could only illustrate by example.
"""
from dataclasses import dataclass

import numpy as np

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "equals", "cross", "half_disk",
          "frame")


def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius ``r`` on offsets (dy, dx) from its centre."""
    d = np.hypot(dy, dx)
    box = np.maximum(abs(dy), abs(dx))
    t = r / 3.2
    masks = {
        "disk": lambda: d <= r,
        "square": lambda: box <= 0.85 * r,
        "triangle": lambda: (dy <= 0.8 * r) & (abs(dx) <= (dy + r) * 0.55),
        "plus": lambda: ((abs(dx) <= t) & (abs(dy) <= r)) | ((abs(dy) <= t) & (abs(dx) <= r)),
        "ring": lambda: (d <= r) & (d >= 0.55 * r),
        "diamond": lambda: abs(dx) + abs(dy) <= r,
        "equals": lambda: (abs(dx) <= r) & ((abs(dy - r / 2) <= t) | (abs(dy + r / 2) <= t)),
        "cross": lambda: ((abs(dx - dy) <= t) | (abs(dx + dy) <= t)) & (box <= 0.85 * r),
        "half_disk": lambda: (d <= r) & (dy >= -0.1 * r),
        "frame": lambda: (box <= 0.9 * r) & (box >= 0.55 * r),
    }
    return masks[shape]()


@dataclass
class ShapesData:
    images: np.ndarray      # (N, S, S, 3) uint8
    labels: np.ndarray      # (N,) class of the main object
    main_masks: np.ndarray  # (N, S, S) bool: pixels of the labelled object
    other_masks: np.ndarray  # (N, S, S) bool: pixels of the second object
    other_labels: np.ndarray  # (N,)

    def take(self, order) -> "ShapesData":
        return ShapesData(*(a[order] for a in (self.images, self.labels, self.main_masks,
                                               self.other_masks, self.other_labels)))


def _clutter(rng, size: int) -> np.ndarray:
    """Smooth colour field plus short random strokes: texture, but no class shapes."""
    coarse = rng.uniform(40, 215, (4, 4, 3))
    idx = np.linspace(0, 3, size)
    i0 = np.floor(idx).astype(int).clip(0, 2)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]
    img = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    for _ in range(rng.integers(6, 12)):  # strokes
        y, x = rng.integers(0, size, 2)
        length, vertical = rng.integers(4, size // 3), rng.random() < 0.5
        colour = rng.uniform(0, 255, 3)
        if vertical:
            img[y:y + length, x:x + 1] = colour
        else:
            img[y:y + 1, x:x + length] = colour
    return img + rng.normal(0, 12, img.shape)


def _place(rng, size, r, avoid=None):
    """A centre for an object of radius r inside the image, away from ``avoid`` if given."""
    for _ in range(50):
        c = rng.uniform(r, size - r, 2)
        if avoid is None or np.hypot(*(c - avoid[0])) > r + avoid[1]:
            return c
    return c


def make_shapes(num_images: int, size: int = 64, seed: int = 0) -> ShapesData:
    """Generate ``num_images`` labelled images of ``size`` px (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.zeros((num_images, size, size, 3), np.uint8)
    main = np.zeros((num_images, size, size), bool)
    other = np.zeros_like(main)
    labels = rng.integers(0, len(SHAPES), num_images)
    other_labels = (labels + rng.integers(1, len(SHAPES), num_images)) % len(SHAPES)
    for n in range(num_images):
        img = _clutter(rng, size)
        r_main = rng.uniform(0.13, 0.2) * size
        r_other = rng.uniform(0.55, 0.75) * r_main
        c_main = _place(rng, size, r_main)
        c_other = _place(rng, size, r_other, avoid=(c_main, r_main))
        for target, shape, c, r in ((other, other_labels[n], c_other, r_other),
                                    (main, labels[n], c_main, r_main)):
            mask = shape_mask(SHAPES[shape], yy - c[0], xx - c[1], r)
            img[mask] = rng.uniform(0, 255, 3)
            target[n] = mask
        other[n] &= ~main[n]  # the main object is drawn on top
        images[n] = np.clip(img, 0, 255).astype(np.uint8)
    return ShapesData(images, labels, main, other, other_labels)


def visible_fraction(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of each mask's pixels inside each box; masks ``(N, S, S)``, boxes ``(N, K, 4)``."""
    integral = np.pad(masks.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0))).astype(np.int64)
    n = np.arange(len(masks))[:, None]
    y, x, h, w = (boxes[..., i].astype(np.int64) for i in range(4))
    inside = (integral[n, y + h, x + w] - integral[n, y, x + w] - integral[n, y + h, x]
              + integral[n, y, x])
    return inside / np.maximum(1, masks.sum((1, 2)))[:, None]
