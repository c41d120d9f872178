"""LoRA on a quantized frozen base (NF4 QLoRA, FP8) as a ``torch.library`` custom op with autograd.

``fastadapt::qlora_linear`` takes the quantized weight as bitsandbytes stores it (packed codes,
value table, block absmax, and the double-quantized absmax's parts) and returns ``(y, u)`` like
``fastadapt::lora_linear``; ``fastadapt::qlora_linear_backward`` is one fused backward call on the
forward's backend. The frozen weight never gets a gradient. The layout is stated once, in
:mod:`fastadapt.reference.qlora`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastadapt import _checks, dispatch, strategy
from fastadapt.backends import device_reasons, dtype_reasons
from fastadapt.ops import _autocast, _eager
from fastadapt.ops.lora import _draw_seed, _rank_segments, _seed, check_adapter_args
from fastadapt.reference import qlora as reference
from fastadapt.reference.qlora import QuantizedWeight

OP = "qlora_linear"


def nf4_weight(data: Tensor, absmax: Tensor, shape, *, blocksize: int = 64, code: Optional[Tensor] = None,
               absmax2: Optional[Tensor] = None, code2: Optional[Tensor] = None, offset: Optional[Tensor] = None,
               blocksize2: int = 256) -> QuantizedWeight:
    """An NF4 weight from bitsandbytes' parts (see :func:`nf4_from_bnb` for a ``Params4bit``).

    ``data``: the packed codes, ceil(N*K/2) bytes (uint8, or any dtype bnb's ``quant_storage`` put
    them in); ``absmax``: float32, one per block (uint8 when double-quantized, then ``absmax2``,
    ``code2`` and ``offset`` are bnb's ``state2.absmax``, ``state2.code`` and ``offset``);
    ``shape``: (out_features, in_features); ``code``: the 16 NF4 values (bnb's table by default)."""
    if isinstance(data, Tensor) and data.dtype != torch.uint8 and data.is_contiguous():
        data = data.view(torch.uint8)
    if code is None:
        code = reference.nf4_code(absmax.device)
    return QuantizedWeight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, 4,
                           tuple(int(s) for s in shape))


def nf4_from_bnb(weight) -> QuantizedWeight:
    """The NF4 weight of a bitsandbytes ``Params4bit`` (``Linear4bit.weight``), read in place.

    Raises ValueError for what the kernels do not read: FP4, or the CPU inference repacking bnb
    does in eval mode (``quant_state.packing_format_for_cpu``)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("weight has no quant_state: not a quantized bitsandbytes Params4bit")
    if state.quant_type != "nf4":
        raise ValueError(f"quant_type {state.quant_type!r} is not served (only 'nf4')")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("the weight is in bnb's CPU inference packing (packing_format_for_cpu), not its NF4 layout")
    if len(state.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    nested = dict(absmax2=state.state2.absmax, code2=state.state2.code, offset=state.offset,
                  blocksize2=state.state2.blocksize) if state.nested else {}
    return nf4_weight(weight.data, state.absmax, state.shape, blocksize=state.blocksize, code=state.code, **nested)


def fp8_weight(weight: Tensor, scale: Tensor) -> QuantizedWeight:
    """An FP8 weight: ``weight`` (out_features, in_features) ``torch.float8_e4m3fn``, contiguous,
    dequantized as ``weight.float() * scale`` with ``scale`` float32 of one element (per tensor) or
    out_features elements (per output channel: shape (N,) or (N, 1), as torchao's row-wise and
    transformers' ``weight_scale_inv`` store it)."""
    _checks.tensor("weight", weight, ndim=2, floating=False)
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be torch.float8_e4m3fn, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (row-major (out_features, in_features))")
    n_out, n_in = weight.shape
    _checks.tensor("scale", scale, floating=False)
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if scale.numel() == 1:
        blocksize = n_out * n_in
    elif scale.numel() == n_out and scale.shape in ((n_out,), (n_out, 1)):
        blocksize = n_in
    else:
        raise ValueError(f"scale must have 1 element (per tensor) or shape ({n_out},) / ({n_out}, 1) "
                         f"(per output channel), got {tuple(scale.shape)}")
    return QuantizedWeight(weight.view(torch.uint8), reference.fp8_code(weight.device), scale.reshape(-1), None,
                           None, None, blocksize, 256, 8, (n_out, n_in))


def _check_weight(q: QuantizedWeight) -> None:
    """Every size the kernels index by, checked (a short table would be an out-of-bounds read)."""
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight (fastadapt.nf4_weight / fp8_weight / nf4_from_bnb), "
                        f"got {type(q).__name__}")
    if q.bits not in (4, 8):
        raise ValueError(f"bits must be 4 (NF4) or 8 (FP8), got {q.bits}")
    if len(q.shape) != 2 or min(q.shape) <= 0:
        raise ValueError(f"weight shape must be 2-D and non-empty, got {q.shape}")
    numel = q.shape[0] * q.shape[1]
    for name, t, dtype in (("data", q.data, torch.uint8), ("code", q.code, torch.float32),
                           ("absmax", q.absmax, torch.uint8 if q.nested else torch.float32)):
        _checks.tensor(f"weight.{name}", t, floating=False)
        if t.dtype != dtype:
            raise TypeError(f"weight.{name} must be {dtype}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"weight.{name} must be contiguous")
    if q.data.numel() != (numel * q.bits + 7) // 8:
        raise ValueError(f"weight.data has {q.data.numel()} bytes, expected {(numel * q.bits + 7) // 8} for "
                         f"shape {q.shape} at {q.bits} bits")
    _checks.dim_equal("weight.code.numel()", q.code.numel(), 2 ** q.bits)
    if isinstance(q.blocksize, bool) or not isinstance(q.blocksize, int) or q.blocksize <= 0:
        raise ValueError(f"weight.blocksize must be a positive int, got {q.blocksize!r}")
    blocks = -(-numel // q.blocksize)
    _checks.dim_equal("weight.absmax.numel() (blocks)", q.absmax.numel(), blocks)
    if q.nested:
        if q.code2 is None or q.offset is None:
            raise ValueError("a double-quantized weight needs absmax2, code2 and offset")
        if isinstance(q.blocksize2, bool) or not isinstance(q.blocksize2, int) or q.blocksize2 <= 0:
            raise ValueError(f"weight.blocksize2 must be a positive int, got {q.blocksize2!r}")
        for name, t, n in (("absmax2", q.absmax2, -(-blocks // q.blocksize2)), ("code2", q.code2, 256),
                           ("offset", q.offset, 1)):
            _checks.tensor(f"weight.{name}", t, floating=False)
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError(f"weight.{name} must be a contiguous float32 tensor, got {t.dtype}")
            _checks.dim_equal(f"weight.{name}.numel()", t.numel(), n)
    elif q.code2 is not None or q.offset is not None:
        raise ValueError("code2 / offset given without absmax2")


def _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, in_features):
    return QuantizedWeight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits,
                           (out_features, in_features))


def _select(x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, lora_A, lora_B,
            scaling, bias, *_) -> dispatch.Implementation:
    return dispatch.select(OP, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)


def _forward(impl, x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, lora_A,
             lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    q = _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, x.shape[-1])
    y, u = impl.forward(x.reshape(-1, x.shape[-1]), q, lora_A, lora_B, scaling, bias, dropout_p, _seed(seed),
                        segments, segment_p)
    return y.view(*x.shape[:-1], out_features), u


@torch.library.custom_op("fastadapt::qlora_linear", mutates_args=())
def _qlora_linear(x: Tensor, data: Tensor, code: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                  code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, blocksize2: int, bits: int,
                  out_features: int, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor],
                  dropout_p: float, seed: Optional[Tensor], segments: Optional[list[int]] = None,
                  segment_p: Optional[list[float]] = None) -> tuple[Tensor, Tensor]:
    inputs = (x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, lora_A, lora_B,
              scaling, bias, dropout_p, seed, segments, segment_p)
    return _forward(_select(*inputs), *inputs)


@_qlora_linear.register_fake
def _(x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, lora_A, lora_B,
      scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(x.shape[:-1].numel(), lora_A.shape[0])


def _run_backward(gy: Tensor, x: Tensor, data: Tensor, code: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                  code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, blocksize2: int, bits: int,
                  lora_A: Tensor, lora_B: Tensor, u: Tensor, scaling: float, dropout_p: float,
                  seed: Optional[Tensor], needs: list[bool], backend: str, segments: Optional[list[int]] = None,
                  segment_p: Optional[list[float]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gx, gA, gB, gbias) on ``backend``, the forward's; a gradient not asked for comes back empty."""
    q = _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, gy.shape[-1], x.shape[-1])
    grads = dispatch.get(OP, backend).backward(gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1]), q,
                                               lora_A, lora_B, u, scaling, dropout_p, _seed(seed), needs, segments,
                                               segment_p)
    gx, *rest = (g if g is not None else x.new_empty(0) for g in grads)
    return (gx.view(x.shape) if needs[0] else gx), *rest


_qlora_linear_backward = torch.library.custom_op("fastadapt::qlora_linear_backward", mutates_args=())(_run_backward)


@_qlora_linear_backward.register_fake
def _(gy, x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, lora_A, lora_B, u, scaling,
      dropout_p, seed, needs, backend, segments=None, segment_p=None):
    shapes = (x.shape, lora_A.shape, lora_B.shape, lora_B.shape[:1])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output, backend=None):
    (x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, _, lora_A, lora_B, scaling, bias,
     dropout_p, seed, segments, segment_p) = inputs
    ctx.save_for_backward(x, data, code, absmax, absmax2, code2, offset, lora_A, lora_B, output[1], seed)
    ctx.meta = (blocksize, blocksize2, bits, scaling, dropout_p, segments, segment_p)
    ctx.backend = backend or _select(*inputs).backend  # the one the forward just ran on


