"""Triton kernels of gated prefix attention (LLaMA-Adapter) and prefix tuning, forward and backward.

A flash-attention 2 forward and backward in which the prefix keys are one more run of key blocks
(the math and notation are in ``fastadapt/reference/prefix_attention.py``):

* ``_fwd_kernel``: one program per (query block, batch x head). It runs the online softmax over the
  prefix blocks, then over the token blocks, in the same pass over Q. Gated mode keeps the prefix's
  own statistics (m_p, l_p, acc_p) and combines ``acc / l + g * acc_p / l_p`` at the end; joint mode
  carries one set of statistics through both runs. Saves the softmax statistics (row max and row
  sum, base 2) of each softmax: (B, H, Sq, 2) fp32, twice in gated mode.
* ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)``; in gated mode it also recomputes P_p
  from its statistics (L <= 512 keys, so O(S L D) work next to the O(S^2 D) attention) and stores
  ``r_p = rowsum(dO * O_p) = rowsum(P_p * dO V_p^T)``: the gate's grad is ``sum_{b,i} r_p`` and the two softmax
  parts get ``delta_p = g r_p`` and ``delta - g r_p``. Nothing prefix-sized is saved by the forward.
* ``_bwd_dkdv_kernel``: one program per (key block, batch x kv head); prefix blocks first (their
  programs walk every query, so they are the longest), then token blocks. Each program loops over
  the query heads of its GQA group, so dK/dV are written once, with no atomics.
* ``_bwd_dq_kernel``: one program per (query block, batch x head), over token then prefix blocks.

The head dim is padded to a power of two with masks (80 -> 128). Token-key visibility: bottom-right
causal (``j <= i + Sk - Sq``) and an optional key-padding mask; prefix keys are visible to all.
Under the CPU interpreter bf16 is stored as raw uint16, so every load is converted to fp32 before
elementwise math and every dot goes through :func:`mma`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret
from fastadapt.kernels.common import cast, dot_constexprs, fit_shared_memory, mma

LOG2E = 1.4426950408889634


@triton.jit
def _scaled(s, qk_scale, qk_lo):
    """``s * scale * log2(e)`` with the constant split in two fp32 parts (hi + lo): one rounded
    fp32 constant would scale every score of the tensor by the same relative error (up to 6e-8),
    a systematic shift of the softmax that showed up as 2x PyTorch's fp32 error in the gate grad."""
    return s * qk_scale + s * qk_lo


@triton.jit
def _store_stats(st_ptr, off, row_ok, m, l):
    """Saved softmax statistics, (B, H, Sq, 2) fp32: the row max m of the base-2 scores
    ``s * scale * log2(e)`` and the row sum l of ``exp2(. - m)``. The backward recomputes
    ``P = exp2(s - m) / l`` as the forward formed it. A single natural-log logsumexp, rounded
    once when stored and again when scaled back to base 2, multiplies every P of a row by the same
    relative error (~5e-7 at |lse| ~ 3 in fp32); measured at D=80, L=3: dk_p up to 2.2x PyTorch's
    own fp32 error with it, 1.95x with (m, l), 1.4x once r_p is also summed over the keys (see
    the preprocess kernel); 12 seeds each."""
    tl.store(st_ptr + 2 * off, m, mask=row_ok)
    tl.store(st_ptr + 2 * off + 1, l, mask=row_ok)


@triton.jit
def _load_stats(st_ptr, off, row_ok):
    # Rows past Sq read (m, l) = (+inf, 1): their P is 0.
    m = tl.load(st_ptr + 2 * off, mask=row_ok, other=float("inf"))
    l = tl.load(st_ptr + 2 * off + 1, mask=row_ok, other=1.0)
    return m, l


