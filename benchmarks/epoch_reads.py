"""Claim: a training rank reads only its share of each epoch from the label store (one slot per
image of its shard, :mod:`refinery_pipeline.loaders.epoch_reads`), so its host memory for labels grows
with images / world size, not with K, and its first batch waits for one epoch's read, not for
the whole crop table (issue 27, item 3).

A synthetic store of ImageNet-21k size (14,197,122 images by default) is written by
``benchmarks/imagenet_store.py``'s writer (the real ``LabelStore`` writer, the real crop plan,
synthetic labels), then each measurement runs in its own process, so its peak resident memory
is its own:

* open: ``LabelStore.open`` and the store's own checks (what every reader does first);
* whole: the read every rank did before, ``store.read_crops()`` (the whole crop table);
* rank W: rank 0 of a world of W (every rank of a world reads the same amount): its rows of
  each epoch as FFCV's ``distributed=True`` draws them (``DistributedSampler``, reshuffled per
  epoch; all rows for W = 1), read by ``ReplayedCrops.fill`` as ``refine train`` does (boxes,
  flips, stored labels; chunks checked against their checksums), the crop table of the
  ``.beton`` included. Timed: the first epoch's read (what the first batch waits for), the
  next epoch's read (in the background thread while an epoch trains) and what is left of it
  at the epoch boundary.

  nice -n 5 python benchmarks/epoch_reads.py -K 10 --dir /tmp --tag epoch_reads_cpu
  python benchmarks/epoch_reads.py --images 3000 -K 4 --worlds 1 8 --dir /tmp/x \\
      --results-dir /tmp/x  # a quick check
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402
import imagenet_store  # noqa: E402
from _results import markdown_table  # noqa: E402

IMAGENET_21K_IMAGES = 14_197_122
TARGET_K = 40  # what the issue asks about; a smaller K is projected to it


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    """Resident memory now: taken after the imports, what torch, FFCV and numba hold in any
    process before a byte of the store is read."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def imported() -> int:
    """Import what ``refine train`` imports; the resident memory after it."""
    import refinery_pipeline.loaders.replay  # noqa: F401  (torch, FFCV, numba)
    import refinery_pipeline.training.train  # noqa: F401
    return rss_now()


