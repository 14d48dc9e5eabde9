"""Claim: a store's labels stay valid for crops cut from the original files, not only the .beton.

`StoreCropDataset(store, beton)` reproduces the stored (and FFCV-replayed) pixels byte for byte;
`StoreCropDataset(store, tree)` cuts the same boxes from the original JPEG files, which differ
from the `.beton`'s re-encoded copies by a few levels. This measures how much that moves the
refinery's labels: for every stored crop (all images x all K slots: epochs 0..K-1 of the cycle
policy), the refinery (BatchNorm in eval mode, so a crop's label depends on its pixels alone)
labels both versions; reported are top-1 agreement, the largest and mean per-crop max absolute
probability difference, and the per-crop pixel differences. Sanity check: the .beton-source
labels against the stored top-k (should agree to float16 storage).

The refinery is trained with ``refine train`` and the store made with ``refine precompute
--bn-mode eval``, both skipped when their outputs exist under ``--work`` (resumable).

  python benchmarks/pixel_source_agreement.py --res 32 --epochs 8 -K 2 \\
      --tag pixel_source_agreement_cpu32
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from _results import markdown_table, write_results
from _runs import device_name, final_metrics, precompute_once, run_logged, threads_per_job

import refinery_pipeline as refinery
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.labelling.precompute import software_versions
from refinery_pipeline.labelling.refinery import Refinery


class BothSources(torch.utils.data.Dataset):
    """Item n: the same stored crop from the original files and from the .beton."""

    def __init__(self, files, beton):
        self.files, self.beton = files, beton

    def __len__(self):
        return len(self.beton)

    def set_epoch(self, epoch):
        self.files.set_epoch(epoch)
        self.beton.set_epoch(epoch)

    def __getitem__(self, n):
        a, b = self.files[n], self.beton[n]
        assert a.slot == b.slot
        return a.image, b.image, n, b.slot, b.topk_indices, b.topk_probs.astype(np.float32)


def train_and_label(args) -> tuple[Path, Path, dict]:
    """The refinery checkpoint and its eval-BN store, made unless present; and their commands."""
    work = Path(args.work)
    out = work / f"ref{args.res}"
    train = ["refine", "train", args.data, "--out", str(out), "--arch", args.arch, "--res",
             str(args.res), "--epochs", str(args.epochs), "--batch-size", "128", "--lr", "0.2",
             "--workers", str(args.workers)]
    if not (out / "model.pt").exists():
        seconds = run_logged(train, work / "logs" / f"train_{out.name}.log", threads_per_job(1))
        (out / "seconds").write_text(f"{seconds}\n")
    store = work / f"agreement_ref{args.res}_k{args.K}_eval.zarr"
    options = [args.data, "--weights", str(out / "model.pt"), "-K", str(args.K), "--top-k",
               "10", "--bn-mode", "eval", "--batch-size", "512"]
    seconds = precompute_once(work, store, options)
    train_s = float((out / "seconds").read_text()) if (out / "seconds").exists() else None
    return out / "model.pt", store, {
        "train": " ".join(train), "train_seconds": train_s,
        "refinery_val_top1": final_metrics(out)["val_top1"],
        "precompute": " ".join(["refine", "precompute", *options, str(store)]),
        "precompute_seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/work/shared/datasets/imagenette-96")
    p.add_argument("--work", default="/tmp/bench")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8, help="refinery training epochs")
    p.add_argument("-K", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="crops labelled per forward")
    p.add_argument("--tag", default="pixel_source_agreement_cpu32")
    args = p.parse_args()
    ckpt, store_path, made = train_and_label(args)
    store = refinery.open_store(store_path)
    beton = open_dataset(args.data, "train").path
    ref = Refinery.from_checkpoint(ckpt, bn_mode="eval")
    pair = BothSources(refinery.StoreCropDataset(store, args.data, crop_format="numpy"),
                       refinery.StoreCropDataset(store, beton, crop_format="numpy"))
    loader = torch.utils.data.DataLoader(pair, batch_size=args.batch_size,
                                         num_workers=args.workers, persistent_workers=True)
    cols = {k: [] for k in ("n", "slot", "same_top1", "prob_err", "px_max", "px_mean",
                            "stored_same_top1", "stored_err", "files_correct", "beton_correct")}
    labels = torch.from_numpy(store.read_labels().astype(np.int64))
    for epoch in range(args.K):
        pair.set_epoch(epoch)
        for files, beton_px, n, slot, idx, probs in loader:
            pf, pb = ref.probabilities(files), ref.probabilities(beton_px)
            diff = (files.to(torch.int16) - beton_px.to(torch.int16)).abs().flatten(1)
            cols["n"].append(n), cols["slot"].append(slot)
            cols["same_top1"].append(pf.argmax(1) == pb.argmax(1))
            cols["prob_err"].append((pf - pb).abs().max(1).values)
            cols["px_max"].append(diff.max(1).values), cols["px_mean"].append(diff.float().mean(1))
            cols["stored_same_top1"].append(pb.argmax(1) == idx[:, 0])
            cols["stored_err"].append((pb.gather(1, idx) - probs).abs().max(1).values)
            cols["files_correct"].append(pf.argmax(1) == labels[n])
            cols["beton_correct"].append(pb.argmax(1) == labels[n])
        print(f"epoch {epoch}: {sum(len(c) for c in cols['n']):,} crops", flush=True)
    c = {k: torch.cat(v).numpy() for k, v in cols.items()}
    pairs = np.unique(c["n"] * args.K + c["slot"])
    assert len(pairs) == len(c["n"]) == len(pair) * args.K, "not every (image, slot) once"
    flipped = ~c["same_top1"]
    s = {"crops": int(len(c["n"])), "images": len(pair), "slots": args.K,
         "top1_agreement": float(c["same_top1"].mean()), "top1_disagreements": int(flipped.sum()),
         "max_probability_error": float(c["prob_err"].max()),
         "mean_probability_error": float(c["prob_err"].mean()),
         "p99_probability_error": float(np.quantile(c["prob_err"], 0.99)),
         "pixel_max_abs_diff_max": int(c["px_max"].max()),
         "pixel_max_abs_diff_median": float(np.median(c["px_max"])),
         "pixel_mean_abs_diff_mean": float(c["px_mean"].mean()),
         "pixel_mean_abs_diff_max": float(c["px_mean"].max()),
         "identical_crops": int((c["px_max"] == 0).sum()),
         "files_top1_vs_ground_truth": float(c["files_correct"].mean()),
         "beton_top1_vs_ground_truth": float(c["beton_correct"].mean()),
         "stored_top1_agreement": float(c["stored_same_top1"].mean()),
         "stored_max_probability_error": float(c["stored_err"].max()),
         "mean_probability_error_of_disagreements":
             float(c["prob_err"][flipped].mean()) if flipped.any() else None}
    result = {"args": vars(args), "software": software_versions(), "device": device_name(),
              "made": made, "summary": s}
    lines = [f"# Labels of crops from the original files vs the .beton: `{args.tag}`", "",
             f"`{args.data}` train, {s['images']:,} images x K={args.K} stored slots = "
             f"{s['crops']:,} crops at {args.res} px. Refinery: {args.arch} @ {args.res} px "
             f"trained {args.epochs} epochs with `refine train` on {device_name()} (reduced "
             f"scale; val top-1 {made['refinery_val_top1']:.2f}), labelling in BatchNorm eval "
             "mode, fp32. Probability error: per crop, max over classes of |p_files - p_beton|.",
             ""]
    lines += markdown_table(["quantity", "value"], [
        ["top-1 agreement, files vs .beton", f"{100 * s['top1_agreement']:.3f} % "
                                             f"({s['top1_disagreements']:,} crops differ)"],
        ["probability error: largest / mean / p99",
         f"{s['max_probability_error']:.4f} / {s['mean_probability_error']:.5f} / "
         f"{s['p99_probability_error']:.4f}"],
        ["pixels: max abs diff per crop, largest / median",
         f"{s['pixel_max_abs_diff_max']} / {s['pixel_max_abs_diff_median']:.0f}"],
        ["pixels: mean abs diff per crop, mean / largest",
         f"{s['pixel_mean_abs_diff_mean']:.3f} / {s['pixel_mean_abs_diff_max']:.3f}"],
        ["crops identical in both sources", f"{s['identical_crops']:,}"],
        ["refinery top-1 vs ground truth, files / .beton",
         f"{100 * s['files_top1_vs_ground_truth']:.2f} % / "
         f"{100 * s['beton_top1_vs_ground_truth']:.2f} %"],
        ["sanity: .beton labels vs stored, top-1", f"{100 * s['stored_top1_agreement']:.3f} %"],
        ["sanity: .beton labels vs stored, largest error",
         f"{s['stored_max_probability_error']:.2e} (float16 storage)"]])
    lines += ["", "Made with (skipped when present under `--work`):", "",
              f"- `{made['train']}` ({made['train_seconds'] or 0:.0f} s)",
              f"- `{made['precompute']}` ({made['precompute_seconds']:.0f} s)"]
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
