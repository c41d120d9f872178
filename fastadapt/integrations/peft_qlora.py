"""PEFT's QLoRA layers (``peft.tuners.lora.bnb.Linear4bit`` on a bitsandbytes NF4 ``Linear4bit``) on
``fastadapt::qlora_linear``, for :mod:`fastadapt.integrations.peft_lora`, which patches them with
PEFT's other LoRA layers: the adapter handling is shared, only the frozen product differs.

The fused op reads bnb's ``Params4bit`` and ``QuantState`` in place (no re-quantization, no copy)
and dequantizes as bnb does. It computes what bnb computes: the base in bnb's compute dtype, which
must be the input's (bnb casts the input to its ``compute_dtype`` and the result back); bnb's 4-bit
matmul does not follow ``torch.autocast``, so under autocast only a region whose dtype is the
compute dtype is served.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastadapt.integrations import Rule
from fastadapt.ops.qlora import nf4_from_bnb, qlora_linear


@functools.cache  # asked on every patched call
def lora_class():
    """PEFT's QLoRA layer class, or None without peft's bitsandbytes support."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def is_qlora(module: nn.Module) -> bool:
    cls = lora_class()
    return cls is not None and type(module) is cls


def static_reasons(module: nn.Module) -> list[str]:
    """Why a QLoRA layer can never take the fused path (checked at patch time)."""
    import bitsandbytes as bnb
    base = module.get_base_layer()
    if not isinstance(base, bnb.nn.Linear4bit):
        return [f"base layer is {type(base).__name__}, not bitsandbytes' Linear4bit"]
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        return ["the 4-bit weight is not quantized yet (no quant_state)"]
    if state.quant_type != "nf4":
        return [f"4-bit quant_type {state.quant_type!r} (only NF4 is fused)"]
    return []


def _compute_dtype(base, x) -> torch.dtype:
    """The dtype bnb's Linear4bit computes this call in (its set_compute_type, on the first call)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def _autocast_reason(call) -> str | None:
    compute = _compute_dtype(call.base, call.x)
    if call.compute_dtype is not None and call.compute_dtype != compute:
        return f"autocast to {call.compute_dtype} (bitsandbytes' 4-bit matmul computes in its compute_dtype {compute})"
    return None


def _dtype_reason(call) -> str | None:
    compute = _compute_dtype(call.base, call.x)
    if compute != call.x.dtype:
        return f"bitsandbytes' compute_dtype {compute} differs from the input dtype {call.x.dtype}"
    return None


# The call-time conditions of bitsandbytes' base layer (peft_lora adds the adapters' own): ``call``
# has the base layer, the input and the autocast dtype (None outside autocast).
RULES = (
    Rule("a weight bitsandbytes repacked for its CPU inference kernel (eval mode without grad on an AVX512-BF16 CPU)",
         lambda call: "bitsandbytes repacked the weight for its CPU inference kernel"
         if getattr(call.base.weight.quant_state, "packing_format_for_cpu", False) else None),
    Rule("an input dtype other than bitsandbytes' compute_dtype", _dtype_reason),
    Rule("autocast to another dtype", _autocast_reason),
)


def fused(base, x, lora_A, lora_B, scaling, bias, dropout_p, training, ranks=None):
    """The fused call for a QLoRA layer (arguments as :func:`fastadapt.qlora_linear`)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # bnb casts its bias to the compute dtype too
    return qlora_linear(x, nf4_from_bnb(base.weight), lora_A, lora_B, scaling, bias, dropout_p=dropout_p,
                        training=training, ranks=ranks)
