"""Fidelity: the pixels labelled at precompute time are the pixels the student is shown."""
import cv2
import numpy as np
import pytest

from refinery_pipeline.plan.crop_plan import CropPlan, sample_boxes, sample_flips
from refinery_pipeline.sources.dataset import BetonOptions, ImageDataset
from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
from refinery_pipeline.loaders.replay import make_loader, multi_crop_loader
from refinery_pipeline.loaders.crop_sources import FixedCrops, ReplayedCrops
from refinery_pipeline.loaders.crop_table import crop_table


def plan_arrays(dataset, plan):
    ids = np.arange(dataset.num_images)
    return (sample_boxes(plan, ids, dataset.heights, dataset.widths), sample_flips(plan, ids))


def precompute_pixels(dataset, boxes, flips, size):
    """All K crops of every image, as the precompute path cuts them, indexed by image id."""
    ids = np.arange(dataset.num_images)
    out = np.zeros((dataset.num_images, boxes.shape[1], size, size, 3), np.uint8)
    for batch in multi_crop_loader(dataset, crop_table(boxes, flips), (size, size), 16, ids,
                                   num_workers=2):
        out[batch.indices.numpy()] = batch.images.numpy()
        assert np.array_equal(batch.slots.numpy(), np.tile(np.arange(boxes.shape[1]),
                                                           (len(batch.indices), 1)))
    return out


def test_replayed_crops_are_byte_identical_to_precomputed_crops(tiny_dataset):
    plan = CropPlan(seed=11, crops_per_image=5)
    boxes, flips = plan_arrays(tiny_dataset, plan)
    stored = precompute_pixels(tiny_dataset, boxes, flips, 24)
    crops = ReplayedCrops(boxes, flips, seed=3)
    loader = make_loader(tiny_dataset, crops, (24, 24), batch_size=10, num_workers=2, seed=3)
    slots_seen = []
    for epoch in range(3):
        seen = 0
        for batch in loader:
            index = batch.indices.numpy()
            assert np.array_equal(batch.slots.numpy(), crops.slots[index])  # slots travel along
            assert np.array_equal(batch.images.numpy(), stored[index, crops.slots[index]])
            assert np.array_equal(batch.labels.numpy(), tiny_dataset.labels[index])
            seen += len(index)
        assert seen == (tiny_dataset.num_images // 10) * 10  # drop_last in training
        slots_seen.append(crops.slots.copy())
    assert not np.array_equal(slots_seen[0], slots_seen[1])  # a new slot draw every epoch


def test_crop_matches_an_independent_opencv_reference(tmp_path):
    """Raw-mode .beton: the decoder's crop equals cv2 INTER_AREA of the box, mirrored if flipped."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(20, 70)), int(rng.integers(20, 70)), 3),
                           dtype=np.uint8) for _ in range(24)]
    path = tmp_path / "raw.beton"
    order = write_beton(ArraySource(images, np.zeros(24, int)), path,
                        BetonOptions(write_mode="raw"), num_workers=1)
    dataset = ImageDataset(path)
    boxes, flips = plan_arrays(dataset, CropPlan(seed=1, crops_per_image=4))
    stored = precompute_pixels(dataset, boxes, flips, 16)
    worst = 0
    for n in range(24):
        image = images[order[n]]
        for k in range(4):
            y, x, h, w = boxes[n, k].astype(int)
            ref = cv2.resize(image[y:y + h, x:x + w], (16, 16), interpolation=cv2.INTER_AREA)
            ref = ref[:, ::-1] if flips[n, k] else ref
            worst = max(worst, int(np.abs(ref.astype(int) - stored[n, k].astype(int)).max()))
    assert worst <= 1  # FFCV links its own OpenCV build; rounding may differ by one level


def test_evaluation_crop_is_the_centred_square(tiny_dataset):
    crops = FixedCrops(tiny_dataset.heights, tiny_dataset.widths)
    loader = make_loader(tiny_dataset, crops, (20, 20), 16, num_workers=1, train=False)
    ids = np.concatenate([batch.indices.numpy().copy() for batch in loader])  # ring buffers
    assert np.array_equal(ids, np.arange(tiny_dataset.num_images))  # every image, in order
    side = np.minimum(tiny_dataset.heights, tiny_dataset.widths)
    assert np.array_equal(crops.boxes[:, 2], side) and np.array_equal(crops.boxes[:, 3], side)


def test_stored_labels_describe_the_replayed_pixels(tiny_dataset, tiny_refinery_ckpt, tmp_path):
    """End to end at the label level: precompute, then relabel replayed crops and compare."""
    from refinery_pipeline.store.label_store import LabelStore
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.refinery import Refinery

    refinery = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")
    plan = CropPlan(seed=5, crops_per_image=4)
    precompute(tiny_dataset, tmp_path / "s.zarr", refinery, plan, top_k=3, crop_batch=32,
               chunk_size=32, progress=False)
    arrays = LabelStore.open(tmp_path / "s.zarr").read()
    # the refinery tells crops apart, so labelling the wrong crop would fail the checks below
    assert (arrays["topk_indices"][:, 0] != arrays["topk_indices"][:, 1]).any(axis=1).mean() > 0.3
    crops = ReplayedCrops(arrays["boxes"], arrays["flips"], seed=9)
    loader = make_loader(tiny_dataset, crops, (24, 24), 16, num_workers=2)
    for batch in loader:
        n, k = batch.indices.numpy(), batch.slots.numpy()
        idx, probs = refinery.top_k(batch.images, 3)
        assert np.array_equal(idx, arrays["topk_indices"][n, k])
        np.testing.assert_allclose(probs.astype(np.float32),
                                   arrays["topk_probs"][n, k].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("numba_enabled", [False])
def test_decoder_runs_without_numba(tiny_dataset, numba_enabled):
    """Like FFCV's own tests: the pure-Python path gives the same crops as the compiled one."""
    from ffcv.pipeline.compiler import Compiler
    plan = CropPlan(seed=2, crops_per_image=2)
    boxes, flips = plan_arrays(tiny_dataset, plan)
    compiled = precompute_pixels(tiny_dataset, boxes, flips, 12)
    Compiler.set_enabled(numba_enabled)
    try:
        python = precompute_pixels(tiny_dataset, boxes, flips, 12)
    finally:
        Compiler.set_enabled(True)
    assert np.array_equal(compiled, python)


def test_more_workers_than_cores_is_capped_with_a_warning(tiny_dataset):
    """numba refuses more threads than the machine has; the loader caps and says so."""
    import numba

    from refinery_pipeline.core.errors import RefineryWarning
    too_many = numba.config.NUMBA_NUM_THREADS + 3
    crops = FixedCrops(tiny_dataset.heights, tiny_dataset.widths)
    with pytest.warns(RefineryWarning, match=f"--workers {too_many}"):
        loader = make_loader(tiny_dataset, crops, (20, 20), 16, num_workers=too_many, train=False)
    seen = sum(batch.images.shape[0] for batch in loader)
    assert seen == tiny_dataset.num_images
