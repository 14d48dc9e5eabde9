"""Figures to look at instead of reading JSON: training runs (``refine plot``) and a store's
crops with their labels (``refine show``).

``refine plot`` looks at one or several ``refine train`` runs.

Two panels, one colour per run: validation top-1 (solid) and top-1 on the training crops
(dashed) per epoch, where the gap between them is the overfitting the paper's refinery reduces;
and per-class validation (filled) and training (hollow) accuracy at each run's last evaluated
epoch, the paper's Fig. 5 view, with classes ordered by the first run's validation accuracy.
Reads only ``OUT/metrics.jsonl`` and ``OUT/config.json``, so it works on a run still training.
"""
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ArgumentError, RefineryError, RefineryWarning
from ..models.imagenet_classes import readable_name

CLASS_NAMES_SHOWN = 40  # above this many classes the per-class axis drops its tick labels


@dataclass
class RunMetrics:
    name: str
    epochs: list[dict]        # every metrics.jsonl record, in order
    classes: list[str]

    @property
    def evaluated(self) -> list[dict]:
        return [r for r in self.epochs if "val_top1" in r]


def read_run(run_dir: str | os.PathLike, name: str = None) -> RunMetrics:
    """A run's per-epoch records and class names; a one-line error for anything else."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise RefineryError(f"{run}: no metrics.jsonl; pass the --out directory of a "
                            "`refine train` run")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise RefineryError(f"{metrics}: not JSON lines ({exc.msg}, line {exc.lineno}); was it "
                            "written by `refine train`?") from None
    records = _last_run(metrics, records)
    if not any("val_top1" in r for r in records):
        raise RefineryError(f"{run}: no evaluated epoch yet; plot again after the first "
                            "evaluation (`refine train --eval-every`)")
    num_classes = len(next(r for r in records if "val_per_class" in r)["val_per_class"])
    classes = _recorded_classes(run)
    if classes is None:  # written before config.json named the classes: fractions, not percent
        for r in records:
            if "train_per_class" in r:
                r["train_per_class"] = [100 * v for v in r["train_per_class"]]
    if classes is None or len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]
    return RunMetrics(name or run.name, records, classes)


def _last_run(metrics: Path, records: list[dict]) -> list[dict]:
    """The last run's records, one per epoch. Before `refine train` refused it, a rerun appended
    to an old run's log (epochs 1, 2, 1: plotting both draws a stale line), and a resume after a
    kill between logging and checkpointing logged an epoch twice (1, 2, 2, 3: the later counts)."""
    restarts = [i for i, r in enumerate(records) if i and r.get("epoch") == 1]
    if restarts:
        warnings.warn(f"{metrics}: holds {len(restarts) + 1} runs (epoch 1 again at record "
                      f"{restarts[-1] + 1}); plotting only the last one", RefineryWarning,
                      stacklevel=3)
        records = records[restarts[-1]:]
    return list({r.get("epoch"): r for r in records}.values())


def _recorded_classes(run: Path) -> list[str] | None:
    """The class names `refine train` records in config.json (since per-class training accuracy
    is logged in percent, like everything else); None for older runs."""
    config = run / "config.json"
    return json.loads(config.read_text()).get("classes") if config.is_file() else None


def plot_runs(runs: list[RunMetrics], out: str | os.PathLike) -> Path:
    """Write the two-panel figure for ``runs`` to ``out`` (any format matplotlib writes)."""
    plt = _pyplot()

    classes = runs[0].classes
    if any(r.classes != classes for r in runs[1:]):
        raise RefineryError("runs trained on different classes cannot share the per-class "
                            "panel; plot them separately")
    fig, (curves, per_class) = plt.subplots(
        1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.4]})
    order = sorted(range(len(classes)), key=lambda c: -runs[0].evaluated[-1]["val_per_class"][c])
    for run in runs:
        colour = _draw_curves(curves, run)
        _draw_per_class(per_class, run, order, colour)
    curves.set(xlabel="epoch", ylabel="top-1 (%)",
               title="validation (solid) and training crops (dashed)")
    per_class.set(ylabel="top-1 (%)", title="per class at the last evaluation: "
                  "validation (filled), training crops (hollow)")
    if len(classes) <= CLASS_NAMES_SHOWN:
        per_class.set_xticks(range(len(order)), [readable_name(classes[c]) for c in order],
                             rotation=45, ha="right", fontsize=8)
    else:
        per_class.set_xlabel(f"{len(classes)} classes, by the first run's validation accuracy")
    for ax in (curves, per_class):
        ax.legend(fontsize=8)
    return _save(fig, out)


def _draw_curves(ax, run: RunMetrics) -> str:
    """Validation top-1 at each evaluation, training-crop top-1 every epoch; returns the colour."""
    evaluated = run.evaluated
    line, = ax.plot([r["epoch"] for r in evaluated], [r["val_top1"] for r in evaluated],
                    marker=".", label=f"{run.name}: val {evaluated[-1]['val_top1']:.2f}")
    ax.plot([r["epoch"] for r in run.epochs], [r["train_top1"] for r in run.epochs],
            linestyle="--", color=line.get_color())
    return line.get_color()


def _draw_per_class(ax, run: RunMetrics, order: list[int], colour: str):
    """Per-class validation (filled) and training-crop (hollow) top-1 at the last evaluation."""
    last = run.evaluated[-1]
    xs = range(len(order))
    ax.plot(xs, [last["val_per_class"][c] for c in order], marker="o", linestyle="none",
            color=colour, label=f"{run.name} (epoch {last['epoch']})")
    if "train_per_class" in last:
        ax.plot(xs, [last["train_per_class"][c] for c in order], marker="o", linestyle="none",
                markerfacecolor="none", color=colour)


def read_gap(run_dir: str | os.PathLike) -> dict:
    """A run's ``refine evaluate`` results on both splits of the data it trained on
    (``eval_train.json``, ``eval_val.json``; never another data set's), via
    :func:`.evaluation.read_evaluation`: a one-line error naming the command for a missing one."""
    from ..training.evaluation import read_evaluation
    found = {}
    for split in ("train", "val"):
        found.update(read_evaluation(run_dir, split))
    return found


def plot_gap(runs: list[str], names: list[str], classes: list[str],
             out: str | os.PathLike) -> Path:
    """The paper's overfitting view (Fig. 1, Figs. 4-6) of several runs, e.g. generations:
    top-1 on the training images and on validation, both centred and evaluated alike, with the
    gap between them; and the gap per class, classes ordered by the first run's gap."""
    plt = _pyplot()
    gaps = [read_gap(run) for run in runs]
    fig, (overall, per_class) = plt.subplots(
        1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.4]})
    xs = range(len(runs))
    overall.bar([x - 0.2 for x in xs], [g["train_top1"] for g in gaps], 0.4, label="train images")
    overall.bar([x + 0.2 for x in xs], [g["val_top1"] for g in gaps], 0.4, label="validation")
    for x, g in zip(xs, gaps):
        overall.annotate(f"gap {g['train_top1'] - g['val_top1']:.1f}", (x, g["train_top1"]),
                         ha="center", va="bottom", fontsize=8)
    overall.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    overall.set(ylabel="top-1 (%)", title="top-1 on the training images and on validation")
    per_class_gap = [[t - v for t, v in zip(g["train_per_class"], g["val_per_class"])]
                     for g in gaps]
    order = sorted(range(len(classes)), key=lambda c: -per_class_gap[0][c])
    for name, gap in zip(names, per_class_gap):
        per_class.plot(range(len(order)), [gap[c] for c in order], marker="o", label=name)
    per_class.axhline(0, color="grey", linewidth=0.8)
    per_class.set(ylabel="train - validation top-1 (points)", title="overfitting gap per class")
    if len(classes) <= CLASS_NAMES_SHOWN:
        per_class.set_xticks(range(len(order)), [readable_name(classes[c]) for c in order],
                             rotation=45, ha="right", fontsize=8)
    for ax in (overall, per_class):
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_stored_crops(crops, out: str | os.PathLike, max_crops: int = 8) -> Path:
    """One row per image: its first ``max_crops`` stored crops, each titled with the stored top-1
    class and probability, in red where it is not the image's ground-truth class (the crops
    the paper's refinery relabels)."""
    plt = _pyplot()

    rows, cols = len(crops.images), min(max_crops, crops.pixels.shape[1])
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 0.6, 1.6 * rows), squeeze=False)
    for r in range(rows):
        truth = int(crops.labels[r])
        for c in range(cols):
            ax, top1 = axes[r, c], int(crops.topk_indices[r, c, 0])
            ax.imshow(crops.pixels[r, c])
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{readable_name(crops.classes[top1])} {crops.topk_probs[r, c, 0]:.2f}",
                         fontsize=7, color="black" if top1 == truth else "red")
        axes[r, 0].set_ylabel(f"#{crops.images[r]}\n{readable_name(crops.classes[truth])}",
                              fontsize=7)
    fig.suptitle("stored crops and their top-1 labels (red: not the image's class)", fontsize=9)
    return _save(fig, out)


