"""Models by torchvision or timm name (plus one tiny CNN for the CPU demo) and checkpoints.

A checkpoint written by ``refine train`` records its architecture, classes, input size and
normalisation, so it loads as the next refinery with no extra flags. torchvision's pretrained
weights load by the name its reference scripts take (``--weights ResNet50_Weights.IMAGENET1K_V2``),
with the same facts read from the weights' metadata. Checkpoints of torchvision's and timm's
training scripts load too, with whatever of those facts they record. Weights for more classes
than the data set's (ImageNet-1k weights on Imagenette's WordNet-id folders) label it through a
:class:`ClassSubset` of their outputs.
"""
import errno
import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .checkpoint_safety import load_weights_file, refuse_if_code
from ..core.errors import CheckpointError, RefineryWarning, UntrustedCheckpointError
from .imagenet_classes import (NUM_IMAGENET1K_CLASSES, imagenet1k_outputs, imagenet1k_wnids,
                               output_indices)

CHECKPOINT_FORMAT = "refinery-checkpoint"
# ImageNet statistics in uint8 units: batches stay uint8 until they reach the device.
IMAGENET_NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


def demo_cnn(num_classes: int, width: int = 16) -> nn.Module:
    """A small all-convolutional net with BatchNorm, fast enough to train on 2 CPU cores."""
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]
    w = width
    layers = (block(3, w, 1) + block(w, 2 * w, 2) + block(2 * w, 2 * w, 1) + block(2 * w, 4 * w, 2)
              + block(4 * w, 4 * w, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))


LOCAL_MODELS = {"demo_cnn": demo_cnn, "demo_cnn_wide": lambda num_classes: demo_cnn(num_classes, 32)}
# timm's models are named timm/NAME wherever a name must say which library builds it
TIMM_PREFIX = "timm/"


def available_models() -> list:
    """Every architecture name :func:`create_model` takes: ours, torchvision's, then timm's
    (prefixed, when timm is installed)."""
    timm = _timm()
    timm_names = [TIMM_PREFIX + name for name in timm.list_models()] if timm else []
    return sorted(LOCAL_MODELS) + sorted(_torchvision_models()) + timm_names


def resolve_arch(arch: str) -> str:
    """The canonical name of ``arch``, as checkpoints and label stores record it.

    Several names exist in both torchvision and timm (``resnet50``, ``convnext_tiny``) for
    different networks whose weights do not fit each other, so one order decides: our demo
    models, then torchvision, then timm. ``timm/NAME`` always means timm's NAME, and a timm name
    torchvision lacks (``resnet18d``) is recorded as ``timm/resnet18d``, so a recorded name
    rebuilds the same network whatever the order.

    Parameters
    ----------
    arch : str
        ``demo_cnn``, a torchvision classification model name, ``timm/NAME`` or a timm name.

    Returns
    -------
    str
        ``arch`` itself, or ``timm/`` + ``arch`` for a timm name given without the prefix.

    Raises
    ------
    CheckpointError
        Unknown to both libraries, or a timm name without timm installed.
    """
    if arch in LOCAL_MODELS or (not arch.startswith(TIMM_PREFIX) and arch in _torchvision_models()):
        return arch
    name = arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch
    timm = _timm()
    if timm is not None and timm.is_model(name):
        return TIMM_PREFIX + name
    if timm is None and arch.startswith(TIMM_PREFIX):
        raise CheckpointError(f"architecture {arch!r} is timm's and timm is not installed; "
                              "pip install refinery[timm]")
    hint = ("or a timm one such as resnet18d or timm/convnext_tiny" if timm is not None else
            "or, for timm's models, pip install refinery[timm]")
    raise CheckpointError(f"unknown architecture {arch!r}; use a torchvision classification model "
                          f"name such as resnet18, resnet50 or mobilenet_v2, {hint}")


