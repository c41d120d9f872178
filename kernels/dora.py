"""Triton kernels of the fused DoRA linear, forward and backward.

The math is in ``fastadapt/reference/dora.py``. The frozen products run by one of two strategies,
chosen per call by ``fastadapt.strategy.DORA_NORM`` (a rule on M, ``FASTADAPT_DORA_NORM`` forces
one); both save the same tensors, so either backward serves either forward.

``separate`` (from M = 512 rows up): the frozen products in cuBLAS, as plain LoRA runs them.

* ``_dora_norm_kernel``: ``n = ||W + s B A||`` per row of W in one pass over W: each (rows, K) tile
  of W is added to the same tile of ``s B A`` computed on chip (a BLOCK_N x r x BLOCK_K product
  from B and A, which stay in L2) and its squares summed, so ``W + sBA`` is never in memory, no
  cached ``||W||`` can go stale, and nothing cancels (the sum runs over the squares of ``W + sBA``
  itself, not over the expansion ``||W||^2 + 2s B.(AW^T) + s^2 ||BA||^2``). The K reduction is
  split across programs (fp32 atomics) when N alone would not fill the GPU.
* ``_dora_scale_kernel``: after cuBLAS's ``C = D(x) W^T``, one pass writes ``P = C + u B^T`` in
  place and ``y = g * P + b`` (``g = m / n``); with dropout cuBLAS also computes ``x W^T`` into y
  and the pass adds ``g * P - C`` to it.
* gx: cuBLAS ``(g * gy) W`` plus ``gu A`` added in place by LoRA's update pass; with dropout
  ``gy W + D((g - 1) gy W + gu A)``, two cuBLAS products and :func:`~fastadapt.kernels.common.dropout`.

``gemm`` (below 512 rows, where the products are bound by reading W): two GEMM kernels of DoRA's
own, W read once:

* ``_dora_forward_kernel``: ``P = D(x) W^T + u B^T`` with the accumulator seeded by the rank-r
  update as in LoRA, and in the same K loop the column norm: each W tile the GEMM loads is added to
  ``s (B A)`` of the same tile and its squares summed, as in ``_dora_norm_kernel``. The extra MMA
  work is r/BLOCK_M of the GEMM's, repeated by each row block of programs. The epilogue writes
  ``y = g * P + b`` and ``P``. With dropout a second accumulator collects ``(x - D(x)) W^T`` from the
  same x and W tiles: PEFT computes ``x W^T`` and ``D(x) W^T`` too.
* ``_dora_grad_x_kernel``: ``gx = (g * gy) W + gu A``: the norm is detached, so this is LoRA's
  ``gx`` with each gy tile scaled by ``g`` as it is loaded (no M x N ``g * gy`` is written). With
  dropout: ``gy W + D((g - 1) * gy W + gu A)``, two accumulators over the same tiles.

Either way, ``_dora_colsum_kernel`` gives ``gm = sum_M(gy * P) / n`` and ``gb = sum_M gy`` in one
read of gy, split over M like LoRA's reductions; ``gu = s (g * gy) B`` is ``lora_down`` with ``B``
scaled by ``g`` (N x r, a copy of B), ``gA`` and ``gB = g * (gy^T u)`` are ``lora_reduce``.
``FASTADAPT_LORA_GEMM`` does not apply: DoRA's own flag chooses where its frozen products run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret
from fastadapt.kernels.common import (cast, dot_constexprs, dropout, dropout_scale, fit_shared_memory, grouped_tile,
                                      lowrank_acc, mma, pow2_block, split_rows)
from fastadapt.kernels.lora import (_matmul_configs, _matmul_shared_bytes, launch_matmul, lora_down, lora_matmul,
                                    lora_reduce, store_output, update_accumulator, x_tile)
from fastadapt.strategy import DORA_NORM


@triton.jit
def _dora_forward_kernel(
    x_ptr, w_ptr, a_ptr, u_ptr, v_ptr, mag_ptr, bias_ptr, y_ptr, pre_ptr, norm_ptr,
    M, N, K, R, scaling, p, seed, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, stride_um, stride_ur, stride_vr, stride_vn,
    stride_ym, stride_yn, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # x (M, K), w = W^T (K, N), a = A^T (K, R), u = s D(x) A^T (M, R), v = B^T (R, N).
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = lowrank_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr, v_ptr, rows64, row_ok, cols64, col_ok, R,
                       stride_um, stride_ur, stride_vr, stride_vn, UPCAST, PRECISION, BLOCK_R)
    if DROPOUT:
        undropped = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + ks64[:, None] * stride_wk + cols64[None, :] * stride_wn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            # Each operand rounded to the input dtype, as eager dropout(x) and x - dropout(x) are.
            x32 = xt.to(tl.float32)
            xd32 = x32 * dropout_scale(seed, rows, ks, K, p)
            undropped = mma(cast(x32 - xd32, x_ptr.dtype.element_ty, UPCAST), wt, undropped, UPCAST, PRECISION)
            xt = cast(xd32, x_ptr.dtype.element_ty, UPCAST)
        acc = mma(xt, wt, acc, UPCAST, PRECISION)
        # (s B A)^T over this tile, then the squares of W + s B A summed per column.
        ba = lowrank_acc(tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32), a_ptr, v_ptr, ks64, k_ok, cols64, col_ok, R,
                          stride_ak, stride_ar, stride_vr, stride_vn, UPCAST, PRECISION, BLOCK_R)
        full = wt.to(tl.float32) + scaling * ba
        sq += tl.sum(full * full, axis=0)

    norm = tl.where(col_ok, tl.sqrt(sq), 1.0)
    g = tl.load(mag_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) / norm
    y = acc * g[None, :]
    if DROPOUT:
        y += undropped
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols64[None, :] * stride_yn,
             cast(y, y_ptr.dtype.element_ty, UPCAST), mask=out_mask)
    tl.store(pre_ptr + rows64[:, None] * stride_pm + cols64[None, :] * stride_pn,
             cast(acc, pre_ptr.dtype.element_ty, UPCAST), mask=out_mask)
    if pid_m == 0:
        tl.store(norm_ptr + cols, norm, mask=col_ok)


@triton.jit
def _dora_grad_x_kernel(
    x_ptr, w_ptr, u_ptr, v_ptr, g_ptr, out_ptr,
    M, N, K, R, p, seed, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # out[M, N] = gx; x = gy (M, K = out_features), w = W (K, N = in_features), u = gu (M, R),
    # v = A (R, N), g (K,) float32.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = lowrank_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr, v_ptr, rows64, row_ok, cols64, col_ok, R,
                       stride_um, stride_ur, stride_vr, stride_vn, UPCAST, PRECISION, BLOCK_R)
    if DROPOUT:
        plain = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + ks64[:, None] * stride_wk + cols64[None, :] * stride_wn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        g = tl.load(g_ptr + ks, mask=k_ok, other=0.0)
        if DROPOUT:
            plain = mma(xt, wt, plain, UPCAST, PRECISION)
            g = g - 1.0
        # Rounded to the input dtype, as the eager gy * g would be.
        xt = cast(xt.to(tl.float32) * g[None, :], x_ptr.dtype.element_ty, UPCAST)
        acc = mma(xt, wt, acc, UPCAST, PRECISION)

    if DROPOUT:
        acc = plain + acc * dropout_scale(seed, rows, cols, N, p)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on,
             cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dora_colsum_kernel(
    gy_ptr, pre_ptr, norm_ptr, gm_ptr, gb_ptr,
    M, N, rows_per_split,
    stride_gm, stride_gn, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    m_start = tl.program_id(1) * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < m_end)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        gy = tl.load(gy_ptr + rows64[:, None] * stride_gm + cols64[None, :] * stride_gn, mask=mask,
                     other=0.0).to(tl.float32)
        pre = tl.load(pre_ptr + rows64[:, None] * stride_pm + cols64[None, :] * stride_pn, mask=mask,
                      other=0.0).to(tl.float32)
        acc_m += tl.sum(gy * pre, axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(gy, axis=0)
    acc_m = acc_m / tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
    if ATOMIC:
        tl.atomic_add(gm_ptr + cols, acc_m, mask=col_ok)
        if HAS_BIAS:
            tl.atomic_add(gb_ptr + cols, acc_b, mask=col_ok)
    else:
        tl.store(gm_ptr + cols, acc_m, mask=col_ok)
        if HAS_BIAS:
            tl.store(gb_ptr + cols, acc_b, mask=col_ok)


@triton.jit
def _dora_norm_kernel(
    w_ptr, b_ptr, a_ptr, sq_ptr,
    N, K, R, scaling, cols_per_split,
    stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
    ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # sq[N] = sum over this program's K range of (W + s B A)^2, W (N, K), B (N, R), A (R, K).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * cols_per_split
    k_end = tl.minimum(K, k_start + cols_per_split)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        wt, ks64, k_ok = x_tile(w_ptr, rows, k0, N, k_end, stride_wn, stride_wk, BLOCK_K)
        ba = lowrank_acc(tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), b_ptr, a_ptr, rows.to(tl.int64), rows < N,
                         ks64, k_ok, R, stride_bn, stride_br, stride_ar, stride_ak, UPCAST, PRECISION, BLOCK_R)
        full = wt.to(tl.float32) + scaling * ba
        sq += tl.sum(full * full, axis=1)
    if ATOMIC:
        tl.atomic_add(sq_ptr + rows, sq, mask=rows < N)
    else:
        tl.store(sq_ptr + rows, sq, mask=rows < N)


@triton.jit
def _dora_scale_kernel(
    pre_ptr, u_ptr, v_ptr, mag_ptr, norm_ptr, bias_ptr, y_ptr,
    M, N, R,
    stride_pm, stride_pn, stride_um, stride_ur, stride_vr, stride_vn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # pre holds C = D(x) W^T (cuBLAS) and becomes P = C + u v; y = g P + b, or with DROPOUT
    # y (holding x W^T) += g P - C + b.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c, cols, col_ok = x_tile(pre_ptr, rows, tl.program_id(1) * BLOCK_N, M, N, stride_pm, stride_pn, BLOCK_N)
    c = c.to(tl.float32)
    acc = c + update_accumulator(u_ptr, v_ptr, rows, cols, M, N, R, 0.0, 0, stride_um, stride_ur, stride_vr,
                                 stride_vn, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    store_output(acc, bias_ptr, pre_ptr, rows, cols, M, N, stride_pm, stride_pn, False, False, UPCAST)
    g = tl.load(mag_ptr + cols, mask=col_ok, other=0.0) / tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
    y = acc * g[None, :]
    if DROPOUT:
        y -= c
    store_output(y, bias_ptr, y_ptr, rows, cols, M, N, stride_ym, stride_yn, HAS_BIAS, DROPOUT, UPCAST)


def _dora_shared_bytes(cfg, named_args, kwargs):
    # LoRA's GEMM tiles plus, per stage, the BLOCK_K x BLOCK_R tile of A^T (forward) or none (gx).
    extra = cfg.num_stages * cfg.kwargs["BLOCK_K"] * kwargs["BLOCK_R"] * named_args["x_ptr"].element_size()
    return _matmul_shared_bytes(cfg, named_args, kwargs) + extra


_AUTOTUNE = dict(configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "R"],
                 prune_configs_by={"early_config_prune": fit_shared_memory(_dora_shared_bytes)})
_dora_forward_tuned = triton.autotune(**_AUTOTUNE)(_dora_forward_kernel)
_dora_grad_x_tuned = triton.autotune(**_AUTOTUNE)(_dora_grad_x_kernel)


def dora_matmul(x, w, a, u, v, magnitude, scaling: float, bias, y, pre, norm, *, dropout_p: float = 0.0,
                seed: int = 0):
    """``pre = D(x) @ w + u @ v``, ``norm = ||w^T + scaling * (a @ v)^T||`` per column of w,
    ``y = (magnitude / norm) * pre + (x - D(x)) @ w + bias`` for x (M, K), w (K, N), a (K, R),
    u (M, R), v (R, N); y, pre (M, N); norm (N,) float32. M must be at least 1."""
    M, K = x.shape
    N = w.shape[1]
    R = u.shape[1]
    # The kernel reads the bias and the magnitude as ``ptr + col``: strided ones are copied (N elements).
    args = (x, w, a, u, v, magnitude.contiguous(), bias.contiguous() if bias is not None else y, y, pre, norm,
            M, N, K, R, scaling, dropout_p, seed, max(M, 1).bit_length(),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), y.stride(0), y.stride(1), pre.stride(0), pre.stride(1))
    meta = dict(HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, BLOCK_R=pow2_block(R), **dot_constexprs(x.dtype))
    launch_matmul(_dora_forward_kernel, _dora_forward_tuned, M, N, args, meta)
    return y, pre, norm


def dora_grad_x(gy, w, gu, a, g, out, *, dropout_p: float = 0.0, seed: int = 0):
    """``out = (g * gy) @ w + gu @ a``, or with dropout ``gy @ w + D(((g - 1) * gy) @ w + gu @ a)``,
    for gy (M, K), w (K, N), gu (M, R), a (R, N), g (K,) float32, out (M, N)."""
    M, K = gy.shape
    N = w.shape[1]
    R = gu.shape[1]
    args = (gy, w, gu, a, g, out, M, N, K, R, dropout_p, seed, max(M, 1).bit_length(),
            gy.stride(0), gy.stride(1), w.stride(0), w.stride(1), gu.stride(0), gu.stride(1), a.stride(0), a.stride(1),
            out.stride(0), out.stride(1))
    meta = dict(DROPOUT=dropout_p > 0.0, BLOCK_R=pow2_block(R), **dot_constexprs(gy.dtype))
    launch_matmul(_dora_grad_x_kernel, _dora_grad_x_tuned, M, N, args, meta)
    return out


def dora_colsum(gy, pre, norm, gm, gb, *, splits: int | None = None):
    """``gm = sum_M(gy * pre) / norm`` and ``gb = sum_M gy`` (if ``gb`` is not None) for gy, pre
    (M, N); norm, gm, gb (N,) float32. The M reduction is split as in ``lora_reduce``."""
    M, N = gy.shape
    block_m, block_n = (32, 32) if triton_interpret() else (64, 64)
    splits, rows_per_split = split_rows(M, triton.cdiv(N, block_n), block_m, gy.device, splits)
    if splits > 1:
        gm.zero_()
        if gb is not None:
            gb.zero_()
    _dora_colsum_kernel[(triton.cdiv(N, block_n), splits)](
        gy, pre, norm, gm, gb if gb is not None else gm, M, N, rows_per_split,
        gy.stride(0), gy.stride(1), pre.stride(0), pre.stride(1),
        HAS_BIAS=gb is not None, ATOMIC=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n)
    return gm, gb


def weight_norm(weight, lora_A, lora_B, scaling: float, out, *, splits: int | None = None):
    """``out = ||weight + scaling * lora_B @ lora_A||`` per row, for weight (N, K) (any strides),
    lora_A (r, K), lora_B (N, r); out (N,) float32. The K reduction is split across ``splits``
    programs per block of rows (default: enough to fill the GPU, as :func:`split_rows` chooses)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    block_n, block_k = (32, 32) if triton_interpret() else (64, 64)
    splits, cols_per_split = split_rows(K, triton.cdiv(N, block_n), block_k, weight.device, splits)
    if splits > 1:
        out.zero_()
    _dora_norm_kernel[(triton.cdiv(N, block_n), splits)](
        weight, lora_B, lora_A, out, N, K, R, scaling, cols_per_split,
        weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1), lora_A.stride(0), lora_A.stride(1),
        ATOMIC=splits > 1, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=pow2_block(R), **dot_constexprs(weight.dtype))
    return out.sqrt_()