def _backward(ctx, gy, _gu):
    x, data, code, absmax, absmax2, code2, offset, lora_A, lora_B, u, seed = ctx.saved_tensors
    blocksize, blocksize2, bits, scaling, dropout_p, segments, segment_p = ctx.meta
    needs = [ctx.needs_input_grad[i] for i in (0, 11, 12, 14)]  # x, lora_A, lora_B, bias
    run = _run_backward if getattr(ctx, "eager", False) else torch.ops.fastadapt.qlora_linear_backward
    grads = run(gy, x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, lora_A, lora_B, u,
                scaling, dropout_p, seed, needs, ctx.backend, segments, segment_p)
    gx, gA, gB, gbias = (g if need else None for g, need in zip(grads, needs))
    return gx, *(None,) * 10, gA, gB, None, gbias, None, None, None, None


_qlora_linear.register_autograd(_backward, setup_context=_setup_context)
_QLoRALinear = _eager.function("QLoRALinear", _forward, _setup_context, _backward)
# The weight's value tables and scales stay float32 (bnb dequantizes in fp32, then rounds once).
_KEEP = (2, 3, 4, 5, 6)
_autocast.register(OP, keep=_KEEP)


def qlora_linear(x: Tensor, weight: QuantizedWeight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor] = None, dropout_p: Union[float, Sequence[float]] = 0.0, training: bool = True,
                 ranks: Optional[Sequence[int]] = None) -> Tensor:
    """Fused LoRA linear on a quantized frozen weight (NF4 QLoRA or FP8):
    ``x dequant(W)^T + b + scaling * (dropout(x) A^T) B^T``, the weight dequantized inside the GEMM.

    Args:
        x: (..., in_features), float16 / bfloat16 / float32 (float64 runs on the reference).
        weight: the frozen (out_features, in_features) weight: :func:`nf4_from_bnb` (a bitsandbytes
            ``Params4bit``), :func:`nf4_weight` or :func:`fp8_weight`. It is dequantized to the
            compute dtype exactly as bitsandbytes does (fp32 ``code * absmax``, rounded once).
        lora_A: (r, in_features); lora_B: (out_features, r), in any floating dtype (computed in
            the compute dtype with float32 accumulation; grads come back in their own dtype).
        scaling, bias, dropout_p, training, ranks: as :func:`fastadapt.lora_linear` (``ranks``:
            several adapters summed, each with its own dropout mask).

    Returns:
        (..., out_features) in the compute dtype (``x``'s, or the autocast region's). Gradients flow
        to x, lora_A, lora_B and bias; the quantized weight has none.

    Equivalent PyTorch (bitsandbytes' ``Linear4bit`` + PEFT)::

        W = bnb.functional.dequantize_4bit(packed, quant_state).to(x.dtype)
        F.linear(x, W, bias) + (F.dropout(x, dropout_p, training) @ lora_A.T) @ lora_B.T * scaling
    """
    _check_weight(weight)
    q = weight
    segments = segment_p = None
    if ranks is not None:
        dropout_p, segments, segment_p = _rank_segments(lora_A, ranks, dropout_p, training)
    scaling, p, seed = check_adapter_args(x, lora_A, lora_B, bias, scaling, dropout_p, training, q.shape)
    if segments is not None:
        seed = _draw_seed()
    _checks.same_device(x=x, weight_data=q.data, weight_code=q.code, weight_absmax=q.absmax, weight_absmax2=q.absmax2,
                        weight_code2=q.code2, weight_offset=q.offset, lora_A=lora_A, lora_B=lora_B, bias=bias)
    dtype = _autocast.autocast_dtype(x)
    if dtype is None:
        _checks.same_dtype(x=x, bias=bias)
        dtype = x.dtype
    inputs = (x, q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits, q.shape[0],
              lora_A.to(dtype), lora_B.to(dtype), scaling, bias, p, seed, segments, segment_p)
    if _eager.fast_path(x, q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, lora_A, lora_B, bias):
        y, _ = _eager.run(_QLoRALinear, _select, *inputs, autocast_device=x.device.type, keep=_KEEP)
    else:
        y, _ = torch.ops.fastadapt.qlora_linear(*inputs)
    return y


# ---------------------------------------------------------------------------------------------
# Backends


def _triton_why_not(x, lora_A, lora_B, bias):
    reasons = device_reasons("triton", x.device) + dtype_reasons(x.dtype)
    if len({t.dtype for t in (x, lora_A, lora_B, bias) if t is not None}) > 1:
        reasons.append("x, lora_A, lora_B and bias must share one dtype")
    return reasons


_KERNELS = "fastadapt.kernels.qlora"
dispatch.register(OP, "triton", why_not=_triton_why_not, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"), strategy=strategy.QLORA_DEQUANT)
dispatch.register(OP, "reference", why_not=lambda **_: [], forward=reference.forward, backward=reference.backward)
