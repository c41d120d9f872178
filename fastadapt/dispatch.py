"""Backend selection.

Every fused op registers one implementation per backend. Each implementation answers
``why_not(**inputs) -> list[str]``: the reasons it cannot serve these inputs (empty when it can).
Dispatch walks :data:`BACKENDS` in order and takes the first implementation with no reasons.
``FASTADAPT_BACKEND=<name>`` (or :func:`use_backend`) forces one backend; if that backend cannot
serve, the error names its reasons instead of silently falling back. An implementation registered
as ``nondeterministic`` cannot serve while ``torch.use_deterministic_algorithms(True)`` is set.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# Priority order (DESIGN.md "Backends and fallbacks").
BACKENDS = ("triton", "cuda", "cpp", "reference")
ENV_VAR = "FASTADAPT_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastadapt_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the given inputs (the message lists why)."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op: the forward, the backward and its capability check."""

    op: str
    backend: str
    why_not: Callable[..., list[str]]
    forward: Callable
    backward: Callable
    nondeterministic: str | None = None  # why results may differ run to run (None: they don't)

    def reasons(self, **inputs) -> list[str]:
        """:attr:`why_not`, plus the deterministic-algorithms setting for a non-deterministic one."""
        reasons = self.why_not(**inputs)
        if self.nondeterministic and torch.are_deterministic_algorithms_enabled():
            reasons = reasons + [f"non-deterministic ({self.nondeterministic}) and "
                                 "torch.use_deterministic_algorithms(True) is set"]
        return reasons


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, *, why_not: Callable[..., list[str]], forward: Callable,
             backward: Callable, nondeterministic: str | None = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, why_not, forward, backward,
                                                           nondeterministic)


def nondeterministic() -> dict[tuple[str, str], str]:
    """(op, backend) -> why its results may differ from run to run, for every such implementation."""
    return {(op, name): impl.nondeterministic for op, impls in _REGISTRY.items()
            for name, impl in impls.items() if impl.nondeterministic}


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call: a backend's kernels (Triton, the native extension)
    load only when that backend serves, so ``import fastadapt`` works where they cannot."""
    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)
    call.__qualname__ = f"{module}.{name}"
    return call


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or, failing that, by ``FASTADAPT_BACKEND``."""
    name = _forced.get() or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for the ops called inside the block (``None`` restores automatic choice).

    It picks the backend of forwards: a backward always runs on the backend of its forward (each
    backend regenerates dropout masks from the seed with its own generator), wherever it is called.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def explain(op: str, **inputs) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot serve ``inputs`` (an empty list: it can)."""
    impls = _REGISTRY.get(op, {})
    return {
        name: (impls[name].reasons(**inputs) if name in impls else [f"no {name} implementation of {op}"])
        for name in BACKENDS
    }


def get(op: str, backend: str) -> Implementation:
    """The ``backend`` implementation of ``op``: how a backward finds the one that ran its forward."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        raise KeyError(f"no {backend!r} implementation of {op!r}")
    return impl


def select(op: str, **inputs) -> Implementation:
    """The implementation that serves ``inputs``: the forced backend, or the first with no reasons."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = forced_backend()
    if forced is not None:
        impl = impls.get(forced)
        reasons = impl.reasons(**inputs) if impl else [f"no {forced} implementation of {op}"]
        if reasons:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced but cannot run {op}: " + "; ".join(reasons))
        return impl
    for name in BACKENDS:
        impl = impls.get(name)
        if impl is not None and not impl.reasons(**inputs):
            return impl
    reasons = explain(op, **inputs)
    raise BackendUnavailableError(
        f"no backend can run {op}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items()))
