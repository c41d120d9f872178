"""Custom ops (``torch.ops.fastadapt.*``) with autograd and dispatch, one module per op."""

from fastadapt.ops.bottleneck import bottleneck_adapter
from fastadapt.ops.dora import dora_linear
from fastadapt.ops.lora import lora_linear
from fastadapt.ops.multi_lora import multi_lora_linear
from fastadapt.ops.prefix_attention import prefix_attention
from fastadapt.ops.qlora import QuantizedWeight, fp8_weight, nf4_from_bnb, nf4_weight, qlora_linear

# The native backends "cpp" and "cuda" of the ops (csrc/; DoRA: cpp only): registering them builds nothing;
# the extension is built when dispatch first asks them (fastadapt/_native.py).
from fastadapt.ops import _native_backends  # noqa: E402,F401  (isort: after the ops it registers)

__all__ = ["QuantizedWeight", "bottleneck_adapter", "dora_linear", "fp8_weight", "lora_linear", "multi_lora_linear",
           "nf4_from_bnb", "nf4_weight", "prefix_attention", "qlora_linear"]
