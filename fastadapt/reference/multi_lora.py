"""Many LoRA adapters in one batch (each row its own adapter) in plain PyTorch: the oracle of the
tests and the last-resort backend.

Math, with ``x`` (M, K), ``W`` (N, K), the adapters stacked and padded to the largest rank,
``A`` (n, r_max, K), ``B`` (n, N, r_max), adapter ``a`` of rank ``r_a`` owning rows
``a(m) = a`` (``-1``: base only)::

    A_a, B_a = A[a, :r_a], B[a, :, :r_a]        (padding beyond r_a is never read)
    keep     = dropout mask of x's shape, row m drawn with p_{a(m)} (all True without dropout)
    u[m]     = s_{a(m)} * D(x)[m] A_{a(m)}^T      (M, r_max), zero beyond the row's rank, saved
    y[m]     = x[m] W^T + b + u[m] B_{a(m)}^T     (M, N)

    gu[m]    = s_{a(m)} * gy[m] B_{a(m)}          (M, r_max)
    gx[m]    = gy[m] W + keep[m] / (1 - p) * (gu[m] A_{a(m)})
    gA_a     = sum over rows of a: gu^T D(x)      (r_max, K), zero beyond r_a and for absent adapters
    gB_a     = sum over rows of a: gy^T u         (N, r_max), likewise

which is :mod:`fastadapt.reference.lora` run on each adapter's own rows. Every function here loops
over the adapters with row masks (n matmuls over all M rows): readable, and never reads an id on
the host. An adapter's products read only its own rows (the others zeroed in both operands) and
its padding's gradient is zeroed: a NaN or inf in one row reaches no other adapter, and no padding.
"""

from __future__ import annotations

import torch

from fastadapt.reference.dropout import dropout_keep


def live(A_stack: torch.Tensor, B_stack: torch.Tensor, ranks: torch.Tensor):
    """A_stack and B_stack with the padding beyond each adapter's rank replaced by zeros (through
    ``torch.where``: whatever the padding holds, NaN included, reaches neither the output nor,
    through autograd, its own gradient, which is exactly zero)."""
    r = torch.arange(A_stack.shape[1], device=A_stack.device)
    on = r[None, :] < ranks[:, None]  # (n, r_max)
    zero = A_stack.new_zeros(())
    return torch.where(on[:, :, None], A_stack, zero), torch.where(on[:, None, :], B_stack, zero)


def row_dropout_p(adapter_ids: torch.Tensor, dropout_p: torch.Tensor | None):
    """(M, 1) dropout probability of each row (its adapter's; 0 for base-only rows), or None."""
    if dropout_p is None:
        return None
    p = dropout_p[adapter_ids.clamp(min=0)]
    return torch.where(adapter_ids >= 0, p, p.new_zeros(()))[:, None]


def _dropped(x, keep, p_rows):
    """keep * x * (1 / (1 - p)), computed in float32 (float64 for float64 x) and rounded once to x's
    dtype, the scale from p in float64, as eager dropout does with its scalar."""
    if keep is None:
        return x
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide) * keep.to(wide) * (1.0 / (1.0 - p_rows.double())).to(wide)).to(x.dtype)


def _per_adapter_rows(adapter_ids, n):
    return [(adapter_ids == a)[:, None] for a in range(n)]


def _own(t, rows):
    """``t`` with the rows of other adapters zeroed, so that a product over rows reads only these."""
    return torch.where(rows, t, t.new_zeros(()))


def multi_lora_linear(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias=None, keep=None,
                      dropout_p=None):
    """``y[m] = x[m] W^T + b + s_a (D(x)[m] A_a^T) B_a^T`` for ``a = adapter_ids[m]``, with autograd.

    x (M, K); adapter_ids (M,); ``keep`` the dropout mask of x's shape (or None); dropout_p (n,)
    or None. Equivalent PEFT: its mixed-batch forward (``adapter_names``).
    """
    A, B = live(A_stack, B_stack, ranks)
    xd = _dropped(x, keep, row_dropout_p(adapter_ids, dropout_p))
    y = torch.nn.functional.linear(x, weight, bias)
    for a, rows in enumerate(_per_adapter_rows(adapter_ids, A.shape[0])):
        y = y + _own((_own(xd, rows) @ A[a].t()) @ B[a].t() * scalings[a], rows)
    return y


def forward(x2d, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, dropout_p, seed):
    """Backend forward: (y (M, N), u (M, r_max)) for 2-D ``x2d``; the mask comes from ``seed``."""
    A, B = live(A_stack, B_stack, ranks)
    p_rows = row_dropout_p(adapter_ids, dropout_p)
    keep = dropout_keep(seed, x2d.shape, p_rows, x2d.device)
    xd = _dropped(x2d, keep, p_rows)
    u = x2d.new_zeros(x2d.shape[0], A.shape[1])
    for a, rows in enumerate(_per_adapter_rows(adapter_ids, A.shape[0])):
        u = torch.where(rows, (xd @ A[a].t()) * scalings[a], u)
    y = torch.nn.functional.linear(x2d, weight, bias)
    for a, rows in enumerate(_per_adapter_rows(adapter_ids, A.shape[0])):
        y = torch.where(rows, y + u @ B[a].t(), y)
    return y, u


def backward(gy, x2d, weight, A_stack, B_stack, u, scalings, ranks, adapter_ids, dropout_p, seed, needs):
    """Backend backward: (gx, gA, gB, gbias, gweight), ``None`` where ``needs`` says not needed."""
    need_x, need_A, need_B, need_bias, need_weight = needs
    A, B = live(A_stack, B_stack, ranks)
    p_rows = row_dropout_p(adapter_ids, dropout_p)
    keep = dropout_keep(seed, x2d.shape, p_rows, x2d.device)
    masks = _per_adapter_rows(adapter_ids, A.shape[0])
    gu = gy.new_zeros(gy.shape[0], A.shape[1])
    for a, rows in enumerate(masks):
        gu = torch.where(rows, (gy @ B[a]) * scalings[a], gu)
    gx = gA = gB = None
    if need_x:
        update = torch.zeros_like(x2d)
        for a, rows in enumerate(masks):
            update = torch.where(rows, gu @ A[a], update)
        gx = gy @ weight + _dropped(update, keep, p_rows)
    # Beyond its rank an adapter's gu and u columns are zero only while its rows are finite.
    live_rank = torch.arange(A.shape[1], device=A.device)[None, :] < ranks[:, None]  # (n, r_max)
    if need_A:
        xd = _dropped(x2d, keep, p_rows)
        gA = torch.stack([_own(gu, rows).t() @ _own(xd, rows) for rows in masks])
        gA = torch.where(live_rank[:, :, None], gA, gA.new_zeros(()))
    if need_B:
        gB = torch.stack([_own(gy, rows).t() @ _own(u, rows) for rows in masks])
        gB = torch.where(live_rank[:, None, :], gB, gB.new_zeros(()))
    gbias = gy.sum(0) if need_bias else None
    gweight = gy.t() @ x2d if need_weight else None
    return gx, gA, gB, gbias, gweight
