"""``refine show``: a few images' stored crops decoded through the replay decoder, with their
stored labels, so the pixels shown are the ones the refinery labelled and a student is shown.

It cuts crops as precompute does (:func:`.chunk_labeller.build_crop_table`, the replay loader,
the recipe's ops), so it lives in the labelling stage, above the store and the loaders it uses.
"""
from dataclasses import dataclass

import numpy as np

from ..core.errors import RefineryError, StoreMismatchError
from ..loaders.crop_table import TABLE_FIELDS, crop_table
from ..loaders.recipe_ops import planned_crops
from ..loaders.replay import multi_crop_loader
from ..plan.recipe import plan_augment
from ..store.label_store import LabelStore
from .chunk_labeller import build_crop_table


@dataclass
class ShownCrops:
    """A sample of images' stored crops as the student sees them, with their stored labels."""

    images: np.ndarray        # (n,) image indices in the data set
    pixels: np.ndarray        # (n, K, H, W, 3) uint8 crops
    topk_indices: np.ndarray  # (n, K, k)
    topk_probs: np.ndarray    # (n, K, k) float32
    labels: np.ndarray        # (n,) ground truth
    classes: list


def compared_labels(location, crops: ShownCrops, reference) -> tuple:
    """Another store's labels ``(topk_indices, topk_probs)`` of the crops in ``crops`` (sampled
    from the store at ``reference``), e.g. a later generation's refinery on the same crops (the
    paper's Figs. 7-8). Its crops must be the same: same data set, plan and K."""
    other, base = LabelStore.open(location), LabelStore.open(reference)
    for what in ("plan", "dataset"):
        if other.attrs[what] != base.attrs[what]:
            raise StoreMismatchError(f"{location}: its {what} differs from {reference}'s, so its "
                                     "labels are of other crops; compare stores precomputed with "
                                     "the same --seed and -K on the same data")
    if not other.done_images()[crops.images].all():
        raise RefineryError(f"{location}: has not labelled all the images shown yet; finish "
                            "its precompute first")
    records = other.read_crops(crops.images)
    return records.topk_indices, records.topk_probs.astype(np.float32)


def sample_stored_crops(dataset, location, num_images: int = 6, seed: int = 0,
                        num_workers: int = 2) -> ShownCrops:
    """Decode ``num_images`` randomly chosen (finished) images' stored boxes and flips."""
    store = LabelStore.open(location)
    store.check_matches(dataset.fingerprint())
    done = np.flatnonzero(store.done_images())
    if len(done) == 0:
        raise RefineryError(f"{location}: no finished chunk yet; show it once precompute has "
                            "written one")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(done, min(num_images, len(done)), replace=False))
    records = store.read_crops(ids)
    size, K = store.refinery.input_size, store.layout.crops_per_image
    recipe = plan_augment(store.plan, dataset.num_images, size)
    if recipe is None:  # the stored boxes as they are
        table = np.zeros((dataset.num_images, K, TABLE_FIELDS), np.int32)
        table[ids] = crop_table(records.boxes, records.flips)
    else:  # partners too: the plan's boxes, which `refine verify` checks equal the stored ones
        table = build_crop_table(dataset, store.plan, ids, False, recipe)
    loader = multi_crop_loader(dataset, table, (size, size), len(ids), ids, num_workers)
    pixels = np.concatenate([(batch.images if recipe is None else
                              planned_crops(recipe, batch.images, batch.indices.numpy(), K)
                              ).numpy().copy() for batch in loader])
    pixels = pixels.reshape(len(ids), -1, size, size, 3)  # K = 1 comes without the slot axis
    return ShownCrops(ids, pixels, records.topk_indices, records.topk_probs.astype(np.float32),
                       store.read_labels(ids), store.classes)