def phase_open(cfg) -> dict:
    from refinery_pipeline.store.label_store import LabelStore
    start = time.perf_counter()
    store = LabelStore.open(cfg["store"])
    store.require_intact()
    return {"open_seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss()}


def phase_whole(cfg) -> dict:
    """The read every rank did before per-epoch reads: the whole crop table."""
    from refinery_pipeline.store.label_store import LabelStore
    baseline = imported()
    start = time.perf_counter()
    records = LabelStore.open(cfg["store"]).read_crops()
    seconds = time.perf_counter() - start
    return {"read_seconds": seconds, "peak_rss_bytes": peak_rss(), "baseline_rss_bytes": baseline,
            "decoded_bytes": sum(v.nbytes for v in records.arrays().values())}


def rank_rows(num_images: int, world: int, rank: int, seed: int):
    """``rows(epoch)``: the items rank ``rank`` of ``world`` decodes in an epoch, as FFCV's
    ``distributed=True`` draws them (``traversal_order.Random``: a ``DistributedSampler`` over
    the loader's indices, reshuffled by ``set_epoch``); every item in one process."""
    indices = np.arange(num_images)
    if world == 1:
        return lambda epoch: indices
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(indices, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)

    def rows(epoch: int):
        sampler.set_epoch(epoch)
        return indices[np.array(list(sampler))]
    return rows


def phase_rank(cfg) -> dict:
    """Rank 0 of ``cfg["world"]``: what ``refine train`` reads before and between epochs."""
    from refinery_pipeline.loaders.epoch_reads import StoreSlots
    from refinery_pipeline.store.label_store import LabelStore
    from refinery_pipeline.loaders.crop_sources import ReplayedCrops
    from refinery_pipeline.loaders.crop_table import TABLE_FIELDS
    baseline = imported()
    start = time.perf_counter()
    store = LabelStore.open(cfg["store"])
    store.require_intact()
    opened = time.perf_counter() - start
    crops = ReplayedCrops.reading(StoreSlots(store), seed=0, slot_policy=cfg["policy"],
                                  labels=store.read_labels())
    crops.items_of = rank_rows(store.layout.num_images, cfg["world"], 0, seed=0)
    table = np.zeros((store.layout.num_images, crops.table_slots, TABLE_FIELDS), np.int32)
    epochs, first = [], None
    for epoch in range(cfg["epochs"]):
        t0 = time.perf_counter()
        crops.fill(table, epoch)  # waits for what the read ahead has not finished
        filled = time.perf_counter()
        crops.reader.wait()  # the next epoch's read, alone here (a rank trains meanwhile)
        ahead = time.perf_counter() - filled
        first = filled - start if first is None else first
        epochs.append({"fill_wait_seconds": filled - t0, "read_ahead_seconds": ahead,
                       "rows": int(len(crops.current.rows)),
                       "held_bytes": int(crops.current.nbytes)})
    peak = peak_rss()  # before the check below reads anything
    rows, slots = crops.current.rows, crops.current.slots
    lay = store.layout  # the check: the rank's rows in 3 chunks, against those chunks read whole
    chunks = sorted({0, lay.num_chunks // 2, lay.num_chunks - 1})
    check = rows[np.isin(rows // lay.chunk_size, chunks)]
    boxes = store.read_crops(check).boxes
    correct = bool(np.array_equal(table[check, 0, :4], boxes[np.arange(len(check)),
                                                           slots[np.searchsorted(rows, check)]]))
    return {"open_seconds": opened, "first_epoch_ready_seconds": first, "epochs": epochs,
            "table_bytes": int(table.nbytes), "peak_rss_bytes": peak,
            "baseline_rss_bytes": baseline, "checked_rows": int(len(check)),
            "table_correct": correct}


def phase_chunk_cpu(cfg) -> dict:
    """CPU seconds per chunk of a read (decompress, select, and with ``verify`` hash), on
    ``cfg["sample_chunks"]`` chunks: what an epoch's read costs in core-seconds whatever the
    machine's load (every rank reads every chunk), so the first epoch's wall time on a node
    follows from the cores it gives the read."""
    from refinery_pipeline.loaders.epoch_reads import CUT_ARRAYS, LABEL_ARRAYS, StoreSlots
    from refinery_pipeline.store.label_store import LabelStore
    store = LabelStore.open(cfg["store"])
    store.require_intact()
    lay = store.layout
    count = min(cfg.get("sample_chunks", 40), lay.num_chunks)
    rows = np.arange(lay.chunk_range(0).start, lay.chunk_range(count - 1).stop)
    slots = rows % lay.crops_per_image
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    out = {"chunks": count}
    for verify in (True, False):
        c0, t0 = cpu(), time.perf_counter()
        StoreSlots(store, verify=verify).read(rows, slots, CUT_ARRAYS + LABEL_ARRAYS)
        key = "verified" if verify else "unverified"
        out[key] = {"cpu_seconds_per_chunk": (cpu() - c0) / count,
                    "wall_seconds_per_chunk": (time.perf_counter() - t0) / count}
    return out


PHASES = {"open": phase_open, "whole": phase_whole, "rank": phase_rank,
          "chunk_cpu": phase_chunk_cpu}


def run_phase(name: str, cfg: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--phase", name, json.dumps(cfg)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name} {json.dumps(cfg)[-80:]}: {json.dumps(report)[:400]}", file=sys.stderr,
          flush=True)
    return report


def measure(args) -> dict:
    work = Path(tempfile.mkdtemp(dir=args.dir))
    cfg = {"images": args.images, "K": args.K, "top_k": args.top_k, "classes": args.classes,
           "rounds": 1, "store": str(work / "store.zarr"), "work": str(work),
           "epochs": args.epochs}
    result = {"config": cfg, "worlds": args.worlds, "policies": args.policies}
    try:
        result["write"] = imagenet_store.run_phase("write", cfg)
        result["open"] = run_phase("open", cfg)
        result["whole"] = None if args.no_whole else run_phase("whole", cfg)
        result["ranks"] = [{"world": world, "policy": policy,
                            **run_phase("rank", {**cfg, "world": world, "policy": policy})}
                           for policy in args.policies for world in args.worlds]
        result["chunk_cpu"] = run_phase("chunk_cpu", {**cfg, "sample_chunks": 40})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the store is tens of GB at full size
    return result


def peak_gb(value) -> str:
    """A peak in GB; None: not measured (a run whose peaks its own check spoiled)."""
    return "not measured" if value is None else f"{value / 1e9:.2f}"


def report(args, result: dict) -> str:
    cfg, write = result["config"], result["write"]
    gb = lambda b: f"{b / 1e9:.2f}"
    scale = TARGET_K / cfg["K"]  # per-epoch reads decode whole chunks: time grows with K
    lines = [f"# Per-epoch reads of a label store: `{args.tag}`", "",
             f"{cfg['images']:,} images × K = {cfg['K']} × top-{cfg['top_k']} of "
             f"{cfg['classes']:,} classes ({cfg['images'] * cfg['K']:,} crops; "
             f"{write['chunks']:,} chunks of {write['chunk_size']:,} images), written by "
             "`benchmarks/imagenet_store.py`'s writer. Each row ran in its own process (peak "
             "resident memory is its own); a rank is rank 0 of its world (its rows per epoch as "
             "FFCV's `distributed=True` draws them); checksums checked on every read. "
             f"Machine: {os.cpu_count()} CPU cores (shared), local disk.", "",
             f"Bytes on disk: {write['store_bytes']:,} ({write['store_bytes'] / (cfg['images'] * cfg['K']):.2f}"
             " per crop). Open and the store's checks: "
             f"{result['open']['open_seconds']:.2f} s.", ""]
    rows = []
    if result["whole"]:
        whole = result["whole"]
        rows.append(["before: every rank's whole read (`read_crops()`)", "all",
                     f"{whole['read_seconds']:.1f}", "", gb(whole["decoded_bytes"]),
                     gb(whole["peak_rss_bytes"]), gb(whole["baseline_rss_bytes"])])
    for r in result["ranks"]:
        first, later = r["epochs"][0], r["epochs"][1:]
        ahead = max(e["read_ahead_seconds"] for e in r["epochs"])
        waits = max((e["fill_wait_seconds"] for e in later), default=float("nan"))
        rows.append([f"rank of {r['world']} ({r['policy']})", f"{first['rows']:,}",
                     f"{r['first_epoch_ready_seconds']:.1f}",
                     f"{ahead:.1f} (boundary wait {waits:.2f})",
                     f"{gb(first['held_bytes'])} + table {gb(r['table_bytes'])}",
                     peak_gb(r["peak_rss_bytes"]), gb(r["baseline_rss_bytes"])])
    lines += markdown_table(["reader", "rows per epoch", "first epoch ready (s)",
                             "next epoch's read, in the background (s)",
                             "held: epoch's crops + crop table (GB)", "peak RSS (GB)",
                             "of which imports (GB)"], rows)
    if cfg["K"] != TARGET_K:
        lines += ["", f"## Projection to K = {TARGET_K}", "",
                  f"Measured at K = {cfg['K']}. What a rank holds does not depend on K (one "
                  "slot per row; the crop table is per item), except the `cycle` policy's "
                  f"round order kept by a rank that replays every row (N × K bytes: "
                  f"+{gb(cfg['images'] * (TARGET_K - cfg['K']))} GB at K = {TARGET_K}); the "
                  "whole read's memory beyond the imports grows × "
                  f"{scale:g}. Every "
                  "rank decodes and hashes every chunk holding one of its rows, i.e. all of "
                  f"them, so read times grow with the store's bytes: × {scale:g}."]
        proj = []
        for r in result["ranks"]:
            extra = cfg["images"] * (TARGET_K - cfg["K"]) if r["world"] == 1 and \
                r["policy"] == "cycle" else 0
            proj.append([f"rank of {r['world']} ({r['policy']})",
                         f"{r['first_epoch_ready_seconds'] * scale:.0f}",
                         f"{max(e['read_ahead_seconds'] for e in r['epochs']) * scale:.0f}",
                         peak_gb(r["peak_rss_bytes"] and r["peak_rss_bytes"] + extra)])
        if result["whole"]:
            whole = result["whole"]
            proj.insert(0, ["before: whole read", f"{whole['read_seconds'] * scale:.0f}", "",
                            gb(whole["baseline_rss_bytes"] + (whole["peak_rss_bytes"] -
                                                              whole["baseline_rss_bytes"]) * scale)])
        lines += [""] + markdown_table(["reader", f"first epoch ready at K = {TARGET_K} (s)",
                                        "next epoch's read (s)", "peak RSS (GB)"], proj)
    if result.get("chunk_cpu"):
        lines += chunk_cpu_lines(cfg, result["chunk_cpu"])
    correct = all(r["table_correct"] for r in result["ranks"])
    lines += ["", f"Check: each rank's crop table holds the whole table's boxes of its rows' "
              f"slots (its rows in the first, middle and last chunk): {correct}. Store deleted "
              "after the run."]
    return "\n".join(lines) + "\n"


def chunk_cpu_lines(cfg: dict, cpu: dict) -> list:
    """The first epoch's read in core-seconds, at this K and at :data:`TARGET_K`, and the wall
    time it takes with the read's threads on free cores."""
    from refinery_pipeline.loaders.epoch_reads import READ_THREADS
    from refinery_pipeline.store.schema import default_chunk_size
    here = -(-cfg["images"] // default_chunk_size(cfg["K"], cfg["top_k"]))
    target = -(-cfg["images"] // default_chunk_size(TARGET_K, cfg["top_k"]))
    rows = []
    for key in ("verified", "unverified"):
        per = cpu[key]["cpu_seconds_per_chunk"]
        rows.append([f"{key} ({'every chunk hashed' if key == 'verified' else 'after `refine verify`, --skip-store-check'})",
                     f"{per * 1000:.0f}", f"{per * here:.0f}", f"{per * target:.0f}",
                     f"{per * target / READ_THREADS:.0f}"])
    return ["", "## CPU per chunk", "",
            f"An epoch's read decodes every chunk (every rank's share has rows in all of them). "
            f"CPU time per chunk, measured on {cpu['chunks']} chunks (user + system, all "
            f"threads; it does not depend on the machine's load as wall time does), times the "
            f"chunks of the store here ({here:,}) and at K = {TARGET_K} ({target:,} chunks of "
            "the same number of crops):", ""] + markdown_table(
        ["read", "CPU ms per chunk", f"first epoch, core-s at K = {cfg['K']}",
         f"core-s at K = {TARGET_K}", f"wall s at K = {TARGET_K}, {READ_THREADS} free cores"],
        rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_21K_IMAGES)
    p.add_argument("-K", type=int, default=TARGET_K)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--classes", type=int, default=21_841)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--policies", nargs="+", default=["cycle"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-whole", action="store_true", help="skip the whole read (memory)")
    p.add_argument("--dir", default=None, help="where to build the store [default: a temp dir]")
    p.add_argument("--results-dir", default=None, help="[default: benchmarks/results]")
    p.add_argument("--tag", default="epoch_reads")
    p.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase[0]](json.loads(args.phase[1]))))
        return
    if args.results_dir:
        _results.RESULTS = Path(args.results_dir)
    result = measure(args)
    _results.write_results(args.tag, result, report(args, result))


if __name__ == "__main__":
    main()
