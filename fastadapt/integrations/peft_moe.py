"""PEFT's LoRA on MoE experts (``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])``) on the fused op ``fastadapt::moe_lora_experts``.

PEFT wraps a transformers experts module in one ``ParamWrapper`` per targeted parameter, nested
(``experts`` = wrapper(down_proj) around wrapper(gate_up_proj) around the experts module), and each
call parametrizes the weight as ``W + s B A`` for every expert around the experts' forward. The
patch replaces the outermost wrapper's ``forward``: the whole chain's LoRA factors are read in
place (:func:`lora_factors`: PEFT's ``lora_A.weight`` (r E, in) and ``lora_B.weight`` (out, r E) as
per-expert views, no copy) and one fused call runs the experts with every LoRA, never forming
``W + s B A``. PEFT keeps its parameters, adapters, ``set_adapter``, ``disable_adapter``,
``merge_and_unload`` and ``save_pretrained``.

Served: every transformers MoE family whose experts are 3-D parameters with SwiGLU (Qwen2/3-MoE,
Mixtral, DeepSeek-V2/V3, OLMoE, GLM-4-MoE, ...) or gpt-oss's clamped SwiGLU with biases; LoRA on
either projection or both; several active adapters (summed, as PEFT sums their deltas: one call on
their concatenated ranks); merged adapters (already in the weight) next to unmerged ones; dropout,
were PEFT to allow it on ``ParamWrapper`` (it refuses today). Left to PEFT's forward, reported per
module and refused under ``strict``: mixed-batch ``adapter_names`` (PEFT's ``ParamWrapper``
refuses them itself: "does not support mixed adapter batches"), extra forward arguments, adapters
with different dropout probabilities, ``lora_bias``, expert parallelism, expert weights that
require grad, and an input dtype other than the weights' outside autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastadapt.integrations import (PatchReport, Rule, bind_forward, conditions, first_reason, is_bound, report_of,
                                    unbind_forward)
from fastadapt.integrations import transformers_experts as experts_op
from fastadapt.ops._autocast import autocast_dtype

_MARK = "_fastadapt_moe_patched"


def _param_wrapper():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a PEFT without target_parameters
        return None
    return ParamWrapper


def chain(wrapper) -> tuple[list, nn.Module]:
    """(the ParamWrappers from ``wrapper`` inwards, the module they wrap)."""
    wrapper_class = _param_wrapper()
    wrappers, module = [], wrapper
    while isinstance(module, wrapper_class):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def lora_factors(wrapper, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) of one adapter of a PEFT ``ParamWrapper``, views of its weights."""
    return experts_op.factors(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, wrapper.num_experts)


def _dropout_p(wrapper, adapter: str) -> float:
    dropout = wrapper.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _static_reason(wrappers, experts) -> str | None:
    """Why a chain can never take the fused path (checked once, at patch time)."""
    names = [w.parameter_name for w in wrappers]
    if len(set(names)) != len(names) or not set(names) <= set(experts_op.TARGETS):
        return f"target_parameters {names} (served: gate_up_proj and down_proj, each at most once)"
    if any(w.num_experts < 2 or getattr(w, "_param_ndim", 3) != 3 for w in wrappers):
        return "LoRA on a 2-D parameter (not a stack of experts)"
    layout = experts_op.describe(experts)
    return layout if isinstance(layout, str) else None


def _adapters(wrapper) -> list[str]:
    """The adapters this wrapper adds to the weight in this call: active, present, not merged into it."""
    return [a for a in wrapper.active_adapters if a in wrapper.lora_A and a not in wrapper.merged_adapters]


def _projection_lora(wrapper, adapters: list[str], dtype: torch.dtype):
    """(A, B, scaling) of one projection for the op: one adapter as PEFT's views; several as one
    update of their concatenated ranks, each adapter's scaling folded into its columns of B."""
    if len(adapters) == 1:
        A, B = lora_factors(wrapper, adapters[0])
        scaling = wrapper.scaling[adapters[0]]
        if isinstance(scaling, torch.Tensor):  # PEFT's hotswap scalings: folded into B on the device
            return A, B * scaling.reshape(()), 1.0
        return A, B, scaling
    factors = [lora_factors(wrapper, a) for a in adapters]
    return (torch.cat([A.to(dtype) for A, _ in factors], dim=1),
            torch.cat([(B * wrapper.scaling[a]).to(dtype) for a, (_, B) in zip(adapters, factors)], dim=2), 1.0)


