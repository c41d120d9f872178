"""``fastadapt.patch(model)``: swap other libraries' adapter modules for the fused ops, in place.

Each integration (PEFT LoRA, PEFT adaption prompt, AdapterHub bottleneck adapters, ...) is a
:class:`Patcher`: it walks the model, patches what it can serve, and records in the report what it
left alone and why. :func:`unpatch` undoes every patch.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class PatchReport:
    """What :func:`patch` did: ``patched`` and ``skipped`` are (module name, detail) pairs."""

    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastadapt: patched {len(self.patched)} module(s), left {len(self.skipped)} alone"]
        lines += [f"  patched  {name}: {what}" for name, what in self.patched]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class Patcher(Protocol):
    name: str

    def patch(self, model: torch.nn.Module, report: PatchReport) -> None: ...

    def unpatch(self, model: torch.nn.Module, report: PatchReport) -> None: ...


def bind_forward(module: torch.nn.Module, forward, mark: str) -> None:
    """Route ``module``'s calls through ``forward(module, ...)``: an instance attribute over the
    class's forward, so the library's parameters, buffers and methods stay as they are."""
    module.forward = types.MethodType(forward, module)
    setattr(module, mark, True)


def is_bound(module: torch.nn.Module, mark: str) -> bool:
    return getattr(module, mark, False)


def unbind_forward(module: torch.nn.Module, mark: str) -> None:
    """Undo :func:`bind_forward`: the class's own forward runs again."""
    del module.forward
    delattr(module, mark)


def _patchers() -> list[Patcher]:
    # Imported here: each integration imports its library (peft, adapters) only when asked to patch.
    from fastadapt.integrations import adapterhub, peft_adaption_prompt, peft_lora
    return [peft_lora.PATCHER, peft_adaption_prompt.PATCHER, adapterhub.PATCHER]


def patch(model: torch.nn.Module) -> PatchReport:
    """Route every adapter module of ``model`` that fastadapt can serve through the fused ops.

    Parameters, adapter names and state-dict keys are untouched, so the library's own methods
    (``set_adapter``, ``merge_and_unload``, ``save_pretrained``...) keep working. Returns a report of
    what was patched and what was left alone, and why.
    """
    report = PatchReport()
    for patcher in _patchers():
        patcher.patch(model, report)
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch`: every patched module runs its library's own forward again."""
    report = PatchReport()
    for patcher in _patchers():
        patcher.unpatch(model, report)
    return report
