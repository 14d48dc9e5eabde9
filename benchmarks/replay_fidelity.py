"""Claim: the label stored for a crop is the refinery's label of the very pixels a student is shown.

End to end on real data and on the real device (bf16 autocast on CUDA): precompute a store with
the refinery's BatchNorm in eval mode, so that a crop's label depends on its pixels alone and not
on its batch neighbours; then iterate the student's replay loader exactly as ``refine train``
does (shuffled, the slot each epoch picks, flips included) and re-label every batch online with
the same refinery. The stored targets and the online targets (the training code's own
``StoredTargets`` and ``OnlineTargets``) must agree crop for crop, up to float16 storage and the
few units of bf16 rounding that different batch compositions can cause. Exits 1 when top-1
agreement is below ``--min-agreement``.

  python benchmarks/replay_fidelity.py DATA --refinery REF/model.pt -K 4 --epochs 2 \\
      --workers 16 --tag fidelity_h100
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _results import markdown_table, write_results
from _runs import device_name

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.labelling.precompute import precompute, software_versions
from refinery_pipeline.models.tensors import to_pixels
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.loaders.replay import make_loader
from refinery_pipeline.loaders.crop_sources import ReplayedCrops
from refinery_pipeline.training.targets import OnlineTargets, StoredTargets
from refinery_pipeline.core.devices import resolve_device


def compare_epochs(dataset, store_path: Path, refinery: Refinery, epochs: int, batch_size: int,
                   workers: int) -> dict:
    """Stored vs online targets over ``epochs`` epochs of the student's replay loader."""
    records = LabelStore.open(store_path).read_crops()
    classes = len(dataset.classes)
    crops = ReplayedCrops(records.boxes, records.flips, seed=0)
    cached = StoredTargets(records.topk_indices, records.topk_probs, classes, refinery.device)
    online = OnlineTargets(refinery)
    size = (refinery.input_size, refinery.input_size)
    loader = make_loader(dataset, crops, size, batch_size, workers, train=True, seed=0)
    same_top1, errors, slots = [], [], set()
    for epoch in range(epochs):
        loader.next_epoch = epoch
        for batch in loader:
            slots.update(batch.slots.unique().tolist())  # on the host: no device sync
            pixels = to_pixels(batch.images, refinery.device)
            batch = batch.to(refinery.device)
            stored, fresh = cached(batch, pixels), online(batch, pixels)
            same_top1.append((stored.argmax(1) == fresh.argmax(1)).cpu())
            errors.append((stored - fresh).abs().max(1).values.cpu())
    same, err = torch.cat(same_top1).float(), torch.cat(errors)
    return {"crops": int(same.numel()), "slots_visited": sorted(slots),
            "top1_agreement": same.mean().item(), "max_probability_error": err.max().item(),
            "mean_max_probability_error": err.mean().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="ImageFolder tree (train/ is used) or a .beton")
    p.add_argument("--refinery", required=True, help="refinery checkpoint (model.pt)")
    p.add_argument("-K", "--crops-per-image", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="student epochs to replay and compare")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--min-agreement", type=float, default=0.995)
    p.add_argument("--tag", default="fidelity")
    args = p.parse_args()
    device = resolve_device("auto")
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    refinery = Refinery.from_checkpoint(args.refinery, classes=dataset.classes,
                                        bn_mode="eval", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "labels.zarr"
        # top-k = all classes: the dense stored label is then the whole distribution
        precompute(dataset, store, refinery, CropPlan(seed=0, crops_per_image=args.crops_per_image),
                   top_k=len(dataset.classes), num_workers=args.workers, progress=False)
        report = compare_epochs(dataset, store, refinery, args.epochs, args.batch_size,
                                args.workers)
    result = {"args": vars(args), "device": device_name(), "software": software_versions(),
              "refinery": refinery.describe(), **report}
    passed = report["top1_agreement"] >= args.min_agreement
    lines = [f"# Replay fidelity: `{args.tag}`", "",
             f"Device: {result['device']}. `{args.data}` train ({dataset.num_images:,} images), "
             f"refinery {refinery.arch} @ {refinery.input_size} px, BN eval, "
             f"K = {args.crops_per_image}, all {len(dataset.classes)} classes stored. The "
             f"student's replay loader ran {args.epochs} epochs (slots "
             f"{report['slots_visited']}); each batch was re-labelled online.", ""]
    lines += markdown_table(
        ["crops compared", "top-1 agreement", "max prob. error", "mean per-crop max error"],
        [[f"{report['crops']:,}", f"{100 * report['top1_agreement']:.3f}%",
          f"{report['max_probability_error']:.4f}", f"{report['mean_max_probability_error']:.5f}"]])
    lines += ["", f"{'PASS' if passed else 'FAIL'} (threshold {100 * args.min_agreement:.1f}% "
              "top-1 agreement).", ""]
    write_results(args.tag, result, "\n".join(lines))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