def dora_scale(pre, u, v, magnitude, norm, bias, y, *, dropout: bool = False):
    """``pre += u @ v``, then ``y = (magnitude / norm) * pre + bias`` (with ``dropout``, y holding
    ``x W^T`` and pre ``D(x) W^T`` before: ``y += (magnitude / norm) * pre - D(x) W^T + bias``) for
    pre, y (M, N), u (M, R), v (R, N), magnitude and norm (N,) float32."""
    M, N = pre.shape
    R = u.shape[1]
    block = 32 if triton_interpret() else 64
    _dora_scale_kernel[(triton.cdiv(M, block), triton.cdiv(N, block))](
        pre, u, v, magnitude.contiguous(), norm, bias.contiguous() if bias is not None else y, y, M, N, R,
        pre.stride(0), pre.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DROPOUT=dropout, BLOCK_M=block, BLOCK_N=block, BLOCK_R=pow2_block(R),
        **dot_constexprs(pre.dtype))
    return y, pre


def _scaled(gy, g):
    """``g * gy`` (g per column, float32) rounded once to gy's dtype, as the eager ``(gy * g).to(gy.dtype)``
    and the GEMM path's in-register scaling are, with no float32 M x N temporary."""
    return torch.mul(gy, g, out=torch.empty_like(gy))


