"""Drop-in ``nn.Module`` replacements built on the fused ops."""

from fastadapt.nn.lora import LoRALinear
from fastadapt.nn.prefix_attention import GatedPrefixAttention

__all__ = ["GatedPrefixAttention", "LoRALinear"]
