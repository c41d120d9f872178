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

from fastadapt import _checks, _native, dispatch, strategy
from fastadapt.backends import Capabilities
from fastadapt.ops import _autocast, lora
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.ops.lora import _check_ranks, _draw_seed, check_adapter_args, rows, seed_int
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
        code = reference.nf4_code(_checks.tensor("absmax", absmax, floating=False).device)
    return QuantizedWeight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, 4, tuple(shape))


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
    # The scale is read flat (n_out floats at most): a strided one is copied, not refused.
    return QuantizedWeight(weight.view(torch.uint8), reference.fp8_code(weight.device),
                           scale.reshape(-1).contiguous(), None, None, None, blocksize, 256, 8, (n_out, n_in))


def _check_weight(q: QuantizedWeight) -> QuantizedWeight:
    """Every size the kernels index by, checked (a short table would be an out-of-bounds read), and
    the weight with its integers (bits, shape, block sizes) as Python ints in int64's range: what
    every backend then sees, the reference and the native schemas alike."""
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight (fastadapt.nf4_weight / fp8_weight / nf4_from_bnb), "
                        f"got {type(q).__name__}")
    bits = _checks.int64("weight.bits", q.bits)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 (NF4) or 8 (FP8), got {bits}")
    if not isinstance(q.shape, (tuple, list)) or len(q.shape) != 2:
        raise ValueError(f"weight shape must be 2-D and non-empty, got {q.shape}")
    shape = tuple(_checks.int64(f"weight.shape[{i}]", s) for i, s in enumerate(q.shape))
    if min(shape) <= 0:
        raise ValueError(f"weight shape must be 2-D and non-empty, got {shape}")
    blocksize = _checks.int64("weight.blocksize", q.blocksize, low=1)
    blocksize2 = (_checks.int64("weight.blocksize2", q.blocksize2, low=1) if q.nested
                  else _checks.int64("weight.blocksize2", q.blocksize2))  # unread, but the schemas take it
    q = q._replace(bits=bits, shape=shape, blocksize=blocksize, blocksize2=blocksize2)
    numel = shape[0] * shape[1]
    for name, t, dtype in (("data", q.data, torch.uint8), ("code", q.code, torch.float32),
                           ("absmax", q.absmax, torch.uint8 if q.nested else torch.float32)):
        _checks.tensor(f"weight.{name}", t, floating=False)
        if t.dtype != dtype:
            raise TypeError(f"weight.{name} must be {dtype}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"weight.{name} must be contiguous")
    if q.data.numel() != (numel * bits + 7) // 8:
        raise ValueError(f"weight.data has {q.data.numel()} bytes, expected {(numel * bits + 7) // 8} for "
                         f"shape {shape} at {bits} bits")
    _checks.dim_equal("weight.code.numel()", q.code.numel(), 2 ** bits)
    blocks = -(-numel // blocksize)
    _checks.dim_equal("weight.absmax.numel() (blocks)", q.absmax.numel(), blocks)
    if q.nested:
        if q.code2 is None or q.offset is None:
            raise ValueError("a double-quantized weight needs absmax2, code2 and offset")
        for name, t, n in (("absmax2", q.absmax2, -(-blocks // blocksize2)), ("code2", q.code2, 256),
                           ("offset", q.offset, 1)):
            _checks.tensor(f"weight.{name}", t, floating=False)
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError(f"weight.{name} must be a contiguous float32 tensor, got {t.dtype}")
            _checks.dim_equal(f"weight.{name}.numel()", t.numel(), n)
    elif q.code2 is not None or q.offset is not None:
        raise ValueError("code2 / offset given without absmax2")
    return q


def _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, in_features):
    return QuantizedWeight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits,
                           (out_features, in_features))


def _forward(impl, x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, lora_A,
             lora_B, scaling, bias, dropout_p, seed, ranks, ranks_p):
    q = _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, x.shape[-1])
    y, u = impl.forward(rows(x), q, lora_A, lora_B, scaling, bias, dropout_p, seed_int(seed), ranks, ranks_p)
    return y.view(*x.shape[:-1], out_features), u


def _backward(impl, needs, gy, _gu, x, data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits,
              out_features, lora_A, lora_B, u, scaling, dropout_p, seed, ranks, ranks_p, **_):
    q = _weight(data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits, out_features, x.shape[-1])
    gx, *grads = impl.backward(rows(gy), rows(x), q, lora_A, lora_B, u, scaling, dropout_p, seed_int(seed), needs,
                               ranks, ranks_p)
    return (gx.view(x.shape) if gx is not None else None), *grads


def _fake(x, out_features, lora_A, **_):
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(x.shape[:-1].numel(), lora_A.shape[0])


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.reference import lora as lora_reference
    from fastadapt.testing import FuzzCase

    lead = draw.choice([(0,), (1,), (7,), (2, 3)])
    n_in, n_out, r = draw.int(1, 24), draw.int(1, 24), draw.int(1, 8)
    q = reference.random_weight(draw.choice(["nf4", "nf4-nested", "fp8-tensor", "fp8-channel"]), n_out, n_in,
                                blocksize=draw.choice([32, 64]))
    p, training, scaling = draw.choice([0.0, 0.1, 0.999]), draw.bool(), draw.choice([0.5, -2.0, 3.0])
    tensors = dict(x=torch.randn(*lead, n_in), lora_A=torch.randn(r, n_in) / n_in**0.5,
                   lora_B=torch.randn(n_out, r) / r**0.5, bias=torch.randn(n_out) if draw.bool() else None)
    dropout = training and p > 0.0

    def call(x, lora_A, lora_B, bias, scaling=scaling):
        return qlora_linear(x, q, lora_A, lora_B, scaling, bias, p, training)

    def exact(keep, x, lora_A, lora_B, bias, scaling=scaling):
        mask = keep(0, (x.shape[:-1].numel(), n_in), p).view(x.shape) if dropout else None
        return lora_reference.lora_linear(x, reference.dequantize(q, x.dtype), lora_A, lora_B, scaling, bias, mask, p)

    return FuzzCase(tensors, call, exact, grads=("x", "lora_A", "lora_B", "bias"), dropout=dropout)


# ``fastadapt::qlora_linear`` takes the quantized weight as bitsandbytes stores it and returns
# ``(y, u)``; the weight's value tables and scales stay float32 under autocast (bnb dequantizes in
# fp32, then rounds once).
QLORA_LINEAR = declare(OpSpec(
    OP,
    args=(Arg("x", "Tensor", grad=True, select=True), Arg("data", "Tensor"), Arg("code", "Tensor", keep=True),
          Arg("absmax", "Tensor", keep=True), Arg("absmax2", "Tensor?", keep=True), Arg("code2", "Tensor?", keep=True),
          Arg("offset", "Tensor?", keep=True), Arg("blocksize", "int"), Arg("blocksize2", "int"), Arg("bits", "int"),
          Arg("out_features", "int"), Arg("lora_A", "Tensor", grad=True, select=True),
          Arg("lora_B", "Tensor", grad=True, select=True), Arg("scaling", "float"),
          Arg("bias", "Tensor?", grad=True, select=True), Arg("dropout_p", "float"), Arg("seed", "Tensor?"),
          Arg("ranks", "int[]?", optional=True), Arg("ranks_p", "float[]?", optional=True)),
    outputs=("y", "u"), saved=("u",), grads=("x", "lora_A", "lora_B", "bias"),
    fake=_fake, forward=_forward, backward=_backward, fuzz=_fuzz))


def qlora_linear(x: Tensor, weight: QuantizedWeight, lora_A: Tensor, lora_B: Tensor, scaling: Union[float, Tensor],
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
    q = _check_weight(weight)
    ranks_p = None
    if ranks is not None:
        dropout_p, ranks, ranks_p = _check_ranks(lora_A, ranks, dropout_p, training)
    scaling, p, seed = check_adapter_args(x, lora_A, lora_B, bias, scaling, dropout_p, training, q.shape)
    if ranks is not None:
        seed = _draw_seed()
    _checks.same_device(x=x, weight_data=q.data, weight_code=q.code, weight_absmax=q.absmax, weight_absmax2=q.absmax2,
                        weight_code2=q.code2, weight_offset=q.offset, lora_A=lora_A, lora_B=lora_B, bias=bias)
    dtype = _autocast.autocast_dtype(x)
    if dtype is None:
        _checks.same_dtype(x=x, bias=bias)
        dtype = x.dtype
    lora_B, scaling = lora.scaled_B(lora_B, scaling, dtype)
    return QLORA_LINEAR(x, q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits,
                        q.shape[0], lora_A.to(dtype), lora_B, scaling, bias, p, seed, ranks, ranks_p)[0]


# ---------------------------------------------------------------------------------------------
# Backends

CAPABILITIES = Capabilities("x", ("x", "lora_A", "lora_B", "bias"))
_KERNELS = "fastadapt.kernels.qlora"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"), strategy=strategy.QLORA_DEQUANT)


def _weight_args(q: QuantizedWeight) -> tuple:
    return (q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits)


def native_dequantize(q: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """The cpp backend's dequantized (N, K) weight (csrc/qlora.cpp)."""
    return _native.ops().qlora_dequantize(*_weight_args(q), *q.shape, dtype)


# Several adapters with their own dropout (rank segments): the LoRA kernels' segmented form on the
# dequantized weight, which is what qlora_forward/backward do with one segment.
def _native_forward(x2d, q, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    if ranks is not None:
        return lora.native_forward(x2d, native_dequantize(q, x2d.dtype), lora_A, lora_B, scaling, bias, 0.0, seed,
                                   ranks, ranks_p)
    return _native.ops().qlora_forward(x2d, *_weight_args(q), q.shape[0], lora_A, lora_B, scaling, bias, dropout_p,
                                       seed)


def _native_backward(gy, x2d, q, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None, ranks_p=None):
    needs = [bool(n) for n in needs]
    if ranks is not None:
        return lora.native_backward(gy, x2d, native_dequantize(q, x2d.dtype), lora_A, lora_B, u, scaling, 0.0, seed,
                                    [*needs, False], ranks, ranks_p)[:4]
    grads = _native.ops().qlora_backward(gy, x2d, *_weight_args(q), lora_A, lora_B, u, scaling, dropout_p, seed, needs)
    return _native.asked(grads, needs)


# csrc/qlora.cpp; CPU only.
dispatch.register(OP, "cpp", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=reference.backward)
