"""Triton kernels of the multi-adapter LoRA linear (one adapter per row), forward and backward.

The rows are grouped by adapter on the device, with no host synchronisation: a stable
``torch.sort`` of the ids gives the permutation, ``torch.searchsorted`` each adapter's segment of
it, and a table of tiles (adapter, first and last sorted position) is built with torch ops sized
by an upper bound known on the host (``cdiv(M, block) + min(n, M)`` tiles: each non-empty segment
wastes at most one partial tile). Every program reads one table entry, so a tile holds the rows of
one adapter, gathered from wherever they sit in ``x``; entries past the real count are marked
empty and their programs do nothing. The kernels follow ``kernels/lora.py`` with the adapter's
weights, scaling, rank and dropout probability looked up from the tile's adapter:

* ``_multi_down_kernel``: ``out[rows, :r_a] = s_a * D_a(X[rows]) @ V_a`` (forward ``u``; backward
  ``gu = s_a gy B_a``), zero beyond the rank.
* ``_multi_update_kernel``: ``out[rows] += D_a(U[rows] @ V_a)``: the update added in place to the
  frozen product, which cuBLAS computes first (forward ``y``; backward ``gx``).
* ``_multi_reduce_kernel``: ``out[a] = P[rows_a]^T @ D_a(X[rows_a])`` (``gA_a``, ``gB_a^T``), each
  adapter's rows split in chunks across programs (fp32 atomics) so that few adapters still fill the GPU.

Padding beyond an adapter's rank is masked in every load, so its content never matters; an
adapter with no row gets no program and keeps the zeros its gradient starts from. ``D_a`` is
inverted dropout with the mask drawn from (seed, flat index of x) as in ``kernels/lora.py``,
with the row's adapter's probability.

Unlike ``kernels/lora.py`` there is no Triton GEMM for the frozen product (the
``FASTADAPT_LORA_GEMM`` choice): the frozen product is cuBLAS's, the kernels here add the updates.
Block sizes are fixed, not tuned (no GPU measured them yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret
from fastadapt.kernels.common import (cast, dot_constexprs, down_acc, dropout_scale, lowrank_acc, mma, pow2_block,
                                      reduce_blocks)


@triton.jit
def _tile(table_ptr, perm_ptr, BLOCK: tl.constexpr):
    """(adapter, original row of each of the tile's BLOCK sorted positions, which are real, whether
    any is) for this program's table entry; an empty entry has no real row and stands for adapter 0."""
    entry = table_ptr + tl.program_id(0).to(tl.int64) * 3
    adapter = tl.load(entry)
    start = tl.load(entry + 1)
    end = tl.where(adapter >= 0, tl.load(entry + 2), start)
    pos = start + tl.arange(0, BLOCK)
    ok = pos < end
    rows = tl.load(perm_ptr + pos, mask=ok, other=0)
    return tl.maximum(adapter, 0).to(tl.int64), rows.to(tl.int64), ok, adapter >= 0


