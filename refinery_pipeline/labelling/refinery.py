"""The refinery: a trained classifier that turns crops into soft labels.

BatchNorm runs in train mode by default, as in the paper (the refinery was trained that way and
labels its own training crops better so). Batch statistics then depend on which crops share a
batch, so callers must feed randomly composed batches; precompute fixes that composition per
chunk with a seeded permutation so labels stay reproducible. ``bn_mode="eval"`` uses running
statistics and makes every crop's label independent of its neighbours.

An ensemble (:class:`EnsembleRefinery`, ``--weights A --weights B``) labels with the mean of its
members' probabilities, each member with its own architecture, normalisation and output
selection; in train-mode BN every member sees the same forward batch, so its labels are as
reproducible as one refinery's. :func:`load_refinery` gives one or the other.
"""
import hashlib
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError
from ..models.checkpoints import checkpoint_input_size, file_sha256, load_trained_model
from ..models.classes import ClassSubset
from ..models.registry import PYTHON_NAMES, OptionNames, batchnorm_layers
from ..models.tensors import IMAGENET_NORMALIZATION, normalize, to_pixels

BN_MODES = ("train", "eval")


def set_bn_mode(model: nn.Module, bn_mode: str) -> nn.Module:
    """Eval mode everywhere (no dropout), then BatchNorm layers in train mode if asked.

    Momentum 0 keeps the running statistics untouched while batch statistics are used.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {bn_mode!r}; choose one of {BN_MODES}")
    model.eval()
    if bn_mode == "train":
        for m in batchnorm_layers(model):
            m.train()
            m.momentum = 0.0
    return model


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU, where bf16 is slower than fp32 on most chips."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Labeller:
    """What precompute, audit and training ask of a refinery, given ``probabilities_of_pixels``
    and ``device``: shared by one refinery and an ensemble, so both label alike."""

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 class probabilities ``(B, C)`` for uint8 NHWC crops."""
        return self.probabilities_of_pixels(to_pixels(images, self.device))

    def top_k(self, images: torch.Tensor, k: int):
        """``(indices uint16, probabilities float16)`` of the k most likely classes, on the CPU."""
        values, indices = self.probabilities(images).topk(k, dim=1)
        return indices.to(torch.int32).cpu().numpy().astype("uint16"), \
            values.cpu().numpy().astype("float16")


class Refinery(Labeller):
    """A frozen model that labels uint8 NHWC crops with softmax(logits / T).

    ``source`` is what the weights were given as (a path, a torchvision weights name), for
    messages only: the identity is :meth:`describe`."""

    def __init__(self, model: nn.Module, arch: str, weights_sha256: str, input_size: int,
                 bn_mode: str = "train", temperature: float = 1.0, device="cpu",
                 normalization=IMAGENET_NORMALIZATION, channels_last: bool = True,
                 compile: bool = False, source: str = None):
        self.device = torch.device(device)
        self.source = source
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.model = set_bn_mode(model.to(self.device, memory_format=memory), bn_mode)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # which of the network's outputs are the data set's classes: part of its identity
        self.selected_outputs = (model.outputs.tolist() if isinstance(model, ClassSubset)
                                 else None)
        if compile:  # pays off on long GPU runs; numerics may differ slightly from eager mode
            self.model = torch.compile(self.model)
        self.arch, self.weights_sha256, self.input_size = arch, weights_sha256, int(input_size)
        self.bn_mode, self.temperature = bn_mode, float(temperature)
        self.normalization, self.channels_last = normalization, channels_last

    @classmethod
    def from_checkpoint(cls, weights, arch: str = None, classes: list = None,
                        input_size: int = None, trust_checkpoint: bool = False,
                        option_names: OptionNames = PYTHON_NAMES, **kwargs) -> "Refinery":
        """Load weights: a ``refine train`` checkpoint (needs no ``arch``), a ``state_dict``, a
        torchvision or timm training checkpoint, or torchvision's pretrained weights by name;
        they must predict the data set's ``classes``, or more classes among which they are (an
        ImageNet-1k refinery for an ImageNet-subset data set: those classes' outputs are
        selected, :class:`.models.ClassSubset`). ``input_size`` overrides the checkpoint's
        and is required where it records none. ``trust_checkpoint``, ``option_names``: see
        :func:`.models.load_trained_model`."""
        model, ckpt = load_trained_model(weights, arch, classes,
                                         trust_checkpoint=trust_checkpoint,
                                         option_names=option_names)
        size = checkpoint_input_size(weights, input_size, ckpt, option_names)
        return cls(model, ckpt["arch"], file_sha256(ckpt["file"]), size,
                   normalization=ckpt.get("normalization", IMAGENET_NORMALIZATION),
                   source=str(weights), **kwargs)

    def to(self, device) -> "Refinery":
        """Move the network to ``device`` (a Ray actor's own GPU, say); labels are unchanged."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def describe(self) -> dict:
        """What a label store records about the refinery (its identity for mismatch checks).

        ``selected_outputs`` only where outputs were selected, so stores written before the
        field existed still match the refinery that wrote them."""
        info = {"arch": self.arch, "weights_sha256": self.weights_sha256, "bn_mode": self.bn_mode,
                "temperature": self.temperature, "input_size": self.input_size,
                "normalization": self.normalization}
        if self.selected_outputs is not None:
            info["selected_outputs"] = self.selected_outputs
        return info

    @torch.no_grad()
    def probabilities_of_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Probabilities for float NCHW pixel values (0-255), e.g. crops perturbed in training."""
        x = normalize(pixels.to(self.device), self.normalization, self.channels_last)
        with autocast_for(self.device):
            logits = self.model(x)
        return F.softmax(logits.float() / self.temperature, dim=1)


