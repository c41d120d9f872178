"""fastadapt: fused kernels for parameter-efficient fine-tuning (LoRA, DoRA, bottleneck adapters, gated prefix attention)."""

from fastadapt.dispatch import BackendUnavailableError, use_backend
from fastadapt.inject.bottleneck import (add_adapter, list_adapters, load_adapter, remove_adapter, save_adapter,
                                         set_active, set_active_adapter)
from fastadapt.inject.llama_adapter import add_adaption_prompt
from fastadapt.integrations import FallbackError, PatchReport, patch, unpatch
from fastadapt.ops import (QuantizedWeight, bottleneck_adapter, dora_linear, fp8_weight, lora_linear,
                           moe_lora_experts, multi_lora_linear, nf4_from_bnb, nf4_weight, prefix_attention,
                           qlora_linear)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FallbackError",
    "FastAdaptCallback",
    "PatchReport",
    "QuantizedWeight",
    "add_adapter",
    "add_adaption_prompt",
    "bottleneck_adapter",
    "dora_linear",
    "fp8_weight",
    "list_adapters",
    "load_adapter",
    "lora_linear",
    "moe_lora_experts",
    "multi_lora_linear",
    "nf4_from_bnb",
    "nf4_weight",
    "patch",
    "prefix_attention",
    "qlora_linear",
    "remove_adapter",
    "save_adapter",
    "set_active",
    "set_active_adapter",
    "unpatch",
    "use_backend",
]


def __getattr__(name):
    # FastAdaptCallback subclasses transformers.TrainerCallback: import transformers only when asked.
    if name == "FastAdaptCallback":
        from fastadapt.integrations.trainer import FastAdaptCallback
        return FastAdaptCallback
    raise AttributeError(f"module 'fastadapt' has no attribute {name!r}")
