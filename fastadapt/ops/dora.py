"""The fused DoRA linear as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::dora_linear`` returns ``(y, u, P, n)``: ``u = s D(x) A^T`` (M, r), the pre-scale
output ``P = D(x) W^T + u B^T`` (M, N) that the magnitude's gradient needs, and the detached
weight norm ``n`` (N,), float32 (float64 for float64 inputs). The dropout mask is regenerated from
the seed. ``fastadapt::dora_linear_backward`` is one fused backward call. Math in
``fastadapt/reference/dora.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastadapt import _checks, dispatch, strategy
from fastadapt.ops import _autocast, _eager, lora
from fastadapt.ops.lora import _seed
from fastadapt.reference import dora as reference

OP = "dora_linear"


def _select(x, weight, lora_A, lora_B, magnitude, scaling, bias, *_) -> dispatch.Implementation:
    return dispatch.select(OP, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude, bias=bias)


def _forward(impl, x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    x2d = x.reshape(-1, x.shape[-1])
    y, u, P, n = impl.forward(x2d, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, _seed(seed))
    return y.view(*x.shape[:-1], weight.shape[0]), u, P, n


@torch.library.custom_op("fastadapt::dora_linear", mutates_args=())
def _dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                 bias: Optional[Tensor], dropout_p: float,
                 seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs = (x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed)
    return _forward(_select(*inputs), *inputs)


@_dora_linear.register_fake
def _(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    M = x.shape[:-1].numel()
    N = weight.shape[0]
    n = x.new_empty(N, dtype=torch.promote_types(x.dtype, torch.float32))
    return x.new_empty(*x.shape[:-1], N), x.new_empty(M, lora_A.shape[0]), x.new_empty(M, N), n


def _run_backward(gy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                  u: Tensor, P: Tensor, n: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                  needs: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gx, gA, gB, gmagnitude, gbias, gweight) on ``backend``, the forward's; a gradient not asked
    for in ``needs`` comes back empty."""
    x2d = x.reshape(-1, x.shape[-1])
    gy2d = gy.reshape(-1, gy.shape[-1])
    grads = dispatch.get(OP, backend).backward(gy2d, x2d, weight, lora_A, lora_B, magnitude, u, P, n, scaling,
                                               dropout_p, _seed(seed), needs)
    gx, *rest = (g if g is not None else x.new_empty(0) for g in grads)
    return (gx.view(x.shape) if needs[0] else gx), *rest


_dora_linear_backward = torch.library.custom_op("fastadapt::dora_linear_backward", mutates_args=())(_run_backward)


@_dora_linear_backward.register_fake
def _(gy, x, weight, lora_A, lora_B, magnitude, u, P, n, scaling, dropout_p, seed, needs, backend):
    likes = (x, lora_A, lora_B, magnitude, gy, weight)
    shapes = (x.shape, lora_A.shape, lora_B.shape, magnitude.shape, weight.shape[:1], weight.shape)
    return tuple(like.new_empty(shape) if need else x.new_empty(0) for like, shape, need in zip(likes, shapes, needs))


def _setup_context(ctx, inputs, output, backend=None):
    x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed = inputs
    _, u, P, n = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, u, P, n, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.backend = backend or _select(*inputs).backend  # the one the forward just ran on


def _backward(ctx, gy, _gu, _gP, _gn):
    x, weight, lora_A, lora_B, magnitude, u, P, n, seed = ctx.saved_tensors
    nx, nw, na, nb, nm, _, nbias = ctx.needs_input_grad[:7]
    needs = [nx, na, nb, nm, nbias, nw]
    run = _run_backward if getattr(ctx, "eager", False) else torch.ops.fastadapt.dora_linear_backward
    grads = run(gy, x, weight, lora_A, lora_B, magnitude, u, P, n, ctx.scaling, ctx.dropout_p, seed, needs,
                ctx.backend)
    gx, gA, gB, gm, gbias, gw = (g if need else None for g, need in zip(grads, needs))
    return gx, gw, gA, gB, gm, None, gbias, None, None


