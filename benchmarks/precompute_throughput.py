"""Claim: `refine precompute` runs close to the refinery's own inference speed.

Measures, in one run and on one device: the refinery's model-only throughput on random input
already on the device (same batch size, BN mode, precision and memory format), then full
precompute runs (decode + crop + forward + top-k + store writes) on a real data set, reporting
steady-state crops/s (after the first loader batch, i.e. without one-off numba compilation) and
its ratio to the ceiling, plus how time grows with K and with N.

GPU (issue goal: ratio >= 0.8 for ResNet-50 @ 96, BN train):
  python benchmarks/precompute_throughput.py DATA --arch resnet50 --res 96 --batch-size 512 \
      --workers 16 --tag precompute_h100
CPU at reduced scale:
  python benchmarks/precompute_throughput.py DATA --arch resnet18 --res 32 --batch-size 512 \
      --workers 2 --tag precompute_cpu
"""
import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from _results import markdown_table, write_results

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.models.registry import create_model
from refinery_pipeline.labelling.precompute import precompute, software_versions
from refinery_pipeline.labelling.refinery import Refinery, autocast_for
from refinery_pipeline.core.devices import resolve_device

def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--bn-mode", default="train")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n-fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
    p.add_argument("--tag", default="precompute")
    return p.parse_args()


@torch.no_grad()
def model_ceiling(refinery: Refinery, batch: int, seconds: float) -> float:
    """Images/s of the refinery alone on random input already on the device."""
    x = torch.randn(batch, 3, refinery.input_size, refinery.input_size, device=refinery.device)
    x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if refinery.device.type == "cuda" else (lambda: None)

    def step():
        with autocast_for(refinery.device):
            refinery.model(x).float().softmax(1).topk(5, dim=1)

    for _ in range(3):
        step()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    sync()
    return done / (time.perf_counter() - start)


class UtilisationSampler:
    """Mean GPU utilisation (%) while running, from NVML via torch; None on the CPU."""

    def __init__(self, device):
        self.device, self.samples, self.running = device, [], False

    def __enter__(self):
        if self.device.type == "cuda":
            self.running = True
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self):
        while self.running:
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:
                return
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running = False

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_once(dataset, refinery, K, args, only_fraction=1.0):
    work = Path(tempfile.mkdtemp(prefix="precompute-bench-"))
    try:
        chunk = 1024
        chunks = -(-dataset.num_images // chunk)
        only = range(max(1, round(chunks * only_fraction))) if only_fraction < 1 else None
        with UtilisationSampler(refinery.device) as util:
            s = precompute(dataset, work / "s.zarr", refinery, CropPlan(seed=0, crops_per_image=K),
                           5, args.batch_size, chunk, args.workers, progress=False,
                           only_chunks=only)
        size = sum(p.stat().st_size for p in (work / "s.zarr").rglob("*") if p.is_file())
        assert LabelStore.open(work / "s.zarr").done_chunks().sum() == s.chunks_written
        return {"K": K, "images": s.crops // K, "crops": s.crops, "seconds": s.seconds,
                "warmup_seconds": s.warmup_seconds, "crops_per_second": s.crops_per_second,
                "steady_crops_per_second": s.steady_crops_per_second,
                "gpu_utilisation": util.mean, "store_bytes": size}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    args = get_args()
    device = resolve_device("auto")
    dataset = open_dataset(args.data, "train", num_workers=args.workers)
    model = create_model(args.arch, len(dataset.classes))  # weights do not change speed
    refinery = Refinery(model, args.arch, "random-init", args.res, bn_mode=args.bn_mode,
                        device=device)
    torch.set_num_threads(args.workers)
    ceiling_before = model_ceiling(refinery, args.batch_size, args.ceiling_seconds)
    runs = [run_once(dataset, refinery, K, args) for K in args.ks]
    runs += [run_once(dataset, refinery, 10, args, f) for f in args.n_fractions if f < 1]
    ceiling_after = model_ceiling(refinery, args.batch_size, args.ceiling_seconds)
    ceiling = (ceiling_before + ceiling_after) / 2
    for r in runs:
        r["ratio_to_ceiling"] = r["steady_crops_per_second"] / ceiling
    result = {"args": vars(args), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              "CPU", "threads": torch.get_num_threads(), "software": software_versions(),
              "ceiling_images_per_second": {"before": ceiling_before, "after": ceiling_after},
              "runs": runs}
    write_results(args.tag, result, to_markdown(result))


def _steady_columns(run: dict) -> list[str]:
    """Steady crops/s and its ratio; n/a when the run was a single loader batch (all warm-up)."""
    if not run["steady_crops_per_second"]:
        return ["n/a (one loader batch)", "n/a"]
    return [f"{run['steady_crops_per_second']:,.0f}", f"{run['ratio_to_ceiling']:.2f}"]


def to_markdown(r) -> str:
    a, c = r["args"], r["ceiling_images_per_second"]
    lines = [f"# Precompute throughput: `{a['tag']}`", "",
             f"Device: {r['device_name']} ({r['threads']} threads). Refinery {a['arch']} @ "
             f"{a['res']} px, BN {a['bn_mode']}, batch {a['batch_size']}, {a['workers']} decode "
             f"workers, top-5. Data: `{a['data']}`.", "",
             f"Model-only ceiling (random input on the device, same batch/BN/precision): "
             f"{c['before']:,.0f} img/s before the runs, {c['after']:,.0f} after.", ""]
    lines += markdown_table(
        ["K", "images", "crops", "total s", "warm-up s", "crops/s", "steady crops/s",
         "ratio to ceiling", "GPU util %", "bytes/crop"],
        [[x["K"], f"{x['images']:,}", f"{x['crops']:,}", f"{x['seconds']:.1f}",
          f"{x['warmup_seconds']:.1f}", f"{x['crops_per_second']:,.0f}",
          *_steady_columns(x),
          "n/a" if x["gpu_utilisation"] is None else f"{x['gpu_utilisation']:.0f}",
          f"{x['store_bytes'] / x['crops']:.1f}"] for x in r["runs"]])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
