"""Checkpoints load as data: unpickling a shared file never runs code unless its user trusts it.

A ``.pt`` file is a pickle, and ``torch.load(weights_only=False)`` runs whatever callable the
pickle names (``os.system`` included) before any check of ours sees the result. Refineries are
meant to be exchanged (one team audits another's store with the other's weights), so every
weights file is read with ``weights_only=True``: tensors, numbers, strings and containers, plus
the few types on :data:`SAFE_TYPES` that the supported checkpoint layouts hold. Anything else is
refused in one line naming what it would have run and the opt-in, :data:`TRUST_OPT_IN`, for a
file whose author the user trusts.
"""
import argparse
import pickle
import re
import zipfile

import torch

from ..core.errors import UntrustedCheckpointError

# The only types beyond torch's own allow-list that a supported layout needs: the ``args``
# Namespace that torchvision's classification reference scripts and timm's train.py save.
# ``refine train``'s model.pt and last.pt need none (configs, optimizer, scheduler and RNG states
# are tensors and plain data), nor does a bare state_dict.
SAFE_TYPES = (argparse.Namespace,)
SAFE_NAMES = frozenset(f"{t.__module__}.{t.__qualname__}" for t in SAFE_TYPES)
# How each entry point says "I trust this file": the CLI's flag and the API's keyword.
TRUST_OPT_IN = "--trust-checkpoint (trust_checkpoint=True in Python)"


def load_weights_file(path, trust_checkpoint: bool = False):
    """``torch.load(path)`` on the CPU, as data unless ``trust_checkpoint``.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save`` (or any pickle).
    trust_checkpoint : bool
        Unpickle with no restriction, running whatever the file names: only for a file whose
        author the user trusts.

    Returns
    -------
    object
        What was saved.

    Raises
    ------
    UntrustedCheckpointError
        Loading it would run code (see :func:`refuse_if_code`); nothing has run.
    Exception
        Whatever ``torch.load`` raises for a file that is no checkpoint at all (truncated,
        random bytes); callers say that in their own words.
    """
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_TYPES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refuse_if_code(path, exc)
        raise


def refuse_if_code(path, exc: pickle.UnpicklingError):
    """Raise :class:`UntrustedCheckpointError` when ``exc``, from a ``weights_only`` load of
    ``path``, means the file needs code run to load; return when it means the file is no
    pickle the restricted unpickler can read at all (random bytes), which callers report as
    not a checkpoint.

    A zip checkpoint (``torch.save``'s format since 1.6) that fails is always refused: it is a
    checkpoint, and what failed is something beyond plain data. Other files are refused when
    the error names the global they would call.
    """
    names = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(exc))
    names = list(dict.fromkeys(n for n in names if n not in SAFE_NAMES))
    if names:
        raise UntrustedCheckpointError(
            f"{path}: loading it would call {', '.join(names)}, code a checkpoint of weights "
            f"does not need; pass {TRUST_OPT_IN} only if you trust whoever made this file")
    if zipfile.is_zipfile(path):
        raise UntrustedCheckpointError(
            f"{path}: cannot be read as plain data ({_weights_only_reason(exc)}); pass "
            f"{TRUST_OPT_IN} only if you trust whoever made this file")


def _unsafe_globals(path) -> list:
    """The globals a zip checkpoint's pickle names that ``weights_only`` does not allow, read
    without unpickling (none for other files, or one whose pickle cannot be scanned)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint; damaged: the load's own error tells
        return []


def _weights_only_reason(exc: BaseException) -> str:
    """The restricted unpickler's own complaint, without torch's paragraphs of advice."""
    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(exc).__name__
