"""Claim: an ImageNet-sized label store (1,281,167 images × K = 40 × top-10 of 1,000 classes,
51M crops) is written, read, verified and replayed in minutes on 2 cores, and a training rank
needs no store-sized memory on its GPU (what a rank reads of each epoch: epoch_reads.py).

The store goes through the real writer (``LabelStore.create`` / ``write_chunk`` / ``finalize``,
the default chunk size, as ``refine precompute`` uses them), locally and on a moto S3 server.
Boxes and flips come from the real ``CropPlan`` on synthetic ImageNet image sizes; labels are
synthetic (the model is in ``LABEL_MODEL``; real label entropy is measured on Tiny-ImageNet,
issue 17 item 3). Every phase runs in its own process, so its peak host memory
(``ru_maxrss``) is its own:

* write: time in the writer only (synthesis is timed apart), bytes on disk per array;
* read: ``LabelStore.open(...).read_crops()`` (checksums checked, as ``refine train`` reads it),
  then a sample of chunks compared with what was written, the device memory a training rank
  held before (the whole store's labels, int16 + float16) and holds now (``StoredTargets``'s
  tensors), and the per-epoch crop-table rewrite (``ReplayedCrops.fill``, both slot policies);
* (what each torchrun rank reads now, its shard of an epoch: ``benchmarks/epoch_reads.py``);
* ``refine verify``.

  nice -n 5 python benchmarks/imagenet_store.py --dir /tmp/bigstore --tag imagenet_store_cpu
  python benchmarks/imagenet_store.py --scale 0.0016 -K 4 --dir /tmp/x --results-dir /tmp/x  # CI
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402
from _results import markdown_table  # noqa: E402

IMAGENET_IMAGES = 1_281_167
LABEL_MODEL = (
    "per image: its ground-truth class, 3 'sibling' classes within ±15 ids of it (WordNet-sorted "
    "ids put fine-grained siblings near each other) and 12 random classes form a pool of 16; "
    "image logits 3 + N(0,1) for the true class, 1.5 + N(0,1) for siblings, N(0,1) - 0.5 for the "
    "rest of the pool; each crop adds N(0,1) per class and, with probability 0.25, +2.5 to one "
    "random pool class (a second object); the pool's softmax times 1 - t, t ~ U(0.02, 0.15) per "
    "crop, the mass of the other classes; top-10 of the pool, most probable first, float16")
IMAGE_SIZE_MODEL = (
    "75% landscape; long side 500 px for 80% of images, else log-normal around 400 px "
    "(sigma 0.35, clipped to 64-2,000); aspect 4:3 (55%), 3:2 (15%), 1:1 (10%), else uniform "
    "in 1-2 (ImageNet-1k train: most images 500 × 375 or 500 × 333)")


# ------------------------------------------------------------------------------ synthetic data

def image_sizes(num_images: int, seed: int = 0) -> np.ndarray:
    """``(N, 2)`` heights and widths drawn as :data:`IMAGE_SIZE_MODEL` says."""
    rng = np.random.default_rng([seed, 1])
    long_side = np.where(rng.random(num_images) < 0.8, 500.0,
                         np.clip(400 * np.exp(0.35 * rng.standard_normal(num_images)), 64, 2000))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, np.nan], num_images, p=[0.55, 0.15, 0.1, 0.2])
    aspect = np.where(np.isnan(aspect), rng.uniform(1, 2, num_images), aspect)
    short_side = np.maximum(16, np.round(long_side / aspect))
    landscape = rng.random(num_images) < 0.75
    heights = np.where(landscape, short_side, long_side)
    widths = np.where(landscape, long_side, short_side)
    return np.stack([heights, widths], -1).astype(np.uint16)


def ground_truth(num_images: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, 2]).integers(0, classes, num_images)


def synthetic_labels(labels: np.ndarray, K: int, top_k: int, classes: int, seed: int):
    """Top-k ``(indices uint16, probs float16)`` of shape ``(n, K, top_k)`` for images whose
    ground truth is ``labels``, drawn as :data:`LABEL_MODEL` says."""
    rng = np.random.default_rng(seed)
    n, pool = len(labels), 16
    siblings = (labels[:, None] + rng.choice(np.r_[-15:0, 1:16], (n, 3))) % classes
    others = rng.integers(0, classes, (n, pool - 4))
    members = np.concatenate([labels[:, None], siblings, others], 1)
    base = np.concatenate([3 + rng.standard_normal((n, 1)), 1.5 + rng.standard_normal((n, 3)),
                           rng.standard_normal((n, pool - 4)) - 0.5], 1)
    logits = base[:, None, :] + rng.standard_normal((n, K, pool))
    second = rng.random((n, K)) < 0.25
    logits[np.nonzero(second) + (rng.integers(0, pool, int(second.sum())),)] += 2.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p *= (1 - rng.uniform(0.02, 0.15, (n, K, 1))) / p.sum(-1, keepdims=True)
    # duplicate classes in a pool (a random pick equal to a sibling) keep their larger share:
    # sorting by class, then zeroing repeats, keeps every stored index distinct per crop
    by_class = np.argsort(members, 1, kind="stable")
    sorted_members = np.take_along_axis(members, by_class, 1)
    repeat = np.zeros_like(sorted_members, bool)
    repeat[:, 1:] = sorted_members[:, 1:] == sorted_members[:, :-1]
    p = np.take_along_axis(p, by_class[:, None, :], 2)
    p[np.broadcast_to(repeat[:, None, :], p.shape)] = 0
    top = np.argsort(-p, -1, kind="stable")[..., :top_k]
    indices = np.take_along_axis(np.broadcast_to(sorted_members[:, None, :], p.shape), top, -1)
    return indices.astype(np.uint16), np.take_along_axis(p, top, -1).astype(np.float16)


def chunk_records(layout, plan, sizes, labels, c: int, classes: int) -> dict:
    """What chunk ``c`` holds: the plan's boxes and flips, synthetic labels seeded by ``c``."""
    from refinery_pipeline.plan.crop_plan import sample_boxes, sample_flips
    rows = layout.chunk_range(c)
    ids = np.arange(rows.start, rows.stop)
    indices, probs = synthetic_labels(labels[ids], layout.crops_per_image, layout.top_k, classes,
                                      seed=[7, c])
    return {"boxes": sample_boxes(plan, ids, sizes[ids, 0], sizes[ids, 1]),
            "flips": sample_flips(plan, ids), "topk_indices": indices, "topk_probs": probs}


