"""``refine audit``: recompute a random sample of stored labels and compare.

The sample is made of whole loader batches of the original run (a chunk and a batch start),
and each is relabelled by :func:`.chunk_labeller.label_loader_batch` with the store's recorded
batching: the same crops, cut by the same decoder, in the same forward batches. So even
train-mode BN labels, which depend on their batch neighbours, can be checked crop for crop.
"""
from dataclasses import dataclass

import numpy as np

from ..core.errors import StoreMismatchError
from ..plan.recipe import plan_augment
from ..store.label_store import LabelStore
from ..store.schema import Batching, round_probabilities
from .chunk_labeller import UnitLoader, build_crop_table, label_loader_batch
from .refinery import identity_mismatch


@dataclass
class AuditReport:
    crops: int
    loader_batches: int
    top1_agreement: float
    topk_indices_agreement: float
    max_probability_error: float
    mean_probability_error: float
    bn_mode: str


def sample_loader_batches(store: LabelStore, batching: Batching, sample_crops: int,
                          seed: int) -> list:
    """Random ``range``s of image ids, each exactly one loader batch of the original run."""
    lay = store.layout
    units = [u for c in np.flatnonzero(store.done_chunks())
             for u in batching.units(lay, int(c))]
    crops_per_unit = batching.images_per_batch * lay.crops_per_image
    wanted = min(len(units), max(1, -(-sample_crops // crops_per_unit)))
    chosen = np.random.default_rng(seed).choice(len(units), wanted, replace=False)
    return sorted((units[i] for i in chosen), key=lambda u: u.start)


def audit_store(dataset, location, refinery, sample_crops: int = 20000, seed: int = 0,
                num_workers: int = 2) -> AuditReport:
    store = LabelStore.open(location)
    store.check_matches(dataset.fingerprint())
    recorded = store.attrs["refinery"]
    mismatch = identity_mismatch(recorded, refinery)  # an ensemble: member by member
    if mismatch:
        raise StoreMismatchError(f"{location}: {mismatch}")
    lay, plan, batching = store.layout, store.plan, store.batching
    units = sample_loader_batches(store, batching, sample_crops, seed)
    ids = np.concatenate([np.arange(u.start, u.stop) for u in units])
    recipe = plan_augment(plan, dataset.num_images, refinery.input_size)  # relabelled as made
    table = build_crop_table(dataset, plan, ids, lay.soft_static, recipe)
    stored = store.read_crops()
    size = (refinery.input_size, refinery.input_size)
    loader = UnitLoader(dataset, table, size, batching.images_per_batch, units, num_workers,
                        recipe, lay.crops_per_image)
    same_top1, same_topk, errors = [], [], []
    for unit, images in loader(units):
        index = np.arange(unit.start, unit.stop)
        chunk = unit.start // lay.chunk_size
        classes, probs = label_loader_batch(refinery, images, batching.crop_batch,
                                            lay.top_k, plan.seed, chunk, unit.start)
        probs = round_probabilities(probs, lay.prob_bits)  # as the writer stored them
        K = lay.crops_per_image
        old_i, old_p = stored.topk_indices[index], stored.topk_probs[index]
        same_top1.append((classes[:, :K, 0] == old_i[..., 0]).ravel())
        same_topk.append((classes[:, :K] == old_i).all(-1).ravel())
        errors.append(np.abs(probs[:, :K].astype(np.float32) - old_p.astype(np.float32)).ravel())
    errors = np.concatenate(errors)
    return AuditReport(crops=int(sum(len(a) for a in same_top1)), loader_batches=len(units),
                       top1_agreement=float(np.concatenate(same_top1).mean()),
                       topk_indices_agreement=float(np.concatenate(same_topk).mean()),
                       max_probability_error=float(errors.max()),
                       mean_probability_error=float(errors.mean()), bn_mode=recorded["bn_mode"])
