"""Shared by the accuracy benchmarks: run `refine` commands as a user would, resumably.

Each training is a ``refine train`` subprocess (so the CLI itself is what gets measured), logs
to a file, and is skipped when its ``model.pt`` exists, so an interrupted benchmark continues
where it stopped. Several trainings may run side by side with the cores split between them;
then give each one ``--workers`` of at most its share of cores too: FFCV's numba decoding threads
spin while they wait, and on 2 cores two online-teacher runs with 2 workers each took 145 s per
epoch against 36 s with 1 worker each (ResNet-18 @ 32 px, measured 2026-11-25).
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Student run names shared by the scripts: with the same --work and settings, one script reuses
# the finished students of another (adversarial_jitter.py, refined_vs_ground_truth.py and
# top_k_rest.py all train these two).
GROUND_TRUTH, ONLINE = "ground truth", "online, fresh crops, BN train"



def resume_flag(out: Path) -> list:
    """``--resume`` for a run interrupted after a checkpoint, nothing for a fresh one (refine
    train refuses --resume without OUT/last.pt, and a fresh run into a used --out)."""
    return ["--resume"] if (Path(out) / "last.pt").is_file() else []

def run_logged(command: list[str], log: Path, threads: int) -> float:
    """Run one CLI command with ``threads`` intra-op threads, output to ``log``; return seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def device_name() -> str:
    """Where the trainings ran, for the results file."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def recorded_device(work: Path, collect_only: bool) -> str:
    """The device the runs in ``work`` trained on: this machine's, recorded for a later
    ``--collect-only`` (which may run elsewhere, on run directories copied back)."""
    marker = work / "device"
    if not collect_only:
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(device_name() + "\n")
    return marker.read_text().strip() if marker.exists() else device_name()


def final_metrics(run_dir: Path) -> dict:
    """The last evaluated epoch of a finished ``refine train`` run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "val_top1" in line][-1]


def overfitting_gap(run_dir: Path, threads: int = 1, workers: int = 1) -> dict:
    """A finished run's top-1 on its own training images and on validation, both centred and
    evaluated alike (``refine evaluate --split train|val``, each once: kept as
    ``RUN/eval_SPLIT.json``), and the gap between them: the paper's measure of overfitting."""
    found = {}
    for split in ("train", "val"):
        path = Path(run_dir) / f"eval_{split}.json"
        if not path.is_file():
            run_logged(["refine", "evaluate", str(run_dir), "--split", split, "--workers",
                        str(workers)], Path(run_dir) / f"evaluate_{split}.log", threads)
        found[split] = json.loads(path.read_text())[f"{split}_top1"]
    return {"train_top1": found["train"], "val_top1": found["val"],
            "gap": found["train"] - found["val"]}


def precompute_seconds(store: Path) -> float | None:
    """How long the finished ``refine precompute`` of ``store`` took; None if it has not run."""
    marker = store.with_suffix(".seconds")
    return float(marker.read_text()) if marker.exists() else None


def runs_by_name(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished runs grouped by setting name (their seeds together), in first-seen order."""
    grouped = {}
    for row in rows:
        grouped.setdefault(row["name"], []).append(row)
    return grouped


def threads_per_job(jobs: int) -> int:
    """Intra-op threads for each of ``jobs`` commands run side by side on this machine."""
    return max(1, (os.cpu_count() or 1) // jobs)


def precompute_once(work: Path, store: Path, options: list[str],
                    threads: int = threads_per_job(1)) -> float:
    """``refine precompute`` into ``store`` unless done before; return the seconds it took
    (wall time: with other stores made beside it, that includes sharing the machine)."""
    seconds = precompute_seconds(store)
    if seconds is None:
        seconds = run_logged(["refine", "precompute", *options, str(store)],
                             work / "logs" / f"precompute_{store.stem}.log", threads=threads)
        store.with_suffix(".seconds").write_text(f"{seconds}\n")
    return seconds


def describe_students(a: dict) -> str:
    """The options of :func:`add_student_arguments` (``vars(args)``) for a results header."""
    bn = (f", BatchNorm statistics recomputed over {a['precise_bn']} training batches before "
          "evaluation (`--precise-bn`)" if a.get("precise_bn") else "")
    return (f"{a['arch']} @ {a['res']} px, {a['epochs']} epochs, batch {a['batch_size']}, "
            f"lr {a['lr']}{bn}")


def add_student_arguments(p, work: str, epochs: int):
    """The options every student-training benchmark shares (see :meth:`StudentRuns.from_args`)."""
    p.add_argument("--work", default=work)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=2, help="loader workers per student")
    p.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    p.add_argument("--precise-bn", type=int, default=0,
                   help="students' `refine train --precise-bn` batches (default 0: off)")


class StudentRuns:
    """Train students with shared options; each run is a dict with a name, seed and options."""

    def __init__(self, work: Path, common: list[str], epochs: int, jobs: int,
                 collect_only: bool = False):
        self.work, self.common, self.epochs, self.jobs = work, common, epochs, jobs
        self.threads = threads_per_job(jobs)
        self.collect_only = collect_only  # report finished runs, train none

    @classmethod
    def from_args(cls, args, collect_only: bool = False) -> "StudentRuns":
        """Students of ``args.data`` with the options of :func:`add_student_arguments`."""
        common = [args.data, "--arch", args.arch, "--res", str(args.res), "--batch-size",
                  str(args.batch_size), "--lr", str(args.lr), "--workers", str(args.workers)]
        if args.precise_bn:
            common += ["--precise-bn", str(args.precise_bn)]
        return cls(Path(args.work), common, args.epochs, args.jobs, collect_only)

    def run_dir(self, run: dict) -> Path:
        """Where a run (a name and a seed) trains: the same place for every script."""
        name = run["name"].replace(" ", "_").replace("=", "").replace(",", "")
        return self.work / "students" / f"{name}_seed{run['seed']}"

    def train(self, run: dict) -> dict | None:
        """Train one student unless its model.pt exists; return the run with its final metrics
        (None for a run that is not finished when only collecting)."""
        out = self.run_dir(run)
        if self.collect_only:
            # A run is finished once its wall time is recorded; run directories copied back from
            # another machine carry metrics and seconds without the (large) checkpoints.
            if not (out / "seconds").exists():
                print(f"{run['name']:>34} seed {run['seed']}: not finished, left out", flush=True)
                return None
        elif not (out / "model.pt").exists():
            seconds = run_logged(
                ["refine", "train", *self.common, "--out", str(out), "--epochs", str(self.epochs),
                 "--seed", str(run["seed"]), "--eval-every", str(self.epochs),
                 *resume_flag(out), *run["options"]],
                self.work / "logs" / f"{out.name}.log", threads=self.threads)
            (out / "seconds").write_text(f"{seconds}\n")
        m = final_metrics(out)
        row = {k: v for k, v in run.items() if k != "options"}
        row.update(val_top1=m["val_top1"], val_top5=m["val_top5"],
                   seconds=float((out / "seconds").read_text()))
        row.update({k: m[k] for k in ("adv_loss", "adv_rms") if k in m})  # adversarial runs
        print(f"{run['name']:>34} seed {run['seed']}: {row['val_top1']:.2f}", flush=True)
        return row

    def train_all(self, runs: list[dict]) -> list[dict]:
        """Every finished run's row, in the order given."""
        with ThreadPoolExecutor(self.jobs) as pool:
            return [row for row in pool.map(self.train, runs) if row is not None]
