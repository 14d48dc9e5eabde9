"""torchvision's pretrained weights by the name its reference scripts take
(``ResNet50_Weights.IMAGENET1K_V2``), with their classes, input size and normalisation from the
weights' metadata.
"""
import pickle
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..core.errors import CheckpointError, RefineryWarning
from .checkpoint_safety import refuse_if_code
from .classes import _check_classes, select_outputs
from .registry import OptionNames, _other_arch_fix

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
