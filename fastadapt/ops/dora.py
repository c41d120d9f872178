"""The fused DoRA linear as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::dora_linear`` returns ``(y, u, P, n)``: ``u = s D(x) A^T`` (M, r), the pre-scale
output ``P = D(x) W^T + u B^T`` (M, N) that the magnitude's gradient needs, and the detached
weight norm ``n`` (N,), float32 (float64 for float64 inputs). The dropout mask is regenerated from
the seed. ``fastadapt::dora_linear_backward`` is one fused backward call. Math in
``fastadapt/reference/dora.py``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch, strategy
from fastadapt.backends import Capabilities
from fastadapt.ops import lora
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.ops.lora import rows, seed_int
from fastadapt.reference import dora as reference

OP = "dora_linear"


def _forward(impl, x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    y, u, P, n = impl.forward(rows(x), weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed_int(seed))
    return y.view(*x.shape[:-1], weight.shape[0]), u, P, n


def _backward(impl, needs, gy, _gu, _gP, _gn, x, weight, lora_A, lora_B, magnitude, seed, u, P, n, scaling,
              dropout_p, **_):
    gx, *grads = impl.backward(rows(gy), rows(x), weight, lora_A, lora_B, magnitude, u, P, n, scaling, dropout_p,
                               seed_int(seed), needs)
    return (gx.view(x.shape) if gx is not None else None), *grads


def _fake(x, weight, lora_A, **_):
    M, N = x.shape[:-1].numel(), weight.shape[0]
    n = x.new_empty(N, dtype=torch.promote_types(x.dtype, torch.float32))
    return x.new_empty(*x.shape[:-1], N), x.new_empty(M, lora_A.shape[0]), x.new_empty(M, N), n


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    lead = draw.choice([(0,), (1,), (7,), (2, 3)])
    n_in, n_out, r = draw.int(1, 24), draw.int(1, 24), draw.int(1, 8)
    p, training, scaling = draw.choice([0.0, 0.1, 0.999]), draw.bool(), draw.choice([0.5, -2.0, 3.0])
    tensors = dict(x=torch.randn(*lead, n_in), weight=torch.randn(n_out, n_in) / n_in**0.5,
                   lora_A=torch.randn(r, n_in) / n_in**0.5, lora_B=torch.randn(n_out, r) / r**0.5,
                   magnitude=torch.rand(n_out) + 0.5, bias=torch.randn(n_out) if draw.bool() else None)
    dropout = training and p > 0.0

    def call(x, weight, lora_A, lora_B, magnitude, bias, scaling=scaling):
        return dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, p, training)

    def exact(keep, x, weight, lora_A, lora_B, magnitude, bias, scaling=scaling):
        mask = keep(0, (x.shape[:-1].numel(), x.shape[-1]), p).view(x.shape) if dropout else None
        return reference.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, mask, p)

    return FuzzCase(tensors, call, exact, grads=("x", "weight", "lora_A", "lora_B", "magnitude", "bias"),
                    dropout=dropout)


# ``fastadapt::dora_linear`` returns ``(y, u, P, n)``; autocast leaves the magnitude in float32.
DORA_LINEAR = declare(OpSpec(
    OP,
    args=(Arg("x", "Tensor", grad=True, select=True), Arg("weight", "Tensor", grad=True, select=True),
          Arg("lora_A", "Tensor", grad=True, select=True), Arg("lora_B", "Tensor", grad=True, select=True),
          Arg("magnitude", "Tensor", grad=True, keep=True, select=True), Arg("scaling", "float"),
          Arg("bias", "Tensor?", grad=True, select=True), Arg("dropout_p", "float"), Arg("seed", "Tensor?")),
    outputs=("y", "u", "P", "n"), saved=("u", "P", "n"), grads=("x", "lora_A", "lora_B", "magnitude", "bias", "weight"),
    fake=_fake, forward=_forward, backward=_backward, fuzz=_fuzz))


def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: Union[float, Tensor], bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                training: bool = True) -> Tensor:
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
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA), finite: a Python
            float or a one-element tensor, as for :func:`fastadapt.lora_linear`.
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
    lora_B, scaling = lora.scaled_B(lora_B, scaling, dtype)
    return DORA_LINEAR(x, weight, lora_A.to(dtype), lora_B, magnitude.to(torch.promote_types(dtype, torch.float32)),
                       scaling, bias, p, seed)[0]


# ---------------------------------------------------------------------------------------------
# Backends


def _float32_magnitude(backend, magnitude, **_):
    return [] if magnitude.dtype == torch.float32 else [f"magnitude must be float32, got {magnitude.dtype}"]


CAPABILITIES = Capabilities("x", lora.CAPABILITIES.same_dtype, extra=_float32_magnitude)
_KERNELS = "fastadapt.kernels.dora"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"), strategy=strategy.DORA_NORM)


# csrc/dora.cpp; no CUDA kernel: on CUDA the Triton backend or the reference serves.
_native_forward, _native_backward = _native.calls("dora")
dispatch.register(OP, "cpp", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=reference.backward)
