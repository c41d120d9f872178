"""Triton kernels of the fused bottleneck adapter, forward and backward.

The math is in ``fastadapt/reference/bottleneck.py``. Four kernels cover the whole op:

* ``_bn_fwd_kernel`` (one program per BLOCK_M rows): [LN_before row statistics] -> down-projection
  over the hidden dimension -> bias and activation in registers -> [LN_after statistics, recomputing
  the up-projection tile by tile] -> up-projection, scale, dropout, gate, residual, LN_after, store.
  The bottleneck activation never leaves the chip; HBM sees z (and r) read and out written, plus the
  pre-activation h (M, m) and four floats per row of LN statistics saved for the backward.
* ``_bn_bwd_rows_kernel`` (one program per BLOCK_M rows): recomputes a = f(h) from the saved h,
  runs the LN_after backward (row sums), accumulates g_a = g_u W_u over the hidden dimension on
  chip, forms g_h = g_a f'(h) (stored: M x m), and in the same program computes
  g_z = LN_before_bwd(g_h W_d) and the residual gradient. The up-projection tile is recomputed
  wherever the backward needs u (LN_after, gating): m multiply-adds per element, cheaper than
  storing and re-reading an (M, d) tensor.
* ``_bn_bwd_up_reduce_kernel`` / ``_bn_bwd_down_reduce_kernel``: the parameter gradients that
  reduce over tokens (g_W_u = g_u^T a with b_u, scale and LN_after parameters; g_W_d = g_h^T zn
  with the LN_before parameters), one program per hidden-dimension tile, the token dimension split
  across programs with fp32 atomics so that a few tiles still fill the GPU (as ``lora_reduce``).

Dropout masks are drawn from (seed, flat index in the (M, d) output) by ``dropout_scale`` and
regenerated, never stored. Activations on chip are rounded to the input dtype where eager PyTorch
would round them (h, a, LN outputs, g_u, g_h), so the tensor-core operands are the same dtype as
eager's and the backward recomputes exactly the forward's values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret
from fastadapt.kernels.common import cast, dot_constexprs, dropout_scale, mma, pow2_block, split_rows

# Activation codes (constexpr ACT); names as in fastadapt.reference.bottleneck.canonical_activation.
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5, "leakyrelu": 6}
LEAKY_SLOPE = 0.01  # F.leaky_relu's default, the one ``adapters`` uses
MAX_BOTTLENECK = 1024


@triton.jit
def _tanh(x):
    # libdevice.tanh does not run under the CPU interpreter; the exp form loses relative accuracy
    # near 0 (1 - e^-2|x| cancels), so small |x| uses the odd Taylor series (error < 1e-7 at 0.3).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(ax < 0.3, poly, t)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act(h, ACT: tl.constexpr):
    """f(h) for fp32 h."""
    if ACT == 1:
        a = tl.where(h <= 0.0, 0.0, h)  # NaN stays NaN, as F.relu (tl.maximum(NaN, 0) is 0)
    elif ACT == 2:
        a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        a = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 4:
        a = h * _sigmoid(h)
    elif ACT == 5:
        a = _tanh(h)
    elif ACT == 6:
        a = tl.where(h > 0, h, h * 0.01)
    else:
        a = h
    return a


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """f'(h) for fp32 h, with torch's choice at the kinks (relu'(0) = 0, leaky_relu'(0) = slope) and
    at NaN (relu'(NaN) = 1, leaky_relu'(NaN) = slope: torch tests h <= 0 and h > 0 respectively)."""
    if ACT == 1:
        g = tl.where(h <= 0, 0.0, 1.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        g = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 4:
        sg = _sigmoid(h)
        g = sg * (1.0 + h * (1.0 - sg))
    elif ACT == 5:
        t = _tanh(h)
        g = 1.0 - t * t
    elif ACT == 6:
        g = tl.where(h > 0, 1.0, 0.01)
    else:
        g = tl.zeros_like(h) + 1.0  # not h * 0 + 1: NaN there
    return g


@triton.jit
def _chan_update(mean, m2, n, x, mask, cnt):
    """Merge one chunk of columns into running per-row (mean, M2, count) (Chan et al.): one pass
    over the row, without the cancellation of sum-of-squares when |mean| >> std."""
    cmean = tl.sum(tl.where(mask, x, 0.0), 1) / cnt
    diff = tl.where(mask, x - cmean[:, None], 0.0)
    cm2 = tl.sum(diff * diff, 1)
    n_new = n + cnt
    delta = cmean - mean
    mean = mean + delta * (cnt / n_new)
    m2 = m2 + cm2 + delta * delta * (n * cnt / n_new)
    return mean, m2, n_new


@triton.jit
def _load_tile(ptr, rows64, cols, stride_m, stride_d, mask):
    return tl.load(ptr + rows64[:, None] * stride_m + cols[None, :].to(tl.int64) * stride_d,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _vec(ptr, cols, col_ok):
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
             HAS_BU: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """u = a W_u^T + b_u for one (BLOCK_M, BLOCK_D) tile, fp32. a: (BLOCK_M, BLOCK_B), input dtype."""
    wut = tl.load(wu_ptr + bcols[:, None] * stride_wub + cols[None, :].to(tl.int64) * stride_wud,
                  mask=b_ok[:, None] & col_ok[None, :], other=0.0)
    u = mma(a, wut, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
    if HAS_BU:
        u += _vec(bu_ptr, cols, col_ok)[None, :]
    return u


@triton.jit
def _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """The (BLOCK_M, BLOCK_D) factor D' * s with which q = D(s u) multiplies u."""
    if HAS_SCALE:
        s = scaling * tl.load(sc_ptr + cols * stride_sc, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK_D,), dtype=tl.float32) + scaling
    f = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + s[None, :]
    if DROPOUT:
        f = f * dropout_scale(seed, rows, cols, D, p)
    return f


