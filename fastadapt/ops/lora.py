"""The fused LoRA linear as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::lora_linear`` returns ``(y, u)``, where ``u = s * D(x) A^T`` (M, r) is saved for the
backward instead of the dropped input (PEFT saves D(x), M x K); the dropout mask is regenerated
from the seed. ``fastadapt::lora_linear_backward`` is one fused backward call.

Several adapters summed (PEFT's several active adapters) are one call on their concatenated ranks;
with dropout, ``segments`` / ``segment_p`` give each adapter's rank and probability, and each draws
its own mask (``fastadapt/reference/lora.py``, ``rank_segments``).
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastadapt import _checks, dispatch
from fastadapt.backends import device_reasons, dtype_reasons
from fastadapt.ops import _autocast, _eager
from fastadapt.reference import lora as reference
from fastadapt.reference.dropout import dropout_keep

OP = "lora_linear"


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _select(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, *_) -> dispatch.Implementation:
    return dispatch.select(OP, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias,
                           segmented=segments is not None)


def _forward(impl, x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    x2d = x.reshape(-1, x.shape[-1])
    y, u = impl.forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, _seed(seed), segments, segment_p)
    return y.view(*x.shape[:-1], weight.shape[0]), u


@torch.library.custom_op("fastadapt::lora_linear", mutates_args=())
def _lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
                 segments: Optional[list[int]] = None,
                 segment_p: Optional[list[float]] = None) -> tuple[Tensor, Tensor]:
    inputs = (x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments, segment_p)
    return _forward(_select(*inputs), *inputs)


@_lora_linear.register_fake
def _(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    M = x.shape[:-1].numel()
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(M, lora_A.shape[0])


def _run_backward(gy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                  scaling: float, dropout_p: float, seed: Optional[Tensor], needs: list[bool],
                  backend: str, segments: Optional[list[int]] = None,
                  segment_p: Optional[list[float]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gx, gA, gB, gbias, gweight) on ``backend``, the forward's; a gradient not asked for in
    ``needs`` comes back empty."""
    x2d = x.reshape(-1, x.shape[-1])
    gy2d = gy.reshape(-1, gy.shape[-1])
    grads = dispatch.get(OP, backend).backward(gy2d, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, _seed(seed),
                                               needs, segments, segment_p)
    gx, *rest = (g if g is not None else x.new_empty(0) for g in grads)
    return (gx.view(x.shape) if needs[0] else gx), *rest


_lora_linear_backward = torch.library.custom_op("fastadapt::lora_linear_backward", mutates_args=())(_run_backward)


@_lora_linear_backward.register_fake
def _(gy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, backend, segments=None, segment_p=None):
    shapes = (x.shape, lora_A.shape, lora_B.shape, weight.shape[:1], weight.shape)
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output, backend=None):
    x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments, segment_p = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.segments = segments
    ctx.segment_p = segment_p
    ctx.backend = backend or _select(*inputs).backend  # the one the forward just ran on


def _backward(ctx, gy, _gu):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    nx, nw, na, nb, _, nbias = ctx.needs_input_grad[:6]
    needs = [nx, na, nb, nbias, nw]
    run = _run_backward if getattr(ctx, "eager", False) else torch.ops.fastadapt.lora_linear_backward
    grads = run(gy, x, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, needs, ctx.backend,
                ctx.segments, ctx.segment_p)
    gx, gA, gB, gbias, gw = (g if need else None for g, need in zip(grads, needs))
    return gx, gw, gA, gB, None, gbias, None, None, None, None


_lora_linear.register_autograd(_backward, setup_context=_setup_context)
_LoRALinear = _eager.function("LoRALinear", _forward, _setup_context, _backward)
_autocast.register("lora_linear")


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: Union[float, Sequence[float]] = 0.0, training: bool = True,
                ranks: Optional[Sequence[int]] = None) -> Tensor:
    """Fused LoRA linear: ``x W^T + b + scaling * (dropout(x) A^T) B^T``.

    Args:
        x: (..., in_features), float16 / bfloat16 / float32 (float64 runs on the reference).
        weight: (out_features, in_features), the frozen base weight, any strides (a transposed
            view of a GPT-2 ``Conv1D`` weight needs no copy); same dtype as ``x`` outside autocast.
        lora_A: (r, in_features); lora_B: (out_features, r) (PEFT's layouts). If their dtype
            differs from the compute dtype (PEFT keeps adapters in float32 by default), the
            low-rank path is computed in the compute dtype with float32 accumulation, and their
            grads come back in their own dtype.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA), finite.
        bias: (out_features,) or None.
        dropout_p: dropout probability on the LoRA input, applied only when ``training``; the mask
            is drawn from a seed inside the kernel and regenerated in the backward, never stored.
            With ``ranks``, one probability for every adapter or a sequence of one per adapter.
        ranks: several adapters summed in one call (PEFT's several active adapters): lora_A's rows
            (lora_B's columns) are the adapters' in turn, of these ranks (positive, summing to r).
            With dropout in training each adapter draws its own mask over x, as PEFT's dropout
            module per adapter does; without, the call is the single rank-r update. A common
            ``scaling`` applies: fold each adapter's own into its columns of lora_B.

    Returns:
        (..., out_features) in the compute dtype: ``x``'s, or inside ``torch.autocast`` the
        region's (every floating input is cast to it, as for ``F.linear``). Gradients flow to x,
        lora_A, lora_B, bias, and to weight only if it requires grad.

    Equivalent PyTorch::

        F.linear(x, weight, bias) + (F.dropout(x, dropout_p, training) @ lora_A.T) @ lora_B.T * scaling

    and with ``ranks``, a sum of such updates over the adapters' slices of lora_A and lora_B.
    """
    segments = segment_p = None
    if ranks is not None:
        dropout_p, segments, segment_p = _rank_segments(lora_A, ranks, dropout_p, training)
    dtype, scaling, p, seed = check_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
    if segments is not None:
        seed = _draw_seed()
    inputs = (x, weight, lora_A.to(dtype), lora_B.to(dtype), scaling, bias, p, seed, segments, segment_p)
    if _eager.fast_path(x, weight, lora_A, lora_B, bias):
        y, _ = _eager.run(_LoRALinear, _select, *inputs, autocast_device=x.device.type)
    else:
        y, _ = torch.ops.fastadapt.lora_linear(*inputs)
    return y


