"""``refine evaluate``: a trained model's accuracy on the centred images of either split.

The paper measures overfitting as the gap between top-1 on the *training images* and on the
validation images (Fig. 1, Figs. 4-6), both evaluated the same way. ``refine train`` logs a
training accuracy too, but as a running average over augmented crops with the weights still
moving, which is not that: a crop is harder than the centred image, so that number cannot show
whether a network memorised its training set. This module evaluates any checkpoint on the
centred square of every image of the split asked for, exactly as validation is evaluated.

Each result records the data set it measured (path and fingerprint), and a run directory keeps
the results of the data it trained on apart from any other data's: ``eval_<split>.json`` for
its own, ``eval_<split>-<fingerprint id>.json`` for another data set, so evaluating a run on
other data never overwrites what ``refine plot --gap`` reads.
"""
import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..core.errors import RefineryWarning, RunError
from ..labelling.refinery import autocast_for
from ..models.tensors import to_model_input

SPLITS = ("train", "val")


def checkpoint_of(run) -> Path:
    """The model of ``run``: a ``refine train`` --out directory (its ``model.pt``) or a file."""
    run = Path(run)
    if run.is_dir():
        model = run / "model.pt"
        if not model.is_file():
            raise RunError(f"{run}: holds no model.pt (the run has not finished); evaluate a "
                           "finished run, or pass a checkpoint file")
        return model
    return run