@triton.jit
def _bn_fwd_kernel(
    z_ptr, r_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sc_ptr, lnb_w_ptr, lnb_b_ptr, lna_w_ptr, lna_b_ptr,
    gate_ptr, out_ptr, h_ptr, stats_ptr,
    M, D, B, scaling, eps, p, seed,
    stride_zm, stride_zd, stride_rm, stride_rd, stride_wdb, stride_wdd, stride_wud, stride_wub,
    stride_om, stride_od, stride_sc,
    HAS_RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr,
    LN_BEFORE: tl.constexpr, LN_AFTER: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
    GATING: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B

    # LN_before statistics: one extra read of the z rows (the tile is too wide to keep on chip).
    if LN_BEFORE:
        mean_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        n = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            zt = _load_tile(z_ptr, rows64, cols, stride_zm, stride_zd, mask)
            cnt = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
            mean_b, m2, n = _chan_update(mean_b, m2, n, zt, mask, cnt)
        rstd_b = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(stats_ptr + rows, mean_b, mask=row_ok)
        tl.store(stats_ptr + M + rows, rstd_b, mask=row_ok)

    # Down-projection: h = LN_before(z) W_d^T + b_d, accumulated in fp32 over the hidden dimension.
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        zt = tl.load(z_ptr + rows64[:, None] * stride_zm + cols[None, :].to(tl.int64) * stride_zd,
                     mask=mask, other=0.0)
        if LN_BEFORE:
            zn = (zt.to(tl.float32) - mean_b[:, None]) * rstd_b[:, None]
            zn = zn * _vec(lnb_w_ptr, cols, col_ok)[None, :] + _vec(lnb_b_ptr, cols, col_ok)[None, :]
            zt = cast(tl.where(mask, zn, 0.0), z_ptr.dtype.element_ty, UPCAST)
        wdt = tl.load(wd_ptr + cols[:, None].to(tl.int64) * stride_wdd + bcols[None, :] * stride_wdb,
                      mask=col_ok[:, None] & b_ok[None, :], other=0.0)
        acc = mma(zt, wdt, acc, UPCAST, PRECISION)
    if HAS_BD:
        acc += _vec(bd_ptr, bcols, b_ok)[None, :]
    # Rounded to the input dtype, as eager's nn.Linear output is: the backward recomputes a from
    # this stored h and so sees exactly the forward's activation.
    h = cast(acc, z_ptr.dtype.element_ty, UPCAST)
    tl.store(h_ptr + rows64[:, None] * B + bcols[None, :], h, mask=row_ok[:, None] & b_ok[None, :])
    a = cast(_act(h.to(tl.float32), ACT), z_ptr.dtype.element_ty, UPCAST)

    if GATING:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # LN_after statistics of t = o (+ r): the up-projection is recomputed in the output pass rather
    # than t being written and re-read (m multiply-adds per element against 2 HBM bytes per element).
    if LN_AFTER:
        mean_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        n = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            u = _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
                         HAS_BU, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
            t = u * _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                                HAS_SCALE, DROPOUT, BLOCK_M, BLOCK_D)
            if GATING:
                t = t * gate[:, None]
            if RESIDUAL_BEFORE_LN:
                t += _load_tile(r_ptr, rows64, cols, stride_rm, stride_rd, mask)
            cnt = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
            mean_a, m2, n = _chan_update(mean_a, m2, n, t, mask, cnt)
        rstd_a = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(stats_ptr + 2 * M + rows, mean_a, mask=row_ok)
        tl.store(stats_ptr + 3 * M + rows, rstd_a, mask=row_ok)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        u = _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
                     HAS_BU, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
        t = u * _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                            HAS_SCALE, DROPOUT, BLOCK_M, BLOCK_D)
        if GATING:
            t = t * gate[:, None]
        if HAS_RES:
            rt = _load_tile(r_ptr, rows64, cols, stride_rm, stride_rd, mask)
        if LN_AFTER:
            if RESIDUAL_BEFORE_LN:
                t += rt
            y = (t - mean_a[:, None]) * rstd_a[:, None]
            y = y * _vec(lna_w_ptr, cols, col_ok)[None, :] + _vec(lna_b_ptr, cols, col_ok)[None, :]
            if HAS_RES and not RESIDUAL_BEFORE_LN:
                y += rt
        else:
            y = t
            if HAS_RES:
                y += rt
        tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :].to(tl.int64) * stride_od,
                 cast(y, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _bn_bwd_rows_kernel(
    go_ptr, z_ptr, r_ptr, wd_ptr, wu_ptr, bu_ptr, sc_ptr, lnb_w_ptr, lna_w_ptr, gate_ptr,
    h_ptr, stats_ptr, gz_ptr, gr_ptr, gh_ptr, ggate_ptr, cstats_ptr,
    M, D, B, scaling, p, seed,
    stride_gm, stride_gd, stride_zm, stride_zd, stride_rm, stride_rd, stride_wdb, stride_wdd,
    stride_wud, stride_wub, stride_gzm, stride_gzd, stride_grm, stride_grd, stride_sc,
    HAS_RES: tl.constexpr, HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr,
    LN_BEFORE: tl.constexpr, LN_AFTER: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
    GATING: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr,
    NEED_Z: tl.constexpr, NEED_R: tl.constexpr, NEED_U: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B
    bmask = row_ok[:, None] & b_ok[None, :]

    h = tl.load(h_ptr + rows64[:, None] * B + bcols[None, :], mask=bmask, other=0.0).to(tl.float32)
    a = cast(_act(h, ACT), z_ptr.dtype.element_ty, UPCAST)
    if GATING:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # LN_after backward needs two row sums over the whole row before any g_t element is known.
    if LN_AFTER:
        mean_a = tl.load(stats_ptr + 2 * M + rows, mask=row_ok, other=0.0)
        rstd_a = tl.load(stats_ptr + 3 * M + rows, mask=row_ok, other=0.0)
        c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            u = _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
                         HAS_BU, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
            t = u * _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                                HAS_SCALE, DROPOUT, BLOCK_M, BLOCK_D)
            if GATING:
                t = t * gate[:, None]
            if RESIDUAL_BEFORE_LN:
                t += _load_tile(r_ptr, rows64, cols, stride_rm, stride_rd, mask)
            that = (t - mean_a[:, None]) * rstd_a[:, None]
            gg = _load_tile(go_ptr, rows64, cols, stride_gm, stride_gd, mask) * _vec(lna_w_ptr, cols, col_ok)[None, :]
            c1 += tl.sum(gg, 1)
            c2 += tl.sum(tl.where(mask, gg * that, 0.0), 1)
        c1 = c1 / D
        c2 = c2 / D
        tl.store(cstats_ptr + rows, c1, mask=row_ok)
        tl.store(cstats_ptr + M + rows, c2, mask=row_ok)

    # g_a = g_u W_u, accumulated on chip over the hidden dimension.
    ga = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    ggate = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        go = _load_tile(go_ptr, rows64, cols, stride_gm, stride_gd, mask)
        f = _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                        HAS_SCALE, DROPOUT, BLOCK_M, BLOCK_D)
        if NEED_U:
            u = _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
                         HAS_BU, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
            q = u * f
        if LN_AFTER:
            t = q
            if GATING:
                t = t * gate[:, None]
            if RESIDUAL_BEFORE_LN:
                t += _load_tile(r_ptr, rows64, cols, stride_rm, stride_rd, mask)
            that = (t - mean_a[:, None]) * rstd_a[:, None]
            go = go * _vec(lna_w_ptr, cols, col_ok)[None, :]
            go = rstd_a[:, None] * (go - c1[:, None] - that * c2[:, None])
            if RESIDUAL_BEFORE_LN and NEED_R:
                tl.store(gr_ptr + rows64[:, None] * stride_grm + cols[None, :].to(tl.int64) * stride_grd,
                         cast(go, gr_ptr.dtype.element_ty, UPCAST), mask=mask)
        if GATING:
            ggate += tl.sum(tl.where(mask, go * q, 0.0), 1)
            go = go * gate[:, None]
        gu = cast(tl.where(mask, go * f, 0.0), z_ptr.dtype.element_ty, UPCAST)
        wut = tl.load(wu_ptr + cols[:, None].to(tl.int64) * stride_wud + bcols[None, :] * stride_wub,
                      mask=col_ok[:, None] & b_ok[None, :], other=0.0)
        ga = mma(gu, wut, ga, UPCAST, PRECISION)
    if GATING:
        tl.store(ggate_ptr + rows, ggate, mask=row_ok)
    gh = cast(ga * _act_grad(h, ACT), z_ptr.dtype.element_ty, UPCAST)
    tl.store(gh_ptr + rows64[:, None] * B + bcols[None, :], gh, mask=bmask)

    # g_z = LN_before_bwd(g_h W_d), in the same program: g_h never goes back through HBM for it.
    if NEED_Z:
        if LN_BEFORE:
            mean_b = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
            rstd_b = tl.load(stats_ptr + M + rows, mask=row_ok, other=0.0)
            c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                mask = row_ok[:, None] & col_ok[None, :]
                wdt = tl.load(wd_ptr + bcols[:, None] * stride_wdb + cols[None, :].to(tl.int64) * stride_wdd,
                              mask=b_ok[:, None] & col_ok[None, :], other=0.0)
                gzn = mma(gh, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
                zhat = (_load_tile(z_ptr, rows64, cols, stride_zm, stride_zd, mask) - mean_b[:, None]) * rstd_b[:, None]
                gg = gzn * _vec(lnb_w_ptr, cols, col_ok)[None, :]
                c1 += tl.sum(gg, 1)
                c2 += tl.sum(tl.where(mask, gg * zhat, 0.0), 1)
            c1 = c1 / D
            c2 = c2 / D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            wdt = tl.load(wd_ptr + bcols[:, None] * stride_wdb + cols[None, :].to(tl.int64) * stride_wdd,
                          mask=b_ok[:, None] & col_ok[None, :], other=0.0)
            gz = mma(gh, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
            if LN_BEFORE:
                zhat = (_load_tile(z_ptr, rows64, cols, stride_zm, stride_zd, mask) - mean_b[:, None]) * rstd_b[:, None]
                gz = gz * _vec(lnb_w_ptr, cols, col_ok)[None, :]
                gz = rstd_b[:, None] * (gz - c1[:, None] - zhat * c2[:, None])
            tl.store(gz_ptr + rows64[:, None] * stride_gzm + cols[None, :].to(tl.int64) * stride_gzd,
                     cast(gz, gz_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _bn_bwd_up_reduce_kernel(
    go_ptr, r_ptr, wu_ptr, bu_ptr, sc_ptr, lna_w_ptr, gate_ptr, h_ptr, stats_ptr, cstats_ptr,
    gwu_ptr, gbu_ptr, gsc_ptr, glna_w_ptr, glna_b_ptr,
    M, D, B, scaling, p, seed, rows_per_split,
    stride_gm, stride_gd, stride_rm, stride_rd, stride_wud, stride_wub, stride_sc,
    HAS_RES: tl.constexpr, HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr, LN_AFTER: tl.constexpr,
    RESIDUAL_BEFORE_LN: tl.constexpr, GATING: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr,
    NEED_U: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_W_u (d, m) = g_u^T a, g_b_u, g_scale (per channel, before the ``scaling`` factor is
    folded), g_LN_after weight/bias, over one hidden-dimension tile and one split of the rows."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B
    m_start = tl.program_id(1) * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)

    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    gbu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gsc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(h_ptr + rows64[:, None] * B + bcols[None, :], mask=row_ok[:, None] & b_ok[None, :],
                    other=0.0).to(tl.float32)
        a = cast(_act(h, ACT), h_ptr.dtype.element_ty, UPCAST)
        go = _load_tile(go_ptr, rows64, cols, stride_gm, stride_gd, mask)
        f = _scale_drop(rows, cols, col_ok, D, scaling, sc_ptr, stride_sc, p, seed,
                        HAS_SCALE, DROPOUT, BLOCK_M, BLOCK_D)
        if GATING:
            gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if NEED_U:
            u = _up_tile(a, wu_ptr, bu_ptr, cols, col_ok, bcols, b_ok, stride_wud, stride_wub,
                         HAS_BU, UPCAST, PRECISION, BLOCK_M, BLOCK_D)
        if LN_AFTER:
            t = u * f
            if GATING:
                t = t * gate[:, None]
            if RESIDUAL_BEFORE_LN:
                t += _load_tile(r_ptr, rows64, cols, stride_rm, stride_rd, mask)
            mean_a = tl.load(stats_ptr + 2 * M + rows, mask=row_ok, other=0.0)
            rstd_a = tl.load(stats_ptr + 3 * M + rows, mask=row_ok, other=0.0)
            c1 = tl.load(cstats_ptr + rows, mask=row_ok, other=0.0)
            c2 = tl.load(cstats_ptr + M + rows, mask=row_ok, other=0.0)
            that = tl.where(mask, (t - mean_a[:, None]) * rstd_a[:, None], 0.0)
            gw += tl.sum(go * that, 0)
            gb += tl.sum(go, 0)
            go = go * _vec(lna_w_ptr, cols, col_ok)[None, :]
            go = rstd_a[:, None] * (go - c1[:, None] - that * c2[:, None])
        if GATING:
            go = go * gate[:, None]
        go = tl.where(mask, go, 0.0)
        if HAS_SCALE:
            gq = go * u
            if DROPOUT:
                gq = gq * dropout_scale(seed, rows, cols, D, p)
            gsc += tl.sum(gq, 0)
        gu = go * f
        gbu += tl.sum(gu, 0)
        acc = mma(tl.trans(cast(gu, h_ptr.dtype.element_ty, UPCAST)), a, acc, UPCAST, PRECISION)

    wmask = col_ok[:, None] & b_ok[None, :]
    wptrs = gwu_ptr + cols64[:, None] * B + bcols[None, :]
    if ATOMIC:
        tl.atomic_add(wptrs, acc, mask=wmask)
        tl.atomic_add(gbu_ptr + cols, gbu, mask=col_ok)
        if HAS_SCALE:
            tl.atomic_add(gsc_ptr + cols, gsc, mask=col_ok)
        if LN_AFTER:
            tl.atomic_add(glna_w_ptr + cols, gw, mask=col_ok)
            tl.atomic_add(glna_b_ptr + cols, gb, mask=col_ok)
    else:
        tl.store(wptrs, acc, mask=wmask)
        tl.store(gbu_ptr + cols, gbu, mask=col_ok)
        if HAS_SCALE:
            tl.store(gsc_ptr + cols, gsc, mask=col_ok)
        if LN_AFTER:
            tl.store(glna_w_ptr + cols, gw, mask=col_ok)
            tl.store(glna_b_ptr + cols, gb, mask=col_ok)


@triton.jit
def _bn_bwd_down_reduce_kernel(
    z_ptr, wd_ptr, lnb_w_ptr, lnb_b_ptr, gh_ptr, stats_ptr, gwd_ptr, glnb_w_ptr, glnb_b_ptr,
    M, D, B, rows_per_split,
    stride_zm, stride_zd, stride_wdb, stride_wdd,
    LN_BEFORE: tl.constexpr, NEED_LN: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_W_d^T (d, m) = zn^T g_h and the LN_before weight/bias grads, over one hidden-dimension
    tile and one split of the rows; zn is recomputed from z and the saved row statistics."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B
    m_start = tl.program_id(1) * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)

    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    gw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if LN_BEFORE:
        lw = _vec(lnb_w_ptr, cols, col_ok)
        lb = _vec(lnb_b_ptr, cols, col_ok)
    if NEED_LN:
        wdt = tl.load(wd_ptr + bcols[:, None] * stride_wdb + cols64[None, :] * stride_wdd,
                      mask=b_ok[:, None] & col_ok[None, :], other=0.0)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        gh = tl.load(gh_ptr + rows64[:, None] * B + bcols[None, :], mask=row_ok[:, None] & b_ok[None, :],
                     other=0.0)
        zt = tl.load(z_ptr + rows64[:, None] * stride_zm + cols64[None, :] * stride_zd, mask=mask, other=0.0)
        if LN_BEFORE:
            mean_b = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
            rstd_b = tl.load(stats_ptr + M + rows, mask=row_ok, other=0.0)
            zhat = tl.where(mask, (zt.to(tl.float32) - mean_b[:, None]) * rstd_b[:, None], 0.0)
            zt = cast(tl.where(mask, zhat * lw[None, :] + lb[None, :], 0.0), z_ptr.dtype.element_ty, UPCAST)
            if NEED_LN:
                gzn = mma(gh, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
                gw += tl.sum(gzn * zhat, 0)
                gb += tl.sum(gzn, 0)
        acc = mma(tl.trans(zt), gh, acc, UPCAST, PRECISION)

    wmask = col_ok[:, None] & b_ok[None, :]
    # g_W_d is (m, d): the kernel's (d, m) tile is written through transposed indexing.
    wptrs = gwd_ptr + bcols[None, :].to(tl.int64) * D + cols64[:, None]
    if ATOMIC:
        tl.atomic_add(wptrs, acc, mask=wmask)
        if NEED_LN:
            tl.atomic_add(glnb_w_ptr + cols, gw, mask=col_ok)
            tl.atomic_add(glnb_b_ptr + cols, gb, mask=col_ok)
    else:
        tl.store(wptrs, acc, mask=wmask)
        if NEED_LN:
            tl.store(glnb_w_ptr + cols, gw, mask=col_ok)
            tl.store(glnb_b_ptr + cols, gb, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(B: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_B, BLOCK_D). The whole bottleneck is one register tile (BLOCK_B >= m), so
    BLOCK_M and BLOCK_D shrink as m grows to keep the (BLOCK_M, BLOCK_B) activation and the
    (BLOCK_D, BLOCK_B) weight tile at <= 16K elements. Untuned until the GPU benchmark runs."""
    block_b = pow2_block(B, 16, MAX_BOTTLENECK)
    if triton_interpret():
        return 32, block_b, 32  # small tiles: every program instance runs in numpy
    block_m = max(16, min(64, 16384 // block_b))
    block_d = max(16, min(64, 16384 // block_b))
    return block_m, block_b, block_d


def _num_warps(block_b: int) -> int:
    return 4 if block_b <= 64 else 8


def _num_stages(block_b: int) -> int:
    # Software pipelining keeps num_stages copies of each loop's operand tiles in shared memory.
    # Compiled for sm_90 (tests/compile_check.py, Triton 3.9), past m = 64 the default 3 stages
    # overflow an H100's 227 KiB per block: at m = 256 the row backward took 272 KiB in bf16 and
    # 529 KiB in fp32, with one stage 64 / 128 KiB. At m <= 64, fp32, 3 stages: 193 KiB on sm_90,
    # 161 KiB on sm_80 (limit 163 KiB).
    return 3 if block_b <= 64 else 1


def _contiguous(*vectors):
    # The kernels index the 1-D operands (biases, LayerNorm parameters, the per-row gate) as
    # ``ptr + i``: a strided view, or a broadcast gate expanded to (M,) with stride 0, is copied
    # first (at most M + 5d elements against the M x d of the op).
    return tuple(t.contiguous() if t is not None else None for t in vectors)


def _scale_stride(scale) -> int:
    # A (1,) "learned" scale is broadcast over the hidden dimension with stride 0.
    return 0 if scale is None or scale.numel() == 1 else scale.stride(0)


def _residual_before_ln(residual_before_ln, residual, lna_weight) -> bool:
    # The kernels' RESIDUAL_BEFORE_LN: the flag where it changes the math, with both a residual and
    # an LN_after (without LN_after, o + r is the same either way).
    return bool(residual_before_ln) and residual is not None and lna_weight is not None


def forward(z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias,
            lna_weight, lna_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed, *,
            buffers=None):
    """Fused forward for 2-D z (M, d): returns (out (M, d), h (M, m), stats (4, M) float32).

    stats rows: mean and rstd of the LN_before input, mean and rstd of the LN_after input (rows
    of a norm that is off stay 0). ``buffers``: preallocated (out, h, stats) (tests
    pass NaN-filled ones)."""
    M, D = z.shape
    B = down_weight.shape[0]
    down_bias, up_bias, lnb_weight, lnb_bias, lna_weight, lna_bias, gate = _contiguous(
        down_bias, up_bias, lnb_weight, lnb_bias, lna_weight, lna_bias, gate)
    if buffers is not None:
        out, h, stats = buffers
    else:
        out = torch.empty((M, D), device=z.device, dtype=z.dtype)
        h = torch.empty((M, B), device=z.device, dtype=z.dtype)
        # Zeroed: the rows of a norm that is off are never written, and an op output must not
        # carry uninitialised memory (opcheck compares outputs across runs).
        stats = torch.zeros((4, M), device=z.device, dtype=torch.float32)
    if M == 0:
        return out, h, stats
    block_m, block_b, block_d = _blocks(B)
    dummy = out  # pointer for absent optional tensors (never dereferenced: the flag is off)
    r = residual if residual is not None else out
    _bn_fwd_kernel[(triton.cdiv(M, block_m),)](
        z, r, down_weight, down_bias if down_bias is not None else dummy, up_weight,
        up_bias if up_bias is not None else dummy, scale if scale is not None else dummy,
        lnb_weight if lnb_weight is not None else dummy, lnb_bias if lnb_bias is not None else dummy,
        lna_weight if lna_weight is not None else dummy, lna_bias if lna_bias is not None else dummy,
        gate if gate is not None else dummy, out, h, stats,
        M, D, B, scaling, eps, dropout_p, seed,
        z.stride(0), z.stride(1), r.stride(0), r.stride(1), down_weight.stride(0), down_weight.stride(1),
        up_weight.stride(0), up_weight.stride(1), out.stride(0), out.stride(1), _scale_stride(scale),
        HAS_RES=residual is not None, HAS_BD=down_bias is not None, HAS_BU=up_bias is not None,
        HAS_SCALE=scale is not None, LN_BEFORE=lnb_weight is not None, LN_AFTER=lna_weight is not None,
        RESIDUAL_BEFORE_LN=_residual_before_ln(residual_before_ln, residual, lna_weight), GATING=gate is not None,
        DROPOUT=dropout_p > 0.0,
        ACT=ACT_CODES[activation], BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=_num_warps(block_b), num_stages=_num_stages(block_b), **dot_constexprs(z.dtype))
    return out, h, stats


def backward(gout, z, residual, down_weight, down_bias, up_weight, up_bias, h, stats, scale, lnb_weight,
             lnb_bias, lna_weight, lna_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed,
             needs, *, splits=None):
    """Fused backward: the gradients of (z, residual, down_weight, down_bias, up_weight, up_bias,
    scale, lnb_weight, lnb_bias, lna_weight, lna_bias, gate), ``None`` where not needed.

    The residual gradient is computed here only where it differs from ``gout`` (LN_after applied
    to o + r); elsewhere the caller passes ``gout`` itself on. Parameter gradients are accumulated
    in float32 and returned in each parameter's dtype. ``splits`` overrides the number of row
    splits of the token reductions (tests force > 1 to exercise the atomics on the CPU)."""
    (need_z, need_r, need_wd, need_bd, need_wu, need_bu, need_sc, need_lnbw, need_lnbb, need_lnaw,
     need_lnab, need_gate) = needs
    M, D = z.shape
    B = down_weight.shape[0]
    up_bias, lnb_weight, lnb_bias, lna_weight, lna_bias, gate = _contiguous(
        up_bias, lnb_weight, lnb_bias, lna_weight, lna_bias, gate)
    dev = z.device
    f32 = dict(device=dev, dtype=torch.float32)
    grads = [None] * 12
    if M == 0:
        zeros = [torch.zeros_like(t) if t is not None and need else None
                 for t, need in zip((z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight,
                                     lnb_bias, lna_weight, lna_bias, gate), needs)]
        return tuple(zeros)
    block_m, block_b, block_d = _blocks(B)
    ln_before = lnb_weight is not None
    ln_after = lna_weight is not None
    residual_before_ln = _residual_before_ln(residual_before_ln, residual, lna_weight)
    dummy = h
    r = residual if residual is not None else gout
    consts = dict(**dot_constexprs(z.dtype), num_warps=_num_warps(block_b), num_stages=_num_stages(block_b))

    gz = torch.empty((M, D), device=dev, dtype=z.dtype) if need_z else None
    gr = torch.empty((M, D), device=dev, dtype=z.dtype) if (need_r and residual_before_ln) else None
    gh = torch.empty((M, B), device=dev, dtype=z.dtype)
    ggate = torch.empty((M,), **f32) if gate is not None else None
    cstats = torch.empty((2, M), **f32)
    gzt = gz if gz is not None else gout
    grt = gr if gr is not None else gout
    _bn_bwd_rows_kernel[(triton.cdiv(M, block_m),)](
        gout, z, r, down_weight, up_weight, up_bias if up_bias is not None else dummy,
        scale if scale is not None else dummy, lnb_weight if ln_before else dummy,
        lna_weight if ln_after else dummy, gate if gate is not None else dummy,
        h, stats, gzt, grt, gh, ggate if ggate is not None else cstats, cstats,
        M, D, B, scaling, dropout_p, seed,
        gout.stride(0), gout.stride(1), z.stride(0), z.stride(1), r.stride(0), r.stride(1),
        down_weight.stride(0), down_weight.stride(1), up_weight.stride(0), up_weight.stride(1),
        gzt.stride(0), gzt.stride(1), grt.stride(0), grt.stride(1), _scale_stride(scale),
        HAS_RES=residual is not None, HAS_BU=up_bias is not None, HAS_SCALE=scale is not None,
        LN_BEFORE=ln_before, LN_AFTER=ln_after, RESIDUAL_BEFORE_LN=residual_before_ln, GATING=gate is not None,
        DROPOUT=dropout_p > 0.0, ACT=ACT_CODES[activation], NEED_Z=bool(need_z), NEED_R=gr is not None,
        NEED_U=ln_after or gate is not None,
        BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d, **consts)
    grads[0], grads[1] = gz, gr
    if need_gate and gate is not None:
        grads[11] = ggate.to(gate.dtype)

    tiles = triton.cdiv(D, block_d)
    splits, rows_per_split = split_rows(M, tiles, block_m, dev, splits)
    make = torch.zeros if splits > 1 else torch.empty
    if need_wu or need_bu or need_sc or need_lnaw or need_lnab:
        gwu = make((D, B), **f32)
        gbu = make((D,), **f32)
        gsc = make((D,), **f32) if scale is not None else None
        glnaw = make((D,), **f32) if ln_after else None
        glnab = make((D,), **f32) if ln_after else None
        _bn_bwd_up_reduce_kernel[(tiles, splits)](
            gout, r, up_weight, up_bias if up_bias is not None else dummy, scale if scale is not None else dummy,
            lna_weight if ln_after else dummy, gate if gate is not None else dummy, h, stats, cstats,
            gwu, gbu, gsc if gsc is not None else gbu, glnaw if ln_after else gbu, glnab if ln_after else gbu,
            M, D, B, scaling, dropout_p, seed, rows_per_split,
            gout.stride(0), gout.stride(1), r.stride(0), r.stride(1), up_weight.stride(0), up_weight.stride(1),
            _scale_stride(scale),
            HAS_RES=residual is not None, HAS_BU=up_bias is not None, HAS_SCALE=scale is not None,
            LN_AFTER=ln_after, RESIDUAL_BEFORE_LN=residual_before_ln, GATING=gate is not None,
            DROPOUT=dropout_p > 0.0, ACT=ACT_CODES[activation], ATOMIC=splits > 1,
            NEED_U=ln_after or scale is not None,
            BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d, **consts)
        if need_wu:
            grads[4] = gwu.to(up_weight.dtype)
        if need_bu and up_bias is not None:
            grads[5] = gbu.to(up_bias.dtype)
        if need_sc and scale is not None:
            g = gsc * scaling
            # A "learned" scalar: the d per-channel partials are summed in float64 (one number
            # from M*d terms of both signs; the extra precision costs nothing here).
            grads[6] = (g.double().sum().reshape(scale.shape) if scale.numel() == 1 else g).to(scale.dtype)
        if ln_after and need_lnaw:
            grads[9] = glnaw.to(lna_weight.dtype)
        if ln_after and need_lnab:
            grads[10] = glnab.to(lna_bias.dtype)

    need_lnb = ln_before and (need_lnbw or need_lnbb)
    if need_wd or need_lnb:
        gwd = make((B, D), **f32)
        glnbw = make((D,), **f32) if need_lnb else None
        glnbb = make((D,), **f32) if need_lnb else None
        _bn_bwd_down_reduce_kernel[(tiles, splits)](
            z, down_weight, lnb_weight if ln_before else dummy, lnb_bias if ln_before else dummy, gh, stats,
            gwd, glnbw if need_lnb else gwd, glnbb if need_lnb else gwd,
            M, D, B, rows_per_split, z.stride(0), z.stride(1), down_weight.stride(0), down_weight.stride(1),
            LN_BEFORE=ln_before, NEED_LN=need_lnb, ATOMIC=splits > 1,
            BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d, **consts)
        if need_wd:
            grads[2] = gwd.to(down_weight.dtype)
        if need_lnb and need_lnbw:
            grads[7] = glnbw.to(lnb_weight.dtype)
        if need_lnb and need_lnbb:
            grads[8] = glnbb.to(lnb_bias.dtype)
    if need_bd and down_bias is not None:
        grads[3] = gh.sum(0, dtype=torch.float32).to(down_bias.dtype)
    return tuple(grads)
