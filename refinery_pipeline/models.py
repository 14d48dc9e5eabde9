"""Models by torchvision name (plus one tiny CNN for the CPU demo) and self-describing checkpoints.

A checkpoint written by ``refine train`` records its architecture, classes, input size and
normalisation, so it loads as the next refinery with no extra flags. torchvision's pretrained
weights load by the name its reference scripts take (``--weights ResNet50_Weights.IMAGENET1K_V2``),
with the same facts read from the weights' metadata.
"""
import hashlib
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import CheckpointError, RefineryWarning

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


def available_models() -> list:
    import torchvision
    return sorted(LOCAL_MODELS) + sorted(torchvision.models.list_models(torchvision.models))


def create_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised model by torchvision name (``resnet18``, ``mobilenet_v2``, ...)."""
    import torchvision
    if arch in LOCAL_MODELS:
        return LOCAL_MODELS[arch](num_classes)
    if arch not in torchvision.models.list_models(torchvision.models):
        raise CheckpointError(f"unknown architecture {arch!r}; use a torchvision classification "
                              "model name such as resnet18, resnet50 or mobilenet_v2")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


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
    state = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": len(classes),
             "classes": list(classes), "input_size": int(input_size),
             "normalization": IMAGENET_NORMALIZATION, "model": model.state_dict(), **extra}
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Load a checkpoint; a bare ``state_dict`` is accepted too (it then lacks arch and classes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}); pass a "
                              "file written by `refine train` or torch.save(model.state_dict())") \
            from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"model": state}
    raise CheckpointError(f"{path}: not a model checkpoint (no state_dict inside); pass a file "
                          "written by `refine train` or torch.save(model.state_dict())")


def load_trained_model(weights, arch: str = None, classes: list = None):
    """``(model, checkpoint)`` from ``weights``: a checkpoint file, or a torchvision weights name.

    ``arch`` and the data set's ``classes`` must agree with what the weights record; the
    checkpoint's ``file`` is what identifies the weights (its SHA-256 goes into label stores).
    """
    pretrained = torchvision_weights(weights)
    if pretrained is not None:
        return _load_torchvision_weights(pretrained, str(weights), arch, classes)
    ckpt = load_checkpoint(weights)
    arch = arch or ckpt.get("arch")
    if arch is None:
        raise CheckpointError(f"{weights}: a bare state_dict does not name its architecture; "
                              "pass --refinery ARCH")
    if ckpt.get("arch") not in (None, arch):
        raise CheckpointError(f"{weights}: checkpoint is a {ckpt['arch']}, not a {arch}; drop "
                              f"--refinery or pass --refinery {ckpt['arch']}")
    saved_classes = ckpt.get("num_classes") or _head_size(ckpt["model"])
    _check_classes(weights, saved_classes, ckpt.get("classes"), classes)
    model = create_model(arch, saved_classes if classes is None else len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit a {arch} ({first}); pass the "
                              "architecture they were trained with") from None
    ckpt.update(arch=arch, file=Path(weights))
    return model, ckpt


def _check_classes(weights, saved_count: int, saved_names: list, classes: list):
    """Refuse a model whose outputs mean other classes than the data set's: a label store made
    with it would be silently wrong. A bare state_dict names no classes; its count must fit."""
    if classes is None:
        return
    if saved_count is not None and saved_count != len(classes):
        raise CheckpointError(f"{weights}: these weights predict {saved_count} classes but the "
                              f"data set has {len(classes)}; use a refinery trained on these "
                              "classes")
    if _named(saved_names) and _named(classes) and list(saved_names) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved_names, classes)) if a != b)
        raise CheckpointError(f"{weights}: output {i} is class {saved_names[i]!r} but the data "
                              f"set's class {i} is {classes[i]!r}; use a refinery trained on these "
                              "classes (same class folders)")


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


def _load_torchvision_weights(weights, name: str, arch: str, classes: list):
    """A torchvision model with its pretrained weights, downloaded once into torch's hub cache
    (``$TORCH_HOME``), described like a ``refine train`` checkpoint."""
    import torchvision
    own_arch = next(m for m in torchvision.models.list_models(torchvision.models)
                    if torchvision.models.get_model_weights(m) is type(weights))
    if arch not in (None, own_arch):
        raise CheckpointError(f"{name}: these are weights of a {own_arch}, not a {arch}; drop "
                              f"--refinery or pass --refinery {own_arch}")
    categories = weights.meta["categories"]
    _check_classes(name, len(categories), None, classes)
    _warn_if_class_order_unverified(name, categories, classes)
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        model = torchvision.models.get_model(own_arch, weights=weights)
    except OSError as exc:  # no network (URLError), no space
        raise CheckpointError(f"{name}: cannot download {weights.url} ({exc}); copy that file into "
                              f"{file.parent}/ or pass a local checkpoint") from None
    except Exception as exc:  # a damaged file in the cache, or a download failing its hash check
        raise CheckpointError(f"{name}: {file} does not load ({type(exc).__name__}); delete it to "
                              "download it again") from None
    transform = weights.transforms()
    normalization = {key: [round(255 * v, 3) for v in getattr(transform, key)]
                     for key in ("mean", "std")}
    return model, {"arch": own_arch, "num_classes": len(categories), "file": file,
                   "input_size": transform.crop_size[0], "normalization": normalization}


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