@dataclass
class _Call:
    """One call of a patched chain, as the conditions below judge it (the experts' own conditions,
    :data:`fastadapt.integrations.transformers_experts.RULES`, read ``experts``, ``x``, ``weights``)."""

    wrappers: list
    active: dict  # parameter name -> the adapters it adds in this call
    experts: nn.Module
    x: torch.Tensor
    weights: list
    args: tuple
    kwargs: dict
    ps: list  # each active adapter's dropout probability


def _lora_bias(wrappers, active=None) -> list[str]:
    return sorted({a for w in wrappers for a in (active[w.parameter_name] if active else w.lora_B)
                   if w.lora_B[a].bias is not None})


_MIXED = Rule("mixed-batch adapter_names (PEFT's ParamWrapper refuses them itself)",
              lambda call: "mixed-batch adapter_names on MoE experts (PEFT's ParamWrapper does not support them)"
              if call.kwargs.get("adapter_names") is not None else None)
_EXTRA = Rule("extra forward arguments", lambda call: "extra forward arguments"
              if call.args or any(v is not None for k, v in call.kwargs.items() if k != "adapter_names") else None)
_DROPOUTS = Rule(lambda m: "active adapters with different dropout probabilities"
                 if len(_all_adapters(m)) > 1 else None,
                 lambda call: f"adapters with different dropout probabilities {sorted(set(call.ps))} (the op takes one)"
                 if len(set(call.ps)) > 1 else None)
_BIAS = Rule(lambda m: f"lora_bias on adapter(s) {biased}" if (biased := _lora_bias(chain(m)[0])) else None,
             lambda call: f"lora_bias on adapter(s) {biased}"
             if (biased := _lora_bias(call.wrappers, call.active)) else None)
RULES = (_MIXED, _EXTRA, _DROPOUTS, _BIAS, *experts_op.RULES)


def _all_adapters(wrapper) -> set[str]:
    return {a for w in chain(wrapper)[0] for a in w.lora_A}


def _fused_forward(self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None, *args, **kwargs):
    wrappers, experts = chain(self)
    active = {w.parameter_name: _adapters(w) for w in wrappers}
    if self.disable_adapters or not any(active.values()):
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    name, report = report_of(self)
    layout = experts_op.describe(experts)
    ps = [_dropout_p(w, a) for w in wrappers for a in active[w.parameter_name]]
    frozen = experts_op.weights(experts, layout)
    call = _Call(wrappers, active, experts, hidden_states, [w for w in frozen if w is not None], args, kwargs, ps)
    reason = first_reason(RULES, call)
    if reason is not None:
        report.fall_back(name, reason)
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    report.fused()
    dtype = autocast_dtype(hidden_states) or hidden_states.dtype
    lora = {w.parameter_name: _projection_lora(w, active[w.parameter_name], dtype)
            for w in wrappers if active[w.parameter_name]}
    return experts_op.run(layout, hidden_states, top_k_index, top_k_weights, frozen, lora, ps[0] if ps else 0.0,
                          self.training)


class _PeftMoePatcher:
    name = "peft-moe"
    library = "peft"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        wrapper_class = _param_wrapper()
        if wrapper_class is None:
            return
        inner = {id(m.base_layer) for m in model.modules() if isinstance(m, wrapper_class)}
        for name, module in model.named_modules(prefix=prefix):
            if not isinstance(module, wrapper_class) or id(module) in inner:
                continue  # not a ParamWrapper, or one wrapped by another: the outermost serves the chain
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            wrappers, experts = chain(module)
            reason = _static_reason(wrappers, experts)
            if reason is not None:
                report.skipped.append((name, f"PEFT target_parameters LoRA: {reason}"))
                continue
            layout = experts_op.describe(experts)
            targets = " + ".join(w.parameter_name for w in reversed(wrappers))
            bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                         what=f"peft LoRA on {type(experts).__name__}.{targets} ({layout.activation}) -> "
                              "fastadapt::moe_lora_experts", fallbacks=conditions(RULES, module))

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                report.patched.append((name, "restored PEFT's forward"))


PATCHER = _PeftMoePatcher()
