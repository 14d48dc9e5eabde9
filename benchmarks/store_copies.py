"""Claim: a label store travels. One store of an ImageFolder tree serves a shuffled flat copy, a
90% subset (``--allow-missing``), WebDataset shards and a Hugging Face table with crops byte for
byte those of the store's own ``.beton`` replay (all hold the original files' bytes, which the
``.beton`` keeps: JPEG passthrough), and students trained from each match one trained from the
tree; re-encoded copies (shorter side 64 px; JPEG quality 75) are told approximate, and
``check-copy`` measures how far their labels drift (issue 26, "Measured").

Steps, each a ``refine`` command or public call; finished steps are skipped on a rerun:

1. a refinery trained on DATA's ground truth (or ``--refinery``), ``refine precompute`` of
   DATA's tree (K crops per image, top-k, the default train-mode BN);
2. the copies, made from the tree's files (``benchmarks/_copies.py``);
3. per copy: :func:`refinery_pipeline.check_copy` with the refinery on ``--sample`` crops
   (train-mode BN: whole loader batches of the store's run), and every store row's crop at
   epochs 0 and 1 from the copy, through the plain reader (``StoreCropDataset``) and the FFCV
   backend (``replay_loader``, which converts the copy to a keyed ``.beton``), compared byte
   for byte with the FFCV replay of the store's own ``.beton``;
4. students: ``refine train COPY --labels STORE --val DATA`` per copy and seed.

CPU at reduced scale (a class-balanced 3,000-image subset, 32 px):
  python benchmarks/folder_subset.py ../shared/datasets/imagenette-96 /tmp/in300 --train 300 --copy
  python benchmarks/store_copies.py /tmp/in300 --work /tmp/store_copies --jobs 2 --workers 1 \\
      --tag store_copies_cpu32
"""
import argparse
import statistics
from pathlib import Path

import _copies
from _results import markdown_table, write_results
from _runs import StudentRuns, add_student_arguments, describe_students, device_name, precompute_once
from refined_vs_ground_truth import refinery_checkpoint

ORIGINAL = "original tree"


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="an ImageFolder tree with train/ and val/")
    add_student_arguments(p, work="runs/store_copies", epochs=8)
    p.add_argument("--refinery", help="an existing refinery model.pt (else one is trained)")
    p.add_argument("--refinery-arch", default="resnet18")
    p.add_argument("--refinery-epochs", type=int, default=16)
    p.add_argument("-K", "--crops-per-image", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--sample", type=int, default=10000, help="crops check-copy labels again")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tag", default="store_copies")
    return p.parse_args()


def make_copies(data: Path, work: Path) -> dict:
    """name -> (DATA as refine takes it, extra train options)."""
    split = data / "train"
    return {ORIGINAL: (data, []),
            "shuffled flat copy (a list)": (_copies.listed_flat(split, work / "flat"), []),
            "90% subset": (_copies.tree_subset(split, work / "subset", 0.9), ["--allow-missing"]),
            "WebDataset shards": (_copies.shards(split, work / "shards", per_shard=500), []),
            "Hugging Face table": (_copies.hf_table(split, work / "hf"), []),
            "re-encoded, shorter side 64 px": (
                _copies.reencoded(split, work / "short64", quality=90, short_side=64), []),
            "re-encoded, JPEG quality 75": (_copies.reencoded(split, work / "q75", 75), [])}


def replayed_crops(loader, epoch: int) -> dict:
    """store row -> its crop's bytes, over one epoch of an FFCV ``CropLoader``."""
    loader.set_epoch(epoch)
    out = {}
    for batch in loader:
        images = batch.images.permute(0, 2, 3, 1) if batch.images.shape[1] == 3 else batch.images
        for i, n in enumerate(batch.indices.tolist()):
            out[n] = images[i].numpy().tobytes()
    return out


def crop_identity(store, beton, data, allow_missing: bool, workers: int, epochs=(0, 1)) -> dict:
    """How many of the copy's crops equal the store's own ``.beton`` replay byte for byte,
    through each backend, over ``epochs`` (every store row the copy gives)."""
    import refinery_pipeline as refinery
    kw = dict(seed=0, drop_last=False)
    own = refinery.replay_loader(store, beton, 64, workers, **kw)
    ffcv = refinery.replay_loader(store, data, 64, workers, allow_missing=allow_missing, **kw)
    plain = refinery.StoreCropDataset(store, data, crop_format="numpy",
                                      allow_missing=allow_missing)
    found = {"crops": 0, "plain_identical": 0, "ffcv_identical": 0, "plain_exact_flags": 0}
    for epoch in epochs:
        reference, copied = replayed_crops(own, epoch), replayed_crops(ffcv, epoch)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            sample = plain[i]
            found["crops"] += 1
            found["plain_exact_flags"] += bool(sample.exact)
            found["plain_identical"] += sample.image.tobytes() == reference[sample.index]
            found["ffcv_identical"] += copied.get(sample.index) == reference[sample.index]
    return found


