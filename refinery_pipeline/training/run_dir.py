"""A run directory: refused when it holds another run, resumed only with the same settings (the
runtime ones may change), its config, metrics log and checkpoints written as epochs finish.
"""
import itertools
import json
import math
import os
import pickle
from pathlib import Path

import torch

from ..core.errors import CheckpointError, RefineryError, RunError, first_line
from ..models.checkpoint_safety import load_weights_file
from .config import TrainConfig
from .schedule import milestone_problem

RUN_FILES = ("metrics.jsonl", "last.pt", "model.pt")  # what a run that trained an epoch leaves


# Settings that say how a run executes, not what it computes: a --resume may change them. Others
# (lr, epochs, data, batch size, ...) would continue the saved state under another schedule or
# on other data, so they must match config.json. --device and --compile change float rounding
# only; --eval-every only which epochs are evaluated; --skip-store-check only whether a verified
# store is checked again; --trust-checkpoint only whether a file that runs code may load.
RESUMABLE_CHANGES = frozenset({"out_dir", "resume", "workers", "device", "compile", "progress",
                               "cache_dir", "eval_every", "skip_store_check", "trust_checkpoint"})


def _check_run_dir(cfg: TrainConfig, out: Path):
    """Runs never mix their files: a fresh run refuses an --out holding another run (its log
    would read epochs 1, 2, 1), and --resume refuses one with no run to continue."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: not a directory; choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and not (out / "last.pt").is_file():
        raise RunError(f"{out / 'last.pt'}: not found, so there is no run to resume; drop --resume "
                       "to start a fresh run" + (" in another --out" if found else ""))
    if not cfg.resume and found:
        raise RunError(f"{out}: already holds a run ({', '.join(found)}); pass --resume to "
                       "continue it, or choose another --out")


def _saved_config(out: Path) -> dict:
    """The ``config.json`` of the run to resume: what its settings must match."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        saved = getattr(exc, "strerror", None) or str(exc)
    if not isinstance(saved, dict):
        raise RunError(f"{path}: cannot be read ({saved}), so the settings of the run to resume "
                       "are unknown; restore it, or start a new run in another --out")
    return saved


def _check_same_run(out: Path, saved: dict, settings: dict):
    """--resume continues the run recorded in ``config.json`` (``saved``; None for a fresh run):
    refuse settings that differ, other than :data:`RESUMABLE_CHANGES`, naming the first. Keys a
    saved config lacks (written before they existed) are not compared."""
    if saved is None:
        return
    now = json.loads(json.dumps(settings))  # compare as saved: tuples as lists, 1 as 1.0
    for key, value in now.items():
        if key in RESUMABLE_CHANGES or key not in saved or saved[key] == value:
            continue
        raise RunError(f"{out / 'config.json'}: the run was started with {key} "
                       f"{_shown(saved[key])}, this resume has {key} {_shown(value)}; resume "
                       "with the run's settings and data, or start a new run in another --out")


def _shown(value, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _maybe_resume(cfg, out, model, optimizer, scheduler) -> int:
    """The epoch ``out/last.pt`` ends at (0 for a fresh run), with model, optimizer, schedule
    and RNG restored from it."""
    if not cfg.resume:
        return 0
    last = out / "last.pt"
    try:
        state = load_weights_file(last, cfg.trust_checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["epoch"])
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{last}: cannot resume from it ({first_line(exc)}); it is "
                              "not this run's last.pt; start a new run in another --out") from None


def _check_epochs(cfg: TrainConfig):
    """``--epochs 0`` would save an untrained model.pt and report metrics it never computed;
    milestones that do not fit the scheduler or the run would train another schedule."""
    if cfg.epochs < 1:
        raise RefineryError(f"--epochs {cfg.epochs}: nothing to train; pass --epochs 1 or more")
    problem = milestone_problem(cfg.lr_scheduler, cfg.lr_milestones, cfg.epochs)
    if problem:
        raise RefineryError(problem)


def _check_epochs_left(cfg: TrainConfig, out: Path, start_epoch: int):
    """Resuming a finished run would train nothing and report metrics it never computed."""
    if start_epoch >= cfg.epochs:
        raise RunError(f"{out / 'last.pt'}: the run already trained all {cfg.epochs} epochs, so "
                       "there is nothing to resume (its final weights are in last.pt and "
                       "model.pt); start a new run in another --out")


def _record_run(out: Path, run_config: dict, start_epoch: int):
    """Write a fresh run's ``config.json``. A resumed run keeps its own, and forgets the epochs
    it logged but never checkpointed (killed between the two): it trains and logs them again."""
    out.mkdir(parents=True, exist_ok=True)
    if not run_config["resume"]:
        (out / "config.json").write_text(json.dumps(run_config, indent=1))
        return
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True) if log.is_file() else []
    kept = list(itertools.takewhile(lambda line: _epoch_of(line) <= start_epoch, lines))
    if len(kept) < len(lines):
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)


def _epoch_of(line: str) -> float:
    """A metrics.jsonl line's epoch; infinite for a line torn by a kill mid-write."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _log(out: Path, record: dict, echo: bool):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if echo:
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()
                 if not k.endswith("per_class")}
        print(json.dumps(shown), flush=True)