def grad_x_cublas(gy, weight, gu, lora_A, g, out, *, dropout_p: float = 0.0, seed: int = 0):
    """:func:`dora_grad_x`'s ``out`` with the frozen products in cuBLAS: ``(g * gy) W`` and ``gu A``
    added in place by LoRA's update pass; with dropout ``gy W + D((g - 1) * gy W + gu A)``."""
    if dropout_p == 0.0:
        torch.mm(_scaled(gy, g), weight, out=out)
        return lora_matmul(None, None, gu, lora_A, None, out, accumulate=True)
    torch.mm(gy, weight, out=out)
    dropped_part = _scaled(gy, g - 1.0) @ weight
    lora_matmul(None, None, gu, lora_A, None, dropped_part, accumulate=True)
    return dropout(dropped_part, dropout_p, seed, out=out, accumulate=True)


def forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    """Fused forward for 2-D x (M, K): returns (y (M, N), u (M, r), P (M, N), n (N,) float32).
    All inputs share one dtype; the strategy is ``DORA_NORM``'s for M."""
    M = x.shape[0]
    N, R = lora_B.shape
    u = torch.empty((M, R), device=x.device, dtype=x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((M, N), device=x.device, dtype=x.dtype)
    norm = torch.empty((N,), device=x.device, dtype=torch.float32)
    separate = DORA_NORM.choose(M) == "separate"
    # An empty batch has no GEMM to carry the norm, and its backward still divides by it.
    if separate or M == 0:
        weight_norm(weight, lora_A, lora_B, scaling, norm)
    if M == 0:
        return y, u, pre, norm
    lora_down(x, lora_A.t(), scaling, u, dropout_p=dropout_p, seed=seed)
    if not separate:
        dora_matmul(x, weight.t(), lora_A.t(), u, lora_B.t(), magnitude, scaling, bias, y, pre, norm,
                    dropout_p=dropout_p, seed=seed)
        return y, u, pre, norm
    if dropout_p > 0.0:
        torch.mm(x, weight.t(), out=y)
        torch.mm(dropout(x, dropout_p, seed), weight.t(), out=pre)
    else:
        torch.mm(x, weight.t(), out=pre)
    dora_scale(pre, u, lora_B.t(), magnitude, norm, bias, y, dropout=dropout_p > 0.0)
    return y, u, pre, norm


def backward(gy, x, weight, lora_A, lora_B, magnitude, u, pre, norm, scaling, dropout_p, seed, needs):
    """Fused backward: (gx, gA, gB, gmagnitude, gbias, gweight), ``None`` where not needed."""
    need_x, need_A, need_B, need_m, need_bias, need_weight = needs
    M, K = x.shape
    N, R = lora_B.shape
    gx = gA = gB = gm = gbias = gweight = None
    g = magnitude.float() / norm
    gu = None
    if need_x or need_A:
        gu = torch.empty((M, R), device=x.device, dtype=x.dtype)
        lora_down(gy, (lora_B * g[:, None]).to(x.dtype), scaling, gu)
    if need_x:
        grad_x = grad_x_cublas if DORA_NORM.choose(M) == "separate" else dora_grad_x
        gx = grad_x(gy, weight, gu, lora_A, g, torch.empty((M, K), device=x.device, dtype=x.dtype),
                    dropout_p=dropout_p, seed=seed)
    if need_A:
        gA = torch.empty((R, K), device=x.device, dtype=torch.float32)
        gA = lora_reduce(gu, x, 1.0, gA, dropout_p=dropout_p, seed=seed).to(lora_A.dtype)
    if need_B:
        # Written through transposed strides: the kernel produces (gy^T u)^T into gB's memory.
        gB = torch.empty((N, R), device=x.device, dtype=torch.float32)
        lora_reduce(u, gy, 1.0, gB.t())
        gB = (gB * g[:, None]).to(lora_B.dtype)
    if need_m or need_bias:
        gm = torch.empty((N,), device=x.device, dtype=torch.float32)
        gbias = torch.empty((N,), device=x.device, dtype=torch.float32) if need_bias else None
        dora_colsum(gy, pre, norm, gm, gbias)
        gm = gm.to(magnitude.dtype) if need_m else None
        gbias = gbias.to(gy.dtype) if need_bias else None
    if need_weight:
        gP = _scaled(gy, g)
        if dropout_p > 0.0:
            gweight = gy.t() @ x + (gP - gy).t() @ dropout(x, dropout_p, seed)
        else:
            gweight = gP.t() @ x
    return gx, gA, gB, gm, gbias, gweight
