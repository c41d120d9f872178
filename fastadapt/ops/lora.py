"""The fused LoRA linear as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::lora_linear`` returns ``(y, u)``, where ``u = s * D(x) A^T`` (M, r) is saved for the
backward instead of the dropped input (PEFT saves D(x), M x K); the dropout mask is regenerated
from the seed. ``fastadapt::lora_linear_backward`` is one fused backward call.

Several adapters summed (PEFT's several active adapters) are one call on their concatenated ranks;
with dropout, ``ranks`` / ``ranks_p`` give each adapter's rank and probability, and each draws
its own mask (``fastadapt/reference/lora.py``, ``rank_segments``: each adapter's rows of lora_A).
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch
from fastadapt.backends import Capabilities
from fastadapt.ops import _autocast
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.reference import lora as reference
from fastadapt.reference.dropout import dropout_keep

OP = "lora_linear"


def seed_int(seed: Optional[Tensor]) -> int:
    """The dropout seed as the backends take it (0 when there is no dropout)."""
    return 0 if seed is None else int(seed)


def rows(t: Tensor) -> Tensor:
    """(..., K) as the (M, K) rows the backends take."""
    return t.reshape(-1, t.shape[-1])


def _forward(impl, x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks, ranks_p):
    y, u = impl.forward(rows(x), weight, lora_A, lora_B, scaling, bias, dropout_p, seed_int(seed), ranks, ranks_p)
    return y.view(*x.shape[:-1], weight.shape[0]), u


def _backward(impl, needs, gy, _gu, x, weight, lora_A, lora_B, bias, seed, u, scaling, dropout_p, ranks, ranks_p):
    gx, *grads = impl.backward(rows(gy), rows(x), weight, lora_A, lora_B, u, scaling, dropout_p, seed_int(seed),
                               needs, ranks, ranks_p)
    return (gx.view(x.shape) if gx is not None else None), *grads


def _fake(x, weight, lora_A, lora_B, **_):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape[:-1].numel(), lora_A.shape[0])


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    lead = draw.choice([(0,), (1,), (7,), (2, 3)])
    n_in, n_out = draw.int(1, 24), draw.int(1, 24)
    ranks = draw.choice([None, [draw.int(1, 4)], [draw.int(1, 4), draw.int(1, 4)]])
    r = sum(ranks) if ranks else draw.int(1, 8)
    p, training, scaling = draw.choice([0.0, 0.1, 0.999]), draw.bool(), draw.choice([0.5, -2.0, 3.0])
    tensors = dict(x=torch.randn(*lead, n_in), weight=torch.randn(n_out, n_in) / n_in**0.5,
                   lora_A=torch.randn(r, n_in) / n_in**0.5, lora_B=torch.randn(n_out, r) / r**0.5,
                   bias=torch.randn(n_out) if draw.bool() else None)
    dropout = training and p > 0.0

    def call(x, weight, lora_A, lora_B, bias, scaling=scaling):
        return lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, training, ranks)

    def exact(keep, x, weight, lora_A, lora_B, bias, scaling=scaling):
        rows = (x.shape[:-1].numel(), x.shape[-1])
        masks = [keep(k, rows, p).view(x.shape) if dropout else None for k in range(len(ranks or [r]))]
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, masks, [p] * len(masks), ranks or [r])

    return FuzzCase(tensors, call, exact, grads=("x", "weight", "lora_A", "lora_B", "bias"), dropout=dropout)


# ``fastadapt::lora_linear`` returns ``(y, u)``; the backward's gradients come in ``grads`` order.
LORA_LINEAR = declare(OpSpec(
    OP,
    args=(Arg("x", "Tensor", grad=True, select=True), Arg("weight", "Tensor", grad=True, select=True),
          Arg("lora_A", "Tensor", grad=True, select=True), Arg("lora_B", "Tensor", grad=True, select=True),
          Arg("scaling", "float"), Arg("bias", "Tensor?", grad=True, select=True), Arg("dropout_p", "float"),
          Arg("seed", "Tensor?"), Arg("ranks", "int[]?", select=True, optional=True),
          Arg("ranks_p", "float[]?", optional=True)),
    outputs=("y", "u"), saved=("u",), grads=("x", "lora_A", "lora_B", "bias", "weight"),
    fake=_fake, forward=_forward, backward=_backward, fuzz=_fuzz))


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Union[float, Tensor],
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
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA), finite: a Python
            float, or a one-element tensor on x's device (or a 0-d CPU tensor), which is read on
            the device only (PEFT's hotswap scalings; under torch.compile a new value needs no
            recompile).
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
    ranks_p = None
    if ranks is not None:
        dropout_p, ranks, ranks_p = _check_ranks(lora_A, ranks, dropout_p, training)
    dtype, scaling, p, seed = check_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
    if ranks is not None:
        seed = _draw_seed()
    lora_B, scaling = scaled_B(lora_B, scaling, dtype)
    return LORA_LINEAR(x, weight, lora_A.to(dtype), lora_B, scaling, bias, p, seed, ranks, ranks_p)[0]


def check_adapter_args(x, lora_A, lora_B, bias, scaling, dropout_p, training, weight_shape):
    """The checks every LoRA op shares, against the frozen weight's (out_features, in_features)
    (``qlora_linear``'s weight is no tensor): returns (scaling, the dropout probability in effect,
    its seed or None)."""
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
    if isinstance(scaling, Tensor):
        _check_scaling_tensor(x, scaling)
    else:
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


def _check_scaling_tensor(x: Tensor, scaling: Tensor) -> None:
    _checks.tensor("scaling", scaling)
    if scaling.numel() != 1:
        raise ValueError(f"a tensor scaling must hold one value, got shape {tuple(scaling.shape)}")
    if scaling.device != x.device and not (scaling.device.type == "cpu" and scaling.dim() == 0):
        raise ValueError(f"scaling is on {scaling.device} and x on {x.device}: a tensor scaling must be on x's "
                         "device, or a 0-d CPU tensor")
    torch._assert_async(torch.isfinite(scaling).all(), "scaling must be finite")


def scaled_B(lora_B: Tensor, scaling: Union[float, Tensor], dtype: torch.dtype) -> tuple[Tensor, float]:
    """(lora_B in the compute dtype, the float scaling the kernels take). A tensor scaling (PEFT's
    ``prepare_model_for_compiled_hotswap`` keeps one per adapter, so that a new value needs no
    recompile) is folded into B on its device, no host read, and the kernels get 1.0; its
    gradient, if it needs one, flows through the product."""
    if isinstance(scaling, Tensor):
        return (lora_B * scaling.reshape(())).to(dtype), 1.0
    return lora_B.to(dtype), scaling


def _draw_seed() -> Tensor:
    # Drawn on the CPU generator: no device sync, and torch.compile traces it.
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


MAX_ADAPTERS = 64


def _check_ranks(lora_A, ranks, dropout_p, training):
    """(dropout_p, ranks, ranks_p) of :func:`lora_linear`'s ``ranks``: ranks only where
    they change the result (several adapters with dropout in training), else a plain call."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or not ranks:
        raise TypeError(f"ranks must be a non-empty sequence of ints, got {ranks!r}")
    if len(ranks) > MAX_ADAPTERS:
        raise ValueError(f"ranks: at most {MAX_ADAPTERS} adapters per call, got {len(ranks)}")
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


