"""Custom ops (``torch.ops.fastadapt.*``) with autograd and dispatch, one module per op: its
declaration (fastadapt/ops/_declare.py), its argument checks and its backends. Registering the
native backends ("cpp", "cuda") builds nothing: the extension is built when dispatch first asks
them (fastadapt/_native.py)."""

from fastadapt.ops.bottleneck import bottleneck_adapter
from fastadapt.ops.dora import dora_linear
from fastadapt.ops.lora import lora_linear
from fastadapt.ops.moe_lora import moe_lora_experts
from fastadapt.ops.multi_lora import multi_lora_linear
from fastadapt.ops.prefix_attention import prefix_attention
from fastadapt.ops.qlora import QuantizedWeight, fp8_weight, nf4_from_bnb, nf4_weight, qlora_linear

__all__ = ["QuantizedWeight", "bottleneck_adapter", "dora_linear", "fp8_weight", "lora_linear", "moe_lora_experts",
           "multi_lora_linear", "nf4_from_bnb", "nf4_weight", "prefix_attention", "qlora_linear"]
