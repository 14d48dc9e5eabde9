"""``refine demo``: the whole path on procedural data, on 2 CPU cores, in a few minutes.

shapes data -> .beton -> refinery trained on ground truth (twice the students' epochs) ->
precomputed label store -> two students with identical settings, one on ground truth and one on
the stored labels. Because the generator knows where each object is, the demo also measures the
crop-level label noise the refinery is meant to fix.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..plan.crop_plan import CropPlan, crops_for_parity
from ..core.errors import RunError
from ..sources.dataset import ImageDataset
from ..sources.beton_writer import ArraySource, write_beton
from ..store.label_store import LabelStore
from ..store.schema import DEFAULT_TOP_K
from .plots import plot_runs, read_run
from ..labelling.precompute import precompute
from ..labelling.refinery import Refinery
from .synthetic import SHAPES, make_shapes, visible_fraction
from ..training.train import fit
from ..training.config import TrainConfig


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "refinery-demo"
    train_images: int = 3000
    val_images: int = 1000
    image_size: int = 64
    crop_size: int = 32
    epochs: int = 30
    refinery_epochs: int = 60  # twice the students': a refinery must be stronger than them
    arch: str = "demo_cnn"
    refinery_arch: str = "demo_cnn"
    crops_per_image: int = None  # default: enough crops for the students' epochs at parity
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    workers: int = 2

    def __post_init__(self):
        if self.crops_per_image is None:
            object.__setattr__(self, "crops_per_image", crops_for_parity(self.epochs))


def write_shapes(cfg: DemoConfig, out: Path):
    """Write train/val betons; return the train split's ground truth in stored (shuffled) order."""
    truth = None
    for split, count, seed in (("train", cfg.train_images, cfg.seed),
                               ("val", cfg.val_images, cfg.seed + 1)):
        data = make_shapes(count, cfg.image_size, seed)
        order = write_beton(ArraySource(data.images, data.labels), out / f"shapes_{split}.beton",
                            classes=SHAPES, num_workers=cfg.workers)
        if split == "train":
            truth = data.take(order)
    return truth


def crop_label_report(store: LabelStore, truth) -> dict:
    """How often the image label is wrong for a stored crop, and what the refinery said there."""
    records = store.read_crops()
    labelled = visible_fraction(truth.main_masks, records.boxes)
    missing = labelled == 0  # the crop shows no pixel of the labelled object
    other = visible_fraction(truth.other_masks, records.boxes) > 0.5
    idx, probs = records.topk_indices.astype(np.int64), records.topk_probs.astype(np.float64)
    gt = truth.labels[:, None, None]
    p_gt = np.where(idx == gt, probs, 0).sum(-1)
    top1 = idx[..., 0]
    only_other = missing & other
    return {
        "crops": int(missing.size),
        "crops_missing_object_share": float(missing.mean()),
        "refinery_p_gt_on_missing": float(p_gt[missing].mean()),
        "refinery_p_gt_on_others": float(p_gt[~missing].mean()),
        "refinery_top1_on_missing": float(probs[..., 0][missing].mean()),
        "refinery_top1_on_others": float(probs[..., 0][~missing].mean()),
        "crops_showing_only_second_object": int(only_other.sum()),
        "refinery_names_second_object_share": float(
            (top1 == truth.other_labels[:, None])[only_other].mean()) if only_other.any() else 0.0,
    }


# What a demo writes under its --out folder; a rerun replaces all of it.
DEMO_OUTPUTS = ("refinery", "student_gt", "student_refined", "labels.zarr", "labels.zarr.locks",
                "shapes_train.beton", "shapes_val.beton", "shapes_train.beton.meta.json",
                "shapes_val.beton.meta.json", "demo_result.json", "students.png")


