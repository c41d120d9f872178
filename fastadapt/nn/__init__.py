"""Drop-in ``nn.Module`` replacements built on the fused ops."""

from fastadapt.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