_KEEP = (4,)  # autocast leaves the magnitude in float32 (dora_linear)
_dora_linear.register_autograd(_backward, setup_context=_setup_context)
_DoRALinear = _eager.function("DoRALinear", _forward, _setup_context, _backward)
_autocast.register(OP, keep=_KEEP)


def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True) -> Tensor:
    """Fused DoRA linear, as PEFT's ``use_dora=True`` LoRA ``Linear`` computes it.

    ``y = x W^T + b + (g - 1) * D(x) W^T + g * s * (D(x) A^T) B^T`` with ``g = m / ||W + s B A||``
    per output feature, the norm detached (no gradient flows through it, as in PEFT and the DoRA
    paper); without dropout ``y = g * (x W^T + s (x A^T) B^T) + b``.

    Args:
        x: (..., in_features), float16 / bfloat16 / float32 (float64 runs on the reference).
        weight: (out_features, in_features), the frozen base weight, any strides (a transposed
            view of a GPT-2 ``Conv1D`` weight needs no copy); same dtype as ``x`` outside autocast.
        lora_A: (r, in_features); lora_B: (out_features, r) (PEFT's layouts): computed in the
            compute dtype with float32 accumulation, whatever their own dtype (PEFT keeps them in
            float32); magnitude: (out_features,) (PEFT's ``lora_magnitude_vector[name].weight``),
            used in float32 (float64 for float64 inputs). Their grads come back in their own dtype.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA), finite.
        bias: (out_features,) or None.
        dropout_p: dropout probability on the adapter's input, applied only when ``training``;
            the mask is drawn from a seed inside the kernels and regenerated in the backward.

    Returns:
        (..., out_features) in the compute dtype: ``x``'s, or inside ``torch.autocast`` the
        region's. Gradients flow to x, lora_A, lora_B, magnitude, bias, and to weight only if it
        requires grad.

    Equivalent PyTorch::

        n = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1).detach()
        xd = F.dropout(x, dropout_p, training)
        g = magnitude / n
        F.linear(x, weight, bias) + (g - 1) * F.linear(xd, weight) + g * scaling * (xd @ lora_A.T) @ lora_B.T
    """
    _checks.tensor("magnitude", magnitude, ndim=1)
    dtype, scaling, p, seed = lora.check_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
    _checks.same_device(x=x, magnitude=magnitude)
    _checks.dim_equal("magnitude.shape[0] (out_features)", magnitude.shape[0], weight.shape[0])
    # The magnitude stays in float32 (PEFT's m / n is float32 over a half base): rounding it to the
    # compute dtype would scale every output and every gradient by a rounded g.
    inputs = (x, weight, lora_A.to(dtype), lora_B.to(dtype), magnitude.to(torch.promote_types(dtype, torch.float32)),
              scaling, bias, p, seed)
    if _eager.fast_path(x, weight, lora_A, lora_B, magnitude, bias):
        y, *_ = _eager.run(_DoRALinear, _select, *inputs, autocast_device=x.device.type, keep=_KEEP)
    else:
        y, *_ = torch.ops.fastadapt.dora_linear(*inputs)
    return y


# ---------------------------------------------------------------------------------------------
# Backends


def _triton_why_not(x, weight, lora_A, lora_B, magnitude, bias):
    reasons = lora._triton_why_not(x, weight, lora_A, lora_B, bias)
    if magnitude.dtype != torch.float32:
        reasons.append(f"magnitude must be float32, got {magnitude.dtype}")
    return reasons


_KERNELS = "fastadapt.kernels.dora"
dispatch.register(OP, "triton", why_not=_triton_why_not, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"), strategy=strategy.DORA_NORM)
dispatch.register(OP, "reference", why_not=lambda **_: [], forward=reference.forward,
                  backward=reference.backward)
