"""Claim: `refine precompute --engine ray` costs little over the local engine, and a second
actor adds throughput (docs/ray.md, issue 27's speed section).

One run, one machine, the same plan and refinery: the local engine, then the Ray engine with
one actor (goal: >= 0.9 of the local engine's crops/s) and with two (against one), on a local
Ray cluster started once before the runs (its start-up is reported apart: a cluster is started
once per job, not per store). Each run's time is the whole ``precompute`` call: store creation,
each actor's start-up (imports, the refinery, the loader's compilation) and the labelling.
Every store is checked to be byte-identical to the local engine's.

CPU (imagenette-96 at 32 px, a ResNet-18 refinery at random init: weights do not change speed;
K = 16 and chunks of 256 images, so start-up is amortised and two actors share 37 chunks):
  cd benchmarks && python ray_engine.py /work/shared/datasets/imagenette-96 --arch resnet18 \
      --res 32 -K 16 --chunk-size 256 --tag ray_engine_cpu
A smaller run (K = 4, chunks of 1,024: 10 chunks) shows the start-up unamortised
(results/ray_engine_cpu_k4.md).
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _results import markdown_table, write_results

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.labelling.precompute import precompute, software_versions
from refinery_pipeline.labelling.ray_engine import RayOptions
from refinery_pipeline.labelling.refinery import Refinery


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("-K", "--crops-per-image", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="decoding threads per process/actor")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process/actor")
    p.add_argument("--tag", default="ray_engine")
    return p.parse_args()


def store_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_once(name, dataset, refinery, args, work: Path, ray_options=None) -> dict:
    location = work / f"{name}.zarr"
    started = time.perf_counter()
    plan = CropPlan(seed=0, crops_per_image=args.crops_per_image)
    s = precompute(dataset, location, refinery, plan, 5, args.batch_size, args.chunk_size,
                   args.workers, progress=False, ray_options=ray_options)
    seconds = time.perf_counter() - started
    return {"engine": name, "crops": s.crops, "chunks": s.chunks_written, "seconds": seconds,
            "crops_per_second": s.crops / seconds, "warmup_seconds": s.warmup_seconds,
            "steady_crops_per_second": s.steady_crops_per_second, "location": location}


def main():
    args = get_args()
    import ray
    torch.set_num_threads(args.threads)
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    model = create_model(args.arch, len(dataset.classes))
    refinery = Refinery(model, args.arch, "random-init", args.res, bn_mode="train")
    work = Path(tempfile.mkdtemp(prefix="ray-engine-bench-"))
    try:
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
        cluster_seconds = time.perf_counter() - started
        runs = [run_once("local", dataset, refinery, args, work)]
        for actors in (1, 2):
            runs.append(run_once(f"ray, {actors} actor{'s' * (actors > 1)}", dataset, refinery,
                                 args, work, RayOptions(actors=actors, cpus_per_actor=1)))
        reference = store_bytes(runs[0]["location"])
        for r in runs:
            r["identical_to_local"] = store_bytes(r.pop("location")) == reference
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    local, one, two = (r["crops_per_second"] for r in runs)
    steady = [r["steady_crops_per_second"] for r in runs]
    result = {"args": vars(args), "images": dataset.num_images, "cpus": torch.get_num_threads(),
              "software": {**software_versions(), "ray": ray.__version__},
              "cluster_start_seconds": cluster_seconds, "runs": runs,
              "ratios": {"ray_1_actor_vs_local": one / local, "ray_2_actors_vs_1": two / one,
                         "steady_ray_1_actor_vs_local": steady[1] / steady[0],
                         "steady_ray_2_actors_vs_1": steady[2] / steady[1]}}
    write_results(args.tag, result, to_markdown(result))


def to_markdown(r) -> str:
    a = r["args"]
    lines = [f"# Ray engine against the local engine: `{a['tag']}`", "",
             f"CPU, {a['threads']} torch thread(s) and {a['workers']} decoding thread(s) per "
             f"process or actor; refinery {a['arch']} @ {a['res']} px (BN train), K = "
             f"{a['crops_per_image']}, batch {a['batch_size']}, chunks of {a['chunk_size']} "
             f"images; {r['images']:,} images of `{a['data']}`. A local Ray cluster (2 CPUs) "
             f"started once before the runs in {r['cluster_start_seconds']:.1f} s (not counted). "
             "Each time is the whole precompute call, actors' start-up included. Warm-up: until "
             "the first loader batch is labelled (local) or the first chunk is written (Ray, "
             "whose driver sees chunks only); steady crops/s: after it.", ""]
    lines += markdown_table(
        ["engine", "crops", "chunks", "seconds", "crops/s", "warm-up s", "steady crops/s",
         "store identical to local"],
        [[x["engine"], f"{x['crops']:,}", x["chunks"], f"{x['seconds']:.1f}",
          f"{x['crops_per_second']:,.0f}", f"{x['warmup_seconds']:.1f}",
          f"{x['steady_crops_per_second']:,.0f}", x["identical_to_local"]] for x in r["runs"]])
    q = r["ratios"]
    lines += ["", f"Ray with one actor / local: **{q['ray_1_actor_vs_local']:.2f}** (goal >= 0.9), "
              f"{q['steady_ray_1_actor_vs_local']:.2f} after warm-up. Two actors / one: "
              f"**{q['ray_2_actors_vs_1']:.2f}**, {q['steady_ray_2_actors_vs_1']:.2f} after "
              "warm-up."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
