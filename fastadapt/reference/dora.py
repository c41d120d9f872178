"""DoRA linear in plain PyTorch: the oracle of the tests and the last-resort backend.

Math (PEFT 0.21's ``DoraLinearLayer`` called from its LoRA ``Linear``), with ``x`` of shape (M, K),
``W`` (N, K), ``A`` (r, K), ``B`` (N, r), the magnitude ``m`` (N,)::

    keep = dropout mask of x's shape, D(x) = keep * x / (1 - p)      (D(x) = x without dropout)
    n    = ||W + s B A|| over each row of W                            (N,), detached: no gradient
    g    = m / n                                                       (N,)
    u    = s D(x) A^T                                                  (M, r), saved
    P    = D(x) W^T + u B^T                                            (M, N), saved
    y    = x W^T + b + (g - 1) * D(x) W^T + g * u B^T
         = (x - D(x)) W^T + g * P + b                                  (g * P + b without dropout)

PEFT computes ``(g - 1) * base + g * s * lora(D(x))`` on top of the base layer's output, with
``base = x W^T`` taken from that output when dropout is off and recomputed as ``D(x) W^T`` when
it is on; both cases are the line above. Because ``n`` is detached (DoRA paper, section 4.3), the
backward is LoRA's backward with ``gy`` scaled per column by ``g``, plus the magnitude's gradient::

    gP = g * gy                                                        (M, N), column-scaled
    gu = s gP B                                                        (M, r)
    gx = gy W + D((gP - gy) W + gu A)                                  (gP W + gu A without dropout)
    gA = gu^T D(x)                                                     (r, K)
    gB = gP^T u                                                        (N, r)
    gm = sum_M (gy * P) / n                                            (N,)
    gb = sum_M gy                                                      (N,)
    gW = gy^T x + (gP - gy)^T D(x)                                     (only if W trains)
"""

from __future__ import annotations

import torch

from fastadapt.reference.dropout import dropout_keep
from fastadapt.reference.lora import _dropped


def weight_norm(weight, lora_A, lora_B, scaling, dtype):
    """``||W + s B A||`` per row of W, in ``dtype`` (PEFT's ``get_weight_norm``)."""
    return torch.linalg.norm(weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype)), dim=1)


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, keep=None, dropout_p=0.0):
    """DoRA's output with autograd, as PEFT computes it; ``keep`` is the dropout mask (or None).

    Equivalent PEFT: ``base_layer(x) + lora_magnitude_vector(dropout(x), lora_A=..., lora_B=...,
    scaling=s, base_layer=..., base_result=...)``.
    """
    norm = weight_norm(weight, lora_A, lora_B, scaling, x.dtype).detach()
    g = magnitude / norm
    xd = _dropped(x, keep, dropout_p)
    base = torch.nn.functional.linear(xd, weight)
    lora = (xd @ lora_A.t()) @ lora_B.t() * scaling
    return torch.nn.functional.linear(x, weight, bias) + (g - 1) * base + g * lora


def _norm_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def forward(x2d, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    """Backend forward: (y, u, P, n) for 2-D ``x2d``; n in float32 (float64 for float64 inputs).

    Composed as PEFT composes it, the base layer's output plus ``(g - 1) D(x) W^T + g u B^T``, with
    the norm computed as PEFT initialises the magnitude (:func:`weight_norm`): at PEFT's
    initialisation (``B = 0``, ``m = ||W||``) g is exactly 1 and the added term exactly 0, so ``y``
    is the base layer's output bit for bit, which PEFT guarantees (its tests assert ``atol=0``).
    """
    keep = dropout_keep(seed, x2d.shape, dropout_p, x2d.device)
    xd = _dropped(x2d, keep, dropout_p)
    n = weight_norm(weight, lora_A, lora_B, scaling, _norm_dtype(x2d.dtype))
    g = magnitude.to(n.dtype) / n
    u = (xd @ lora_A.t()) * scaling
    out = torch.nn.functional.linear(x2d, weight, bias)  # the base layer's output, as its own call rounds it
    if keep is not None:
        base = xd @ weight.t()
    else:  # taken from the output, as PEFT does
        base = out if bias is None else out - bias
    lora = u @ lora_B.t()
    y = out.to(n.dtype) + ((g - 1) * base.to(n.dtype) + g * lora.to(n.dtype))
    return y.to(x2d.dtype), u, base + lora, n


def backward(gy, x2d, weight, lora_A, lora_B, magnitude, u, P, n, scaling, dropout_p, seed, needs):
    """Backend backward: (gx, gA, gB, gm, gbias, gweight), ``None`` where ``needs`` says not needed."""
    need_x, need_A, need_B, need_m, need_bias, need_weight = needs
    keep = dropout_keep(seed, x2d.shape, dropout_p, x2d.device)
    g = magnitude.to(n.dtype) / n
    gP = (gy * g).to(gy.dtype)
    gu = (gP @ lora_B) * scaling
    gx = gA = gB = gm = gbias = gweight = None
    if need_x:
        gx = gP @ weight + gu @ lora_A if keep is None else \
            gy @ weight + _dropped((gP - gy) @ weight + gu @ lora_A, keep, dropout_p)
    if need_A:
        gA = gu.t() @ _dropped(x2d, keep, dropout_p)
    if need_B:
        gB = gP.t() @ u
    if need_m:
        gm = ((gy * P).sum(0, dtype=n.dtype) / n).to(magnitude.dtype)
    if need_bias:
        gbias = gy.sum(0)
    if need_weight:
        gweight = gP.t() @ x2d if keep is None else gy.t() @ x2d + (gP - gy).t() @ _dropped(x2d, keep, dropout_p)
    return gx, gA, gB, gm, gbias, gweight
