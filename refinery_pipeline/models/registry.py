"""Models by name: torchvision's and timm's (``timm/NAME``), plus a tiny CNN for the CPU demo.

One place resolves an architecture name, builds the network and checks that it can take a
given input size; the messages name the options of the command that asked (``OptionNames``).
Checkpoints are :mod:`.checkpoints`, torchvision's pretrained weights
:mod:`.torchvision_weights`, output subsets :mod:`.classes`.
"""
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import CheckpointError, first_line


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
        return first_line(exc)
    return None


def batchnorm_layers(model: nn.Module) -> list:
    """Every BatchNorm layer of ``model`` (1d, 2d, 3d, and subclasses such as SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _other_arch_fix(names: OptionNames, saved: str, asked: str) -> str:
    """The fix for weights of another network than asked: name theirs, or pass other weights
    (only the latter where the architecture is not the user's to give)."""
    other = f"weights of a {asked}"
    return f"pass {names.ask('arch', saved)} or {other}" if names.arch else f"pass {other}"
