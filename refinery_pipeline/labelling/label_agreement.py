"""A copy's labels checked: crops cut from the copy's pixels labelled again by the store's refinery and compared with the stored labels, exact and approximate crops apart, in the store's BN mode (train-mode BN: whole loader batches of the original run)."""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..plan.crop_plan import centre_square
from ..sources.pixels import box_in_frame, cut_crop
from ..store.schema import round_probabilities
from .verdicts import EXACT, USABLE_VERDICTS

LABEL_BATCH = 256  # sampled crops per refinery call in eval mode


@dataclass(frozen=True)
class LabelAgreement:
    """Stored labels against the refinery's on the copy's pixels, over some crops.

    ``top1``: share of crops whose stored top-1 class is the refinery's; ``max_error`` and
    ``mean_error``: ``|stored p - refinery p|`` over each crop's stored top-k classes (the
    refinery's probabilities rounded as the store rounds them)."""
    crops: int
    top1: float
    max_error: float
    mean_error: float

    @classmethod
    def of(cls, same_top1: np.ndarray, errors: np.ndarray) -> Optional["LabelAgreement"]:
        if not len(same_top1):
            return None
        return cls(len(same_top1), float(same_top1.mean()), float(errors.max()),
                   float(errors.mean()))

    def text(self) -> str:
        return (f"{self.crops:,} crops, top-1 agreement {100 * self.top1:.2f}%, probability "
                f"error max {self.max_error:.1e}, mean {self.mean_error:.1e}")


@dataclass(frozen=True)
class Agreement:
    """The sampled comparison: overall, on exact crops and on approximate ones (None where no
    crop of that kind was sampled); ``loader_batches`` > 0 when whole loader batches of the
    original run were rebuilt (train-mode BN), 0 when crops were labelled one by one."""
    bn_mode: str
    loader_batches: int
    overall: Optional[LabelAgreement]
    exact: Optional[LabelAgreement]
    approximate: Optional[LabelAgreement]


def measure_agreement(crops, refinery, verdicts, usable_slots, sample: int,
                      seed: int) -> Agreement:
    """Label a seeded sample of the copy's crops again and compare with the stored labels
    (see the module docstring for how BN modes are handled)."""
    store = crops.store
    bn_mode = store.refinery.bn_mode
    present = np.isin(verdicts, USABLE_VERDICTS)
    usable = present[:, None] & (usable_slots if usable_slots is not None else True)
    usable = np.broadcast_to(usable, (len(present), store.layout.crops_per_image))
    exact = _exact_crops(crops, verdicts == EXACT)
    rng = np.random.default_rng(seed)
    if bn_mode == "train":
        results, batches = _label_loader_batches(crops, refinery, usable, sample, rng)
    else:
        results, batches = _label_crops(crops, refinery, usable, sample, rng), 0
    if not results:
        return Agreement(bn_mode, 0, None, None, None)
    n, k, same, errors = (np.concatenate(parts) for parts in zip(*results))
    is_exact = exact(n, k)
    return Agreement(bn_mode, batches, LabelAgreement.of(same, errors),
                     LabelAgreement.of(same[is_exact], errors[is_exact]),
                     LabelAgreement.of(same[~is_exact], errors[~is_exact]))


def _exact_crops(crops, exact_rows: np.ndarray):
    """``exact(n, k)``: whether crop (n, k) is cut from exact bytes only (a mixed crop needs
    its partner's too)."""
    recipe = crops.recipe

    def exact(n, k):
        own = exact_rows[n]
        if recipe is None or not recipe.recipe.mixes:
            return own
        m, _ = recipe.partners(n, k)
        return own & exact_rows[m]
    return exact


def _label_crops(crops, refinery, usable, sample: int, rng) -> list:
    """Eval-mode BN: a uniform sample of the usable crops, labelled in batches of any
    composition."""
    n, k = np.nonzero(usable)
    chosen = np.sort(rng.choice(len(n), min(sample, len(n)), replace=False))
    n, k = n[chosen], k[chosen]
    results = []
    for start in range(0, len(n), LABEL_BATCH):
        part = slice(start, start + LABEL_BATCH)
        images = np.stack([crops.crop(int(a), int(b)) for a, b in zip(n[part], k[part])])
        classes, values = _labelled(crops, refinery, images[:, None], 0, start)
        results.append((n[part], k[part]) + _compared(crops, n[part], k[part], classes[:, 0],
                                                      values[:, 0]))
    return results


