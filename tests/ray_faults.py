"""Refineries that misbehave inside Ray actors (no pytest imports: actors import this module),
and a driver for a subprocess, so tests can kill actors and drivers at chosen points."""
import os
import signal
import sys
import time


class FaultyRefinery:
    """A refinery whose forward passes can be slowed, or which kills its own process once.

    ``die_after``: the process that makes that many forward passes, when ``marker`` does not yet
    exist, creates it and dies by SIGKILL (an actor lost mid-chunk, as on a preempted node);
    every later process labels normally. ``delay``: seconds slept before each forward pass.
    ``gate``: a folder where each process, before its first pass, signs in and waits until
    ``gate_count`` have (actors of several drivers start labelling together).
    """

    def __init__(self, refinery, marker=None, die_after=None, delay=0.0, gate=None,
                 gate_count=2):
        self.refinery, self.marker, self.die_after, self.delay = refinery, marker, die_after, delay
        self.gate, self.gate_count, self.calls = gate, gate_count, 0

    def _wait_at_gate(self, timeout=300):
        os.makedirs(self.gate, exist_ok=True)
        open(os.path.join(self.gate, str(os.getpid())), "w").close()
        deadline = time.monotonic() + timeout
        while len(os.listdir(self.gate)) < self.gate_count and time.monotonic() < deadline:
            time.sleep(0.05)

    def __getattr__(self, name):
        if name == "refinery":  # while unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.refinery, name)

    def to(self, device):
        self.refinery = self.refinery.to(device)
        return self

    def probabilities(self, images):
        if self.gate is not None and not self.calls:
            self._wait_at_gate()
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after \
                and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        return self.refinery.probabilities(images)


def drive(data, store, ckpt, address, delay, gate=None, chunk_size=8, actors=1,
          only_chunks=None):
    """A driver as ``refine precompute --engine ray`` runs one (``address`` "local": the local
    engine instead), with slow forward passes; prints the summary line's counts."""
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.dataset import ImageDataset
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.labelling.ray_engine import RayOptions
    from refinery_pipeline.labelling.refinery import Refinery
    refinery = FaultyRefinery(Refinery.from_checkpoint(ckpt), delay=float(delay), gate=gate)
    s = precompute(ImageDataset(data), store, refinery, CropPlan(seed=0, crops_per_image=3),
                   top_k=3, crop_batch=32, chunk_size=int(chunk_size), num_workers=1,
                   progress=False, only_chunks=only_chunks,
                   ray_options=None if address == "local" else
                   RayOptions(address=address, actors=int(actors)))
    print(f"{s.chunks_written} chunks written, {s.chunks_skipped} already done, "
          f"{s.chunks_claimed_elsewhere} elsewhere", flush=True)


if __name__ == "__main__":
    drive(*sys.argv[1:])
