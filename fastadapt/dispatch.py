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
_candidates: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fastadapt_candidates",
                                                                              default=BACKENDS)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the given inputs (the message lists why)."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op: the forward, the backward and its capability check."""

    op: str
    backend: str
    why_not: Callable[..., list[str]]
    forward: Callable
    backward: Callable | None  # None: the gradients are the composite's (autograd through it)
    nondeterministic: str | None = None  # why results may differ run to run (None: they don't)
    # A reason when this backend is known to be slower than the plain PyTorch composite for these
    # inputs (its crossover): automatic choice passes over it, forcing still uses it.
    slower: Callable[..., str | None] | None = None
    # The plain PyTorch composite with autograd (reference backends): what the eager path runs
    # instead of the Function around forward/backward, so it costs what the unfused model costs;
    # the custom op's backward takes its gradients through it too (the same bits on both paths).
    composite: Callable | None = None
    # For a backend that chooses per call among kernels of its own (where a frozen product runs:
    # fastadapt/strategy.py): ``strategy(**inputs)`` says which it runs for these inputs and why,
    # ``str(strategy)`` states the rule. The kernels apply the rule themselves; dispatch only shows it.
    strategy: Callable[..., str] | None = None

    def reasons(self, **inputs) -> list[str]:
        """:attr:`why_not`, plus the deterministic-algorithms setting for a non-deterministic one."""
        reasons = self.why_not(**inputs)
        if self.nondeterministic and torch.are_deterministic_algorithms_enabled():
            reasons = reasons + [f"non-deterministic ({self.nondeterministic}) and "
                                 "torch.use_deterministic_algorithms(True) is set"]
        return reasons


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, *, forward: Callable, backward: Callable | None, capabilities=None,
             nondeterministic: str | None = None, slower: Callable[..., str | None] | None = None,
             composite: Callable | None = None, strategy: Callable[..., str] | None = None) -> None:
    """Register ``backend``'s implementation of ``op``. ``capabilities``
    (:class:`fastadapt.backends.Capabilities`) says what it serves; None: everything (the
    reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    why_not = capabilities.why_not(backend) if capabilities is not None else _serves_all
    _DECISIONS.clear()
    _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, why_not, forward, backward,
                                                           nondeterministic, slower, composite, strategy)


def _serves_all(**_) -> list[str]:
    return []


def ops() -> tuple[str, ...]:
    """Every op with a registered backend, in registration order."""
    return tuple(_REGISTRY)


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


@contextlib.contextmanager
def only_backends(*names: str) -> Iterator[None]:
    """Let automatic choice inside the block walk only ``names`` (in :data:`BACKENDS` order), e.g.
    to leave out Triton's CPU interpreter, which tests and ``fastadapt demo`` switch on."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"unknown or no backends {unknown or names!r}; expected some of {BACKENDS}")
    token = _candidates.set(tuple(n for n in BACKENDS if n in names))
    try:
        yield
    finally:
        _candidates.reset(token)


def explain(op: str, **inputs) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot serve ``inputs`` (an empty list: it can), the
    reason automatic choice passes over it if it is slower than the composite there, and, for one
    that serves and chooses among kernels of its own per call, ``strategy: <which and why>`` alone."""
    impls = _REGISTRY.get(op, {})
    out = {}
    for name in BACKENDS:
        impl = impls.get(name)
        out[name] = impl.reasons(**inputs) if impl else [f"no {name} implementation of {op}"]
        slower = impl.slower(**inputs) if impl and impl.slower and not out[name] else None
        if slower:
            out[name] = [f"passed over: {slower}"]
        elif impl and impl.strategy and not out[name]:
            out[name] = [f"strategy: {impl.strategy(**inputs)}"]
    return out


def crossovers() -> dict[tuple[str, str], str]:
    """(op, backend) -> its declared crossover (the ``slower`` rule's docstring), for ``fastadapt info``."""
    return {(op, name): " ".join((impl.slower.__doc__ or "").split()) for op, impls in _REGISTRY.items()
            for name, impl in impls.items() if impl.slower}


def strategies() -> dict[tuple[str, str], str]:
    """(op, backend) -> the rule by which it chooses its kernels per call, for ``fastadapt info``."""
    return {(op, name): str(impl.strategy) for op, impls in _REGISTRY.items()
            for name, impl in impls.items() if impl.strategy}


def get(op: str, backend: str) -> Implementation:
    """The ``backend`` implementation of ``op``: how a backward finds the one that ran its forward."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        raise KeyError(f"no {backend!r} implementation of {op!r}")
    return impl


# Decisions by op, forced backend, deterministic-algorithms flag and each input's device, dtype and
# shape (a flag's value), which is all a ``why_not`` may read: the walk over the backends cost
# 10 us per call (CPU, LoRA), as much as the kernels of a small layer; the lookup costs 2.
_DECISIONS: dict[tuple, Implementation] = {}
_MAX_DECISIONS = 4096


def _decision_key(op: str, forced: str | None, inputs: dict) -> tuple:
    return (op, forced, _candidates.get(), torch.are_deterministic_algorithms_enabled(),
            *((t.device, t.dtype, t.shape) if isinstance(t, torch.Tensor) else t for t in inputs.values()))


def select(op: str, **inputs) -> Implementation:
    """The implementation that serves ``inputs``: the forced backend, or the first with no reasons.

    ``inputs`` are tensors (or None) and hashable flags; an implementation's ``why_not`` may depend
    on the tensors' devices, dtypes and shapes and on the flags only, as the decision is cached on
    those."""
    forced = forced_backend()
    key = _decision_key(op, forced, inputs)
    try:
        impl = _DECISIONS.get(key)
    except TypeError:  # symbolic sizes (torch.compile tracing with dynamic shapes) are unhashable
        return _select(op, forced, inputs)
    if impl is None:
        impl = _select(op, forced, inputs)
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = impl
    return impl


def _select(op: str, forced: str | None, inputs: dict) -> Implementation:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if forced is not None:
        impl = impls.get(forced)
        reasons = impl.reasons(**inputs) if impl else [f"no {forced} implementation of {op}"]
        if reasons:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced but cannot run {op}: " + "; ".join(reasons))
        return impl
    for name in _candidates.get():
        impl = impls.get(name)
        if impl is not None and not impl.reasons(**inputs) and not (impl.slower and impl.slower(**inputs)):
            return impl
    reasons = explain(op, **inputs)
    raise BackendUnavailableError(
        f"no backend can run {op}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items()))
