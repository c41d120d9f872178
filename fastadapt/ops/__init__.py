"""Custom ops (``torch.ops.fastadapt.*``) with autograd and dispatch, one module per op."""

from fastadapt.ops.lora import lora_linear

__all__ = ["lora_linear"]
