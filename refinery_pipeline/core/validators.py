"""Checks of public API arguments: one definition of each rule and one wording of its error.

Every public function and constructor checks what a user passes before it touches data, and
refuses a wrong kind or range with an :class:`~.errors.ArgumentError` (a ``RefineryError`` and a
``ValueError``) of one line: ``name=value: what it must be; what to pass``. Without these, a
negative epoch or an image index past the store's end surfaced as a raw numpy/torch error frames
away from the call (``OverflowError ... uint64``, ``numel: integer multiplication overflow``), or
was silently accepted (``slot_of(1, -3, 4)`` answered a slot for an image that does not exist).

Each check returns the value in the form the caller works with (an ``int``, a ``float``, an
``int64`` array), so a caller checks and converts in one line.
"""
import math
import numbers
import os
from typing import Optional

import numpy as np

from .errors import ArgumentError


def refuse(name: str, value, need: str, fix: str) -> ArgumentError:
    """The error for argument ``name``: ``name=value: need; fix`` (the value shortened)."""
    return ArgumentError(f"{name}={_shown(value)}: {need}; {fix}")


def whole_number(name: str, value, minimum: int = 0, fix: str = None) -> int:
    """``value`` as an ``int`` if it is a whole number (Python or NumPy, never a bool or a
    float that happens to be whole) of at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise refuse(name, value, f"must be a whole number >= {minimum}",
                     fix or f"pass {minimum} or more")
    return int(value)


def optional_whole_number(name: str, value, minimum: int = 1, fix: str = None) -> Optional[int]:
    """:func:`whole_number`, or None where None means "the default"."""
    return None if value is None else whole_number(name, value, minimum, fix)


def positive_number(name: str, value, fix: str = None) -> float:
    """``value`` as a ``float`` if it is a finite real number above 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise refuse(name, value, "must be a finite number > 0", fix or "pass a positive number")
    return float(value)


def flag(name: str, value) -> bool:
    """``value`` if it is a bool (a truthy string such as ``"no"`` is not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise refuse(name, value, "must be True or False", "pass a bool")
    return bool(value)


def one_of(name: str, value, choices, what: str = None) -> str:
    """``value`` if it is one of the strings ``choices`` (``what`` they are, for the error:
    default the argument's name)."""
    if not isinstance(value, str) or value not in choices:
        raise refuse(name, value, f"unknown {what or name}",
                     f"pass one of {', '.join(map(repr, choices))}")
    return value


def path_like(name: str, value, what: str) -> os.PathLike:
    """``value`` if it is a path or URL (``str`` or ``os.PathLike``); ``what`` says what is
    expected there, for the error."""
    if not isinstance(value, (str, os.PathLike)):
        raise refuse(name, value, f"must be a path or URL ({what})", f"pass the {what}'s path")
    return value


def optional_callable(name: str, value):
    """``value`` if it is None or can be called."""
    if value is not None and not callable(value):
        raise refuse(name, value, "must be callable or None",
                     "pass a function or transform (e.g. a torchvision v2.Compose), or None")
    return value


def index_array(name: str, values, upper: Optional[int] = None, what: str = "image",
                keep_dtype: bool = False) -> np.ndarray:
    """``values`` (an int or an array-like of them) as ``int64`` of the same shape (its own
    integer dtype with ``keep_dtype``: no copy of a large array), if every one is a whole number
    in ``0 ... upper - 1`` (``upper`` None: no upper bound). Floats, even whole ones, are
    refused: a computed index that became a float is a bug upstream."""
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise refuse(name, values, f"must be whole {what} indices (int, or an integer array)",
                     f"pass e.g. np.arange(n) of {what} indices")
    if not keep_dtype or array.size == 0:
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise refuse(name, values, f"holds the negative {what} index {int(array.min())}",
                     "pass indices from 0 (negative indices do not count from the end)")
    if upper is not None and array.size and array.max() >= upper:
        raise refuse(name, values, f"holds the {what} index {int(array.max())}, out of range "
                     f"0 ... {upper - 1}", f"pass {what} indices below {upper}")
    return array


def _shown(value, limit: int = 60) -> str:
    """``repr(value)`` shortened to one line of at most ``limit`` characters."""
    if isinstance(value, np.ndarray) or _is_tensor(value):
        text = f"<{type(value).__name__} of shape {tuple(value.shape)}, {value.dtype}>"
    else:
        text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "shape")