def _label_loader_batches(crops, refinery, usable, sample: int, rng) -> tuple:
    """Train-mode BN: whole loader batches of the original run (the same crops, shuffled and
    split into forward batches as precompute did), drawn from those whose every crop the copy
    gives, until ``sample`` crops are labelled."""
    store = crops.store
    lay, batching = store.layout, store.batching
    K = lay.crops_per_image
    units = [(c, u) for c in range(lay.num_chunks) for u in batching.units(lay, c)
             if usable[u.start:u.stop].all()]
    results, labelled = [], 0
    for i in rng.permutation(len(units)):
        if labelled >= sample:
            break
        c, unit = units[i]
        rows = np.arange(unit.start, unit.stop)
        images = np.stack([_unit_crops(crops, int(r)) for r in rows])
        classes, values = _labelled(crops, refinery, images, c, unit.start)
        n, k = np.repeat(rows, K), np.tile(np.arange(K), len(rows))
        results.append((n, k) + _compared(crops, n, k, classes[:, :K].reshape(len(n), -1),
                                          values[:, :K].reshape(len(n), -1)))
        labelled += len(n)
    return results, len(results)


def _unit_crops(crops, n: int) -> np.ndarray:
    """Image ``n``'s crops as precompute labelled them: its K planned crops through the
    recipe, then (soft-static stores) its centred square."""
    store = crops.store
    own = [crops.crop(n, k) for k in range(store.layout.crops_per_image)]
    if store.layout.soft_static:
        image, _ = crops.pixels.read(n)
        stored = crops.stored_sizes[n]
        box = box_in_frame(centre_square(*stored[:, None])[0], stored, image.shape[:2])
        own.append(cut_crop(image, box, False, crops.size))
    return np.stack(own)


def _labelled(crops, refinery, images: np.ndarray, chunk: int, start: int) -> tuple:
    """Every class's probability, sorted, for crops ``(B, S, s, s, 3)``, batched as precompute
    batches a loader batch (:func:`.chunk_labeller.label_loader_batch`), rounded as stored."""
    import torch

    from .chunk_labeller import label_loader_batch
    store = crops.store
    classes, values = label_loader_batch(refinery, torch.from_numpy(images),
                                         store.batching.crop_batch, store.num_classes,
                                         store.plan.seed, chunk, start)
    return classes, round_probabilities(values, store.layout.prob_bits)


def _compared(crops, n, k, classes, values) -> tuple:
    """``(same top-1 (M,), errors (M, k))`` of crops (n, k): the refinery's sorted
    ``classes``/``values`` ``(M, C)`` against the stored top-k, class by class."""
    stored_i = crops.records.topk_indices[n, k].astype(np.int64)
    stored_p = crops.records.topk_probs[n, k].astype(np.float32)
    full = np.zeros(classes.shape, np.float32)
    np.put_along_axis(full, classes.astype(np.int64), values.astype(np.float32), 1)
    errors = np.abs(np.take_along_axis(full, stored_i, 1) - stored_p)
    return classes[:, 0].astype(np.int64) == stored_i[:, 0], errors


def agreement_lines(agreement: Optional[Agreement], store, seed: int) -> list:
    """The label lines of a report (none without a refinery)."""
    if agreement is None:
        return []
    how = (f"BN {agreement.bn_mode}, as the store was labelled" +
           (f", in {agreement.loader_batches} whole loader batches of the original run"
            if agreement.loader_batches else "") + f"; seed {seed}")
    if agreement.overall is None:
        why = ("no loader batch of the original run has all its images in the copy, and "
               "train-mode BN labels depend on their batch") if agreement.bn_mode == "train" \
            else "no crop of the copy is usable"
        return [f"labels: not compared ({why})"]
    lines = [f"labels: {agreement.overall.text()} ({how})"]
    for name, part, note in (("exact", agreement.exact, "the labelled pixels: any error "
                              "means another or a nondeterministic refinery"),
                             ("approximate", agreement.approximate, "what the copy costs")):
        if part is not None:
            lines.append(f"labels, {name} crops: {part.text()} ({note})")
    return lines