def create_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised model by name: ``demo_cnn``, torchvision's (``resnet18``,
    ``mobilenet_v2``, ...) or timm's (``timm/convnext_tiny``, ``resnet18d``), resolved by
    :func:`resolve_arch`."""
    name = resolve_arch(arch)
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name](num_classes)
    if name.startswith(TIMM_PREFIX):
        return _timm().create_model(name[len(TIMM_PREFIX):], pretrained=False,
                                    num_classes=num_classes)
    import torchvision
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _torchvision_models() -> list:
    import torchvision
    return torchvision.models.list_models(torchvision.models)


def _timm():
    """The timm module, or None: timm is an optional extra (``pip install refinery[timm]``)."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def check_input_size(arch: str, res: int):
    """Refuse ``res`` px inputs for an architecture that cannot take them, before training time
    is spent: torchvision's ViTs take only their ``image_size``, MaxViT only some sizes.

    One forward pass of a zero image decides, first on the meta device (shapes only, well under
    a second even for a ViT-H) and, where that fails, again on the CPU: a few models use
    operations meta tensors lack, and only a real failure is the model's.

    Parameters
    ----------
    arch : str
        The student's architecture (``--arch``).
    res : int
        Its crop size (``--res``).

    Raises
    ------
    CheckpointError
        ``arch`` is unknown, or its forward pass fails at ``res`` px.
    """
    resolve_arch(arch)  # an unknown name is its own error, not a size problem
    problem = _forward_problem(arch, res, "meta") and _forward_problem(arch, res, "cpu")
    if problem:
        raise CheckpointError(f"--arch {arch} does not accept {res} px inputs ({problem}); pass "
                              "--res N with a size it takes")


def _forward_problem(arch: str, res: int, device: str):
    """The first line of what building ``arch`` and one forward pass at ``res`` px raise on
    ``device``, or None. Eval mode: batch statistics of one image are no test of the size."""
    try:
        with torch.device(device), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torchvision's init-weights FutureWarnings
            create_model(arch, 2).eval()(torch.zeros(1, 3, res, res))
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return None


def batchnorm_layers(model: nn.Module) -> list:
    """Every BatchNorm layer of ``model`` (1d, 2d, 3d, and subclasses such as SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def to_pixels(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 NHWC crops -> float NCHW pixel values (0-255) on ``device``."""
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()


def _stats(normalization, like: torch.Tensor):
    mean = torch.tensor(normalization["mean"], device=like.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], device=like.device).view(1, 3, 1, 1)
    return mean, std


