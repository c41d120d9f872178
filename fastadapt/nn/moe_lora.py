"""``LoRAExperts``: a transformers MoE experts module with per-expert LoRA, on the fused op."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from fastadapt.integrations import transformers_experts as experts_op


class LoRAExperts(nn.Module):
    """Per-expert LoRA on a transformers experts module's ``gate_up_proj`` and / or ``down_proj``
    (3-D parameters, any MoE family :func:`fastadapt.integrations.transformers_experts.describe`
    accepts), run by ``fastadapt.moe_lora_experts``: ``W + s B A`` is never formed.

    The factors are kept in PEFT's ``target_parameters`` layout (``ParamWrapper``): for each
    targeted parameter ``name``, ``lora_A[name].weight`` (r E, in) and ``lora_B[name].weight``
    (out, r E), initialised as PEFT does (A Kaiming-uniform, B zero). Unlike PEFT's ``ParamWrapper``,
    ``lora_dropout`` is supported: dropout on each LoRA's input, one mask per (token, expert) pair,
    as PEFT's per-expert ``nn.Linear`` LoRA layers draw them. The experts' own parameters are frozen.

    Called as the experts module it wraps: ``(hidden_states (T, H), top_k_index, top_k_weights)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 target_parameters: Sequence[str] = experts_op.TARGETS, use_rslora: bool = False):
        super().__init__()
        layout = experts_op.describe(base_layer)
        if isinstance(layout, str):
            raise ValueError(f"LoRAExperts cannot serve {type(base_layer).__name__}: {layout}")
        if not target_parameters or not set(target_parameters) <= set(experts_op.TARGETS):
            raise ValueError(f"target_parameters must be a non-empty subset of {experts_op.TARGETS}, "
                             f"got {target_parameters!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        self.layout = layout
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        weight = base_layer.gate_up_proj
        self.num_experts = weight.shape[0]
        for name in target_parameters:
            w = getattr(base_layer, name)
            n_in, n_out = (w.shape[1], w.shape[2]) if layout.transposed else (w.shape[2], w.shape[1])
            kw = dict(bias=False, device=w.device, dtype=w.dtype)
            self.lora_A[name] = nn.Linear(n_in, r * self.num_experts, **kw)
            self.lora_B[name] = nn.Linear(r * self.num_experts, n_out, **kw)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # PEFT's reset_lora_parameters
            nn.init.zeros_(self.lora_B[name].weight)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        lora = {name: (*experts_op.factors(self.lora_A[name].weight, self.lora_B[name].weight, self.num_experts),
                       self.scaling) for name in self.lora_A}
        return experts_op.run(self.layout, hidden_states, top_k_index, top_k_weights,
                              experts_op.weights(self.base_layer, self.layout), lora, self.lora_dropout, self.training)

    def extra_repr(self) -> str:
        return (f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}, experts={self.num_experts}, "
                f"targets={list(self.lora_A)}, activation={self.layout.activation}")


def add_experts_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     target_parameters: Sequence[str] = experts_op.TARGETS, use_rslora: bool = False) -> list[str]:
    """Wrap every experts module of ``model`` that the op serves in a :class:`LoRAExperts`; returns
    their names. The rest of the model is left as it is (freeze it as you train)."""
    found = [(name, module) for name, module in model.named_modules()
             if not isinstance(module, LoRAExperts) and not isinstance(experts_op.describe(module), str)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                LoRAExperts(module, r, lora_alpha, lora_dropout, target_parameters, use_rslora))
    return [name for name, _ in found]