def check_adapter_args(x, lora_A, lora_B, bias, scaling, dropout_p, training, weight_shape):
    """The checks every LoRA op shares, against the frozen weight's (out_features, in_features)
    (``qlora_linear``'s weight is no tensor): returns (scaling, the dropout probability in effect,
    its seed or None)."""
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
    scaling = _checks.finite_float("scaling", scaling)
    dropout_p = _checks.probability("dropout_p", dropout_p)
    n_out, n_in = weight_shape
    rank = lora_A.shape[0]
    _checks.dim_equal("x.shape[-1] (in_features)", x.shape[-1], n_in)
    if rank == 0:
        raise ValueError("lora_A has rank 0: r must be at least 1")
    _checks.dim_equal("lora_A.shape[1] (in_features)", lora_A.shape[1], n_in)
    _checks.dim_equal("lora_B.shape[0] (out_features)", lora_B.shape[0], n_out)
    _checks.dim_equal("lora_B.shape[1] (r)", lora_B.shape[1], rank)
    if bias is not None:
        _checks.dim_equal("bias.shape[0] (out_features)", bias.shape[0], n_out)
    p = dropout_p if training else 0.0
    return scaling, p, _draw_seed() if p > 0.0 else None


def _draw_seed() -> Tensor:
    # Drawn on the CPU generator: no device sync, and torch.compile traces it.
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


MAX_SEGMENTS = 64


def _rank_segments(lora_A, ranks, dropout_p, training):
    """(dropout_p, segments, segment_p) of :func:`lora_linear`'s ``ranks``: segments only where
    they change the result (several adapters with dropout in training), else a plain call."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or not ranks:
        raise TypeError(f"ranks must be a non-empty sequence of ints, got {ranks!r}")
    if len(ranks) > MAX_SEGMENTS:
        raise ValueError(f"ranks: at most {MAX_SEGMENTS} adapters per call, got {len(ranks)}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be positive ints, got {list(ranks)}")
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.dim_equal("sum(ranks) (lora_A.shape[0], r)", sum(ranks), lora_A.shape[0])
    if isinstance(dropout_p, Real):
        ps = [_checks.probability("dropout_p", dropout_p)] * len(ranks)
    elif isinstance(dropout_p, Sequence) and not isinstance(dropout_p, (str, bytes)):
        _checks.dim_equal("len(dropout_p) (one per adapter of ranks)", len(dropout_p), len(ranks))
        ps = [_checks.probability(f"dropout_p[{k}]", p) for k, p in enumerate(dropout_p)]
    else:
        raise TypeError(f"dropout_p must be a float or a sequence of floats, got {type(dropout_p).__name__}")
    if len(ranks) == 1 or not training or not any(ps):
        return (ps[0] if len(ranks) == 1 else 0.0), None, None
    return 0.0, [int(r) for r in ranks], ps


def check_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training):
    """The argument checks of :func:`lora_linear` (and of ``dora_linear``, which adds its
    magnitude's): returns (compute dtype, scaling, dropout p in effect, dropout seed or None)."""
    _checks.tensor("weight", weight, ndim=2)
    scaling, p, seed = check_adapter_args(x, lora_A, lora_B, bias, scaling, dropout_p, training, weight.shape)
    _checks.same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    dtype = _autocast.autocast_dtype(x)
    if dtype is None:
        _checks.same_dtype(x=x, weight=weight, bias=bias)
        dtype = x.dtype
    # else the op's autocast rule casts x, weight and bias to the region's dtype
    n_out, n_in = weight.shape
    if n_in == 0 or n_out == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    return dtype, scaling, p, seed


# ---------------------------------------------------------------------------------------------
# Backends


def _triton_why_not(x, weight, lora_A, lora_B, bias, segmented=False):
    reasons = device_reasons("triton", x.device) + dtype_reasons(x.dtype)
    if len({t.dtype for t in (x, weight, lora_A, lora_B, bias) if t is not None}) > 1:
        reasons.append("x, weight, lora_A, lora_B and bias must share one dtype")
    return reasons


_KERNELS = "fastadapt.kernels.lora"
dispatch.register(OP, "triton", why_not=_triton_why_not, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))


def _composite(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    spans = reference.rank_segments(lora_A.shape[0], dropout_p, _seed(seed), segments, segment_p)
    keep = [dropout_keep(sd, (x.shape[:-1].numel(), x.shape[-1]), p, x.device) for _, _, p, sd in spans]
    keep = [None if k is None else k.view(x.shape) for k in keep]
    if segments is None:
        y = reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, keep[0], dropout_p)
    else:
        y = reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, keep, segment_p, segments)
    return y, None  # u is what the fused backward keeps; autograd keeps its own


dispatch.register(OP, "reference", why_not=lambda **_: [], forward=reference.forward,
                  backward=reference.backward, composite=_composite)
