"""Many LoRA adapters in one batch as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::multi_lora_linear`` returns ``(y, u)``: each row of ``x`` goes through the frozen
linear plus the update of its own adapter (or none), forward and backward, in any row order. As in
``fastadapt::lora_linear``, ``u`` (M, r_max) is saved for the backward instead of the dropped
input and the dropout mask is regenerated from a seed.

Storage of adapters of different ranks: padded stacks ``A_stack`` (n, r_max, K), ``B_stack``
(n, N, r_max) plus ``ranks`` (n,). Chosen over a ragged concatenation because an adapter is then
found from its id by one stride (no offset table to keep in step with the weights), the kernels
load one tile shape for every adapter, and PEFT-style per-adapter parameters stack with one
``F.pad`` + ``torch.stack`` that autograd differentiates. The cost is memory: (r_max - r_a) x (K + N)
unused elements per adapter, 0 when ranks are equal (the common case of a sweep or a serving
fleet). Every backend reads an adapter only up to its rank, so the padding's content never matters
(NaN included) and its gradient is exactly zero.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch
from fastadapt.backends import Capabilities
from fastadapt.ops import _autocast
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.ops.lora import rows, seed_int
from fastadapt.reference import multi_lora as reference

OP = "multi_lora_linear"
ID_DTYPES = (torch.int32, torch.int64)


def _forward(impl, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, dropout_p, seed):
    y, u = impl.forward(rows(x), weight, A_stack, B_stack, scalings, ranks, adapter_ids.reshape(-1), bias, dropout_p,
                        seed_int(seed))
    return y.view(*x.shape[:-1], weight.shape[0]), u


def _backward(impl, needs, gy, _gu, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, dropout_p, seed, u,
              **_):
    gx, *grads = impl.backward(rows(gy), rows(x), weight, A_stack, B_stack, u, scalings, ranks,
                               adapter_ids.reshape(-1), dropout_p, seed_int(seed), needs)
    return (gx.view(x.shape) if gx is not None else None), *grads


def _fake(x, weight, A_stack, **_):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape[:-1].numel(), A_stack.shape[1])


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    lead = draw.choice([(0,), (1,), (7,), (2, 3)])
    n_in, n_out, n = draw.int(1, 24), draw.int(1, 24), draw.int(1, 3)
    ranks = [draw.int(1, 4) for _ in range(n)]
    scalings = [draw.choice([0.5, -2.0, 3.0]) for _ in range(n)]
    ps = [draw.choice([0.0, 0.1, 0.999]) for _ in range(n)]
    training, per_sequence = draw.bool(), len(lead) > 1 and draw.bool()
    r_max = max(ranks)
    ids = torch.randint(-1, n, lead[:1] if per_sequence else lead)
    tensors = dict(x=torch.randn(*lead, n_in), weight=torch.randn(n_out, n_in) / n_in**0.5,
                   A_stack=torch.randn(n, r_max, n_in) / n_in**0.5, B_stack=torch.randn(n, n_out, r_max) / r_max**0.5,
                   adapter_ids=ids, bias=torch.randn(n_out) if draw.bool() else None)
    dropout = training and any(ps)

    def call(x, weight, A_stack, B_stack, adapter_ids, bias):
        return multi_lora_linear(x, weight, A_stack, B_stack, scalings, adapter_ids, bias, ps, training, ranks)

    def exact(keep, x, weight, A_stack, B_stack, adapter_ids, bias):
        if adapter_ids.dim() < x.dim() - 1:  # one id per sequence
            adapter_ids = adapter_ids.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
        rows = adapter_ids.reshape(-1)
        x2d = x.reshape(-1, x.shape[-1])
        table = torch.promote_types(x.dtype, torch.float32)
        mask = None
        if dropout:  # each row's mask from its adapter's probability, one draw for all
            mask = torch.ones(x2d.shape, dtype=torch.bool)
            for a, p in enumerate(ps):
                if p > 0.0:
                    mask[rows == a] = keep(0, x2d.shape, p)[rows == a]
        y = reference.multi_lora_linear(x2d, weight, A_stack, B_stack, torch.tensor(scalings, dtype=table),
                                        torch.tensor(ranks), rows, bias, mask,
                                        torch.tensor(ps, dtype=table) if dropout else None)
        return y.view(*x.shape[:-1], weight.shape[0])

    return FuzzCase(tensors, call, exact, grads=("x", "weight", "A_stack", "B_stack", "bias"),
                    fixed=("adapter_ids",), dropout=dropout)


# ``fastadapt::multi_lora_linear`` returns ``(y, u)``; the per-adapter tables stay float32 under autocast.
MULTI_LORA_LINEAR = declare(OpSpec(
    OP,
    args=(Arg("x", "Tensor", grad=True, select=True), Arg("weight", "Tensor", grad=True, select=True),
          Arg("A_stack", "Tensor", grad=True, select=True), Arg("B_stack", "Tensor", grad=True, select=True),
          Arg("scalings", "Tensor", keep=True), Arg("ranks", "Tensor"), Arg("adapter_ids", "Tensor"),
          Arg("bias", "Tensor?", grad=True, select=True), Arg("dropout_p", "Tensor?", keep=True),
          Arg("seed", "Tensor?")),
    outputs=("y", "u"), saved=("u",), grads=("x", "A_stack", "B_stack", "bias", "weight"),
    fake=_fake, forward=_forward, backward=_backward, fuzz=_fuzz))

PerAdapter = Union[float, Sequence[float], Tensor]


def _device_values(name: str, value: Tensor, n: int, dtype: torch.dtype, device) -> Tensor:
    """A per-adapter tensor argument, checked for shape and device and cast to ``dtype``. Taken as
    it is, so a caller that calls every step can keep it on the device (building it from a list
    costs a host-to-device copy, a synchronisation on CUDA, each call)."""
    integer = not (value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool)
    if value.dtype.is_floating_point != dtype.is_floating_point or (not dtype.is_floating_point and not integer):
        kind = "a floating-point" if dtype.is_floating_point else "an integer"
        raise TypeError(f"{name} must be {kind} tensor, got {value.dtype}")
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per adapter), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} and x on {device}: all tensors must be on one device")
    return value.to(dtype)


def _host_values(name: str, value, n: int, check) -> list:
    """A per-adapter Python argument (one value for all adapters, or n values), each checked."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__}")
    values = [value] * n if isinstance(value, Real) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values, expected {n} (one per adapter)")
    return [check(name, v) for v in values]


