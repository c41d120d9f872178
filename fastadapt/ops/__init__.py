"""Custom ops (``torch.ops.fastadapt.*``) with autograd and dispatch, one module per op."""

from fastadapt.ops.bottleneck import bottleneck_adapter
from fastadapt.ops.lora import lora_linear
from fastadapt.ops.multi_lora import multi_lora_linear
from fastadapt.ops.prefix_attention import prefix_attention

# The native backends "cpp" and "cuda" of all three ops (csrc/): registering them builds nothing;
# the extension is built when dispatch first asks them (fastadapt/_native.py).
from fastadapt.ops import _native_backends  # noqa: E402,F401  (isort: after the ops it registers)

__all__ = ["bottleneck_adapter", "lora_linear", "multi_lora_linear", "prefix_attention"]
