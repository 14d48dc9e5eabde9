"""``refine evaluate``: a trained model's accuracy on the centred images of either split.

The paper measures overfitting as the gap between top-1 on the *training images* and on the
validation images (Fig. 1, Figs. 4-6), both evaluated the same way. ``refine train`` logs a
training accuracy too, but as a running average over augmented crops with the weights still
moving, which is not that: a crop is harder than the centred image, so that number cannot show
whether a network memorised its training set. This module evaluates any checkpoint on the
centred square of every image of the split asked for, exactly as validation is evaluated.
"""
import json
from pathlib import Path

import torch

from .errors import RunError

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


def save_evaluation(run, metrics: dict):
    """``RUN/eval_<split>.json`` for a run directory (what ``refine plot`` reads); None for a
    checkpoint file, which has no run to keep it."""
    if not Path(run).is_dir():
        return None
    path = Path(run) / f"eval_{metrics['split']}.json"
    path.write_text(json.dumps(metrics))
    return path


def evaluate_checkpoint(weights, data, split: str = "val", res: int = None,
                        batch_size: int = 256, num_workers: int = 2, device: str = "auto",
                        cache_dir=None, arch: str = None, trust_checkpoint: bool = False,
                        option_names=None) -> dict:
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

    Returns
    -------
    dict
        ``{split}_top1``, ``{split}_top5``, ``{split}_per_class`` (a list in class order), and
        ``split``, ``images``, ``res``, ``checkpoint``.
    """
    from .dataset import open_dataset
    from .models import PYTHON_NAMES, checkpoint_input_size, load_trained_model
    from .replay import FixedCrops, make_loader
    from .train import _val_location, evaluate, resolve_device
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    location = data if split == "train" else _val_location(data)
    dataset = open_dataset(location, split, cache_dir, num_workers=num_workers)
    names = option_names or PYTHON_NAMES
    model, ckpt = load_trained_model(weights, arch, dataset.classes,
                                     trust_checkpoint=trust_checkpoint, option_names=names)
    size = checkpoint_input_size(weights, res, ckpt, names)
    device = resolve_device(device)
    model = model.to(device, memory_format=torch.channels_last)
    loader = make_loader(dataset, FixedCrops(dataset.heights, dataset.widths), (size, size),
                         batch_size, num_workers, train=False)
    metrics = evaluate(model, loader, device, len(dataset.classes))
    return {f"{split}_{key[4:]}": value for key, value in metrics.items()} | {
        "split": split, "images": dataset.num_images, "res": int(size),
        "checkpoint": str(weights)}
