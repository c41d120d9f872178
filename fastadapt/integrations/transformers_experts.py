"""transformers' MoE experts on ``fastadapt::moe_lora_experts``, and the ``"fastadapt"`` entry of its
experts interface.

transformers 5 stores each MoE block's experts as 3-D parameters (``gate_up_proj``, ``down_proj``,
gpt-oss's transposed with biases) and runs them through ``experts_implementation``
(``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``). :func:`register` adds ``"fastadapt"``
there: ``from_pretrained(..., experts_implementation="fastadapt")`` (or
``model.set_experts_implementation("fastadapt")``) then runs every experts module of the model on
the fused op. A weight that PEFT's ``target_parameters`` LoRA has parametrized for the call (PEFT's
``ParamWrapper`` folds ``W + s B A`` into the parameter around the experts' forward) is read as
its unmodified original plus the LoRA factors PEFT's parametrization holds, so ``W + s B A`` is
never formed; a parametrization holding a materialised delta (several active adapters, float8
weights) is read as PEFT made it. What the op does not serve (another activation, a post-expert
norm, experts without a gate, expert parallelism, expert weights that require grad in grad mode)
runs transformers' ``grouped_mm`` experts, with a warning naming the reason once per reason.

:func:`describe` and :func:`run` are what the PEFT patch (:mod:`fastadapt.integrations.peft_moe`)
and ``fastadapt.nn.LoRAExperts`` share with it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastadapt.integrations import Rule, first_reason
from fastadapt.ops._autocast import autocast_dtype
from fastadapt.ops.moe_lora import moe_lora_experts

EXPERTS_IMPLEMENTATION = "fastadapt"
TARGETS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """How one experts module is laid out and gated, as the op takes it."""

    activation: str
    alpha: float
    limit: float
    transposed: bool  # weights stored (E, in, out) (gpt-oss), passed to the op as transposed views
    bias: bool


def describe(experts: nn.Module) -> Layout | str:
    """The :class:`Layout` of a transformers experts module, or why the op cannot serve it."""
    from transformers.integrations.moe import _default_apply_gate

    for name in TARGETS:
        weight = getattr(experts, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return f"{type(experts).__name__} has no 3-D {name} (not transformers' experts layout)"
    if not getattr(experts, "has_gate", True):
        return "experts without a gate (up_proj only) are not served"
    if getattr(experts, "has_post_expert_norm", False):
        return "a post-expert norm is not served"
    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    if gate is _default_apply_gate:
        from transformers.activations import SiLUActivation

        if not isinstance(getattr(experts, "act_fn", None), (SiLUActivation, nn.SiLU)):
            return f"activation {type(getattr(experts, 'act_fn', None)).__name__} is not served (silu only)"
        layout = Layout("silu", 0.0, 0.0, bool(getattr(experts, "is_transposed", False)), False)
    elif _is_gpt_oss_gate(gate):
        layout = Layout("gpt_oss", float(experts.alpha), float(experts.limit),
                        bool(getattr(experts, "is_transposed", False)), False)
    else:
        return f"{type(experts).__name__}._apply_gate is neither SwiGLU nor gpt-oss's clamped SwiGLU"
    if getattr(experts, "has_bias", False):
        layout = Layout(layout.activation, layout.alpha, layout.limit, layout.transposed, True)
    return layout


def _is_gpt_oss_gate(gate) -> bool:
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return False
    return gate is GptOssExperts._apply_gate


def factors(lora_A: torch.Tensor, lora_B: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) from PEFT's ``ParamWrapper`` layout, as views, no copy:
    ``lora_A`` (r E, in), expert-major rows, and ``lora_B`` (out, r E), whose column k E + e is expert
    e's k-th (PEFT's ``get_delta_weight``)."""
    return lora_A.view(n_experts, -1, lora_A.shape[1]), lora_B.view(lora_B.shape[0], -1, n_experts).permute(2, 0, 1)


@dataclass
class ExpertsCall:
    """One call of an experts module, as the conditions below judge it."""

    experts: nn.Module
    x: torch.Tensor
    weights: list  # the frozen tensors the op would read (expert weights, biases)


def _weights_grad(call: ExpertsCall) -> str | None:
    if torch.is_grad_enabled() and any(w.requires_grad for w in call.weights):
        return "the expert weights require grad (the op trains LoRA factors, not the experts)"
    return None


def _dtype(call: ExpertsCall) -> str | None:
    if autocast_dtype(call.x) is None and any(w.dtype != call.x.dtype for w in call.weights):
        return f"input dtype {call.x.dtype} differs from the expert weights' {call.weights[0].dtype} outside autocast"
    return None