@triton.jit
def _visible(rows, cols, col_ok, kpm_base, stride_pn, diag_off, CAUSAL: tl.constexpr,
             HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the token keys ``cols`` that the queries ``rows`` may attend."""
    ok = col_ok[None, :] & (rows[:, None] >= 0)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + diag_off)
    if HAS_KPM:
        keep = tl.load(kpm_base + cols.to(tl.int64) * stride_pn, mask=col_ok, other=0)
        ok = ok & (keep != 0)[None, :]
    return ok


@triton.jit
def _fwd_run(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
             lo, hi, n_keys, rows, offs_d, d_ok, kpm_base, stride_pn, diag_off, qk_scale, qk_lo,
             CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over keys [lo, hi) of one run (prefix or tokens); statistics in base 2."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + cols64[None, :] * stride_kn,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        s = _scaled(s, qk_scale, qk_lo)
        ok = _visible(rows, cols, col_ok, kpm_base, stride_pn, diag_off, CAUSAL, HAS_KPM)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; exponentiate against 0 instead so that
        # it produces p = 0 and alpha = 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        # P is rounded to the input dtype for the PV product, as in flash-attention.
        acc = mma(cast(p, v_base.dtype.element_ty, UPCAST), vt, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, gate_ptr, kpm_ptr, out_ptr, lse_ptr, lsep_ptr,
    H, GROUP, Sq, Sk, L, D, qk_scale, qk_lo, SQ_BUCKET, SK_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, JOINT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kpm_base = kpm_ptr + b * stride_mb
    diag_off = Sk - Sq
    hi = Sk
    full = Sk
    if CAUSAL:
        # Key blocks below `full` are visible to every query of this block: no causal mask there.
        hi = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + diag_off), 0)
        full = tl.minimum(tl.maximum(((pid_m * BLOCK_M + diag_off + 1) // BLOCK_N) * BLOCK_N, 0), hi)

    acc_p = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_p = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_p, m_p, l_p = _fwd_run(
        acc_p, m_p, l_p, q, kp_ptr + b * stride_pkb + hk * stride_pkh, vp_ptr + b * stride_pvb + hk * stride_pvh,
        stride_pks, stride_pkd, stride_pvs, stride_pvd, 0, L, L, rows, offs_d, d_ok, kpm_base, stride_mn,
        0, qk_scale, qk_lo, False, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows64[:, None] * stride_os + offs_d[None, :] * stride_od
    st_off = bh * Sq + rows
    if JOINT:
        # Prefix tuning: the token run continues the prefix's statistics (one softmax over both).
        acc, m_i, l_i = _fwd_run(
            acc_p, m_p, l_p, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, 0, full, Sk, rows,
            offs_d, d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, False, HAS_KPM, UPCAST, PRECISION,
            BLOCK_M, BLOCK_N)
        if CAUSAL:
            acc, m_i, l_i = _fwd_run(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, full, hi, Sk, rows,
                offs_d, d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, True, HAS_KPM, UPCAST, PRECISION,
                BLOCK_M, BLOCK_N)
        out = acc / l_i[:, None]  # l_i >= 1: the prefix (L >= 1) is always visible
        _store_stats(lse_ptr, st_off, row_ok, m_i, l_i)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _fwd_run(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, 0, full, Sk, rows,
            offs_d, d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, False, HAS_KPM, UPCAST, PRECISION,
            BLOCK_M, BLOCK_N)
        if CAUSAL:
            acc, m_i, l_i = _fwd_run(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, full, hi, Sk, rows,
                offs_d, d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, True, HAS_KPM, UPCAST, PRECISION,
                BLOCK_M, BLOCK_N)
        g = tl.load(gate_ptr + h).to(tl.float32)
        empty = l_i == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None]) + g * (acc_p / l_p[:, None])
        # A row that sees no token key saves (m, l) = (+inf, 1): its recomputed P is 0.
        _store_stats(lse_ptr, st_off, row_ok, tl.where(empty, float("inf"), m_i), tl.where(empty, 1.0, l_i))
        _store_stats(lsep_ptr, st_off, row_ok, m_p, l_p)
    tl.store(out_ptrs, cast(out, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr, do_ptr, q_ptr, kp_ptr, vp_ptr, gate_ptr, lsep_ptr, delta_ptr, rp_ptr,
    H, GROUP, Sq, L, D, qk_scale, qk_lo,
    stride_ob, stride_oh, stride_os, stride_od, stride_gb, stride_gh, stride_gs, stride_gd,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    JOINT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + rows64[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=tile_ok, other=0.0).to(tl.float32)
    do_raw = tl.load(do_ptr + b * stride_gb + h * stride_gh + rows64[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                     mask=tile_ok, other=0.0)
    do = do_raw.to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse_off = bh * Sq + rows
    if not JOINT:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=tile_ok, other=0.0)
        m_p, l_p = _load_stats(lsep_ptr, lse_off, row_ok)
        kp_base = kp_ptr + b * stride_pkb + hk * stride_pkh
        vp_base = vp_ptr + b * stride_pvb + hk * stride_pvh
        # r_p = rowsum(dO * O_p) = sum_j P_p[:, j] (dO V_p^T)[:, j]: summed over the prefix keys, as
        # PyTorch's softmax backward sums P * dP, so that dP_p - delta_p cancels as accurately as it
        # does there (with L = 3 keys the D-wise sum cost up to 2x PyTorch's fp32 error in dk_p).
        r_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < L
            cols64 = cols.to(tl.int64)
            kv_ok = d_ok[:, None] & col_ok[None, :]
            kt = tl.load(kp_base + offs_d[:, None] * stride_pkd + cols64[None, :] * stride_pks, mask=kv_ok, other=0.0)
            vt = tl.load(vp_base + offs_d[:, None] * stride_pvd + cols64[None, :] * stride_pvs, mask=kv_ok, other=0.0)
            s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            s = _scaled(s, qk_scale, qk_lo)
            p = tl.where(col_ok[None, :], tl.exp2(s - m_p[:, None]) / l_p[:, None], 0.0)
            dp = mma(do_raw, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            r_p += tl.sum(p * dp, 1)
        g = tl.load(gate_ptr + h).to(tl.float32)
        delta = delta - g * r_p
        tl.store(rp_ptr + lse_off, r_p, mask=row_ok)
    tl.store(delta_ptr + lse_off, delta, mask=row_ok)


@triton.jit
def _dq_run(dq, q, do, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, lo, hi, n_keys, rows,
            offs_d, d_ok, kpm_base, stride_pn, diag_off, qk_scale, qk_lo, m_i, l_i, delta, g,
            CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq += dS K over keys [lo, hi) of one run, dS = P * (g dO V^T - delta)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        cols64 = cols.to(tl.int64)
        kd_ok = d_ok[:, None] & col_ok[None, :]
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + cols64[None, :] * stride_kn, mask=kd_ok, other=0.0)
        vt = tl.load(v_base + offs_d[:, None] * stride_vd + cols64[None, :] * stride_vn, mask=kd_ok, other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        s = _scaled(s, qk_scale, qk_lo)
        ok = _visible(rows, cols, col_ok, kpm_base, stride_pn, diag_off, CAUSAL, HAS_KPM)
        p = tl.where(ok, tl.exp2(s - m_i[:, None]) / l_i[:, None], 0.0)
        dp = mma(do, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * g
        ds = p * (dp - delta[:, None])
        dq = mma(cast(ds, k_base.dtype.element_ty, UPCAST), tl.trans(kt), dq, UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, gate_ptr, kpm_ptr, do_ptr, lse_ptr, lsep_ptr, delta_ptr, rp_ptr,
    dq_ptr,
    H, GROUP, Sq, Sk, L, D, scale, qk_scale, qk_lo, SQ_BUCKET, SK_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd, stride_mb, stride_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, JOINT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_gb + h * stride_gh + rows64[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=tile_ok, other=0.0)
    lse_off = bh * Sq + rows
    m_i, l_i = _load_stats(lse_ptr, lse_off, row_ok)
    delta = tl.load(delta_ptr + lse_off, mask=row_ok, other=0.0)
    if JOINT:
        m_p, l_p = m_i, l_i
        g = 1.0
        delta_p = delta
    else:
        m_p, l_p = _load_stats(lsep_ptr, lse_off, row_ok)
        g = tl.load(gate_ptr + h).to(tl.float32)
        delta_p = g * tl.load(rp_ptr + lse_off, mask=row_ok, other=0.0)
    diag_off = Sk - Sq
    hi = Sk
    full = Sk
    if CAUSAL:
        # As in the forward: no causal mask on the key blocks below `full`.
        hi = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + diag_off), 0)
        full = tl.minimum(tl.maximum(((pid_m * BLOCK_M + diag_off + 1) // BLOCK_N) * BLOCK_N, 0), hi)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_mb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_run(dq, q, do, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, 0, full, Sk, rows, offs_d,
                 d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, m_i, l_i, delta, 1.0,
                 False, HAS_KPM, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    if CAUSAL:
        dq = _dq_run(dq, q, do, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, full, hi, Sk, rows,
                     offs_d, d_ok, kpm_base, stride_mn, diag_off, qk_scale, qk_lo, m_i, l_i, delta, 1.0,
                     True, HAS_KPM, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    dq = _dq_run(dq, q, do, kp_ptr + b * stride_pkb + hk * stride_pkh, vp_ptr + b * stride_pvb + hk * stride_pvh,
                 stride_pks, stride_pkd, stride_pvs, stride_pvd, 0, L, L, rows, offs_d, d_ok,
                 kpm_ptr, stride_mn, 0, qk_scale, qk_lo, m_p, l_p, delta_p, g,
                 False, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows64[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             cast(dq * scale, dq_ptr.dtype.element_ty, UPCAST), mask=tile_ok)


@triton.jit
def _dkdv_step(dk, dv, start_m, cols, col_ok, kt, vt, q_base, do_base, lse_ptr, delta_ptr, bh, g, Sq, offs_d, d_ok,
               stride_qs, stride_qd, stride_gs, stride_gd, diag_off, qk_scale, qk_lo,
               CAUSAL: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV += the contribution of the query block at start_m (one query head)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + rows64[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    do = tl.load(do_base + rows64[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=tile_ok, other=0.0)
    m_i, l_i = _load_stats(lse_ptr, bh * Sq + rows, row_ok)
    delta = tl.load(delta_ptr + bh * Sq + rows, mask=row_ok, other=0.0)
    if GATED:
        delta = g * delta
    s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
    s = _scaled(s, qk_scale, qk_lo)
    ok = _visible(rows, cols, col_ok, q_base, 0, diag_off, CAUSAL, False) & row_ok[:, None]
    p = tl.where(ok, tl.exp2(s - m_i[:, None]) / l_i[:, None], 0.0)
    pt = tl.trans(cast(p, q_base.dtype.element_ty, UPCAST))
    if GATED:
        dv += g * mma(pt, do, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), UPCAST, PRECISION)
    else:
        dv = mma(pt, do, dv, UPCAST, PRECISION)
    dp = mma(do, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * g
    ds = p * (dp - delta[:, None])
    dk = mma(tl.trans(cast(ds, q_base.dtype.element_ty, UPCAST)), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_run(start_n, n_keys, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              dk_base, dv_base, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
              q_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr, b, hk, GROUP, H, Sq, D, scale, qk_scale, qk_lo,
              stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
              kpm_base, stride_pn, diag_off,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one block of keys (prefix or tokens), summed over the query heads of the GQA group.

    GATED (prefix block, gated mode): ``lse_ptr`` holds the prefix statistics, ``delta_ptr`` holds r_p, and
    dV = g P^T dO, dP = g dO V^T, delta_p = g r_p.
    """
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < n_keys
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(v_base + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Under the causal mask the first query that sees key start_n is start_n - diag_off.
    # and query blocks from q_mid on see every key of this block: no causal mask there.
    q_lo = 0
    q_mid = 0
    if CAUSAL:
        q_lo = (tl.maximum(start_n - diag_off, 0) // BLOCK_M) * BLOCK_M
        q_mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_off, 0), BLOCK_M) * BLOCK_M
    if HAS_KPM:
        # The padding of this key block, loaded once (it does not depend on the query).
        col_ok = col_ok & (tl.load(kpm_base + cols64 * stride_pn, mask=col_ok, other=0) != 0)
    for gh in range(0, GROUP):
        h = hk * GROUP + gh
        bh = b * H + h
        g = 1.0
        if GATED:
            g = tl.load(gate_ptr + h).to(tl.float32)
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_gb + h * stride_gh
        if CAUSAL:
            for start_m in range(q_lo, tl.minimum(q_mid, Sq), BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, start_m, cols, col_ok, kt, vt, q_base, do_base, lse_ptr, delta_ptr, bh, g,
                                    Sq, offs_d, d_ok, stride_qs, stride_qd, stride_gs, stride_gd, diag_off,
                                    qk_scale, qk_lo, True, GATED, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                                    BLOCK_D)
        for start_m in range(q_mid, Sq, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, start_m, cols, col_ok, kt, vt, q_base, do_base, lse_ptr, delta_ptr, bh, g,
                                Sq, offs_d, d_ok, stride_qs, stride_qd, stride_gs, stride_gd, diag_off,
                                qk_scale, qk_lo, False, GATED, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(dk_base + cols64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             cast(dk * scale, dk_base.dtype.element_ty, UPCAST), mask=kv_ok)
    tl.store(dv_base + cols64[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             cast(dv, dv_base.dtype.element_ty, UPCAST), mask=kv_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, gate_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, plse_ptr, pdelta_ptr,
    dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
    H, HKV, GROUP, Sq, Sk, L, D, scale, qk_scale, qk_lo, SQ_BUCKET, SK_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dpb, stride_dph, stride_dps, stride_dpd,
    stride_mb, stride_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, JOINT: tl.constexpr, DO_PREFIX: tl.constexpr,
    DO_TOKENS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid axis 0: the prefix key blocks first (each walks every query: the longest programs),
    # then the token key blocks.
    n_prefix_blocks = tl.cdiv(L, BLOCK_N)
    pid_n = tl.program_id(0)
    if not DO_PREFIX:
        pid_n += n_prefix_blocks
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    if pid_n < n_prefix_blocks:
        # dK_p, dV_p (dk and dv share one layout, as do dkp and dvp: both allocated by the launcher).
        _dkdv_run(pid_n * BLOCK_N, L, kp_ptr + b * stride_pkb + hk * stride_pkh,
                  vp_ptr + b * stride_pvb + hk * stride_pvh, stride_pks, stride_pkd, stride_pvs, stride_pvd,
                  dkp_ptr + b * stride_dpb + hk * stride_dph, dvp_ptr + b * stride_dpb + hk * stride_dph,
                  stride_dps, stride_dpd, stride_dps, stride_dpd,
                  q_ptr, do_ptr, plse_ptr, pdelta_ptr, gate_ptr,
                  b, hk, GROUP, H, Sq, D, scale, qk_scale, qk_lo,
                  stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
                  kpm_ptr, stride_mn, 0,
                  False, False, not JOINT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _dkdv_run((pid_n - n_prefix_blocks) * BLOCK_N, Sk, k_ptr + b * stride_kb + hk * stride_kh,
                  v_ptr + b * stride_vb + hk * stride_vh, stride_ks, stride_kd, stride_vs, stride_vd,
                  dk_ptr + b * stride_dkb + hk * stride_dkh, dv_ptr + b * stride_dkb + hk * stride_dkh,
                  stride_dks, stride_dkd, stride_dks, stride_dkd,
                  q_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr,
                  b, hk, GROUP, H, Sq, D, scale, qk_scale, qk_lo,
                  stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
                  kpm_ptr + b * stride_mb, stride_mn, Sk - Sq,
                  CAUSAL, HAS_KPM, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _configs(pairs):
    # Starting points from the Triton fused-attention tutorial; untuned on our shapes until the
    # GPU benchmark runs (no device in the session that wrote this).
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


def _shared_bytes(kept: str, n_kept: int):
    """Shared memory of a config, estimated: ``n_kept`` (BLOCK_kept, BLOCK_D) tiles held across the
    loop plus two streamed tiles of the other block size per pipeline stage. An upper bound of what
    Triton 3.9 allocated at D = 128 in fp32 (tests/compile_check.py), where half the configs below
    exceed sm_80's 163 KiB and a third sm_90's 227 KiB (e.g. forward 128x64, 3 stages: 256 KiB);
    in 16-bit all fit."""
    streamed = "BLOCK_N" if kept == "BLOCK_M" else "BLOCK_M"

    def size(cfg, named_args, kwargs):
        c = cfg.kwargs
        return ((n_kept * c[kept] + 2 * cfg.num_stages * c[streamed]) * kwargs["BLOCK_D"]
                * named_args["q_ptr"].element_size())
    return fit_shared_memory(size)


_KEY = ["SQ_BUCKET", "SK_BUCKET", "L", "D", "GROUP", "CAUSAL", "JOINT"]
_fwd_tuned = triton.autotune(
    configs=_configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2),
                      (16, 64, 4, 2)]), key=_KEY,
    prune_configs_by={"early_config_prune": _shared_bytes("BLOCK_M", 1)})(_fwd_kernel)  # q kept, k, v streamed
_dq_tuned = triton.autotune(
    configs=_configs([(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (16, 64, 4, 2)]),
    key=_KEY, prune_configs_by={"early_config_prune": _shared_bytes("BLOCK_M", 2)})(_bwd_dq_kernel)  # q, dO kept
_dkdv_tuned = triton.autotune(
    configs=_configs([(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (16, 64, 4, 2)]),
    key=_KEY, prune_configs_by={"early_config_prune": _shared_bytes("BLOCK_N", 2)})(_bwd_dkdv_kernel)  # k, v kept

# Small fixed tiles for the CPU interpreter, where every program instance runs in numpy.
_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16}


def _launch(kernel, tuned, grid, args, meta):
    if triton_interpret():
        kernel[grid(_INTERPRET)](*args, **meta, **_INTERPRET)
    else:
        tuned[grid](*args, **meta)


def _qk_scale(scale: float) -> tuple[float, float]:
    """(hi, lo) fp32 parts of ``scale * log2(e)``; see :func:`_scaled`."""
    full = scale * LOG2E
    hi = float(torch.tensor(full, dtype=torch.float32))
    return hi, full - hi


def _empty(shape, device, dtype):
    """Output allocation, one place (the tests swap in NaN-filled buffers to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _strides(t):
    return tuple(t.stride())


def _bucket(n: int) -> int:
    # Sequence lengths vary call to call; tune once per power-of-two size class.
    return max(n, 1).bit_length()


def _common(q, k, k_p, key_padding_mask):
    B, H, Sq, D = q.shape
    Hkv, Sk, L = k.shape[1], k.shape[2], k_p.shape[2]
    if key_padding_mask is None:
        kpm, kpm_strides = q, (0, 0)  # never read (HAS_KPM=False)
    else:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        kpm_strides = _strides(kpm)
    return B, H, Hkv, Sq, Sk, L, D, kpm, kpm_strides


def forward(q, k, v, k_p, v_p, gate, key_padding_mask, scale, causal, joint):
    """Fused forward: (out (B, H, Sq, D) q.dtype, stats, stats_p (B, H, Sq, 2) fp32, the latter
    empty in joint mode); see :func:`_store_stats`. Inputs in any strides; all of q, k, v, k_p, v_p share one dtype."""
    B, H, Hkv, Sq, Sk, L, D, kpm, kpm_strides = _common(q, k, k_p, key_padding_mask)
    out = _empty((B, H, Sq, D), q.device, q.dtype)
    lse = _empty((B, H, Sq, 2), q.device, torch.float32)
    lse_p = _empty((0,) if joint else (B, H, Sq, 2), q.device, torch.float32)
    gate_arg = lse if gate is None else gate.contiguous()  # read as gate_ptr + h
    args = (q, k, v, k_p, v_p, gate_arg, kpm, out, lse, lse_p if not joint else lse,
            H, H // Hkv, Sq, Sk, L, D, *_qk_scale(scale), _bucket(Sq), _bucket(Sk),
            *_strides(q), *_strides(k), *_strides(v), *_strides(k_p), *_strides(v_p), *_strides(out),
            *kpm_strides)
    meta = dict(CAUSAL=causal, HAS_KPM=key_padding_mask is not None, JOINT=joint,
                BLOCK_D=max(16, triton.next_power_of_2(D)), **dot_constexprs(q.dtype))
    _launch(_fwd_kernel, _fwd_tuned, lambda c: (triton.cdiv(Sq, c["BLOCK_M"]), B * H), args, meta)
    return out, lse, lse_p


def backward(dout, q, k, v, k_p, v_p, gate, key_padding_mask, out, lse, lse_p, scale, causal, joint, needs):
    """Fused backward: (dq, dk, dv, dk_p, dv_p, dgate (H,) fp32), ``None`` where not needed."""
    need_q, need_k, need_v, need_kp, need_vp, need_gate = needs
    B, H, Hkv, Sq, Sk, L, D, kpm, kpm_strides = _common(q, k, k_p, key_padding_mask)
    group = H // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    dots = dot_constexprs(q.dtype)
    delta = _empty((B, H, Sq), q.device, torch.float32)
    r_p = delta if joint else _empty((B, H, Sq), q.device, torch.float32)
    gate_arg = lse if gate is None else gate.contiguous()  # read as gate_ptr + h
    lsep_arg = lse if joint else lse_p
    pre_block = 16 if triton_interpret() else 64
    _bwd_preprocess_kernel[(triton.cdiv(Sq, pre_block), B * H)](
        out, dout, q, k_p, v_p, gate_arg, lsep_arg, delta, r_p,
        H, group, Sq, L, D, *_qk_scale(scale),
        *_strides(out), *_strides(dout), *_strides(q), *_strides(k_p), *_strides(v_p),
        JOINT=joint, BLOCK_M=pre_block, BLOCK_N=16 if triton_interpret() else 32, BLOCK_D=block_d, **dots)

    meta = dict(CAUSAL=causal, HAS_KPM=key_padding_mask is not None, JOINT=joint, BLOCK_D=block_d, **dots)
    dq = dk = dv = dk_p = dv_p = None
    if need_q:
        dq = _empty(q.shape, q.device, q.dtype)
        args = (q, k, v, k_p, v_p, gate_arg, kpm, dout, lse, lsep_arg, delta, r_p, dq,
                H, group, Sq, Sk, L, D, scale, *_qk_scale(scale), _bucket(Sq), _bucket(Sk),
                *_strides(q), *_strides(k), *_strides(v), *_strides(k_p), *_strides(v_p), *_strides(dout),
                *_strides(dq), *kpm_strides)
        _launch(_bwd_dq_kernel, _dq_tuned, lambda c: (triton.cdiv(Sq, c["BLOCK_M"]), B * H), args, meta)
    do_tokens, do_prefix = need_k or need_v, need_kp or need_vp
    if do_tokens or do_prefix:
        dk = _empty((B, Hkv, Sk, D), q.device, k.dtype)
        dv = _empty((B, Hkv, Sk, D), q.device, v.dtype)
        dk_p = _empty((B, Hkv, L, D), q.device, k_p.dtype)
        dv_p = _empty((B, Hkv, L, D), q.device, v_p.dtype)
        # Prefix blocks read (lse_p, r_p) in gated mode and the joint softmax's (lse, delta) in joint mode.
        args = (q, k, v, k_p, v_p, gate_arg, kpm, dout, lse, delta, lsep_arg, r_p, dk, dv, dk_p, dv_p,
                H, Hkv, group, Sq, Sk, L, D, scale, *_qk_scale(scale), _bucket(Sq), _bucket(Sk),
                *_strides(q), *_strides(k), *_strides(v), *_strides(k_p), *_strides(v_p), *_strides(dout),
                *_strides(dk), *_strides(dk_p), *kpm_strides)

        def grid(c):
            n = (triton.cdiv(L, c["BLOCK_N"]) if do_prefix else 0) + (triton.cdiv(Sk, c["BLOCK_N"]) if do_tokens else 0)
            return (n, B * Hkv)

        _launch(_bwd_dkdv_kernel, _dkdv_tuned, grid, args,
                dict(meta, DO_PREFIX=do_prefix, DO_TOKENS=do_tokens))
    dgate = r_p.sum((0, 2)) if need_gate and not joint else None
    return (dq, dk if need_k else None, dv if need_v else None, dk_p if need_kp else None,
            dv_p if need_vp else None, dgate)
