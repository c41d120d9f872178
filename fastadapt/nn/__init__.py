"""Drop-in ``nn.Module`` replacements built on the fused ops."""

from fastadapt.nn.bottleneck import BnConfig, BottleneckAdapter, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from fastadapt.nn.lora import LoRALinear
from fastadapt.nn.moe_lora import LoRAExperts, add_experts_lora
from fastadapt.nn.multi_lora import MultiLoRALinear
from fastadapt.nn.prefix_attention import GatedPrefixAttention

__all__ = ["BnConfig", "BottleneckAdapter", "DoubleSeqBnConfig", "GatedPrefixAttention", "LoRAExperts", "LoRALinear",
           "MultiLoRALinear", "ParBnConfig", "SeqBnConfig", "add_experts_lora"]