# The conditions under which a call runs the library's own experts (fastadapt.integrations.Rule:
# each states itself in the patch report and checks the calls). Shared with the PEFT patch.
EXPERT_PARALLEL = Rule("expert parallelism", lambda call: "expert parallelism (routing sentinels past the local "
                       "experts)" if getattr(call.experts, "_is_expert_parallel", False) else None)
WEIGHTS_GRAD = Rule("expert weights that require grad", _weights_grad)
DTYPE = Rule("an input dtype other than the expert weights' outside autocast", _dtype)
RULES = (EXPERT_PARALLEL, WEIGHTS_GRAD, DTYPE)


def call_reason(experts: nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> Optional[str]:
    """Why this call must run the library's own experts (None: the op serves it)."""
    return first_reason(RULES, ExpertsCall(experts, x, weights))


def weights(experts: nn.Module, layout: Layout, raw: dict | None = None) -> list[torch.Tensor]:
    """[gate_up_proj, down_proj (the op's (E, out, in) views), gate_up bias, down bias (or None)].
    ``raw``: the parameters to read instead of the module's attributes (PEFT's originals)."""
    raw = raw or {}
    out = []
    for name in TARGETS:
        w = raw.get(name, getattr(experts, name))
        out.append(w.transpose(1, 2) if layout.transposed else w)
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        out.append(getattr(experts, name) if layout.bias else None)
    return out


def run(layout: Layout, x, top_k_index, top_k_weights, frozen: list, lora: dict, dropout_p: float = 0.0,
        training: bool = False):
    """``fastadapt.moe_lora_experts`` on an experts module's frozen ``weights(...)`` and ``lora``:
    ``{"gate_up_proj": (A (E, r, in), B (E, out, r), scaling), "down_proj": ...}`` (either absent)."""
    gate_up, down = lora.get("gate_up_proj"), lora.get("down_proj")
    return moe_lora_experts(
        x, top_k_index, top_k_weights, frozen[0], frozen[1], gate_up_bias=frozen[2], down_bias=frozen[3],
        gate_up_A=gate_up[0] if gate_up else None, gate_up_B=gate_up[1] if gate_up else None,
        gate_up_scaling=gate_up[2] if gate_up else 1.0, down_A=down[0] if down else None,
        down_B=down[1] if down else None, down_scaling=down[2] if down else 1.0, activation=layout.activation,
        alpha=layout.alpha, limit=layout.limit, dropout_p=dropout_p, training=training)


def _peft_factors(experts: nn.Module, name: str):
    """(original parameter, LoRA factors (A, B, scaling) or None) of a weight that PEFT has
    parametrized for this call, or None if it is not parametrized, or holds anything else than
    PEFT's one-adapter factor proxy (then the parametrized weight is what to read)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(experts, name):
        return None
    chain = experts.parametrizations[name]
    if len(chain) != 1 or type(chain[0]).__name__ != "_LoraFactorsProxy":
        return None
    proxy = chain[0]
    lhs, rhs = proxy.lhs, proxy.rhs
    if not getattr(experts, "is_transposed", False):  # (E, out, in): lhs = B (E, out, r), rhs = A (E, r, in)
        return chain.original, (rhs, lhs, proxy.scaling)
    return chain.original, (lhs.transpose(1, 2), rhs.transpose(1, 2), proxy.scaling)  # (E, in, out): A^T, B^T


_warned: set[str] = set()


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts function ``"fastadapt"`` (``experts_implementation="fastadapt"``)."""
    layout = describe(self)
    raw, lora = {}, {}
    if not isinstance(layout, str):
        for name in TARGETS:
            found = _peft_factors(self, name)
            if found is not None:
                raw[name], lora[name] = found
        frozen = weights(self, layout, raw)
        reason = call_reason(self, hidden_states, [w for w in frozen if w is not None])
    else:
        reason = layout
    if reason is None:
        return run(layout, hidden_states, top_k_index, top_k_weights, frozen, lora)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastadapt: experts_implementation='fastadapt' runs transformers' grouped_mm experts for "
                      f"{type(self).__name__}: {reason}", stacklevel=2)
    from transformers.integrations.moe import grouped_mm_experts_forward
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> str:
    """Add ``"fastadapt"`` to transformers' experts interface (idempotent); returns the name to pass
    as ``experts_implementation``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return EXPERTS_IMPLEMENTATION
