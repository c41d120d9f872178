"""``fastadapt.patch(model)``: swap other libraries' adapter modules for the fused ops, in place.

Each integration (PEFT LoRA, PEFT LoRA on MoE experts, PEFT adaption prompt, AdapterHub bottleneck
adapters, ...) is a :class:`Patcher`: it walks the model, patches what it can serve, and records in
the report what it left alone and why, and, per patched module, the call-time conditions under
which that module will still run its library's own forward. :func:`unpatch` undoes every patch.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

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


@dataclass(frozen=True)
class Rule:
    """One condition under which a patched module hands a call to its library's forward, declared
    once for both places that state it: ``when`` is its text in the patch report (a string, or
    ``when(module)``: the text for that module, None where it cannot arise there, judged at patch
    time) and ``why(call)`` checks a call (the reason, or None)."""

    when: str | Callable[[torch.nn.Module], str | None]
    why: Callable[..., str | None]


def conditions(rules, module: torch.nn.Module) -> str:
    """The report's call-time conditions of ``module``: the texts of the ``rules`` that can arise there."""
    texts = (rule.when if isinstance(rule.when, str) else rule.when(module) for rule in dict.fromkeys(rules))
    return "; ".join(text for text in texts if text is not None)


def first_reason(rules, call) -> str | None:
    """The reason of the first of the ``rules`` that ``call`` meets (None: the fused op serves it)."""
    return next((reason for rule in rules if (reason := rule.why(call)) is not None), None)


class Patcher(Protocol):
    name: str
    library: str  # the top-level package of the modules it patches ("peft", "adapters")

    def patch(self, model: torch.nn.Module, report: PatchReport, prefix: str = "") -> None:
        """Patch what it serves in ``model``, whose modules are named ``prefix``-first: "" from
        :func:`patch`, the name of a module that joins a patched model later (:func:`_join`)."""

    def unpatch(self, model: torch.nn.Module, report: PatchReport) -> None: ...


_NAME, _REPORT = "_fastadapt_name", "_fastadapt_report"


def bind(module: torch.nn.Module, attr: str, function) -> None:
    """``module.<attr>`` becomes ``function`` bound to ``module``: an instance attribute over the
    class's own, undone by ``del module.<attr>``.

    A ``functools.partial``, not a bound method, so that a patched model can be pickled or
    ``torch.save``d whole: a ``types.MethodType`` pickles as ``getattr(module, function.__name__)``,
    which fails when it is loaded (the module has no such attribute); a partial pickles as the
    function, by its qualified name, and the module (which pickle and deepcopy resolve to the
    module's copy)."""
    setattr(module, attr, functools.partial(function, module))


def bind_forward(module: torch.nn.Module, forward, mark: str, *, name: str, report: PatchReport, what: str,
                 fallbacks: str) -> None:
    """Route ``module``'s calls through ``forward(module, ...)`` (:func:`bind`), so the library's
    parameters, buffers and methods stay as they are; then :func:`mark_patched`."""
    bind(module, "forward", forward)
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


# --- Modules that join a patched model later (an adapter added, loaded or swapped in after patch())
# are patched as they are registered: every module of a patched model carries a _Site, and a
# module-registration hook (torch's, process-wide) patches what is registered under one.

_SITE = "_fastadapt_site"
_HOOK = []  # the registration hook's handle, once installed


class _Site:
    """A module's name in a patched model, and that model's report."""

    __slots__ = ("name", "report")

    def __init__(self, name: str, report: PatchReport):
        _install_hook()  # also where a pickled patched model is loaded
        self.name, self.report = name, report

    def __reduce__(self):
        return _Site, (self.name, self.report)


def _install_hook() -> None:
    if not _HOOK:
        _HOOK.append(torch.nn.modules.module.register_module_module_registration_hook(_on_register))


def _on_register(parent: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
    site = parent.__dict__.get(_SITE)
    if site is not None and submodule is not None:
        _join(submodule, f"{site.name}.{name}" if site.name else name, site.report)


def _join(module: torch.nn.Module, name: str, report: PatchReport) -> None:
    """Patch what is servable in ``module``, which joins a patched model as ``name``."""
    start = len(report.skipped)
    # Only the patchers of a library with a module in there (this runs at every registration into a
    # patched model: most are PEFT's nn.Linear per adapter in a LoRA layer, no patcher's business).
    libraries = {type(m).__module__.partition(".")[0] for m in module.modules()}
    for patcher in _patchers():
        if patcher.library in libraries:
            patcher.patch(module, report, prefix=name)
    if len(report.skipped) > start:
        # A module swapped back in (PEFT's set_adapter does that with adaption prompts) is patched
        # already, or was reported when first seen: nothing new to say.
        known = set(report.skipped[:start])
        report.skipped[start:] = [entry for entry in dict.fromkeys(report.skipped[start:])
                                  if entry not in known and entry[1] != "already patched"]
    track(module, name, report)


def track(module: torch.nn.Module, name: str, report: PatchReport | None) -> None:
    """Mark ``module`` and everything in it as part of a patched model (``report`` None: no longer)."""
    for sub_name, sub in module.named_modules(prefix=name):
        if report is None:
            sub.__dict__.pop(_SITE, None)
        else:
            sub.__dict__[_SITE] = _Site(sub_name, report)


def patch(model: torch.nn.Module, strict: bool = False, report: PatchReport | None = None) -> PatchReport:
    """Route every adapter module of ``model`` that fastadapt can serve through the fused ops.

    Parameters, adapter names and state-dict keys are untouched, so the library's own methods
    (``set_adapter``, ``merge_and_unload``, ``save_pretrained``...) keep working. Returns a report of
    what was patched, what was left alone and why, and under which call-time conditions a patched
    module still runs its library's own forward. Such a call warns once; with ``strict=True`` it
    raises :class:`FallbackError` instead. The model stays patched: adapter modules added to it
    later (``add_adapter``, ``load_adapter``, another adapter swapped in) are patched when they are
    registered in it, and the report lists them. ``report``: an earlier patch's report to add to
    (modules patched before stay as they are; ``strict`` is then the report's), as
    ``FastAdaptCallback`` does.
    """
    if report is None:
        report = PatchReport(strict=strict)
    for patcher in _patchers():
        patcher.patch(model, report)
    track(model, "", report)
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch`: every patched module runs its library's own forward again."""
    report = PatchReport()
    track(model, "", None)
    for patcher in _patchers():
        patcher.unpatch(model, report)
    return report