def data_of(run, data=None) -> str:
    """The data set to evaluate on: ``data``, else the one a run directory trained on."""
    if data is not None:
        return str(data)
    config = Path(run) / "config.json"
    try:
        return json.loads(config.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RunError(f"{run}: no run directory's config.json names the data set; pass "
                       "DATA") from None


def conversion_of(run, data=None):
    """How to convert the data to evaluate ``run`` on: as the run converted the data it
    trained on (``config.json``'s ``conversion``) when ``data`` is that data (or not given), so
    the result is filed as its own; the defaults for other data and for checkpoint files. A
    run from before conversions were recorded converted with ``reencode``, capped as its store
    or its ``--max-resolution`` said."""
    from ..sources.dataset import BetonOptions
    config = _run_config(Path(run)) if Path(run).is_dir() else {}
    trained_on = config.get("data")
    if trained_on is None or (data is not None and
                              Path(str(data)).resolve() != Path(str(trained_on)).resolve()):
        return BetonOptions()
    if isinstance(config.get("conversion"), dict):
        return BetonOptions.from_record(config["conversion"])
    return _conversion_before_records(config)


def _conversion_before_records(config: dict):
    from dataclasses import replace

    from ..core.errors import RefineryError
    from ..sources.dataset import conversion_options
    from ..store.label_store import LabelStore
    source = None
    if config.get("labels"):
        try:
            source = LabelStore.open(config["labels"]).dataset.source
        except (RefineryError, OSError, TypeError, KeyError):
            source = None  # the store is gone: its cap cannot be known; evaluate uncapped
    try:
        options = conversion_options(source, config.get("max_resolution"))
    except RefineryError:
        options = conversion_options(source)
    return replace(options, jpeg="reencode")


def data_id(fingerprint: dict) -> str:
    """A short name for a data set's fingerprint (the first 12 hex digits of the SHA-256 of its
    canonical JSON): what names another data set's results in a run directory."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def data_record(dataset, data, split: str) -> dict:
    """What an evaluation measured: the data set as given (``path``, ``split``), the ``.beton``
    read (a tree's cached conversion), its fingerprint (count, classes, hashes of the stored
    image bytes and labels, as a label store records its data set), the tree's file-list
    fingerprint where it came from one (``source``), and the fingerprint's ``id``."""
    fingerprint = dataset.fingerprint()
    return {"path": str(data), "split": split, "beton": str(dataset.path),
            "fingerprint": fingerprint, "source": dataset.source(), "id": data_id(fingerprint)}


def data_ids(train_ds, val_ds) -> dict:
    """``{"train": id, "val": id}`` of a run's two splits, which ``refine train`` records in
    ``config.json`` so that an evaluation can tell the run's own data from any other."""
    return {"train": data_id(train_ds.fingerprint()), "val": data_id(val_ds.fingerprint())}


def _run_config(run: Path) -> dict:
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def measured_own_data(run, record: dict) -> bool:
    """Whether the evaluation ``record`` (see :func:`data_record`) measured the data set the
    run in directory ``run`` trained on: by the fingerprints ``config.json`` records, and for a
    run from before those were recorded, by the data set's path."""
    config = _run_config(Path(run))
    ids = config.get("data_ids")
    if isinstance(ids, dict) and record.get("split") in ids:
        return ids[record["split"]] == record.get("id")
    trained_on = config.get("data")
    return trained_on is not None and \
        Path(str(trained_on)).resolve() == Path(str(record.get("path"))).resolve()


def save_evaluation(run, metrics: dict):
    """Keep ``metrics`` in a run directory: ``RUN/eval_<split>.json`` for the data the run
    trained on (what ``refine plot --gap`` reads), ``RUN/eval_<split>-<id>.json`` for other data
    (named by its fingerprint, so no data set's result replaces another's). None for a
    checkpoint file, which has no run to keep it."""
    run = Path(run)
    if not run.is_dir():
        return None
    record, split = metrics["data"], metrics["split"]
    own = measured_own_data(run, record)
    path = run / (f"eval_{split}.json" if own else f"eval_{split}-{record['id']}.json")
    path.write_text(json.dumps(metrics))
    return path


def read_evaluation(run, split: str) -> dict:
    """The run's ``refine evaluate`` result on its own ``split`` (``RUN/eval_<split>.json``).

    A result from before evaluations recorded their data set is read as the run's own, with a
    :class:`RefineryWarning` saying so; one that records another data set is refused.

    Raises
    ------
    RunError
        No result of the run's own data (naming those of other data sets found instead, and
        the command that writes it), or the file is not a result of the run's own data.
    """
    run = Path(run)
    path = run / f"eval_{split}.json"
    command = f"`refine evaluate {run} --split {split}`"
    if not path.is_file():
        others = sorted(p.name for p in run.glob(f"eval_{split}-*.json"))
        held = (f" (only {', '.join(others)}: results of other data sets than the run trained "
                "on)") if others else ""
        raise RunError(f"{path}: not found{held}; run {command} first")
    try:
        result = json.loads(path.read_text())
    except ValueError:
        raise RunError(f"{path}: not JSON; rerun {command}") from None
    record = result.get("data") if isinstance(result, dict) else None
    if not isinstance(result, dict) or f"{split}_top1" not in result:
        raise RunError(f"{path}: not a `refine evaluate` result; rerun {command}")
    if record is None:
        trained_on = _run_config(run).get("data", "the data in its config.json")
        warnings.warn(f"{path}: written before evaluation files recorded their data set; read "
                      f"as the run's own ({trained_on}); rerun {command} to record it",
                      RefineryWarning, stacklevel=2)
    elif not measured_own_data(run, record):
        raise RunError(f"{path}: measured {record.get('path')} (data set {record.get('id')}), "
                       f"not the data the run trained on; rerun {command}")
    return result


def evaluate_checkpoint(weights, data, split: str = "val", res: int = None,
                        batch_size: int = 256, num_workers: int = 2, device: str = "auto",
                        cache_dir=None, arch: str = None, trust_checkpoint: bool = False,
                        option_names=None, options=None) -> dict:
    """Top-1, top-5 and per-class top-1 (percent) of ``weights`` on the centred square of every
    image of ``split``, as ``refine train`` evaluates validation.

    Parameters
    ----------
    weights : str or os.PathLike
        Any checkpoint ``refine precompute --weights`` takes; it must predict the data set's
        classes.
    data : str or os.PathLike
        The ImageFolder root (``train/``, ``val/``) or ``X_train.beton`` (with ``X_val.beton``).
    split : {"val", "train"}
        ``train``: the training images, for the paper's train/validation gap.
    res : int, optional
        Crop side; the checkpoint's recorded input size by default.
    arch : str, optional
        The architecture, for a checkpoint that records none (a bare ``state_dict``).
    trust_checkpoint : bool
        Load a checkpoint that needs code run to load; only for a file whose author you trust.
    option_names : OptionNames, optional
        What the messages ask for (``refine evaluate`` passes its ``--arch`` and ``--res``);
        the Python keywords by default.
    options : BetonOptions, optional
        How a tree is converted (default: :class:`.dataset.BetonOptions`'s defaults); a run's
        own data as it trained on it: :func:`conversion_of`.

    Returns
    -------
    dict
        ``{split}_top1``, ``{split}_top5``, ``{split}_per_class`` (a list in class order), and
        ``split``, ``images``, ``res``, ``checkpoint``, and ``data``: what was measured (see
        :func:`data_record`).
    """
    from ..core.devices import resolve_device
    from ..loaders.crop_sources import FixedCrops
    from ..loaders.replay import make_loader
    from ..models.checkpoints import checkpoint_input_size, load_trained_model
    from ..models.registry import PYTHON_NAMES
    from ..sources.data_cache import open_dataset
    from ..sources.dataset import BetonOptions
    from .data import _val_location
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    device = resolve_device(device)  # before any data is converted
    location = data if split == "train" else _val_location(data)
    dataset = open_dataset(location, split, cache_dir, options or BetonOptions(),
                           num_workers=num_workers)
    names = option_names or PYTHON_NAMES
    model, ckpt = load_trained_model(weights, arch, dataset.classes,
                                     trust_checkpoint=trust_checkpoint, option_names=names)
    size = checkpoint_input_size(weights, res, ckpt, names)
    model = model.to(device, memory_format=torch.channels_last)
    loader = make_loader(dataset, FixedCrops(dataset.heights, dataset.widths), (size, size),
                         batch_size, num_workers, train=False)
    metrics = evaluate(model, loader, device, len(dataset.classes))
    return {f"{split}_{key[4:]}": value for key, value in metrics.items()} | {
        "split": split, "images": dataset.num_images, "res": int(size),
        "checkpoint": str(weights), "data": data_record(dataset, data, split)}


@torch.no_grad()
def evaluate(model, loader, device, num_classes, channels_last=True):
    """Top-1, top-5 and per-class top-1 (percent) on a single centred crop per image."""
    model.eval()
    correct1 = torch.zeros(num_classes, device=device)
    correct5 = torch.zeros((), device=device)
    seen = torch.zeros(num_classes, device=device)
    for batch in loader:
        labels = batch.labels.to(device)
        with autocast_for(device):
            logits = model(to_model_input(batch.images, device, channels_last=channels_last))
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1.index_add_(0, labels, (top[:, 0] == labels).float())
        correct5 += (top == labels[:, None]).any(1).sum()
        seen.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
    n = seen.sum().item()
    return {"val_top1": 100 * correct1.sum().item() / n, "val_top5": 100 * correct5.item() / n,
            "val_per_class": (100 * correct1 / seen.clamp_min(1)).tolist()}