def as_stored(layout, arrays: dict) -> dict:
    """What the writer stores for ``arrays``: whatever it does to values on the way (e.g. the
    rounding of probabilities of format 3), taken from the writer's own layout."""
    rounded = getattr(layout, "rounded", None)
    return rounded(arrays) if rounded else arrays


def store_attributes(plan, images: int, classes: int) -> dict:
    from refinery_pipeline.store.schema import Batching
    from refinery_pipeline.labelling.precompute import software_versions
    return {"plan": plan.to_dict(),
            "refinery": {"arch": "resnet50", "weights_sha256": "0" * 64, "bn_mode": "train",
                         "temperature": 1.0, "input_size": 224,
                         "normalization": {"mean": [124, 116, 104], "std": [58, 57, 57]}},
            "dataset": {"num_images": images, "classes": [f"n{c:08d}" for c in range(classes)],
                        "image_bytes_sha256": "0" * 64, "labels_sha256": None},
            "batching": Batching(512, 8).__dict__, "software": software_versions()}


# ------------------------------------------------------------------------------ phases (children)

def memory() -> dict:
    """Peak resident memory so far, and the resident memory now, private and file-backed."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_anon_bytes": kib("RssAnon"), "rss_file_bytes": kib("RssFile")}


def setting(cfg):
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.store.schema import StoreLayout, default_chunk_size
    layout = StoreLayout(cfg["images"], cfg["K"], cfg["top_k"],
                         default_chunk_size(cfg["K"], cfg["top_k"]))
    return layout, CropPlan(seed=0, crops_per_image=cfg["K"])


def phase_write(cfg) -> dict:
    import zarr.codecs  # noqa: F401  (imported before the clock starts)
    from refinery_pipeline.store.label_store import LabelStore
    layout, plan = setting(cfg)
    sizes, labels = image_sizes(layout.num_images), ground_truth(layout.num_images, cfg["classes"])
    attrs, synth, write = store_attributes(plan, layout.num_images, cfg["classes"]), 0.0, 0.0
    start = time.perf_counter()
    store = LabelStore.create(cfg["store"], layout, attrs, labels=labels, image_sizes=sizes)
    write += time.perf_counter() - start
    top1 = mass = 0.0
    for c in range(layout.num_chunks):
        t0 = time.perf_counter()
        records = chunk_records(layout, plan, sizes, labels, c, cfg["classes"])
        t1 = time.perf_counter()
        store.write_chunk(c, records)
        write += time.perf_counter() - t1
        synth += t1 - t0
        probs = records["topk_probs"].astype(np.float64)
        top1 += probs[..., 0].sum()
        mass += probs.sum()
    t0 = time.perf_counter()
    store.finalize()
    write += time.perf_counter() - t0
    crops = layout.num_images * layout.crops_per_image
    return {"write_seconds": write, "synthesis_seconds": synth, "chunks": layout.num_chunks,
            "chunk_size": layout.chunk_size, "mean_top1_probability": top1 / crops,
            "mean_top_k_mass": mass / crops, "format_version": store.format_version,
            **memory(), **store_bytes(cfg)}


def phase_read(cfg) -> dict:
    """What ``refine train`` does with a store before its first step, timed."""
    import torch
    from refinery_pipeline.store.label_store import LabelStore
    from refinery_pipeline.loaders.crop_sources import ReplayedCrops
    from refinery_pipeline.loaders.crop_table import TABLE_FIELDS
    from refinery_pipeline.training.targets import StoredTargets
    layout, plan = setting(cfg)
    start = time.perf_counter()
    store = LabelStore.open(cfg["store"])
    records = store.read_crops()
    read_seconds = time.perf_counter() - start
    after_read = memory()
    sizes, labels = image_sizes(layout.num_images), ground_truth(layout.num_images, cfg["classes"])
    sample = sorted({0, layout.num_chunks // 2, layout.num_chunks - 1})
    equal = all(np.array_equal(getattr(records, name)[layout.chunk_range(c).start:
                                                      layout.chunk_range(c).stop], values)
                for c in sample for name, values in as_stored(store.layout, chunk_records(
                    layout, plan, sizes, labels, c, cfg["classes"])).items())
    targets = StoredTargets(records.topk_indices, records.topk_probs, cfg["classes"], "cpu")
    held = sum(v.numel() * v.element_size() for v in vars(targets).values()
               if isinstance(v, torch.Tensor))
    table = np.zeros((layout.num_images, 1, TABLE_FIELDS), np.int32)
    fill = {}
    for policy in ("cycle", "random"):
        crops = ReplayedCrops(records.boxes, records.flips, seed=0, slot_policy=policy)
        fill[policy] = []
        for epoch in range(cfg["rounds"]):
            t0 = time.perf_counter()
            crops.fill(table, epoch)
            fill[policy].append(time.perf_counter() - t0)
    rows = np.arange(layout.num_images)
    fill_correct = bool(np.array_equal(table[:, 0, :4], records.boxes[rows, crops.slots]))
    return {"read_seconds": read_seconds, "read_memory": after_read,
            "decoded_bytes": sum(v.nbytes for v in records.arrays().values()),
            "sampled_chunks": sample, "read_back_equal": bool(equal),
            "device_bytes_before": int(records.topk_indices.size * 2 + records.topk_probs.nbytes),
            "device_bytes_now": int(held), "fill_seconds": fill, "fill_correct": fill_correct,
            **memory()}


def phase_verify(cfg) -> dict:
    from click.testing import CliRunner
    from refinery_cli.main import cli  # the installed CLI (this script runs from benchmarks/)
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["verify", cfg["store"], "--cache-dir", cfg["work"]])
    seconds = time.perf_counter() - start
    return {"verify_seconds": seconds, "verify_exit": result.exit_code,
            "verify_output": result.output.strip()[-300:], **memory()}


def store_bytes(cfg) -> dict:
    """The store's bytes: all files (or objects), and per array with its largest object."""
    from refinery_pipeline.store.label_store import LabelStore
    store = LabelStore.open(cfg["store"])
    total = store.nbytes_on_disk()
    per_array, largest = {}, {}
    if not str(cfg["store"]).startswith("s3://"):
        for folder in sorted(p for p in Path(cfg["store"]).iterdir() if p.is_dir()):
            files = [f.stat().st_size for f in folder.rglob("*") if f.is_file()]
            per_array[folder.name], largest[folder.name] = sum(files), max(files)
    return {"store_bytes": total, "per_array_bytes": per_array, "largest_object_bytes": largest}


