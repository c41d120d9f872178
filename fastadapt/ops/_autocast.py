"""Autocast rules for the fused custom ops.

Inside ``torch.autocast(device, dtype)`` PyTorch runs its matmul-class ops (``linear``, ``mm``,
``scaled_dot_product_attention``) in the region's dtype: every floating input on that device,
float64 excepted, is cast to it. A fused op must do the same, or a model under the HF Trainer's
``bf16=True`` computes something other than the model it replaces.

``torch.library.register_autocast`` fixes the cast dtype when the rule is registered; a region's
dtype is chosen per ``torch.autocast`` call (bf16 or fp16, on the CPU or on CUDA), so the kernels
here read it at call time instead. They sit at the Autocast dispatch keys, above Autograd, so the
casts are recorded by autograd (gradients reach each input in its own dtype) and ``torch.compile``
traces them like any other autocast rule.
"""

from __future__ import annotations

import torch

_DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_lib = torch.library.Library("fastadapt", "FRAGMENT")


def cast(value, device_type: str, dtype: torch.dtype):
    """``value`` in ``dtype`` if it is a floating tensor on ``device_type`` other than float64."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type \
            and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a matmul on ``x`` is autocast to: the region's for ``x``'s device, or None
    outside autocast (float64 is never autocast)."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def register(op_name: str, keep: tuple[int, ...] = ()) -> None:
    """Give ``fastadapt::<op_name>`` PyTorch's matmul autocast rule on the CPU and CUDA.

    ``keep``: positions of arguments that stay in their own dtype (DoRA's float32 magnitude,
    multi-LoRA's per-adapter scalings and dropout probabilities, a quantized weight's float32 value
    tables and scales), as PyTorch keeps its fp32-policy operands.
    """
    op = getattr(torch.ops.fastadapt, op_name).default
    for device_type, key in _DEVICE_KEYS.items():
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded):
            dtype = torch.get_autocast_dtype(device_type)
            args = [a if i in keep else cast(a, device_type, dtype) for i, a in enumerate(args)]
            # Autocast off for the op itself, as torch.library.register_autocast does.
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*args)

        _lib.impl(op_name, kernel, key, with_keyset=True)
