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

Several adapters summed (PEFT's several active adapters) are one rank-(r_0 + r_1 + ...) update:
A's rows and B's columns are the adapters' in turn ("rank segments"). Without dropout that is the
math above unchanged. With dropout each adapter draws its own mask over x (PEFT applies each
adapter's dropout module to x), so segment k has its own D_k, drawn from ``seed + k``::

    u[:, seg_k] = s * D_k(x) A_k^T,   gx = gy W + sum_k D_k(gu[:, seg_k] A_k),   gA_k = gu[:, seg_k]^T D_k(x)

and only these three products change: y, gu and gB read the whole rank at once.

The fused kernels compute exactly these products; this module states them once, readably
(:func:`forward`, :func:`backward`; ``qlora_linear``'s reference runs them on the dequantized
weight). As ``lora_linear``'s reference backend it computes the forward's products in the order of
:func:`lora_linear` and takes its gradients through autograd, on the eager path and the custom
op's alike, so that both give the same bits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastadapt.reference.dropout import dropout_keep


def rank_segments(rank: int, dropout_p: float, seed: int, ranks: Optional[Sequence[int]],
                  ranks_p: Optional[Sequence[float]]) -> list[tuple[int, int, float, int]]:
    """The rank segments of a call as (first row of A, end, dropout p, seed): one segment of the
    whole rank with ``dropout_p`` when ``ranks`` is None, else segment k of ``ranks[k]`` rows
    with ``ranks_p[k]`` drawn from ``seed + k``. Every backend walks the same list."""
    if ranks is None:
        return [(0, rank, dropout_p, seed)]
    bounds = [0]
    for r in ranks:
        bounds.append(bounds[-1] + r)
    return [(a, b, p, seed + k) for k, (a, b, p) in enumerate(zip(bounds, bounds[1:], ranks_p))]


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - p)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, dropout_p=0.0, ranks=None):
    """``x W^T + b + s * (D(x) A^T) B^T`` with autograd; ``keep`` is the dropout mask (or None).

    With ``ranks`` (several adapters summed, A's rows and B's columns in turn), ``keep`` and
    ``dropout_p`` are sequences, one mask (or None) and one probability per adapter.

    Equivalent PEFT: ``base_layer(x) + sum over adapters of lora_B(lora_A(dropout(x))) * scaling``.
    """
    return _lora(x, weight, lora_A, lora_B, scaling, bias, *_spans(keep, dropout_p, ranks, lora_A.shape[0]))[0]


def _spans(keep, dropout_p, ranks, rank):
    """(keep masks, probabilities, row bounds of A) per adapter."""
    if ranks is None:
        return [keep], [dropout_p], [(0, rank)]
    return keep, dropout_p, [(a, b) for a, b, _, _ in rank_segments(rank, 0.0, 0, ranks, dropout_p)]


def _lora(x, weight, lora_A, lora_B, scaling, bias, keeps, ps, bounds):
    """(y, [D_k(x) A_k^T]): the one order of operations of the eager composite and of the
    backend forward, so that both paths give the same bits."""
    y = torch.nn.functional.linear(x, weight, bias)
    parts = []
    for k, p, (a, b) in zip(keeps, ps, bounds):
        part = _dropped(x, k, p) @ lora_A[a:b].t()
        y = y + part @ lora_B[:, a:b].t() * scaling
        parts.append(part)
    return y, parts


def forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    """Backend forward: (y, u) for 2-D ``x2d``; the masks come from ``seed``."""
    spans = rank_segments(lora_A.shape[0], dropout_p, seed, ranks, ranks_p)
    keeps = [dropout_keep(sd, x2d.shape, p, x2d.device) for _, _, p, sd in spans]
    y, parts = _lora(x2d, weight, lora_A, lora_B, scaling, bias, keeps, [p for _, _, p, _ in spans],
                     [(a, b) for a, b, _, _ in spans])
    return y, _cat(parts, 1) * scaling


def backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None, ranks_p=None):
    """Backend backward: (gx, gA, gB, gbias, gweight), ``None`` where ``needs`` says not needed."""
    need_x, need_A, need_B, need_bias, need_weight = needs
    gu = (gy @ lora_B) * scaling
    gx = gy @ weight if need_x else None
    gA = []
    for a, b, p, sd in rank_segments(lora_A.shape[0], dropout_p, seed, ranks, ranks_p):
        keep = dropout_keep(sd, x2d.shape, p, x2d.device)
        if need_x:
            gx = gx + _dropped(gu[:, a:b] @ lora_A[a:b], keep, p)
        if need_A:
            gA.append(gu[:, a:b].t() @ _dropped(x2d, keep, p))
    gA = _cat(gA, 0) if need_A else None
    gB = gy.t() @ u if need_B else None
    gbias = gy.sum(0) if need_bias else None
    gweight = gy.t() @ x2d if need_weight else None
    return gx, gA, gB, gbias, gweight
