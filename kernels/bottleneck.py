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

Every pass computes its tile of the adapter output (up-projection, scale, dropout, gate, the
residual before LN_after) with one helper, ``_adapter_tile``, and the LayerNorms' forward and
backward with the ``_ln_*`` helpers. Dropout masks are drawn from (seed, flat index in the (M, d)
output) by ``dropout_scale`` and regenerated, never stored. Activations on chip are rounded to the
input dtype where eager PyTorch would round them (h, a, LN outputs, g_u, g_h), so the tensor-core
operands are the same dtype as eager's and the backward recomputes exactly the forward's values.
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
def _act_backward(g, h, ACT: tl.constexpr):
    """g * f'(h), where a dead ReLU passes exactly 0 whatever g holds (torch's threshold_backward
    selects: a NaN or inf g must not reach the down-projection's gradient)."""
    if ACT == 1:
        return tl.where(h <= 0, 0.0, g)
    return g * _act_grad(h, ACT)


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
def _chan_init(BLOCK_M: tl.constexpr):
    """Per-row (mean, M2, count) of no columns yet, for :func:`_chan_update`."""
    zero = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return zero, zero, zero


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


# ---------------------------------------------------------------------------------------------
# Pieces of the kernels. Row indices are int64 (from an int64 program id): an (M, d) offset passes
# 2^31 at M * d > 2^31, which a 4096-wide activation reaches at 512K tokens.


@triton.jit
def _col_block(d0, D, row_ok, BLOCK_D: tl.constexpr):
    """(cols, col_ok, mask) of the columns d0 + [0, BLOCK_D) of a block of rows."""
    cols = d0 + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    return cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _split_program(M, D, B, rows_per_split, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """(cols, col_ok, bcols, b_ok, m_start, m_end) of a token reduction's program: a tile of the
    hidden dimension (program id 0), the whole bottleneck, a split [m_start, m_end) of the rows
    (program id 1)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    bcols = tl.arange(0, BLOCK_B)
    m_start = tl.program_id(1).to(tl.int64) * rows_per_split
    return cols, cols < D, bcols, bcols < B, m_start, tl.minimum(M, m_start + rows_per_split)


@triton.jit
def _tile(ptr, rows, cols, stride_m, stride_n, mask):
    """The (rows, cols) tile of a 2-D tensor in its own dtype, 0 where masked."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n,
                   mask=mask, other=0.0)


@triton.jit
def _vec(ptr, cols, col_ok):
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_pair(ptr, k: tl.constexpr, M, rows, row_ok):
    """Rows k and k + 1 of a (K, M) float32 array of per-row values (k * M in int64: it passes
    2^31 at M > 2^31 / k)."""
    first = ptr + tl.cast(M, tl.int64) * k + rows
    return tl.load(first, mask=row_ok, other=0.0), tl.load(first + M, mask=row_ok, other=0.0)


@triton.jit
def _store_pair(ptr, k: tl.constexpr, M, rows, row_ok, x, y):
    first = ptr + tl.cast(M, tl.int64) * k + rows
    tl.store(first, x, mask=row_ok)
    tl.store(first + M, y, mask=row_ok)


@triton.jit
def _row_gate(gate_ptr, rows, row_ok, GATING: tl.constexpr):
    """The per-row gate g in fp32; without gating a placeholder that no tile reads."""
    gate = 1.0
    if GATING:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return gate


@triton.jit
def _normalize(x, mean, rstd):
    """x^ = (x - mean) * rstd, per row."""
    return (x - mean[:, None]) * rstd[:, None]


@triton.jit
def _ln_affine(xhat, w_ptr, b_ptr, cols, col_ok):
    return xhat * _vec(w_ptr, cols, col_ok)[None, :] + _vec(b_ptr, cols, col_ok)[None, :]


@triton.jit
def _ln_bwd_start(stats_ptr, k: tl.constexpr, M, rows, row_ok, BLOCK_M: tl.constexpr):
    """(mean, rstd, c1, c2) that start a LayerNorm backward over a block of rows: the forward's
    statistics (rows k and k + 1 of stats) and the sums of :func:`_ln_row_sums` at 0. Both sums
    run over the whole row before any element of the input gradient is known."""
    mean, rstd = _load_pair(stats_ptr, k, M, rows, row_ok)
    zero = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return mean, rstd, zero, zero