def plot_compared_crops(crops, labels: list, names: list, out: str | os.PathLike,
                        max_crops: int = 4, top: int = 3) -> Path:
    """The same stored crops labelled by several stores (``labels``: ``(indices, probs)`` per
    store, named ``names``), each crop over its top-``top`` classes per store: how the labels of
    a crop change across generations of refineries (the paper's Figs. 7-8). Red: a store's
    top-1 is not the image's class."""
    plt = _pyplot()
    rows, cols = len(crops.images), min(max_crops, crops.pixels.shape[1])
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.6, (2.2 + 0.42 * len(names))
                                                  * rows), squeeze=False)
    for r in range(rows):
        truth = int(crops.labels[r])
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(crops.pixels[r, c])
            ax.set_xticks([]), ax.set_yticks([])
            lines = [f"{name}: " + ", ".join(
                f"{readable_name(crops.classes[int(i)])[:11]} {p:.2f}"
                for i, p in zip(indices[r, c, :top], probs[r, c, :top]))
                for name, (indices, probs) in zip(names, labels)]
            wrong = [int(indices[r, c, 0]) != truth for indices, _ in labels]
            ax.set_xlabel("\n".join(lines), fontsize=6, loc="left",
                          color="red" if wrong[-1] else "black")
        axes[r, 0].set_ylabel(f"#{crops.images[r]}\n{readable_name(crops.classes[truth])}",
                              fontsize=7)
    fig.suptitle(f"the same crops, each store's top-{top}\n(red: the last store's top-1 is not "
                 "the image's class)", fontsize=9)
    return _save(fig, out)


def _pyplot():
    """matplotlib's pyplot drawing into files, never a window (no display on servers)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_formats() -> list:
    """The file extensions matplotlib writes (without the dot), sorted."""
    from matplotlib.backend_bases import FigureCanvasBase
    return sorted(FigureCanvasBase.get_supported_filetypes())


def figure_path(out: str | os.PathLike, option: str = "--out") -> Path:
    """``out`` as a figure file matplotlib can write, checked before any work is done for it:
    an unknown extension would fail only after the figure was drawn (with matplotlib's
    traceback), and a missing one would write ``out.png`` while ``out`` was reported.

    Raises
    ------
    ArgumentError
        The extension is missing or one matplotlib has no writer for.
    """
    out = Path(out)
    formats = figure_formats()
    kind = out.suffix[1:].lower()
    if kind not in formats:
        what = f"matplotlib cannot write .{kind} files" if kind else "no file extension"
        raise ArgumentError(f"{option} {out}: {what}; give a file name ending in one of "
                            f"{', '.join('.' + f for f in formats)} (e.g. {out.stem}.png)")
    return out


def _save(fig, out: str | os.PathLike) -> Path:
    try:
        out = figure_path(out)
    except ArgumentError:
        _pyplot().close(fig)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out
