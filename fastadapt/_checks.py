"""Argument checks shared by the public ops: clear errors that name the argument, raised before
any kernel runs (a shape mismatch must never reach Triton as an out-of-bounds read)."""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
           floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _differing(attr: str, tensors: dict) -> dict:
    """The tensors given (None left out) if they differ in ``attr``, else nothing."""
    present = {k: v for k, v in tensors.items() if v is not None}
    return present if len({getattr(v, attr) for v in present.values()}) > 1 else {}


def same_device(**tensors: torch.Tensor | None) -> None:
    if present := _differing("device", tensors):
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def same_dtype(**tensors: torch.Tensor | None) -> None:
    if present := _differing("dtype", tensors):
        listing = ", ".join(f"{k}: {v.dtype}" for k, v in present.items())
        raise TypeError(f"dtypes must match, got {listing}")


def dim_equal(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{what} is {got}, expected {expected}")


INT64_MAX = 2**63 - 1


def int64(name: str, value, low: int = -INT64_MAX - 1) -> int:
    """``value`` (an int, or any integer with ``__index__``: numpy's, a one-element integer tensor;
    not a bool or a float) as a Python int in [low, 2**63 - 1], the range of the native ops' int
    arguments: a float or a larger int failed there, inside the schema, with a confusing error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if not low <= value <= INT64_MAX:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what} below 2**63, got {value}")
    return value


def finite_float(name: str, value) -> float:
    """``value`` as a float: a real number (numpy's included), finite. Under ``torch.compile`` a
    Python float may be symbolic (one graph for every value): it cannot be inspected while tracing,
    and passes through (an eager call checks the same value)."""
    if torch.compiler.is_compiling():
        return value
    # A plain float skips the ABC check (isinstance(value, Real) is a Python call each time).
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def probability(name: str, value) -> float:
    p = finite_float(name, value)
    if torch.compiler.is_compiling():
        return p
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p