def normalize(pixels: torch.Tensor, normalization=IMAGENET_NORMALIZATION,
              channels_last: bool = True) -> torch.Tensor:
    """Float NCHW pixels -> the network's input (channels_last memory if asked)."""
    mean, std = _stats(normalization, pixels)
    x = (pixels - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def denormalize(x: torch.Tensor, normalization=IMAGENET_NORMALIZATION) -> torch.Tensor:
    """A network input back to float pixel values (the inverse of :func:`normalize`)."""
    mean, std = _stats(normalization, x)
    return x * std + mean


def to_model_input(images: torch.Tensor, device, normalization=IMAGENET_NORMALIZATION,
                   channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC crops -> normalised float NCHW on ``device`` (channels_last memory)."""
    return normalize(to_pixels(images, device), normalization, channels_last)


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
        raise OSError(errno.EIO, f"writing the checkpoint failed "
                      f"({(str(exc).splitlines() or ['RuntimeError'])[0]})", str(path)) from None
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


@dataclass(frozen=True)
class OptionNames:
    """How a caller's user gives the facts a checkpoint may not record, so that a message asks
    for something that caller takes: Python keywords by default, a command's own options in the
    CLI (``--refinery`` and ``--input-size`` in ``refine precompute``). ``arch`` None: the caller
    gives it from elsewhere (``refine audit``: the store's record), so only other weights fix a
    checkpoint of another architecture."""
    arch: str = "arch="
    input_size: str = "input_size="

    def ask(self, field: str, value) -> str:
        """``--refinery resnet18`` for an option, ``arch=resnet18`` for a keyword."""
        option = getattr(self, field)
        return f"{option}{value}" if option.endswith("=") else f"{option} {value}"


PYTHON_NAMES = OptionNames()


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
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit a {arch} ({first}); pass the "
                              "architecture they were trained with") from None
    ckpt.update(arch=arch, file=Path(weights))
    return select_outputs(model, outputs), ckpt


class ClassSubset(nn.Module):
    """A classifier restricted to some of its classes: the logits of ``outputs``, in that order.

    Softmax over the selected logits z_S is the full model's probabilities renormalised over
    those classes, softmax(z_S) = p_S / sum(p_S), so an ImageNet-1k refinery labels Imagenette
    or Tiny-ImageNet as if the other classes did not exist. A temperature T divides the selected
    logits, softmax(z_S / T), which is the tempered 1000-way distribution renormalised alike.

    Parameters
    ----------
    model : nn.Module
        The full classifier.
    outputs : sequence of int
        ``outputs[j]`` is the model output that predicts the data set's class ``j``.
    """

    def __init__(self, model: nn.Module, outputs):
        super().__init__()
        self.model = model
        # not persistent: the state_dict stays the full model's (under "model.")
        self.register_buffer("outputs", torch.as_tensor(list(outputs), dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.outputs)


def select_outputs(model: nn.Module, outputs) -> nn.Module:
    """``model`` itself when ``outputs`` is None (output i is class i), else its
    :class:`ClassSubset` of ``outputs``."""
    return model if outputs is None else ClassSubset(model, outputs)


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


def _other_arch_fix(names: OptionNames, saved: str, asked: str) -> str:
    """The fix for weights of another network than asked: name theirs, or pass other weights
    (only the latter where the architecture is not the user's to give)."""
    other = f"weights of a {asked}"
    return f"pass {names.ask('arch', saved)} or {other}" if names.arch else f"pass {other}"


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


def _check_classes(weights, saved_count: int, saved_names: list, classes: list):
    """Which outputs label the data set's ``classes``: None when output i is class i, else the
    output of each class (see :func:`_subset_outputs`).

    Refuses a model whose outputs mean other classes than the data set's: a label store made
    with it would be silently wrong. A bare state_dict names no classes; its count must fit,
    unless it is a 1000-way head and the data set's classes are ImageNet-1k ids.
    """
    if classes is None:
        return None
    outputs = _subset_outputs(saved_count, saved_names, classes)
    if outputs is not None:
        return outputs
    if saved_count is not None and saved_count != len(classes):
        raise CheckpointError(_count_mismatch(weights, saved_count, saved_names, classes))
    if _named(saved_names) and _named(classes) and list(saved_names) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved_names, classes)) if a != b)
        raise CheckpointError(f"{weights}: output {i} is class {saved_names[i]!r} but the data "
                              f"set's class {i} is {classes[i]!r}; use a refinery trained on these "
                              "classes (same class folders)")
    return None


def _subset_outputs(saved_count: int, saved_names: list, classes: list):
    """The outputs that predict the data set's ``classes`` when they are fewer than the model's
    and each is one of them: found by the class names a checkpoint records, else, for a
    1000-way head, by ImageNet-1k's WordNet-id order (torchvision's and timm's ImageNet weights;
    for a checkpoint that names no classes this assumes it was trained on ImageNet-1k, so the
    data set's folders must all be ImageNet-1k ids). None otherwise, and when output i already
    is class i (ImageNet-1k's own folders)."""
    if _named(saved_names):
        return output_indices(classes, saved_names) if len(classes) < len(saved_names) else None
    if saved_count != NUM_IMAGENET1K_CLASSES:
        return None
    outputs = imagenet1k_outputs(classes)
    return None if outputs == list(range(NUM_IMAGENET1K_CLASSES)) else outputs


def _count_mismatch(weights, saved_count: int, saved_names: list, classes: list) -> str:
    """The one-line refusal of weights for another number of classes, saying what would work."""
    said = (f"{weights}: these weights predict {saved_count} classes but the data set has "
            f"{len(classes)}")
    if len(classes) < saved_count and _named(saved_names):
        theirs = set(saved_names)
        missing = next((c for c in classes if c not in theirs), None)
        return (f"{said}, and its class {missing!r} is not one of theirs; use a refinery trained "
                "on these classes, or data whose class folders are some of the weights' classes")
    if len(classes) < saved_count == NUM_IMAGENET1K_CLASSES:
        wnids = set(imagenet1k_wnids())
        missing = next((c for c in classes if c not in wnids), None)
        return (f"{said}, and its class {missing!r} is not an ImageNet-1k WordNet id; name each "
                "class folder by its ImageNet-1k id (n01440764, ...) to label those classes with "
                "ImageNet weights, or use a refinery trained on these classes")
    return f"{said}; use a refinery trained on these classes"


def _named(classes: list) -> bool:
    """Whether ``classes`` are names: a .beton written without them numbers its classes "0",
    "1", ..., which says nothing about which class is which."""
    return classes is not None and list(classes) != [str(i) for i in range(len(classes))]


# torchvision's reference scripts name pretrained weights as <Enum>.<member>
_TORCHVISION_WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+")


def torchvision_weights(name):
    """The torchvision weights called ``name`` (``ResNet50_Weights.IMAGENET1K_V2``), or None when
    ``name`` is a file or not spelled like such a name."""
    if Path(str(name)).exists() or not _TORCHVISION_WEIGHTS_NAME.fullmatch(str(name)):
        return None
    import torchvision
    try:
        return torchvision.models.get_weight(str(name))
    except (ValueError, KeyError):
        raise CheckpointError(f"{name}: neither a file nor torchvision weights; name them as "
                              "torchvision does, e.g. ResNet50_Weights.IMAGENET1K_V2 (see "
                              "torchvision.models.get_model_weights('resnet50'))") from None


def _load_torchvision_weights(weights, name: str, arch: str, classes: list,
                              trust_checkpoint: bool, names: OptionNames):
    """A torchvision model with its pretrained weights, downloaded once into torch's hub cache
    (``$TORCH_HOME``), described like a ``refine train`` checkpoint."""
    import torchvision
    own_arch = next(m for m in torchvision.models.list_models(torchvision.models)
                    if torchvision.models.get_model_weights(m) is type(weights))
    if arch not in (None, own_arch):
        raise CheckpointError(f"{name}: these are weights of a {own_arch}, not a {arch}; "
                              f"{_other_arch_fix(names, own_arch, arch)}")
    categories = weights.meta["categories"]  # names (tench, ...), not ids: matched by order
    outputs = _check_classes(name, len(categories), None, classes)
    _warn_if_class_order_unverified(name, categories, classes)
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        if not trust_checkpoint:  # torchvision unpickles the cached file with no restriction:
            # read it as data first (the file is read twice, but nothing it names runs)
            weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        model = torchvision.models.get_model(own_arch, weights=weights)
    except OSError as exc:  # no network (URLError), no space
        raise CheckpointError(f"{name}: cannot download {weights.url} ({exc}); copy that file into "
                              f"{file.parent}/ or pass a local checkpoint") from None
    except Exception as exc:  # a damaged file in the cache, or a download failing its hash check
        if isinstance(exc, pickle.UnpicklingError):
            refuse_if_code(file, exc)  # a cached file replaced by one that runs code
        raise CheckpointError(f"{name}: {file} does not load ({type(exc).__name__}); delete it to "
                              "download it again") from None
    transform = weights.transforms()
    normalization = {key: [round(255 * v, 3) for v in getattr(transform, key)]
                     for key in ("mean", "std")}
    facts = {"arch": own_arch, "num_classes": len(categories), "file": file,
             "input_size": transform.crop_size[0], "normalization": normalization}
    return select_outputs(model, outputs), facts


_WNID = re.compile(r"n\d{8}")


def _warn_if_class_order_unverified(name: str, categories: list, classes: list):
    """torchvision's ImageNet weights number classes in sorted-WordNet-id order, which is an
    ImageFolder's order when its folders are the ImageNet ids; with other folder names nothing
    here can tell whether output i is the data set's class i."""
    if classes is None or list(classes) == list(categories):
        return
    if not all(_WNID.fullmatch(c) for c in classes):
        warnings.warn(f"{name}: the data set's class folders are not ImageNet WordNet ids "
                      "(n01440764, ...), so whether its sorted classes follow the weights' output "
                      "order cannot be checked; labels are wrong if they do not", RefineryWarning,
                      stacklevel=3)


def _head_size(state_dict) -> int:
    """Class count from the last 2-D weight (the classifier) of a bare state_dict."""
    mats = [v for v in state_dict.values() if getattr(v, "ndim", 0) == 2]
    return int(mats[-1].shape[0]) if mats else None