PHASES = {"write": phase_write, "read": phase_read, "verify": phase_verify}


# ------------------------------------------------------------------------------ orchestration

def run_phase(name: str, cfg: dict, env: dict = None) -> dict:
    """Run one phase in a fresh process (its own peak memory); returns what it reported."""
    done = subprocess.run([sys.executable, __file__, "--phase", name, json.dumps(cfg)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name} {cfg['store']}: {json.dumps(report)[:300]}", file=sys.stderr, flush=True)
    return report


def moto_server(work: Path):
    """A moto S3 server in its own process (its memory is not ours), and the env to reach it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; "
                               "sys.exit(main(['-H', '127.0.0.1', '-p', sys.argv[1]]))",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id="test",
                         aws_secret_access_key="test").create_bucket(Bucket="bench")
            return server, env
        except Exception:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto server did not start")


def peak_rss_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def measure(args) -> dict:
    images = max(64, round(args.images * args.scale))
    work = Path(tempfile.mkdtemp(dir=args.dir))
    cfg = {"images": images, "K": args.K, "top_k": args.top_k, "classes": args.classes,
           "rounds": args.rounds, "store": str(work / "imagenet.zarr"), "work": str(work)}
    result = {"config": cfg}
    try:
        result["local"] = run_phase("write", cfg)
        result["local"]["read"] = run_phase("read", cfg)
        result["local"]["verify"] = run_phase("verify", cfg)
        if not args.no_s3:
            server, env = moto_server(work)
            try:
                s3 = {**cfg, "store": "s3://bench/imagenet.zarr"}
                result["s3"] = run_phase("write", s3, env)
                result["s3"]["read"] = run_phase("read", s3, env)
                result["s3"]["verify"] = run_phase("verify", s3, env)
                result["s3"]["moto_peak_rss_bytes"] = peak_rss_of(server.pid)
            finally:
                server.terminate()
                server.wait()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------ report

def report(args, result: dict) -> str:
    from refinery_pipeline.store.schema import default_chunk_size
    cfg, local = result["config"], result["local"]
    crops = cfg["images"] * cfg["K"]
    gb = lambda b: f"{b / 1e9:.2f}"
    read = local["read"]
    lines = [f"# An ImageNet-sized label store: `{args.tag}`", "",
             f"{cfg['images']:,} images × K = {cfg['K']} × top-{cfg['top_k']} of "
             f"{cfg['classes']:,} classes ({crops:,} crops), chunks of "
             f"{default_chunk_size(cfg['K'], cfg['top_k'])} images ({local['chunks']} chunks), written through "
             "`LabelStore.create` / `write_chunk` / `finalize`. Boxes and flips: the real "
             f"`CropPlan` (seed 0) on synthetic image sizes ({IMAGE_SIZE_MODEL}). Labels: "
             f"synthetic ({LABEL_MODEL}); mean top-1 probability "
             f"{local['mean_top1_probability']:.3f}, mean top-{cfg['top_k']} mass "
             f"{local['mean_top_k_mass']:.3f}. Store format version "
             f"{local['format_version']} (as the writer wrote it). Each phase ran in its own "
             "process.", "",
             "## Bytes on disk", ""]
    per = local["per_array_bytes"]
    lines += markdown_table(["array", "bytes", "per crop", "largest object"],
                            [[name, f"{b:,}", f"{b / crops:.2f}",
                              f"{local['largest_object_bytes'][name] / 1e6:.2f} MB"]
                             for name, b in sorted(per.items(), key=lambda x: -x[1])]
                            + [["**store (all files)**", f"{local['store_bytes']:,}",
                                f"**{local['store_bytes'] / crops:.2f}**", ""]])
    rows = [["write (writer only; synthesis apart)", f"{local['write_seconds']:.1f}",
             f"{local['synthesis_seconds']:.1f} s synthesis", gb(local["peak_rss_bytes"])],
            ["open + `read_crops()` (checksums checked)", f"{read['read_seconds']:.1f}",
             f"{gb(read['decoded_bytes'])} GB decoded", gb(read["read_memory"]["peak_rss_bytes"])],
            ["`refine verify`", f"{local['verify']['verify_seconds']:.1f}",
             local["verify"]["verify_output"].splitlines()[-1][-40:],
             gb(local["verify"]["peak_rss_bytes"])]]
    for policy, times in read["fill_seconds"].items():
        rows.append([f"crop-table rewrite per epoch (`ReplayedCrops.fill`, {policy})",
                     f"{statistics.median(times):.2f}", f"median of {len(times)} epochs", ""])
    if "s3" in result:
        s3 = result["s3"]
        rows += [["S3 (moto): write", f"{s3['write_seconds']:.1f}",
                  f"{s3['store_bytes'] / crops:.2f} B/crop", gb(s3["peak_rss_bytes"])],
                 ["S3 (moto): open + `read_crops()`", f"{s3['read']['read_seconds']:.1f}",
                  "", gb(s3["read"]["read_memory"]["peak_rss_bytes"])],
                 ["S3 (moto): `refine verify`", f"{s3['verify']['verify_seconds']:.1f}",
                  s3["verify"]["verify_output"].splitlines()[-1][-40:],
                  gb(s3["verify"]["peak_rss_bytes"])],
                 ["moto server process", "", "holds the objects", gb(s3["moto_peak_rss_bytes"])]]
    lines += ["", "## Time and host memory", ""]
    lines += markdown_table(["phase", "seconds", "note", "peak host memory (GB)"], rows)
    lines += ["", "## Device memory a training rank holds for labels", "",
              f"Before (the whole store's labels on every GPU, int16 + float16): "
              f"{gb(read['device_bytes_before'])} GB. Now (`StoredTargets`'s tensors; each batch "
              f"brings its own rows): {read['device_bytes_now']:,} bytes.", "",
              f"Checks: read-back equals what was written (chunks {read['sampled_chunks']}): "
              f"{read['read_back_equal']}; the crop table's boxes are the replayed slots': "
              f"{read['fill_correct']}; verify exit code {local['verify']['verify_exit']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=IMAGENET_IMAGES)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of --images to write")
    p.add_argument("-K", type=int, default=40)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="epochs of crop-table rewrites timed")
    p.add_argument("--no-s3", action="store_true", help="skip the moto S3 server")
    p.add_argument("--dir", default=None, help="where to build the store [default: a temp dir]")
    p.add_argument("--results-dir", default=None, help="[default: benchmarks/results]")
    p.add_argument("--keep", action="store_true", help="keep the local store (tests check it)")
    p.add_argument("--tag", default="imagenet_store")
    p.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase[0]](json.loads(args.phase[1]))))
        return
    result = measure(args)
    if args.results_dir:
        _results.RESULTS = Path(args.results_dir)
    _results.write_results(args.tag, {"args": vars(args), **result}, report(args, result))


if __name__ == "__main__":
    main()