@triton.jit
def _ln_row_sums(c1, c2, g, w, xhat, mask):
    """Add one tile's columns to the row sums of g w and g w x^ (their means are c1, c2 of
    :func:`_ln_input_grad`)."""
    gw = g * w[None, :]
    return c1 + tl.sum(gw, 1), c2 + tl.sum(tl.where(mask, gw * xhat, 0.0), 1)


@triton.jit
def _ln_input_grad(g, xhat, w, rstd, c1, c2):
    """The LayerNorm backward to its input, rstd (g w - c1 - x^ c2), with the row means
    c1 = mean(g w) and c2 = mean(g w x^)."""
    return rstd[:, None] * (g * w[None, :] - c1[:, None] - xhat * c2[:, None])


@triton.jit
def _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr, r_ptr,
                  stride_sc, stride_rm, stride_rd, NEED_U: tl.constexpr,
                  HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr, GATING: tl.constexpr, DROPOUT: tl.constexpr,
                  RESIDUAL_BEFORE_LN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(u, f, D', t) of one (BLOCK_M, BLOCK_D) tile, fp32, from a = f(h) (BLOCK_M, BLOCK_B) in the
    input dtype, for every pass of the forward and the backward:

    * f = s D', with which q = D(s u) = u f: s is the scaling times each column's scale, D' the
      dropout factor, regenerated from the seed (1 without dropout);
    * where NEED_U (else 0 placeholders), the up-projection u = a W_u^T + b_u, recomputed, and
      t = g q (+ r where the residual is added before LN_after): the input of LN_after, or the
      adapter output o."""
    col_ok = cols < D
    if HAS_SCALE:
        s = scaling * tl.load(sc_ptr + cols * stride_sc, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK_D,), dtype=tl.float32) + scaling
    f = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + s[None, :]
    drop = 1.0
    if DROPOUT:
        drop = dropout_scale(seed, rows, cols, D, p)
        f = f * drop
    u = 0.0
    t = 0.0
    if NEED_U:
        bcols = tl.arange(0, BLOCK_B)
        wut = _tile(wu_ptr, bcols, cols, 1, B, (bcols < B)[:, None] & col_ok[None, :])
        u = mma(a, wut, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_BU:
            u += _vec(bu_ptr, cols, col_ok)[None, :]
        t = u * f
        if GATING:
            t = t * gate[:, None]
        if RESIDUAL_BEFORE_LN:
            t += _tile(r_ptr, rows, cols, stride_rm, stride_rd, mask).to(tl.float32)
    return u, f, drop, t


@triton.jit
def _down_grad_tile(gh, wd_ptr, cols, D, B, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """g_h W_d[:, cols], fp32: the gradient of LN_before's output (of z without LN_before)."""
    bcols = tl.arange(0, BLOCK_B)
    wdt = _tile(wd_ptr, bcols, cols, D, 1, (bcols < B)[:, None] & (cols < D)[None, :])
    return mma(gh, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)


@triton.jit
def _store_z_grad(gh, rows, row_ok, z_ptr, wd_ptr, lnb_w_ptr, stats_ptr, gz_ptr, M, D, B, stride_zm, stride_zd,
                  LN_BEFORE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store g_z = LN_before_bwd(g_h W_d) (M, d, contiguous) of a block of rows from its g_h."""
    if LN_BEFORE:
        mean_b, rstd_b, c1, c2 = _ln_bwd_start(stats_ptr, 0, M, rows, row_ok, BLOCK_M)
        for d0 in range(0, D, BLOCK_D):
            cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
            zhat = _normalize(_tile(z_ptr, rows, cols, stride_zm, stride_zd, mask).to(tl.float32), mean_b, rstd_b)
            gzn = _down_grad_tile(gh, wd_ptr, cols, D, B, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
            c1, c2 = _ln_row_sums(c1, c2, gzn, _vec(lnb_w_ptr, cols, col_ok), zhat, mask)
        c1 = c1 / D
        c2 = c2 / D
    for d0 in range(0, D, BLOCK_D):
        cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
        gz = _down_grad_tile(gh, wd_ptr, cols, D, B, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
        if LN_BEFORE:
            zhat = _normalize(_tile(z_ptr, rows, cols, stride_zm, stride_zd, mask).to(tl.float32), mean_b, rstd_b)
            gz = _ln_input_grad(gz, zhat, _vec(lnb_w_ptr, cols, col_ok), rstd_b, c1, c2)
        tl.store(gz_ptr + rows[:, None] * D + cols[None, :], cast(gz, gz_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _accumulate(ptrs, x, mask, ATOMIC: tl.constexpr):
    """Write one program's partial sum: added atomically where the rows are split across programs."""
    if ATOMIC:
        tl.atomic_add(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x, mask=mask)


# ---------------------------------------------------------------------------------------------
# Kernels. Arguments: pointers (the optional operands last, a placeholder where absent and their
# flag off), sizes and scalars, strides (weights, biases and the outputs are contiguous), meta-
# parameters. RESIDUAL_BEFORE_LN: a residual is added before LN_after (both present).


@triton.jit
def _bn_fwd_kernel(
    z_ptr, wd_ptr, wu_ptr, r_ptr, bd_ptr, bu_ptr, sc_ptr, lnb_w_ptr, lnb_b_ptr, lna_w_ptr, lna_b_ptr, gate_ptr,
    out_ptr, h_ptr, stats_ptr,
    M, D, B, scaling, eps, p, seed,
    stride_zm, stride_zd, stride_rm, stride_rd, stride_sc,
    HAS_RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr,
    LN_BEFORE: tl.constexpr, LN_AFTER: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr, GATING: tl.constexpr,
    DROPOUT: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B

    # LN_before statistics: one extra read of the z rows (the tile is too wide to keep on chip).
    if LN_BEFORE:
        mean_b, m2, n = _chan_init(BLOCK_M)
        for d0 in range(0, D, BLOCK_D):
            cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
            zt = _tile(z_ptr, rows, cols, stride_zm, stride_zd, mask).to(tl.float32)
            mean_b, m2, n = _chan_update(mean_b, m2, n, zt, mask, tl.minimum(D - d0, BLOCK_D).to(tl.float32))
        rstd_b = 1.0 / tl.sqrt(m2 / D + eps)
        _store_pair(stats_ptr, 0, M, rows, row_ok, mean_b, rstd_b)

    # Down-projection: h = LN_before(z) W_d^T + b_d, accumulated in fp32 over the hidden dimension.
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
        zt = _tile(z_ptr, rows, cols, stride_zm, stride_zd, mask)
        if LN_BEFORE:
            zn = _ln_affine(_normalize(zt.to(tl.float32), mean_b, rstd_b), lnb_w_ptr, lnb_b_ptr, cols, col_ok)
            zt = cast(tl.where(mask, zn, 0.0), z_ptr.dtype.element_ty, UPCAST)
        acc = mma(zt, _tile(wd_ptr, cols, bcols, 1, D, col_ok[:, None] & b_ok[None, :]), acc, UPCAST, PRECISION)
    if HAS_BD:
        acc += _vec(bd_ptr, bcols, b_ok)[None, :]
    # Rounded to the input dtype, as eager's nn.Linear output is: the backward recomputes a from
    # this stored h and so sees exactly the forward's activation.
    h = cast(acc, z_ptr.dtype.element_ty, UPCAST)
    tl.store(h_ptr + rows[:, None] * B + bcols[None, :], h, mask=row_ok[:, None] & b_ok[None, :])
    a = cast(_act(h.to(tl.float32), ACT), z_ptr.dtype.element_ty, UPCAST)
    gate = _row_gate(gate_ptr, rows, row_ok, GATING)

    # LN_after statistics of t: the up-projection is recomputed in the output pass rather than t
    # being written and re-read (m multiply-adds per element against 2 HBM bytes per element).
    if LN_AFTER:
        mean_a, m2, n = _chan_init(BLOCK_M)
        for d0 in range(0, D, BLOCK_D):
            cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
            _, _, _, t = _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr,
                                       r_ptr, stride_sc, stride_rm, stride_rd, True, HAS_BU, HAS_SCALE, GATING, DROPOUT,
                                       RESIDUAL_BEFORE_LN, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
            mean_a, m2, n = _chan_update(mean_a, m2, n, t, mask, tl.minimum(D - d0, BLOCK_D).to(tl.float32))
        rstd_a = 1.0 / tl.sqrt(m2 / D + eps)
        _store_pair(stats_ptr, 2, M, rows, row_ok, mean_a, rstd_a)

    for d0 in range(0, D, BLOCK_D):
        cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
        _, _, _, y = _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr, r_ptr,
                                   stride_sc, stride_rm, stride_rd, True, HAS_BU, HAS_SCALE, GATING, DROPOUT,
                                   RESIDUAL_BEFORE_LN, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
        if LN_AFTER:
            y = _ln_affine(_normalize(y, mean_a, rstd_a), lna_w_ptr, lna_b_ptr, cols, col_ok)
        if HAS_RES and not RESIDUAL_BEFORE_LN:
            y += _tile(r_ptr, rows, cols, stride_rm, stride_rd, mask).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], cast(y, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _bn_bwd_rows_kernel(
    gout_ptr, z_ptr, wd_ptr, wu_ptr, h_ptr, stats_ptr, r_ptr, bu_ptr, sc_ptr, lnb_w_ptr, lna_w_ptr, gate_ptr,
    gz_ptr, gr_ptr, gh_ptr, ggate_ptr, lna_sums_ptr,
    M, D, B, scaling, p, seed,
    stride_gm, stride_gd, stride_zm, stride_zd, stride_rm, stride_rd, stride_sc,
    HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr, LN_BEFORE: tl.constexpr, LN_AFTER: tl.constexpr,
    RESIDUAL_BEFORE_LN: tl.constexpr, GATING: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr,
    NEED_Z: tl.constexpr, NEED_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_h (M, m); g_z (M, d) if NEED_Z; the residual gradient where it differs from gout (LN_after
    of o + r) if NEED_R; g_gate (M,); LN_after's row means c1, c2 (2, M) for the up-projection
    reduction."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bcols = tl.arange(0, BLOCK_B)
    b_ok = bcols < B
    bmask = row_ok[:, None] & b_ok[None, :]

    h = _tile(h_ptr, rows, bcols, B, 1, bmask).to(tl.float32)
    a = cast(_act(h, ACT), z_ptr.dtype.element_ty, UPCAST)
    gate = _row_gate(gate_ptr, rows, row_ok, GATING)

    # LN_after backward: its row sums, a pass over the whole row before the g_a pass.
    if LN_AFTER:
        mean_a, rstd_a, c1, c2 = _ln_bwd_start(stats_ptr, 2, M, rows, row_ok, BLOCK_M)
        for d0 in range(0, D, BLOCK_D):
            cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
            _, _, _, t = _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr,
                                       r_ptr, stride_sc, stride_rm, stride_rd, True, HAS_BU, HAS_SCALE, GATING, DROPOUT,
                                       RESIDUAL_BEFORE_LN, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
            c1, c2 = _ln_row_sums(c1, c2, _tile(gout_ptr, rows, cols, stride_gm, stride_gd, mask).to(tl.float32),
                                  _vec(lna_w_ptr, cols, col_ok), _normalize(t, mean_a, rstd_a), mask)
        c1 = c1 / D
        c2 = c2 / D
        _store_pair(lna_sums_ptr, 0, M, rows, row_ok, c1, c2)

    # g_a = g_u W_u, accumulated on chip over the hidden dimension.
    ga = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    ggate = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, col_ok, mask = _col_block(d0, D, row_ok, BLOCK_D)
        go = _tile(gout_ptr, rows, cols, stride_gm, stride_gd, mask).to(tl.float32)
        u, f, _, t = _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr, r_ptr,
                                   stride_sc, stride_rm, stride_rd, LN_AFTER or GATING, HAS_BU, HAS_SCALE, GATING,
                                   DROPOUT, RESIDUAL_BEFORE_LN, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
        if LN_AFTER:
            go = _ln_input_grad(go, _normalize(t, mean_a, rstd_a), _vec(lna_w_ptr, cols, col_ok), rstd_a, c1, c2)
            if NEED_R:
                tl.store(gr_ptr + rows[:, None] * D + cols[None, :], cast(go, gr_ptr.dtype.element_ty, UPCAST),
                         mask=mask)
        if GATING:
            ggate += tl.sum(tl.where(mask, go * (u * f), 0.0), 1)
            go = go * gate[:, None]
        gu = cast(tl.where(mask, go * f, 0.0), z_ptr.dtype.element_ty, UPCAST)
        ga = mma(gu, _tile(wu_ptr, cols, bcols, B, 1, col_ok[:, None] & b_ok[None, :]), ga, UPCAST, PRECISION)
    if GATING:
        tl.store(ggate_ptr + rows, ggate, mask=row_ok)
    gh = cast(_act_backward(ga, h, ACT), z_ptr.dtype.element_ty, UPCAST)
    tl.store(gh_ptr + rows[:, None] * B + bcols[None, :], gh, mask=bmask)

    # g_z in the same program: g_h never goes back through HBM for it.
    if NEED_Z:
        _store_z_grad(gh, rows, row_ok, z_ptr, wd_ptr, lnb_w_ptr, stats_ptr, gz_ptr, M, D, B, stride_zm, stride_zd,
                      LN_BEFORE, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)


@triton.jit
def _bn_bwd_up_reduce_kernel(
    gout_ptr, wu_ptr, h_ptr, stats_ptr, lna_sums_ptr, r_ptr, bu_ptr, sc_ptr, lna_w_ptr, gate_ptr,
    gwu_ptr, gbu_ptr, gsc_ptr, glna_w_ptr, glna_b_ptr,
    M, D, B, scaling, p, seed, rows_per_split,
    stride_gm, stride_gd, stride_rm, stride_rd, stride_sc,
    HAS_BU: tl.constexpr, HAS_SCALE: tl.constexpr, LN_AFTER: tl.constexpr, RESIDUAL_BEFORE_LN: tl.constexpr,
    GATING: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_W_u (d, m) = g_u^T a, g_b_u, g_scale (per channel, before the ``scaling`` factor is
    folded), g_LN_after weight/bias, over one hidden-dimension tile and one split of the rows."""
    cols, col_ok, bcols, b_ok, m_start, m_end = _split_program(M, D, B, rows_per_split, BLOCK_D, BLOCK_B)

    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    gbu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gsc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        mask = row_ok[:, None] & col_ok[None, :]
        h = _tile(h_ptr, rows, bcols, B, 1, row_ok[:, None] & b_ok[None, :]).to(tl.float32)
        a = cast(_act(h, ACT), h_ptr.dtype.element_ty, UPCAST)
        go = _tile(gout_ptr, rows, cols, stride_gm, stride_gd, mask).to(tl.float32)
        gate = _row_gate(gate_ptr, rows, row_ok, GATING)
        u, f, drop, t = _adapter_tile(a, gate, rows, cols, mask, D, B, scaling, p, seed, wu_ptr, bu_ptr, sc_ptr,
                                      r_ptr, stride_sc, stride_rm, stride_rd, LN_AFTER or HAS_SCALE, HAS_BU, HAS_SCALE,
                                      GATING, DROPOUT, RESIDUAL_BEFORE_LN, UPCAST, PRECISION, BLOCK_M, BLOCK_B, BLOCK_D)
        if LN_AFTER:
            mean_a, rstd_a = _load_pair(stats_ptr, 2, M, rows, row_ok)
            c1, c2 = _load_pair(lna_sums_ptr, 0, M, rows, row_ok)
            that = tl.where(mask, _normalize(t, mean_a, rstd_a), 0.0)
            gw += tl.sum(go * that, 0)
            gb += tl.sum(go, 0)
            go = _ln_input_grad(go, that, _vec(lna_w_ptr, cols, col_ok), rstd_a, c1, c2)
        if GATING:
            go = go * gate[:, None]
        go = tl.where(mask, go, 0.0)
        if HAS_SCALE:
            gsc += tl.sum(go * u * drop, 0)
        gu = go * f
        gbu += tl.sum(gu, 0)
        acc = mma(tl.trans(cast(gu, h_ptr.dtype.element_ty, UPCAST)), a, acc, UPCAST, PRECISION)

    _accumulate(gwu_ptr + cols[:, None].to(tl.int64) * B + bcols[None, :], acc, col_ok[:, None] & b_ok[None, :],
                ATOMIC)
    _accumulate(gbu_ptr + cols, gbu, col_ok, ATOMIC)
    if HAS_SCALE:
        _accumulate(gsc_ptr + cols, gsc, col_ok, ATOMIC)
    if LN_AFTER:
        _accumulate(glna_w_ptr + cols, gw, col_ok, ATOMIC)
        _accumulate(glna_b_ptr + cols, gb, col_ok, ATOMIC)


@triton.jit
def _bn_bwd_down_reduce_kernel(
    z_ptr, wd_ptr, gh_ptr, stats_ptr, lnb_w_ptr, lnb_b_ptr,
    gwd_ptr, glnb_w_ptr, glnb_b_ptr,
    M, D, B, rows_per_split,
    stride_zm, stride_zd,
    LN_BEFORE: tl.constexpr, NEED_LN: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_W_d^T (d, m) = zn^T g_h and the LN_before weight/bias grads, over one hidden-dimension
    tile and one split of the rows; zn is recomputed from z and the saved row statistics."""
    cols, col_ok, bcols, b_ok, m_start, m_end = _split_program(M, D, B, rows_per_split, BLOCK_D, BLOCK_B)

    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    gw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if LN_BEFORE:
        lw = _vec(lnb_w_ptr, cols, col_ok)
        lb = _vec(lnb_b_ptr, cols, col_ok)
    if NEED_LN:
        wdt = _tile(wd_ptr, bcols, cols, D, 1, b_ok[:, None] & col_ok[None, :])
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        mask = row_ok[:, None] & col_ok[None, :]
        gh = _tile(gh_ptr, rows, bcols, B, 1, row_ok[:, None] & b_ok[None, :])
        zt = _tile(z_ptr, rows, cols, stride_zm, stride_zd, mask)
        if LN_BEFORE:
            mean_b, rstd_b = _load_pair(stats_ptr, 0, M, rows, row_ok)
            zhat = tl.where(mask, _normalize(zt.to(tl.float32), mean_b, rstd_b), 0.0)
            zt = cast(tl.where(mask, zhat * lw[None, :] + lb[None, :], 0.0), z_ptr.dtype.element_ty, UPCAST)
            if NEED_LN:
                gzn = mma(gh, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
                gw += tl.sum(gzn * zhat, 0)
                gb += tl.sum(gzn, 0)
        acc = mma(tl.trans(zt), gh, acc, UPCAST, PRECISION)

    # g_W_d is (m, d): the kernel's (d, m) tile is written through transposed indexing.
    _accumulate(gwd_ptr + bcols[None, :].to(tl.int64) * D + cols[:, None], acc, col_ok[:, None] & b_ok[None, :],
                ATOMIC)
    if NEED_LN:
        _accumulate(glnb_w_ptr + cols, gw, col_ok, ATOMIC)
        _accumulate(glnb_b_ptr + cols, gb, col_ok, ATOMIC)


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


def _pointers(placeholder, *tensors):
    # Pointer arguments for optional operands: an absent one is passed as the placeholder, which
    # the kernel, that operand's flag off, never dereferences.
    return tuple(t if t is not None else placeholder for t in tensors)


class _Operands:
    """One call's operands as the kernels take them, and the meta-parameters they imply.

    The kernels index the weights and the 1-D operands (biases, LayerNorm parameters, the per-row
    gate) as contiguous tensors: a strided view, or a broadcast gate expanded to (M,) with stride
    0, is copied first (at most 2md + M + 5d elements against the M x d of the op)."""

    def __init__(self, z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias,
                 lna_weight, lna_bias, gate, scaling, activation, residual_before_ln, dropout_p, seed):
        self.z, self.residual, self.scale = z, residual, scale
        (self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.lnb_weight, self.lnb_bias,
         self.lna_weight, self.lna_bias, self.gate) = (
            t.contiguous() if t is not None else None
            for t in (down_weight, down_bias, up_weight, up_bias, lnb_weight, lnb_bias, lna_weight, lna_bias, gate))
        self.scaling, self.dropout_p, self.seed = scaling, dropout_p, seed
        self.M, self.D = z.shape
        self.B = down_weight.shape[0]
        # A (1,) "learned" scale is broadcast over the hidden dimension with stride 0.
        self.stride_sc = 0 if scale is None or scale.numel() == 1 else scale.stride(0)
        block_m, block_b, block_d = _blocks(self.B)
        self.meta = dict(BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=_num_warps(block_b),
                         num_stages=_num_stages(block_b), **dot_constexprs(z.dtype))
        # Grid sizes: blocks of rows (the forward, the row backward), tiles of the hidden dimension
        # (the token reductions).
        self.row_blocks = triton.cdiv(self.M, block_m)
        self.col_blocks = triton.cdiv(self.D, block_d)
        # residual_before_ln changes the math only where both a residual and LN_after are present.
        self.residual_before_ln = bool(residual_before_ln) and lna_weight is not None and residual is not None
        # The meta-parameters of _adapter_tile, which the forward, the row backward and the
        # up-projection reduction share.
        self.tile = dict(HAS_BU=up_bias is not None, HAS_SCALE=scale is not None, LN_AFTER=lna_weight is not None,
                         RESIDUAL_BEFORE_LN=self.residual_before_ln, GATING=gate is not None,
                         DROPOUT=dropout_p > 0.0, ACT=ACT_CODES[activation])


def forward(z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight,
            lna_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed, *, buffers=None):
    """Fused forward for 2-D z (M, d): returns (out (M, d), h (M, m), stats (4, M) float32).

    stats rows: mean and rstd of the LN_before input, mean and rstd of the LN_after input (rows
    of a norm that is off stay 0). ``buffers``: preallocated contiguous (out, h, stats) (tests
    pass NaN-filled ones)."""
    ops = _Operands(z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight,
                    lna_bias, gate, scaling, activation, residual_before_ln, dropout_p, seed)
    if buffers is not None:
        out, h, stats = buffers
    else:
        out = torch.empty((ops.M, ops.D), device=z.device, dtype=z.dtype)
        h = torch.empty((ops.M, ops.B), device=z.device, dtype=z.dtype)
        # Zeroed: the rows of a norm that is off are never written, and an op output must not
        # carry uninitialised memory (opcheck compares outputs across runs).
        stats = torch.zeros((4, ops.M), device=z.device, dtype=torch.float32)
    if ops.M == 0:
        return out, h, stats
    r, bd, bu, sc, lnb_w, lnb_b, lna_w, lna_b, g = _pointers(
        out, residual, ops.down_bias, ops.up_bias, scale, ops.lnb_weight, ops.lnb_bias, ops.lna_weight, ops.lna_bias,
        ops.gate)
    _bn_fwd_kernel[(ops.row_blocks,)](
        z, ops.down_weight, ops.up_weight, r, bd, bu, sc, lnb_w, lnb_b, lna_w, lna_b, g, out, h, stats,
        ops.M, ops.D, ops.B, scaling, eps, dropout_p, seed,
        z.stride(0), z.stride(1), r.stride(0), r.stride(1), ops.stride_sc,
        HAS_RES=residual is not None, HAS_BD=down_bias is not None, LN_BEFORE=lnb_weight is not None,
        **ops.tile, **ops.meta)
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
    inputs = (z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight,
              lna_bias, gate)
    needs = [bool(need) and t is not None for need, t in zip(needs, inputs)]
    if z.shape[0] == 0:
        return tuple(torch.zeros_like(t) if need else None for t, need in zip(inputs, needs))
    ops = _Operands(*inputs, scaling, activation, residual_before_ln, dropout_p, seed)
    (need_z, need_r, need_wd, need_bd, need_wu, need_bu, need_sc, need_lnbw, need_lnbb, need_lnaw, need_lnab,
     _) = needs
    g_z, g_r, g_h, g_gate, lna_sums = _backward_rows(ops, gout, h, stats, need_z, need_r)
    g_wd = g_lnbw = g_lnbb = g_wu = g_bu = g_sc = g_lnaw = g_lnab = None
    split = split_rows(ops.M, ops.col_blocks, ops.meta["BLOCK_M"], z.device, splits)
    if any((need_wu, need_bu, need_sc, need_lnaw, need_lnab)):
        g_wu, g_bu, g_sc, g_lnaw, g_lnab = _backward_up(ops, gout, h, stats, lna_sums, split, need_sc)
    if any((need_wd, need_lnbw, need_lnbb)):
        g_wd, g_lnbw, g_lnbb = _backward_down(ops, g_h, stats, split, need_lnbw or need_lnbb)
    g_bd = g_h.sum(0, dtype=torch.float32) if need_bd else None
    grads = (g_z, g_r, g_wd, g_bd, g_wu, g_bu, g_sc, g_lnbw, g_lnbb, g_lnaw, g_lnab, g_gate)
    # g_r stays None where needed but equal to gout (the caller's); the others are there when needed.
    return tuple(g.to(t.dtype) if need and g is not None else None for g, need, t in zip(grads, needs, inputs))


def _backward_rows(ops: _Operands, gout, h, stats, need_z: bool, need_r: bool):
    """The row pass: (g_z, g_r, g_h, g_gate, LN_after's row means (2, M) float32); g_r only where
    the residual is inside LN_after, g_gate only with a gate."""
    z = ops.z
    like_z, f32 = dict(device=z.device, dtype=z.dtype), dict(device=z.device, dtype=torch.float32)
    g_z = torch.empty((ops.M, ops.D), **like_z) if need_z else None
    g_r = torch.empty((ops.M, ops.D), **like_z) if need_r and ops.residual_before_ln else None
    g_h = torch.empty((ops.M, ops.B), **like_z)
    g_gate = torch.empty((ops.M,), **f32) if ops.gate is not None else None
    lna_sums = torch.empty((2, ops.M), **f32)
    r, bu, sc, lnb_w, lna_w, g = _pointers(h, ops.residual, ops.up_bias, ops.scale, ops.lnb_weight, ops.lna_weight,
                                           ops.gate)
    gz, gr, ggate = _pointers(gout, g_z, g_r) + _pointers(lna_sums, g_gate)
    _bn_bwd_rows_kernel[(ops.row_blocks,)](
        gout, z, ops.down_weight, ops.up_weight, h, stats, r, bu, sc, lnb_w, lna_w, g, gz, gr, g_h, ggate, lna_sums,
        ops.M, ops.D, ops.B, ops.scaling, ops.dropout_p, ops.seed,
        gout.stride(0), gout.stride(1), z.stride(0), z.stride(1), r.stride(0), r.stride(1), ops.stride_sc,
        LN_BEFORE=ops.lnb_weight is not None, NEED_Z=need_z, NEED_R=g_r is not None, **ops.tile, **ops.meta)
    return g_z, g_r, g_h, g_gate, lna_sums


def _reduction_buffer(ops: _Operands, splits: int):
    # Split rows add their partial sums atomically into a zeroed buffer.
    make = torch.zeros if splits > 1 else torch.empty
    return lambda *shape: make(shape, device=ops.z.device, dtype=torch.float32)


def _backward_up(ops: _Operands, gout, h, stats, lna_sums, split, need_sc: bool):
    """The up-projection side's token reductions: (g_W_u, g_b_u, g_scale, g_LN_after weight, bias)
    in float32, None for an absent operand; g_scale with the ``scaling`` factor folded in where
    needed (float64 for a "learned" scalar)."""
    splits, rows_per_split = split
    alloc = _reduction_buffer(ops, splits)
    g_wu, g_bu = alloc(ops.D, ops.B), alloc(ops.D)
    g_sc = alloc(ops.D) if ops.scale is not None else None
    g_lnaw, g_lnab = (alloc(ops.D), alloc(ops.D)) if ops.lna_weight is not None else (None, None)
    r, bu, sc, lna_w, g = _pointers(h, ops.residual, ops.up_bias, ops.scale, ops.lna_weight, ops.gate)
    _bn_bwd_up_reduce_kernel[(ops.col_blocks, splits)](
        gout, ops.up_weight, h, stats, lna_sums, r, bu, sc, lna_w, g,
        g_wu, *_pointers(g_bu, g_bu, g_sc, g_lnaw, g_lnab),
        ops.M, ops.D, ops.B, ops.scaling, ops.dropout_p, ops.seed, rows_per_split,
        gout.stride(0), gout.stride(1), r.stride(0), r.stride(1), ops.stride_sc,
        ATOMIC=splits > 1, **ops.tile, **ops.meta)
    if need_sc:
        g_sc = g_sc * ops.scaling
        # A "learned" scalar: the d per-channel partials are summed in float64 (one number from
        # M*d terms of both signs; the extra precision costs nothing here).
        g_sc = g_sc.double().sum().reshape(ops.scale.shape) if ops.scale.numel() == 1 else g_sc
    return g_wu, g_bu, g_sc, g_lnaw, g_lnab


def _backward_down(ops: _Operands, g_h, stats, split, need_ln: bool):
    """The down-projection side's token reductions: (g_W_d, g_LN_before weight, bias), float32; the
    LN_before ones only if ``need_ln``."""
    splits, rows_per_split = split
    alloc = _reduction_buffer(ops, splits)
    g_wd = alloc(ops.B, ops.D)
    g_lnbw, g_lnbb = (alloc(ops.D), alloc(ops.D)) if need_ln else (None, None)
    _bn_bwd_down_reduce_kernel[(ops.col_blocks, splits)](
        ops.z, ops.down_weight, g_h, stats, *_pointers(g_h, ops.lnb_weight, ops.lnb_bias),
        g_wd, *_pointers(g_wd, g_lnbw, g_lnbb),
        ops.M, ops.D, ops.B, rows_per_split, ops.z.stride(0), ops.z.stride(1),
        LN_BEFORE=ops.lnb_weight is not None, NEED_LN=need_ln, ATOMIC=splits > 1, **ops.meta)
    return g_wd, g_lnbw, g_lnbb