def _cuda_limits(backend, ranks=None, **_):
    if backend == "cuda" and ranks is not None:
        return ["several adapters with dropout (one mask each): the CUDA kernels draw one mask per call"]
    return []


CAPABILITIES = Capabilities("x", ("x", "weight", "lora_A", "lora_B", "bias"), extra=_cuda_limits)
_KERNELS = "fastadapt.kernels.lora"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))


def native_forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    """The cpp / cuda backends' forward (csrc/lora.cpp, csrc/lora_cuda.cu)."""
    if ranks is not None:
        return _native.ops().lora_segments_forward(x2d, weight, lora_A, lora_B, scaling, bias, ranks, ranks_p,
                                                   seed)
    return _native.ops().lora_forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


def native_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None,
                    ranks_p=None):
    needs = [bool(n) for n in needs]
    if ranks is not None:
        grads = _native.ops().lora_segments_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, ranks, ranks_p,
                                                     seed, needs)
    else:
        grads = _native.ops().lora_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs)
    return _native.asked(grads, needs)


# Where the cpp kernels stop beating eager PyTorch (oneDNN/MKL GEMMs), fwd+bwd, r=16, measured on
# this 2-core x86 CI-class machine at 1 thread (`python benchmarks/cpu_crossover.py`), as eager/cpp:
# fp32 0.66 at M=128 64x64, 0.90 at M=128 512x512, 0.93 at M=1024 64x64, 1.04 at M=2048 64x64,
# 1.01 at M=512 256x256, 1.06 at M=256 512x512, 1.18 at M=1024 512x512; bf16 0.86 at M=256
# 512x512, 0.88 at M=1024 128x128, 1.09 at M=2048 128x128, 1.26 at M=1024 512x512. Below the
# line the per-call overhead (~60 us: autograd, checks, dispatch) outweighs what fusing saves.
CPP_CROSSOVER = {torch.float32: (256, 2**23), torch.float16: (512, 2**27), torch.bfloat16: (512, 2**27)}


def _cpp_slower(x, weight, **_):
    """below M = 256 rows or M*K*N = 2^23 multiply-adds in float32 (512 rows, 2^27 in float16/bfloat16):
    eager PyTorch is faster there (measured: fastadapt/ops/lora.py)"""
    m = x.shape[:-1].numel()
    min_rows, min_work = CPP_CROSSOVER[x.dtype]
    if m < min_rows or m * weight.shape[0] * weight.shape[1] < min_work:
        return (f"M={m}, {weight.shape[1]}->{weight.shape[0]} is below the cpp crossover "
                f"(M >= {min_rows} and M*K*N >= 2^{min_work.bit_length() - 1} in {x.dtype}): eager PyTorch is faster")
    return None


for _backend in ("cuda", "cpp"):
    dispatch.register(OP, _backend, capabilities=CAPABILITIES, forward=native_forward, backward=native_backward,
                      slower=_cpp_slower if _backend == "cpp" else None)


def _composite(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    spans = reference.rank_segments(lora_A.shape[0], dropout_p, seed_int(seed), ranks, ranks_p)
    keep = [dropout_keep(sd, (x.shape[:-1].numel(), x.shape[-1]), p, x.device) for _, _, p, sd in spans]
    keep = [None if k is None else k.view(x.shape) for k in keep]
    if ranks is None:
        y = reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, keep[0], dropout_p)
    else:
        y = reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, keep, ranks_p, ranks)
    return y, None  # u is what the fused backward keeps; autograd keeps its own


dispatch.register(OP, "reference", forward=reference.forward, backward=None, composite=_composite)