# The ``arch`` an ensemble records; its members' own records are in ``members``.
ENSEMBLE = "ensemble"
# What the members of an ensemble share: a store has one crop size, and the command line gives
# the BN mode and temperature once. Each keeps its own normalisation and output selection.
SHARED_BY_MEMBERS = ("input_size", "bn_mode", "temperature", "device")


def ensemble_sha256(member_sha256s) -> str:
    """An ensemble's ``weights_sha256``: the SHA-256 of its members' hex digests joined by
    commas, in member order. One digest that changes with any member and with their order, for
    readers (and messages) that show one."""
    return hashlib.sha256(",".join(member_sha256s).encode("ascii")).hexdigest()


class EnsembleRefinery(Labeller):
    """Refineries labelling as one: the mean of their probabilities, each softmax(logits / T).

    The mean is summed in member order: another order gives the same labels up to float
    rounding, but its record (:meth:`describe`, the members as given) is another refinery's.
    The members share :data:`SHARED_BY_MEMBERS`."""

    arch = ENSEMBLE
    selected_outputs = None  # each member's own are in its record

    def __init__(self, members, option_names: OptionNames = PYTHON_NAMES):
        self.members = tuple(members)
        if len(self.members) < 2:
            raise ValueError("an ensemble has two members or more; use a Refinery for one")
        _require_shared(self.members, option_names)
        first = self.members[0]
        self.device, self.input_size = first.device, first.input_size
        self.bn_mode, self.temperature = first.bn_mode, first.temperature
        shared = all(m.normalization == first.normalization for m in self.members)
        self.normalization = first.normalization if shared else None
        self.weights_sha256 = ensemble_sha256(m.weights_sha256 for m in self.members)

    def to(self, device) -> "EnsembleRefinery":
        """Move every member to ``device``."""
        self.members = tuple(m.to(device) for m in self.members)
        self.device = self.members[0].device
        return self

    def describe(self) -> dict:
        """The ensemble's identity: the shared settings, ``normalization`` where all members
        share one (else None), and every member's own record in order (``members``)."""
        return {"arch": ENSEMBLE, "weights_sha256": self.weights_sha256,
                "bn_mode": self.bn_mode, "temperature": self.temperature,
                "input_size": self.input_size, "normalization": self.normalization,
                "members": [m.describe() for m in self.members]}

    @torch.no_grad()
    def probabilities_of_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The members' mean probabilities, every member on the same pixels (with train-mode BN,
        the same forward batch: labels stay reproducible)."""
        return sum(m.probabilities_of_pixels(pixels) for m in self.members) / len(self.members)


def _require_shared(members, names: OptionNames):
    """Members that disagree on a shared setting are refused naming both; for the input size,
    the one a user meets (checkpoints trained at other sizes), with the option that fixes it
    (``names.input_size``)."""
    first = members[0]
    for name in SHARED_BY_MEMBERS:
        for m in members[1:]:
            a, b = getattr(first, name), getattr(m, name)
            if a == b:
                continue
            if name == "input_size":
                raise CheckpointError(
                    f"{m.source}: records input size {b} px, but {first.source} records {a} px; "
                    "the members of an ensemble label the same crops: pass one size, "
                    f"{names.ask('input_size', 'N')}")
            raise CheckpointError(f"{m.source}: {name} {b}, but {first.source} has {a}; give "
                                  f"every member of an ensemble the same {name}")


def _weights_list(weights) -> list:
    """``--weights`` as a list: one path or name, or several."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        return [weights]
    weights = list(weights)
    if not weights:
        raise ValueError("no weights given; pass one or more")
    return weights


