"""``fastadapt.nn.LoRALinear``: a drop-in LoRA linear with PEFT's parameter names, on the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastadapt import _distributed, dispatch
from fastadapt.ops.lora import lora_linear


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` in one fused op.

    Submodules and state-dict keys are PEFT's (``base_layer.weight``, ``base_layer.bias``,
    ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``), so a PEFT LoRA layer's state dict
    loads here and back. The base layer is frozen; ``lora_A`` starts Kaiming-uniform and ``lora_B``
    at zero, as in PEFT, so the module starts as the base layer.

    ``merge()`` folds ``scaling * B A`` into the base weight for inference (no extra latency);
    ``unmerge()`` takes it out again (exact up to the weight dtype's rounding, as in PEFT).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, bias: bool = True,
                 adapter_name: str = "default", device=None, dtype=None):
        super().__init__()
        self._init_adapter(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype),
                           r, lora_alpha, lora_dropout, use_rslora, adapter_name)

    def _init_adapter(self, base_layer: nn.Linear, r, lora_alpha, lora_dropout, use_rslora, adapter_name):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        w = base_layer.weight
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapter_name = adapter_name
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(
            self.in_features, r, bias=False, device=w.device, dtype=w.dtype)})
        self.lora_B = nn.ModuleDict({adapter_name: nn.Linear(
            r, self.out_features, bias=False, device=w.device, dtype=w.dtype)})
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_name: str = "default") -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` (shared, not copied) as the frozen base layer."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_adapter(linear, r, lora_alpha, lora_dropout, use_rslora, adapter_name)
        return module

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A[self.adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[self.adapter_name].weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` (out, in), computed in float32 and returned in the base weight's dtype."""
        A = self.lora_A[self.adapter_name].weight.float()
        B = self.lora_B[self.adapter_name].weight.float()
        return (B @ A * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return lora_linear(x, self.weight, self.lora_A[self.adapter_name].weight,
                           self.lora_B[self.adapter_name].weight, self.scaling, self.bias,
                           dropout_p=self.lora_dropout, training=self.training)

    def backend(self) -> str:
        """The backend that serves this module's parameters as they are now (device, dtype)."""
        w = self.weight
        if self.merged:
            return "merged (base layer only)"
        A, B = self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight
        if _distributed.sharded(w, A, B):  # outside the forward: FSDP2 shards or ZeRO-3 partitions
            return "chosen per call (parameters sharded)"
        return dispatch.select("lora_linear", x=w, weight=w, lora_A=A.to(w.dtype), lora_B=B.to(w.dtype),
                               bias=self.bias).backend

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}, backend={self.backend()}")
