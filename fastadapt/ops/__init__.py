"""Custom ops (``torch.ops.fastadapt.*``) with autograd and dispatch, one module per op."""

from fastadapt.ops.bottleneck import bottleneck_adapter
from fastadapt.ops.lora import lora_linear
from fastadapt.ops.prefix_attention import prefix_attention

__all__ = ["bottleneck_adapter", "lora_linear", "prefix_attention"]