def member_archs(weights, arch=None) -> list:
    """One architecture (or None: the checkpoint's) per weights file.

    Parameters
    ----------
    weights : str, path or sequence of them
        The members' weights, in order.
    arch : None, str or sequence of str
        None or empty: each checkpoint's own; one name: every member's; else one per weights.

    Raises
    ------
    CheckpointError
        When ``arch`` gives another count than one or one per weights.
    """
    count = len(_weights_list(weights))
    if arch is None or isinstance(arch, str):
        return [arch] * count
    arch = list(arch)
    if len(arch) <= 1:
        return (arch or [None]) * count
    if len(arch) != count:
        raise CheckpointError(f"--refinery: given {len(arch)} times for {count} --weights; give "
                              "it once (for every member), once per --weights in their order, or "
                              "not at all (each checkpoint's own)")
    return arch


def load_refinery(weights, arch=None, classes: list = None, input_size: int = None,
                  option_names: OptionNames = PYTHON_NAMES, **kwargs):
    """A :class:`Refinery` for one weights file, an :class:`EnsembleRefinery` for several.

    Parameters
    ----------
    weights : str, path or sequence of them
        What :meth:`Refinery.from_checkpoint` loads, one per member, in order (the order is
        recorded).
    arch : None, str or sequence of str
        See :func:`member_archs`.
    classes, input_size, option_names, **kwargs
        As for :meth:`Refinery.from_checkpoint`, for every member. Without ``input_size`` the
        members' checkpoints must record the same size.
    """
    sources = _weights_list(weights)
    members = [Refinery.from_checkpoint(w, a, classes, input_size, option_names=option_names,
                                        **kwargs)
               for w, a in zip(sources, member_archs(sources, arch))]
    return members[0] if len(members) == 1 else EnsembleRefinery(members, option_names)


def load_as_recorded(weights, recorded: dict, classes: list, **kwargs):
    """The refinery ``weights`` make under a store's ``refinery`` record (``refine audit``):
    each member with the recorded architecture at its position, all with the recorded input
    size, BN mode and temperature, so that what :func:`identity_mismatch` then compares is
    which weights they are."""
    sources = _weights_list(weights)
    records = recorded.get("members") or [recorded]
    archs = [records[i]["arch"] if i < len(records) else None for i in range(len(sources))]
    return load_refinery(sources, archs, classes, recorded["input_size"],
                         bn_mode=recorded["bn_mode"], temperature=recorded["temperature"],
                         option_names=OptionNames(arch=None), **kwargs)  # as recorded


def identity_mismatch(recorded: dict, refinery):
    """What differs between a store's ``refinery`` record and ``refinery``, in words ending
    with the fix; None when it is the refinery that wrote the store.

    Ensembles are compared member by member, in order, naming the member missing, extra or
    different (by the file given for it)."""
    ours = refinery.describe()
    if ours == recorded:
        return None
    if "members" not in recorded and "members" not in ours:
        diff = [k for k in recorded if recorded[k] != ours.get(k)]
        return (f"refinery differs from the one that wrote the store in {diff}; pass the weights "
                f"that wrote it (SHA-256 {recorded['weights_sha256'][:16]}...)")
    theirs = recorded.get("members") or [recorded]
    given = getattr(refinery, "members", (refinery,))
    problems = _member_problems(theirs, given) or [
        f"the ensemble's own record differs in "
        f"{[k for k in recorded if k != 'members' and recorded[k] != ours.get(k)]}"]
    digests = ", ".join(m["weights_sha256"][:16] + "..." for m in theirs)
    return (f"refinery differs from the one that wrote the store ({_members(len(theirs))}; "
            f"given {_members(len(given))}): {', '.join(problems)}; pass the weights that wrote "
            f"it, one --weights per member in the recorded order (SHA-256 {digests})")


def _members(count: int) -> str:
    return "one refinery" if count == 1 else f"an ensemble of {count}"


def _member_problems(theirs: list, given) -> list:
    """Per position: the recorded member missing, a given one extra, or one that differs."""
    records = [m.describe() for m in given]
    if len(records) == len(theirs) and records != theirs and \
            all(records.count(r) == theirs.count(r) for r in records):
        return ["the members are the recorded ones in another order"]
    problems = []
    for i in range(max(len(theirs), len(records))):
        if i >= len(records):
            problems.append(f"member {i + 1} (SHA-256 {theirs[i]['weights_sha256'][:16]}...) "
                            "is missing")
        elif i >= len(theirs):
            problems.append(f"member {i + 1} ({given[i].source}) is extra")
        elif records[i] != theirs[i]:
            keys = sorted(set(records[i]) | set(theirs[i]))
            diff = [k for k in keys if records[i].get(k) != theirs[i].get(k)]
            problems.append(f"member {i + 1} ({given[i].source}) differs in {diff}")
    return problems
