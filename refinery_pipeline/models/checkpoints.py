"""Checkpoints: saved with what the next stage needs (architecture, classes, input size), and
loaded from refinery, timm, torchvision and training-script formats, read as data.
"""
import errno
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError, UntrustedCheckpointError, first_line
from .checkpoint_safety import load_weights_file
from .classes import _check_classes, select_outputs
from .registry import (PYTHON_NAMES, TIMM_PREFIX, OptionNames, _other_arch_fix, _timm,
                       create_model, resolve_arch)
from .tensors import IMAGENET_NORMALIZATION
from .torchvision_weights import _head_size, _load_torchvision_weights, torchvision_weights

CHECKPOINT_FORMAT = "refinery-checkpoint"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path, model: nn.Module, arch: str, classes, input_size: int, **extra):
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {"format": CHECKPOINT_FORMAT, "arch": resolve_arch(arch), "num_classes": len(classes),
             "classes": list(classes), "input_size": int(input_size),
             "normalization": IMAGENET_NORMALIZATION, "model": model.state_dict(), **extra}
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
    except RuntimeError as exc:  # torch's zip writer reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"writing the checkpoint failed ({first_line(exc)})",
                      str(path)) from None
    os.replace(tmp, path)


def load_checkpoint(path, ema: bool = False, trust_checkpoint: bool = False) -> dict:
    """Load a checkpoint as a dict with the weights under ``model``, whoever wrote it.

    Models trained elsewhere are refineries too, with no conversion step: besides ``refine
    train``'s own format this takes a bare ``state_dict``, torchvision's classification reference
    scripts' checkpoints (``model``, ``args``) and timm's train script's (``state_dict``, ``arch``,
    ``args``), each possibly saved from DDP (``module.``) or torch.compile (``_orig_mod.``).
    Foreign layouts give what they record of ``arch`` and ``input_size``; no classes.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.
    ema : bool
        Take the EMA weights those scripts keep beside the plain ones (``model_ema``,
        ``state_dict_ema``) instead of the plain ones.
    trust_checkpoint : bool
        Load a file that needs code run to load (see :mod:`.checkpoint_safety`); only for a
        file whose author you trust.

    Returns
    -------
    dict
        ``model`` (a state_dict), and ``arch`` and ``input_size`` where known.

    Raises
    ------
    UntrustedCheckpointError
        Loading the file would run code, and ``trust_checkpoint`` is not set; nothing has run.
    CheckpointError
        No such file, not a PyTorch file, or no (EMA) weights inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = load_weights_file(path, trust_checkpoint)
    except UntrustedCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}); pass a "
                              "file written by `refine train` or torch.save(model.state_dict())") \
            from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state
    if _is_state_dict(state) and not ema:
        return {"model": strip_wrapper_prefixes(state)}
    key = next((k for k in _WEIGHTS_KEYS[ema] if _is_state_dict(state.get(k))), None) \
        if isinstance(state, dict) else None
    if key is None and ema:
        raise CheckpointError(f"{path}: no EMA weights inside (no {' or '.join(_WEIGHTS_KEYS[ema])}"
                              "); load the plain weights instead")
    if key is None:
        raise CheckpointError(f"{path}: not a model checkpoint (no state_dict inside); pass a file "
                              "written by `refine train`, torch.save(model.state_dict()), or "
                              "torchvision's or timm's training scripts")
    return _training_script_checkpoint(state, key)


# where training scripts keep the weights: torchvision's references, timm's train.py
_WEIGHTS_KEYS = {False: ("model", "state_dict"), True: ("model_ema", "state_dict_ema")}


# DDP and torch.compile wrap a model as .module / ._orig_mod, and its state_dict keys with it
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and \
        all(isinstance(v, torch.Tensor) for v in value.values())


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """``state_dict`` keyed as the bare model names its tensors.

    A model saved from DDP has every key under ``module.``, one saved from torch.compile under
    ``_orig_mod.`` (both, in either order, when both wrap it). A prefix goes only when every key
    has it, so a model whose own first submodule is called ``module`` keeps its names.

    Parameters
    ----------
    state_dict : dict
        Tensor name -> tensor.

    Returns
    -------
    dict
        The same tensors, prefixes removed (the same dict when there are none).
    """
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)),
                      None)
        if prefix is None:
            return state_dict
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}


def _training_script_checkpoint(state: dict, key: str) -> dict:
    """The weights under ``key`` with the arch, crop size and normalisation the script's
    ``args`` record (torchvision's references always normalise with ImageNet statistics)."""
    weights = {k: v for k, v in state[key].items() if k != "n_averaged"}  # torchvision's EMA
    args = state.get("args")
    if key.startswith("state_dict"):
        arch = _timm_arch(state, args)
        facts = _timm_data_config(arch, args) if args is not None else {}
    else:
        arch = _arg(args, "model") or state.get("arch")
        facts = {"input_size": _recorded_input_size(args)}
    ckpt = {"model": strip_wrapper_prefixes(weights),
            **{k: v for k, v in facts.items() if v is not None}}
    return {**ckpt, "arch": arch} if isinstance(arch, str) else ckpt


def _timm_arch(state: dict, args):
    """timm's saver records ``args.model`` as ``arch``; without ``args`` it records the model's
    class name (``resnet``), which names no model. Prefixed: timm's resnet50 is not
    torchvision's."""
    name = _arg(args, "model") or state.get("arch")
    timm = _timm()
    if not isinstance(name, str) or (args is None and not (timm and timm.is_model(name))):
        return None
    return name if name.startswith(TIMM_PREFIX) else TIMM_PREFIX + name


def _timm_data_config(arch: str, args) -> dict:
    """Crop size and normalisation as timm's train script chose them: from its ``args``, else
    from the model's pretrained config, as its ``resolve_data_config`` does (a ViT normalises
    with mean = std = 0.5, not ImageNet's statistics)."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(arch[len(TIMM_PREFIX):]) if timm and arch else None
    size = _recorded_input_size(args) or (cfg.input_size[-1] if cfg else None)
    mean, std = (_arg(args, name) or (getattr(cfg, name) if cfg else None)
                 for name in ("mean", "std"))
    if not (mean and std and len(mean) == len(std) == 3):
        return {"input_size": size}
    return {"input_size": size, "normalization": {"mean": [round(255 * v, 3) for v in mean],
                                                  "std": [round(255 * v, 3) for v in std]}}


def _recorded_input_size(args):
    """The crop size a training script's ``args`` record, or None.

    torchvision's ``val_crop_size`` first, the size its published weights are described by
    (trained at 176, evaluated at 224 for ResNet50_Weights.IMAGENET1K_V2), then
    ``train_crop_size``; timm's ``input_size`` (C, H, W), then ``img_size``.
    """
    for name in ("val_crop_size", "train_crop_size", "input_size", "img_size"):
        value = _arg(args, name)
        if isinstance(value, (list, tuple)) and value:
            value = value[-1]
        if isinstance(value, int) and value > 0:
            return value
    return None


def _arg(args, name: str):
    """``args.name`` of an argparse Namespace (or a dict of them, as some scripts save)."""
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def load_trained_model(weights, arch: str = None, classes: list = None, ema: bool = False,
                       trust_checkpoint: bool = False, option_names: OptionNames = PYTHON_NAMES):
    """``(model, checkpoint)`` from ``weights``: a checkpoint file, or a torchvision weights name.

    ``arch`` and the data set's ``classes`` must agree with what the weights record; the
    checkpoint's ``file`` is what identifies the weights (its SHA-256 goes into label stores),
    and its ``arch`` is the canonical name (:func:`resolve_arch`). ``ema`` and
    ``trust_checkpoint``: see :func:`load_checkpoint`. Weights for more classes than the data
    set's label it when its classes are some of theirs (by the names a checkpoint records, or as
    ImageNet-1k WordNet ids for a 1000-way head): the model is then a :class:`ClassSubset` of
    those outputs. ``option_names``: what the messages ask for (:class:`OptionNames`).
    """
    pretrained = torchvision_weights(weights)
    if pretrained is not None:
        return _load_torchvision_weights(pretrained, str(weights), arch, classes,
                                         trust_checkpoint, option_names)
    ckpt = load_checkpoint(weights, ema, trust_checkpoint)
    arch = _checkpoint_arch(weights, arch, ckpt.get("arch"), option_names)
    saved_classes = ckpt.get("num_classes") or _head_size(ckpt["model"])
    outputs = _check_classes(weights, saved_classes, ckpt.get("classes"), classes)
    model = create_model(arch, saved_classes or len(classes or ()))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not fit a {arch} ({first_line(exc)}); "
                              "pass the architecture they were trained with") from None
    ckpt.update(arch=arch, file=Path(weights))
    return select_outputs(model, outputs), ckpt


def _checkpoint_arch(weights, asked: str, saved: str, names: OptionNames) -> str:
    """The canonical architecture of a checkpoint: the one it records, or ``asked`` (given as
    ``names.arch``) where it records none; both given, they must name the same network."""
    try:
        asked, saved = (resolve_arch(a) if a else None for a in (asked, saved))
    except CheckpointError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    if asked is None and saved is None:
        raise CheckpointError(f"{weights}: the checkpoint does not name its architecture; pass "
                              f"{names.ask('arch', 'ARCH')}")
    if None not in (asked, saved) and asked != saved:
        raise CheckpointError(f"{weights}: checkpoint is a {saved}, not a {asked}; "
                              f"{_other_arch_fix(names, saved, asked)}")
    return asked or saved


def checkpoint_input_size(weights, asked: int, ckpt: dict,
                          names: OptionNames = PYTHON_NAMES) -> int:
    """The crop size to run ``weights`` at: ``asked``, else the checkpoint's. Never a guess: a
    network labels or classifies crops of another size than it was trained at worse, and
    silently so, and a refinery's size also becomes its store's and so its students'."""
    size = asked or ckpt.get("input_size")
    if not size:
        raise CheckpointError(f"{weights}: the checkpoint records no input size; pass the size "
                              f"it was trained at, {names.ask('input_size', 'N')}")
    return int(size)
