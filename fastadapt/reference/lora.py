"""LoRA linear in plain PyTorch: the oracle of the tests and the last-resort backend.

Math (PEFT's ``LoraLayer``), with ``x`` of shape (M, K), ``W`` (N, K), ``A`` (r, K), ``B`` (N, r)::

    keep = dropout mask of x's shape (all True without dropout), D(x) = keep * x / (1 - p)
    u    = s * D(x) A^T                                   (M, r), saved for the backward
    y    = x W^T + b + u B^T                              (M, N)

    gu = s * gy B                                         (M, r)
    gx = gy W + keep / (1 - p) * (gu A)                   (M, K)
    gA = gu^T D(x)                                        (r, K)
    gB = s * gy^T (D(x) A^T) = gy^T u                     (N, r)
    gb = sum_M gy                                         (N,)

The fused kernels compute exactly these products; this module states them once, readably.
"""

from __future__ import annotations

import torch

from fastadapt.reference.dropout import dropout_keep


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - p)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, dropout_p=0.0):
    """``x W^T + b + s * (D(x) A^T) B^T`` with autograd; ``keep`` is the dropout mask (or None).

    Equivalent PEFT: ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    return y + (_dropped(x, keep, dropout_p) @ lora_A.t()) @ lora_B.t() * scaling


def forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """Backend forward: (y, u) for 2-D ``x2d``; the mask comes from ``seed``."""
    keep = dropout_keep(seed, x2d.shape, dropout_p, x2d.device)
    u = (_dropped(x2d, keep, dropout_p) @ lora_A.t()) * scaling
    y = torch.nn.functional.linear(x2d, weight, bias) + u @ lora_B.t()
    return y, u


def backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs):
    """Backend backward: (gx, gA, gB, gbias, gweight), ``None`` where ``needs`` says not needed."""
    need_x, need_A, need_B, need_bias, need_weight = needs
    keep = dropout_keep(seed, x2d.shape, dropout_p, x2d.device)
    gu = (gy @ lora_B) * scaling
    gx = gy @ weight + _dropped(gu @ lora_A, keep, dropout_p) if need_x else None
    gA = gu.t() @ _dropped(x2d, keep, dropout_p) if need_A else None
    gB = gy.t() @ u if need_B else None
    gbias = gy.sum(0) if need_bias else None
    gweight = gy.t() @ x2d if need_weight else None
    return gx, gA, gB, gbias, gweight
