"""Which torch device a command computes on (``--device``), checked before any work.

``torch.device("cuda")`` is accepted on a machine without a GPU and fails only at the first
tensor moved there, after a data set was converted or a run directory made; a name torch does
not know (``banana``) fails with torch's own traceback. Both are one line here, naming the
option and what to pass instead, before anything is read or written.
"""
import os

import torch

from .errors import ArgumentError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N a GPU index)"


def device_problem(name) -> tuple | None:
    """``(what is wrong, the fix)`` for the ``--device`` value ``name``, or None if it can run.

    Parameters
    ----------
    name : str or torch.device
        ``auto``, or anything ``torch.device`` takes.
    """
    if str(name) == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return "not a torch device", f"give {DEVICE_CHOICES}"
    if device.type == "cpu":
        return None
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if not callable(getattr(backend, "is_available", None)):
        return f"not a device models run on ({device.type})", f"give {DEVICE_CHOICES}"
    if not backend.is_available():
        return (f"no {device.type.upper()} device is available here ({_why_unavailable(device)})",
                "pass --device cpu, or auto (a GPU when there is one, else the CPU)")
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else 1
    if device.index is not None and device.index >= count:
        return (f"there is no {device.type} device {device.index}: this machine has {count}",
                f"give an index below {count}, or auto")
    return None


def _why_unavailable(device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only build of "
                "torch")
    where = "backends.mps" if device.type == "mps" else device.type
    return f"torch.{where}.is_available() is False"


def resolve_device(name) -> torch.device:
    """The torch device for ``--device name``; ``auto`` is this rank's GPU, else the CPU.

    Parameters
    ----------
    name : str or torch.device
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns
    -------
    torch.device

    Raises
    ------
    ArgumentError
        ``name`` is no torch device, or names one this machine does not have.
    """
    problem = device_problem(name)
    if problem is not None:
        raise ArgumentError(f"--device {name}: {problem[0]}; {problem[1]}")
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)