def _start_over(out: Path):
    """A demo owns its folder: a rerun starts from scratch (training refuses to mix runs), but
    only where a previous demo left its result, so no other folder's files are ever removed."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "demo_result.json").is_file() and not (out / "shapes_train.beton").is_file():
        raise RunError(f"{out}: not empty and not a previous demo's folder; pass --out with a new "
                       "or empty folder")
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(cfg: DemoConfig = DemoConfig(), echo=print) -> dict:
    out = Path(cfg.out_dir)
    _start_over(out)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"[1/5] writing {cfg.train_images} + {cfg.val_images} procedural images to {out}")
    truth = write_shapes(cfg, out)
    data = str(out / "shapes_train.beton")
    common = dict(data=data, res=cfg.crop_size, workers=cfg.workers, seed=cfg.seed,
                  batch_size=64, lr=0.05, weight_decay=5e-4, warmup_epochs=1)
    echo(f"[2/5] training the refinery ({cfg.refinery_arch}, {cfg.refinery_epochs} epochs, "
         "ground truth)")
    ref_metrics = fit(TrainConfig(out_dir=str(out / "refinery"), arch=cfg.refinery_arch,
                                  epochs=cfg.refinery_epochs, **common))
    echo(f"[3/5] precomputing K={cfg.crops_per_image} top-{cfg.top_k} labels")
    store_path = out / "labels.zarr"
    refinery = Refinery.from_checkpoint(out / "refinery" / "model.pt")
    summary = precompute(ImageDataset(data), store_path, refinery,
                         CropPlan(seed=cfg.seed, crops_per_image=cfg.crops_per_image),
                         cfg.top_k, crop_batch=256, num_workers=cfg.workers)
    report = crop_label_report(LabelStore.open(store_path), truth)
    echo(f"[4/5] training the ground-truth student ({cfg.arch}, {cfg.epochs} epochs)")
    gt = fit(TrainConfig(out_dir=str(out / "student_gt"), arch=cfg.arch, epochs=cfg.epochs,
                         **common))
    echo(f"[5/5] training the refined student ({cfg.arch}, {cfg.epochs} epochs)")
    refined = fit(TrainConfig(out_dir=str(out / "student_refined"), arch=cfg.arch,
                              epochs=cfg.epochs, labels=str(store_path), **common))
    result = {"config": cfg.__dict__, "refinery_val_top1": ref_metrics["val_top1"],
              "precompute": {"crops": summary.crops, "seconds": summary.seconds,
                             "bytes_per_crop": summary.bytes_per_crop},
              "crop_labels": report,
              "student_gt": {k: gt[k] for k in ("val_top1", "val_top5")},
              "student_refined": {k: refined[k] for k in ("val_top1", "val_top5")}}
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    figure = plot_runs([read_run(out / "refinery", "refinery (ground truth)"),
                        read_run(out / "student_gt", "student, ground truth"),
                        read_run(out / "student_refined", "student, refined labels")],
                       out / "students.png")
    echo(format_result(result) + f"\nPlot: {figure}")
    return result


def format_result(r: dict) -> str:
    c = r["crop_labels"]
    gt, rf = r["student_gt"], r["student_refined"]
    return "\n".join([
        "",
        f"Stored crops: {c['crops']:,}  ({r['precompute']['bytes_per_crop']:.1f} bytes/crop on disk)",
        f"  crops that show no pixel of the labelled object: {100 * c['crops_missing_object_share']:.1f}%"
        "  (their image label is wrong)",
        f"  refinery's probability for the image label:  {c['refinery_p_gt_on_missing']:.3f} on those"
        f" crops vs {c['refinery_p_gt_on_others']:.3f} on the others",
        f"  refinery's top-1 confidence:                 {c['refinery_top1_on_missing']:.3f} on those"
        f" crops vs {c['refinery_top1_on_others']:.3f} on the others",
        f"  of {c['crops_showing_only_second_object']:,} crops showing only the second object, the "
        f"refinery names that object on {100 * c['refinery_names_second_object_share']:.1f}%",
        "",
        f"Refinery val top-1: {r['refinery_val_top1']:.2f}",
        "Students (same architecture, epochs and seed; val, full image):",
        f"  ground truth labels : top-1 {gt['val_top1']:6.2f}  top-5 {gt['val_top5']:6.2f}",
        f"  refined labels      : top-1 {rf['val_top1']:6.2f}  top-5 {rf['val_top5']:6.2f}",
        f"  difference          : {rf['val_top1'] - gt['val_top1']:+.2f} points top-1",
    ])