@triton.jit
def _multi_down_kernel(
    x_ptr, v_ptr, out_ptr, table_ptr, perm_ptr, scale_ptr, rank_ptr, p_ptr,
    C, seed,
    stride_xm, stride_xc, stride_va, stride_vc, stride_vr, stride_om, stride_or,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    a, rows, row_ok, live = _tile(table_ptr, perm_ptr, BLOCK_M)
    rank = tl.load(rank_ptr + a)
    rcols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rcols < rank
    p = 0.0
    if DROPOUT:
        p = tl.load(p_ptr + a)
    # C = 0 for an empty entry: no iteration.
    acc = down_acc(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, v_ptr + a * stride_va, rows, row_ok, rcols,
                   r_ok, tl.where(live, C, 0), seed, p, stride_xm, stride_xc, stride_vc, stride_vr, DROPOUT, UPCAST,
                   PRECISION, BLOCK_C)
    acc = acc * tl.load(scale_ptr + a)
    tl.store(out_ptr + rows[:, None] * stride_om + rcols[None, :] * stride_or,
             cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (rcols < rank)[None, :])


@triton.jit
def _multi_update_kernel(
    u_ptr, v_ptr, out_ptr, table_ptr, perm_ptr, rank_ptr, p_ptr,
    N, seed,
    stride_um, stride_ur, stride_va, stride_vr, stride_vn, stride_om, stride_on,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    a, rows, row_ok, live = _tile(table_ptr, perm_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    # Rank 0 for an empty entry: no iteration. Beyond the rank nothing is read.
    rank = tl.where(live, tl.load(rank_ptr + a), 0)
    acc = lowrank_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr, v_ptr + a * stride_va, rows, row_ok,
                      cols64, col_ok, rank, stride_um, stride_ur, stride_vr, stride_vn, UPCAST, PRECISION, BLOCK_R)
    if DROPOUT:
        acc = acc * dropout_scale(seed, rows, cols, N, tl.load(p_ptr + a))
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols64[None, :] * stride_on
    out_mask = row_ok[:, None] & col_ok[None, :]
    acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=out_mask)


@triton.jit
def _multi_reduce_kernel(
    p_ptr, x_ptr, out_ptr, table_ptr, perm_ptr, rank_ptr, drop_ptr,
    C, seed,
    stride_pm, stride_pr, stride_xm, stride_xc, stride_oa, stride_or, stride_oc,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One program per (column block, rank block, chunk of one adapter's sorted rows).
    entry = table_ptr + tl.program_id(2).to(tl.int64) * 3
    adapter = tl.load(entry)
    start = tl.load(entry + 1)
    end = tl.where(adapter >= 0, tl.load(entry + 2), start)  # an empty entry runs no iteration
    a = tl.maximum(adapter, 0).to(tl.int64)
    rank = tl.load(rank_ptr + a)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < C
    r_ok = rr < rank
    cols64 = cols.to(tl.int64)
    p = 0.0
    if DROPOUT:
        p = tl.load(drop_ptr + a)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        rows = tl.load(perm_ptr + pos, mask=row_ok, other=0).to(tl.int64)
        pt = tl.load(p_ptr + rows[None, :] * stride_pm + rr[:, None] * stride_pr,
                     mask=r_ok[:, None] & row_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + cols64[None, :] * stride_xc,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            xt = cast(xt.to(tl.float32) * dropout_scale(seed, rows, cols, C, p), x_ptr.dtype.element_ty, UPCAST)
        acc = mma(pt, xt, acc, UPCAST, PRECISION)
    out = out_ptr + a * stride_oa + rr[:, None] * stride_or + cols64[None, :] * stride_oc
    # An empty entry's adapter stands in as 0: it must not write (its acc is zero, but a plain
    # store would overwrite adapter 0's chunk).
    r_ok = r_ok & (tl.zeros_like(rr) + adapter >= 0)
    mask = r_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def group_rows(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, bounds) of rows with ids in [-1, n) (any strides), on the device with no host read:
    ``perm`` (M,) int64 the rows sorted by id (stable), ``bounds`` (n + 1,) where each id's segment
    of it starts (rows of id -1 sort first and belong to no segment)."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    return perm, torch.searchsorted(sorted_ids, torch.arange(n + 1, device=ids.device, dtype=sorted_ids.dtype))


class Batch:
    """A batch as the kernels index it, on the device, built once per forward or backward call:
    its rows grouped by adapter, and its per-adapter vectors.

    ``perm`` (M,) lists the rows sorted by adapter id (stable), ``bounds`` (n + 1,) where each
    adapter's segment of it starts (base-only rows, id -1, sort first and belong to no segment);
    :meth:`table` cuts the segments into tiles for one block size. ``scalings`` (float32),
    ``ranks`` (int32) and ``dropout_p`` (float64, or None: no dropout), each (n,), are contiguous:
    the kernels read adapter a's value at ``ptr + a``, so a strided or expanded (stride-0) view is
    copied here, once, for every launch of the call."""

    def __init__(self, adapter_ids: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor,
                 dropout_p: torch.Tensor | None = None):
        perm, bounds = group_rows(adapter_ids, ranks.shape[0])
        self._set(perm.to(torch.int32), bounds, scalings, ranks, dropout_p)

    @classmethod
    def grouped(cls, bounds: torch.Tensor, M: int, scalings: torch.Tensor | None = None,
                ranks: torch.Tensor | None = None, dropout_p: torch.Tensor | None = None) -> "Batch":
        """A batch of M rows already in grouped order (adapter a's rows are ``bounds[a]:bounds[a + 1]``,
        from :func:`group_rows` of the rows before they were gathered): ``perm`` is the identity.
        Without per-adapter vectors it serves for its tiles alone (kernels that read none)."""
        batch = cls.__new__(cls)
        batch._set(torch.arange(M, device=bounds.device, dtype=torch.int32), bounds, scalings, ranks, dropout_p)
        return batch

    def _set(self, perm, bounds, scalings, ranks, dropout_p) -> None:
        self.M, self.n = perm.shape[0], bounds.shape[0] - 1
        self.perm, self.bounds = perm, bounds
        self.scalings = None if scalings is None else scalings.contiguous()
        self.ranks = None if ranks is None else ranks.contiguous()
        self.dropout_p = None if dropout_p is None else dropout_p.contiguous()
        self._tables: dict[int, torch.Tensor] = {}

    def entries(self, block: int) -> int:
        """The table's length for ``block``: an upper bound on the tiles, known without reading the ids."""
        return triton.cdiv(self.M, block) + min(self.n, self.M)

    def table(self, block: int) -> torch.Tensor:
        """(entries, 3) int32: adapter (-1: empty entry), first and end sorted position of each tile
        of at most ``block`` rows of one adapter."""
        if block not in self._tables:
            counts = self.bounds[1:] - self.bounds[:-1]
            tiles = (counts + block - 1) // block
            tile_end = torch.cumsum(tiles, 0)
            t = torch.arange(self.entries(block), device=counts.device)
            adapter = torch.searchsorted(tile_end, t, right=True)
            a = adapter.clamp(max=self.n - 1)
            start = self.bounds[a] + (t - (tile_end[a] - tiles[a])) * block
            end = torch.minimum(self.bounds[a + 1], start + block)
            self._tables[block] = torch.stack([torch.where(adapter < self.n, a, -1), start, end], 1).to(torch.int32)
        return self._tables[block]

    def dropout_args(self, dropout: bool):
        """(pointer, DROPOUT) for a kernel: the probabilities when ``dropout`` is asked and the call
        has any; otherwise a stand-in of the same dtype, which the kernel never reads."""
        if dropout and self.dropout_p is not None:
            return self.dropout_p, True
        return self.scalings, False


def _row_block(M: int) -> int:
    # Decode batches (M <= 16) get the smallest tile tl.dot takes.
    return pow2_block(M, 16, 32 if triton_interpret() else 64)


def multi_down(x, v, batch: Batch, out, *, dropout: bool = False, seed: int = 0):
    """``out[m, :r_a] = s_a * D_a(x[m]) @ v[a]`` for x (M, C), v (n, C, r_max) (any strides), out
    (M, r_max): rows of no adapter, and columns beyond the rank, are left as they are."""
    C = x.shape[1]
    R = v.shape[2]
    block_m = _row_block(batch.M)
    block_r = pow2_block(R)
    block_c = 32 if triton_interpret() else 64
    p, dropout = batch.dropout_args(dropout)
    _multi_down_kernel[(batch.entries(block_m), triton.cdiv(R, block_r))](
        x, v, out, batch.table(block_m), batch.perm, batch.scalings, batch.ranks, p, C, seed,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        DROPOUT=dropout, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c, **dot_constexprs(x.dtype))
    return out


def multi_update(u, v, batch: Batch, out, *, dropout: bool = False, seed: int = 0):
    """``out[m] += D_a(u[m, :r_a] @ v[a, :r_a])`` for u (M, r_max), v (n, r_max, N), out (M, N)."""
    N = out.shape[1]
    R = u.shape[1]
    block_m = _row_block(batch.M)
    block_n = 32 if triton_interpret() else 128
    p, dropout = batch.dropout_args(dropout)
    _multi_update_kernel[(batch.entries(block_m), triton.cdiv(N, block_n))](
        u, v, out, batch.table(block_m), batch.perm, batch.ranks, p, N, seed,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        DROPOUT=dropout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=pow2_block(R), **dot_constexprs(u.dtype))
    return out


def multi_reduce(pm, x, batch: Batch, out, *, dropout: bool = False, seed: int = 0, splits: int | None = None):
    """``out[a] = pm[rows_a]^T @ D_a(x[rows_a])`` for pm (M, r_max), x (M, C), out (n, r_max, C)
    float32 (any strides): zero for adapters with no row.

    Each adapter's rows are split in chunks over programs (default: enough to fill the GPU, one
    chunk per adapter when deterministic algorithms are requested); chunks accumulate with atomics.
    """
    M, R = pm.shape
    C = x.shape[1]
    block_r, block_c, block_m, rows_per_chunk = reduce_blocks(M, R, C, x.device, splits)
    atomic = rows_per_chunk < M
    out.zero_()
    p, dropout = batch.dropout_args(dropout)
    _multi_reduce_kernel[(triton.cdiv(C, block_c), triton.cdiv(R, block_r), batch.entries(rows_per_chunk))](
        pm, x, out, batch.table(rows_per_chunk), batch.perm, batch.ranks, p, C, seed,
        pm.stride(0), pm.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DROPOUT=dropout, ATOMIC=atomic, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_M=block_m,
        **dot_constexprs(x.dtype))
    return out


def _frozen(x, w, bias, out):
    if bias is None:
        return torch.mm(x, w, out=out)
    return torch.addmm(bias, x, w, out=out)


def forward(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, dropout_p, seed):
    """Fused forward for 2-D x (M, K): returns (y (M, N), u (M, r_max)). x, weight, the stacks and
    bias share one dtype; scalings float32 (n,), dropout_p (or None) float64 (n,), ranks int32 (n,)."""
    M = x.shape[0]
    R = A_stack.shape[1]
    N = B_stack.shape[1]
    u = torch.zeros((M, R), device=x.device, dtype=x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, u
    batch = Batch(adapter_ids, scalings, ranks, dropout_p)
    multi_down(x, A_stack.transpose(1, 2), batch, u, dropout=True, seed=seed)
    _frozen(x, weight.t(), bias, y)
    multi_update(u, B_stack.transpose(1, 2), batch, y)
    return y, u


def backward(gy, x, weight, A_stack, B_stack, u, scalings, ranks, adapter_ids, dropout_p, seed, needs):
    """Fused backward: (gx, gA_stack, gB_stack, gbias, gweight), ``None`` where not needed."""
    need_x, need_A, need_B, need_bias, need_weight = needs
    M, K = x.shape
    n, R, _ = A_stack.shape
    N = B_stack.shape[1]
    gx = gA = gB = gbias = gweight = None
    batch = Batch(adapter_ids, scalings, ranks, dropout_p)
    gu = None
    if need_x or need_A:
        gu = torch.zeros((M, R), device=x.device, dtype=x.dtype)
        multi_down(gy, B_stack, batch, gu)
    if need_x:
        gx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        _frozen(gy, weight, None, gx)
        multi_update(gu, A_stack, batch, gx, dropout=True, seed=seed)
    if need_A:
        gA = torch.empty((n, R, K), device=x.device, dtype=torch.float32)
        gA = multi_reduce(gu, x, batch, gA, dropout=True, seed=seed).to(A_stack.dtype)
    if need_B:
        # Written through transposed strides: the kernel produces gB_a^T = u^T gy into gB's memory.
        gB = torch.empty((n, N, R), device=x.device, dtype=torch.float32)
        multi_reduce(u, gy, batch, gB.transpose(1, 2))
        gB = gB.to(B_stack.dtype)
    if need_bias:
        gbias = gy.sum(0, dtype=torch.float32).to(gy.dtype)
    if need_weight:
        gweight = gy.t() @ x
    return gx, gA, gB, gbias, gweight