def _rank(r_max: int):
    def check(name, r):
        if isinstance(r, bool) or not isinstance(r, Integral) or not 1 <= r <= r_max:
            raise ValueError(f"{name} must be ints in [1, r_max = {r_max}] (A_stack.shape[1]), got {r!r}")
        return r
    return check


def multi_lora_linear(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: PerAdapter,
                      adapter_ids: Tensor, bias: Optional[Tensor] = None, dropout_p: PerAdapter = 0.0,
                      training: bool = True, ranks: Union[Sequence[int], Tensor, None] = None) -> Tensor:
    """LoRA linear with one adapter per row: ``x W^T + b + s_a * (dropout_a(x) A_a^T) B_a^T`` where
    ``a`` is the row's entry of ``adapter_ids`` (-1: the base layer alone).

    Rows may come in any order with any mix of adapters; nothing is grouped or padded by the
    caller, and the fused backends group rows on the device (no host synchronisation). Every
    adapter present in the batch gets its gradient, the others exactly zero.

    Args:
        x: (..., in_features), float16 / bfloat16 / float32 (float64 runs on the reference).
        weight: (out_features, in_features), the frozen base weight, any strides.
        A_stack: (n, r_max, in_features): adapter ``a``'s ``lora_A`` is ``A_stack[a, :ranks[a]]``.
        B_stack: (n, out_features, r_max): its ``lora_B`` is ``B_stack[a, :, :ranks[a]]``. The
            padding beyond an adapter's rank is never read and gets a zero gradient. If the stacks'
            dtype differs from the compute dtype, the low-rank path is computed in the compute
            dtype and their grads come back in their own dtype.
        scalings: ``alpha_a / r_a`` per adapter: n Python floats, or a float tensor (n,) on x's device.
        adapter_ids: int32 / int64 tensor on x's device, one id in [-1, n) per row (shape
            ``x.shape[:-1]``) or, for x of 3 or more dimensions, one per sequence (shape ``(x.shape[0],)``).
            Ids are checked on the device (``torch._assert_async``): an out-of-range id raises
            at the next synchronisation on CUDA, at once on the CPU.
        bias: (out_features,) or None.
        dropout_p: dropout probability on each adapter's input: one float for all, n floats, or a
            float tensor (n,); applied only when ``training``. Masks are drawn from a seed and
            regenerated in the backward, never stored.
        ranks: each adapter's rank, n ints in [1, r_max] or an integer tensor (n,); None: all r_max.

    Returns:
        (..., out_features) in the compute dtype (x's, or the autocast region's).

    Equivalent PyTorch::

        y = F.linear(x, weight, bias)
        for a in range(n):
            rows = adapter_ids == a
            A, B = A_stack[a, :ranks[a]], B_stack[a, :, :ranks[a]]
            y[rows] += (F.dropout(x[rows], dropout_p[a], training) @ A.T) @ B.T * scalings[a]
    """
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("A_stack", A_stack, ndim=3)
    _checks.tensor("B_stack", B_stack, ndim=3)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in ID_DTYPES:
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {adapter_ids.dtype}")
    _checks.same_device(x=x, weight=weight, A_stack=A_stack, B_stack=B_stack, adapter_ids=adapter_ids, bias=bias)
    dtype = _autocast.autocast_dtype(x)
    if dtype is None:
        _checks.same_dtype(x=x, weight=weight, bias=bias)
        dtype = x.dtype
    n_out, n_in = weight.shape
    n, r_max, _ = A_stack.shape
    _checks.dim_equal("x.shape[-1] (in_features)", x.shape[-1], n_in)
    if n == 0 or r_max == 0:
        raise ValueError(f"A_stack must hold at least one adapter of rank >= 1, got shape {tuple(A_stack.shape)}")
    _checks.dim_equal("A_stack.shape[2] (in_features)", A_stack.shape[2], n_in)
    _checks.dim_equal("B_stack.shape[0] (adapters)", B_stack.shape[0], n)
    _checks.dim_equal("B_stack.shape[1] (out_features)", B_stack.shape[1], n_out)
    _checks.dim_equal("B_stack.shape[2] (r_max)", B_stack.shape[2], r_max)
    if bias is not None:
        _checks.dim_equal("bias.shape[0] (out_features)", bias.shape[0], n_out)
    if n_in == 0 or n_out == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    rows = x.shape[:-1]
    if adapter_ids.shape != rows:
        if x.dim() >= 3 and adapter_ids.shape == rows[:1]:  # one id per sequence
            adapter_ids = adapter_ids.view(-1, *(1,) * (x.dim() - 2)).expand(rows)
        else:
            per_seq = f" or (x.shape[0],) = {tuple(rows[:1])}" if x.dim() >= 3 else ""
            raise ValueError(f"adapter_ids must have shape x.shape[:-1] = {tuple(rows)}{per_seq}, "
                             f"got {tuple(adapter_ids.shape)}")
    torch._assert_async(((adapter_ids >= -1) & (adapter_ids < n)).all(),
                        f"adapter_ids must be in [-1, {n}) (-1: base only; n = A_stack.shape[0])")

    device = x.device
    # The per-adapter scalings in float32, float64 for a float64 call (as the reference's lora_linear
    # takes a Python float): rounding them to the compute dtype would scale every output of an
    # adapter by a rounded factor. The probabilities in float64 whatever the dtype: 1 / (1 - p) from
    # p rounded to float32 is 1.3e-5 off at p = 0.999, 1.7e-4 at 0.9999.
    table = torch.promote_types(dtype, torch.float32)
    if isinstance(scalings, Tensor):
        scalings_t = _device_values("scalings", scalings, n, table, device)
        torch._assert_async(torch.isfinite(scalings_t).all(), "scalings must be finite")
    else:
        scalings_t = torch.tensor(_host_values("scalings", scalings, n, _checks.finite_float), dtype=table,
                                  device=device)
    if ranks is None:
        ranks_t = torch.full((n,), r_max, dtype=torch.int32, device=device)
    elif isinstance(ranks, Tensor):
        ranks_t = _device_values("ranks", ranks, n, torch.int32, device)
        torch._assert_async(((ranks_t >= 1) & (ranks_t <= r_max)).all(), f"ranks must be in [1, r_max = {r_max}]")
    else:
        ranks_t = torch.tensor(_host_values("ranks", ranks, n, _rank(r_max)), dtype=torch.int32, device=device)

    p_t = None
    if training and isinstance(dropout_p, Tensor):
        p_t = _device_values("dropout_p", dropout_p, n, torch.float64, device)
        torch._assert_async(((p_t >= 0) & (p_t < 1)).all(), "dropout_p must be in [0, 1)")
    elif training:
        ps = _host_values("dropout_p", dropout_p, n, _checks.probability)
        if any(ps):
            p_t = torch.tensor(ps, dtype=torch.float64, device=device)
    # Drawn on the CPU generator: no device sync, and torch.compile traces it.
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p_t is not None else None
    return MULTI_LORA_LINEAR(x, weight, A_stack.to(dtype), B_stack.to(dtype), scalings_t, ranks_t,
                             adapter_ids.to(torch.int64), bias, p_t, seed)[0]


# ---------------------------------------------------------------------------------------------
# Backends

CAPABILITIES = Capabilities("x", ("x", "weight", "A_stack", "B_stack", "bias"))
_KERNELS = "fastadapt.kernels.multi_lora"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))


# csrc/multi_lora.cpp; no CUDA kernel: Triton serves CUDA.
_native_forward, _native_backward = _native.calls("multi_lora")
dispatch.register(OP, "cpp", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=reference.backward)