def check(store, data, refinery_model, args, allow_missing: bool) -> dict:
    from refinery_pipeline import check_copy
    report = check_copy(store, data, refinery_model, sample=args.sample, seed=0,
                        allow_missing=allow_missing, num_workers=2)
    a = report.agreement
    part = lambda p: None if p is None else vars(p)
    return {"status": report.status, "counts": report.counts, "lines": report.lines,
            "agreement": None if a is None else
            {"bn_mode": a.bn_mode, "loader_batches": a.loader_batches,
             "overall": part(a.overall), "exact": part(a.exact),
             "approximate": part(a.approximate)}}


def load_refinery(store, weights: str):
    from refinery_pipeline import open_store
    from refinery_pipeline.refinery import load_as_recorded
    opened = open_store(store)
    return load_as_recorded([weights], opened.attrs["refinery"], opened.classes, device="cpu")


def main():
    args = get_args()
    work, data = Path(args.work), Path(args.data)
    weights, refinery_metrics = refinery_checkpoint(args, work)
    store = work / "store.zarr"
    seconds = precompute_once(work, store, [str(data), "--weights", weights, "-K",
                                            str(args.crops_per_image), "--top-k",
                                            str(args.top_k), "--workers", str(args.workers)])
    from refinery_pipeline import beton_path
    beton = beton_path(data, store=store)
    forms = make_copies(data, work / "copies")
    refinery_model = load_refinery(store, weights)
    found = {}
    for name, (copy, options) in forms.items():
        allow = "--allow-missing" in options
        found[name] = {"data": str(copy), "check": check(store, copy, refinery_model, args, allow),
                       "crops": crop_identity(store, beton, copy, allow, args.workers)}
        print(name, found[name]["crops"], found[name]["check"]["lines"][-1], flush=True)
    runs = StudentRuns(work, ["--arch", args.arch, "--res", str(args.res), "--batch-size",
                              str(args.batch_size), "--lr", str(args.lr), "--workers",
                              str(args.workers)], args.epochs, args.jobs)
    rows = runs.train_all([{"name": name, "seed": seed,
                            "options": [str(copy), "--labels", str(store), "--val", str(data),
                                        *options]}
                           for seed in args.seeds for name, (copy, options) in forms.items()])
    write_results(args.tag, {"args": vars(args), "device": device_name(),
                             "refinery": {"checkpoint": weights, **refinery_metrics},
                             "precompute_seconds": seconds, "copies": found, "students": rows},
                  report(args, found, rows, refinery_metrics, seconds))


def report(args, found: dict, rows: list, refinery_metrics: dict, seconds: float) -> str:
    students = {}
    for row in rows:
        students.setdefault(row["name"], []).append(row["val_top1"])
    base = statistics.mean(students[ORIGINAL]) if ORIGINAL in students else None
    lines = [f"# A store and copies of its data set: `{args.tag}`", "",
             f"Device: {device_name()}. Data: `{args.data}` at {args.res} px crops. Refinery "
             f"{args.refinery or args.refinery_arch} (val top-1 "
             f"{refinery_metrics['val_top1']:.2f}). Store: K = {args.crops_per_image}, top-"
             f"{args.top_k}, BN train, precomputed from the tree in {seconds:.0f} s. Students: "
             f"{describe_students(vars(args))}, seeds {', '.join(map(str, args.seeds))}, each "
             f"trained from the copy (`refine train COPY --labels STORE --val DATA`).", "",
             "## What each copy gives", ""]
    table = []
    for name, f in found.items():
        c, crops = f["check"]["counts"], f["crops"]
        approx = ((f["check"]["agreement"] or {}).get("approximate")
                  or (f["check"]["agreement"] or {}).get("exact") or {})
        table.append([name, f"{c['used']:,} of {c['store_images']:,}", f"{c['exact']:,}",
                      f"{c['resized'] + c['reencoded']:,}",
                      f"{crops['plain_identical']:,} / {crops['ffcv_identical']:,} of "
                      f"{crops['crops']:,}", f["check"]["status"],
                      _percent(approx.get("top1")), _number(approx.get("max_error")),
                      _number(approx.get("mean_error")), f"{approx.get('crops', 0):,}"])
    lines += markdown_table(["copy", "images used", "exact", "approximate",
                             "crops identical to the .beton replay (plain / FFCV backend)",
                             "check-copy exit", "top-1 agreement", "max prob. error",
                             "mean prob. error", "crops compared"], table)
    lines += ["", "## Students", ""]
    lines += markdown_table(
        ["trained from", *[f"seed {s}" for s in args.seeds], "mean val top-1", "vs original"],
        [[name, *[f"{v:.2f}" for v in values], f"{statistics.mean(values):.2f}",
          "" if base is None or name == ORIGINAL else f"{statistics.mean(values) - base:+.2f}"]
         for name, values in students.items()])
    lines += ["", "check-copy's report of each copy:", ""]
    for name, f in found.items():
        lines += [f"`{name}` (exit {f['check']['status']}):", "", "```", *f["check"]["lines"],
                  "```", ""]
    return "\n".join(lines)


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _number(value) -> str:
    return "" if value is None else f"{value:.1e}"


if __name__ == "__main__":
    main()
