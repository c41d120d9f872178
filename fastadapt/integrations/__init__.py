"""``fastadapt.patch(model)``: swap other libraries' adapter modules for the fused ops, in place.

Each integration (PEFT LoRA, PEFT adaption prompt, AdapterHub bottleneck adapters, ...) is a
:class:`Patcher`: it walks the model, patches what it can serve, and records in the report what it
left alone and why, and, per patched module, the call-time conditions under which that module will
still run its library's own forward. :func:`unpatch` undoes every patch.
"""

from __future__ import annotations

import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch


class FallbackError(RuntimeError):
    """A module patched with ``fastadapt.patch(model, strict=True)`` had to run its library's own
    forward for a call (the message names the module and the reason)."""


@dataclass
class PatchReport:
    """What :func:`patch` did.

    ``patched`` and ``skipped`` are (module name, detail) pairs; ``fallbacks`` are (module name,
    conditions) pairs: the call-time conditions under which a patched module still runs its
    library's own forward. ``calls`` counts, live, the patched modules' calls since patching:
    ``"fused"``, and ``"fallback: <reason>"`` per reason (eager calls; a call inside a
    ``torch.compile`` graph is not counted).
    """

    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    strict: bool = False
    calls: Counter = field(default_factory=Counter)
    _warned: bool = field(default=False, repr=False)

    def __str__(self) -> str:
        lines = [f"fastadapt: patched {len(self.patched)} module(s), left {len(self.skipped)} alone"]
        lines += [f"  patched  {name}: {what}" for name, what in self.patched]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        by_conditions: dict[str, list[str]] = {}
        for name, conditions in self.fallbacks:
            by_conditions.setdefault(conditions, []).append(name)
        for conditions, names in by_conditions.items():
            lines.append(f"  at call time, {len(names)} patched module(s) still run the library's forward when: "
                         f"{conditions}")
        return "\n".join(lines)

    def fall_back(self, module_name: str, reason: str) -> None:
        """Called by a patched forward that hands this call to the library: raise under ``strict``,
        otherwise count it and warn once per report (the first fallback, with its reason)."""
        if self.strict:
            raise FallbackError(f"{module_name}: ran the library's own forward: {reason} "
                                "(fastadapt.patch(model, strict=True))")
        if not torch.compiler.is_compiling():
            self.calls[f"fallback: {reason}"] += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"fastadapt: {module_name} runs the library's own forward, not the fused op: {reason}. "
                          "This warning is shown once; the patch report's `calls` counts every fallback.",
                          stacklevel=3)

    def fused(self) -> None:
        """Called by a patched forward that runs the fused op."""
        if not torch.compiler.is_compiling():
            self.calls["fused"] += 1


class Patcher(Protocol):
    name: str

    def patch(self, model: torch.nn.Module, report: PatchReport) -> None: ...

    def unpatch(self, model: torch.nn.Module, report: PatchReport) -> None: ...


_NAME, _REPORT = "_fastadapt_name", "_fastadapt_report"


def bind_forward(module: torch.nn.Module, forward, mark: str, *, name: str, report: PatchReport, what: str,
                 fallbacks: str) -> None:
    """Route ``module``'s calls through ``forward(module, ...)``: an instance attribute over the
    class's forward, so the library's parameters, buffers and methods stay as they are; then
    :func:`mark_patched`."""
    module.forward = types.MethodType(forward, module)
    mark_patched(module, mark, name=name, report=report, what=what, fallbacks=fallbacks)


def mark_patched(module: torch.nn.Module, mark: str, *, name: str, report: PatchReport, what: str,
                 fallbacks: str) -> None:
    """Record ``module`` in ``report`` as patched (``what``), with the call-time ``fallbacks``
    conditions; its fused path reaches the report through :func:`report_of`."""
    setattr(module, mark, True)
    attach(module, name, report)
    report.patched.append((name, what))
    if fallbacks:
        report.fallbacks.append((name, fallbacks))


def is_bound(module: torch.nn.Module, mark: str) -> bool:
    return getattr(module, mark, False)


def attach(module: torch.nn.Module, name: str | None, report: PatchReport | None) -> None:
    """Give ``module`` the report its fused path counts and falls back through (``None``: take it away).
    Plain attributes: a report is no submodule or state."""
    for attr, value in ((_NAME, name), (_REPORT, report)):
        if value is None:
            module.__dict__.pop(attr, None)
        else:
            object.__setattr__(module, attr, value)


def report_of(module: torch.nn.Module) -> tuple[str, PatchReport]:
    """(module name, report) of a module patched by :func:`bind_forward`."""
    return module.__dict__[_NAME], module.__dict__[_REPORT]


def unbind_forward(module: torch.nn.Module, mark: str) -> None:
    """Undo :func:`bind_forward`: the class's own forward runs again."""
    del module.forward
    unmark(module, mark)


def unmark(module: torch.nn.Module, mark: str) -> None:
    """Undo :func:`mark_patched`."""
    delattr(module, mark)
    attach(module, None, None)


def _patchers() -> list[Patcher]:
    # Imported here: each integration imports its library (peft, adapters) only when asked to patch.
    from fastadapt.integrations import adapterhub, peft_adaption_prompt, peft_lora, peft_moe, peft_prefix_tuning
    return [peft_lora.PATCHER, peft_moe.PATCHER, peft_adaption_prompt.PATCHER, peft_prefix_tuning.PATCHER,
            adapterhub.PATCHER]


def patch(model: torch.nn.Module, strict: bool = False) -> PatchReport:
    """Route every adapter module of ``model`` that fastadapt can serve through the fused ops.

    Parameters, adapter names and state-dict keys are untouched, so the library's own methods
    (``set_adapter``, ``merge_and_unload``, ``save_pretrained``...) keep working. Returns a report of
    what was patched, what was left alone and why, and under which call-time conditions a patched
    module still runs its library's own forward. Such a call warns once; with ``strict=True`` it
    raises :class:`FallbackError` instead.
    """
    report = PatchReport(strict=strict)
    for patcher in _patchers():
        patcher.patch(model, report)
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch`: every patched module runs its library's own forward again."""
    report = PatchReport()
    for patcher in _patchers():
        patcher.unpatch(model, report)
    return report
