"""Triton kernels of the fused LoRA linear, forward and backward.

Three kernels cover the whole op (the math is in ``fastadapt/reference/lora.py``):

* ``_lora_down_kernel``: ``out[M, R] = scale * (D(X)[M, C] @ V[C, R])``: the skinny product that
  reads X once (forward ``u = s D(x) A^T``; backward ``gu = s gy B``), dropout drawn in-register.
* ``_lora_matmul_kernel``: ``out[M, N] = X @ W + D(U @ V) + b``: the frozen product with the rank-r
  update folded in. The accumulator is seeded with ``U @ V`` before the K loop, so the update costs
  no extra pass over the output (forward ``y``; backward ``gx = gy W + D(gu A)``).
* ``_lora_reduce_kernel``: ``out[R, C] = scale * (P^T[R, M] @ D(X)[M, C])``: products that reduce
  over the token dimension (``gA = gu^T D(x)``, ``gB^T = u^T gy``), split over M across programs
  with fp32 atomics so that few-column outputs still fill the GPU.

The frozen product itself runs in cuBLAS by default, with the update added in place by the second
kernel with no frozen K loop; ``FASTADAPT_LORA_GEMM=triton`` runs it in the second kernel instead
(see :func:`frozen_gemm`).

``D`` is inverted dropout with the mask drawn from (seed, flat index of x), identical in all three.
Several adapters summed with dropout (rank segments, ``fastadapt/reference/lora.py``) run the
products that see a mask once per segment, on its column slices of u, gu, A and gA (strided
views, no copies), with the segment's own p and seed: the forward's down-projection, gA, and the
update of gx (the first segment seeds the frozen product's output, the others add in place).
Operands are taken as strided views, so transposed weights and non-contiguous inputs need no copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret
from fastadapt.reference.lora import rank_segments
from fastadapt.kernels.common import (cast, dot_constexprs, down_acc, dropout_scale, fit_shared_memory, grouped_tile,
                                      lowrank_acc, mma, pow2_block, reduce_blocks)


@triton.jit
def _lora_down_kernel(
    x_ptr, v_ptr, out_ptr,
    M, C, R, scale, p, seed,
    stride_xm, stride_xc, stride_vc, stride_vr, stride_om, stride_or,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rcols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r_ok = rcols < R
    rows64 = rows.to(tl.int64)
    acc = down_acc(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, v_ptr, rows64, row_ok, rcols, r_ok, C,
                   seed, p, stride_xm, stride_xc, stride_vc, stride_vr, DROPOUT, UPCAST, PRECISION, BLOCK_C)
    acc = acc * scale
    tl.store(out_ptr + rows64[:, None] * stride_om + rcols[None, :] * stride_or,
             cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def update_accumulator(u_ptr, v_ptr, rows, cols, M, N, R, p, seed, stride_um, stride_ur, stride_vr, stride_vn,
                       DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``D(U @ V)`` over the tile in fp32: the accumulator a frozen K loop then adds to.

    Seeding the accumulator with the rank-r update (LoRAFusion's trick): its operands are a few KB
    per tile, and adding it here means the frozen K loop runs unchanged."""
    acc = lowrank_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr, v_ptr, rows.to(tl.int64), rows < M,
                      cols.to(tl.int64), cols < N, R, stride_um, stride_ur, stride_vr, stride_vn, UPCAST, PRECISION,
                      BLOCK_R)
    if DROPOUT:
        acc = acc * dropout_scale(seed, rows, cols, N, p)
    return acc


@triton.jit
def x_tile(x_ptr, rows, k0, M, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """The (rows, k0 + BLOCK_K) tile of an (M, K) tensor x (zeros past its edges), with the K
    indices (int64) and their mask: x's tiles in a frozen K loop, and any other row-major tile."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ks64 = ks.to(tl.int64)
    xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks64[None, :] * stride_xk,
                 mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
    return xt, ks64, k_ok


@triton.jit
def store_output(acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr):
    """``out = acc + bias`` (``out +=`` with ACCUMULATE), rounded to out's dtype."""
    row_ok = rows < M
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=out_mask)


@triton.jit
def _lora_matmul_kernel(
    x_ptr, w_ptr, u_ptr, v_ptr, bias_ptr, out_ptr,
    M, N, K, R, p, seed, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = update_accumulator(u_ptr, v_ptr, rows, cols, M, N, R, p, seed, stride_um, stride_ur, stride_vr, stride_vn,
                             DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        xt, ks64, k_ok = x_tile(x_ptr, rows, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        wt = tl.load(w_ptr + ks64[:, None] * stride_wk + cols64[None, :] * stride_wn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(xt, wt, acc, UPCAST, PRECISION)
    store_output(acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, stride_on, HAS_BIAS, ACCUMULATE, UPCAST)


@triton.jit
def _lora_reduce_kernel(
    p_ptr, x_ptr, out_ptr,
    M, C, R, scale, p, seed, rows_per_split,
    stride_pm, stride_pr, stride_xm, stride_xc, stride_or, stride_oc,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < C
    r_ok = rr < R
    cols64 = cols.to(tl.int64)
    m_start = tl.program_id(2) * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        pt = tl.load(p_ptr + rows64[None, :] * stride_pm + rr[:, None] * stride_pr,
                     mask=r_ok[:, None] & row_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + cols64[None, :] * stride_xc,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            xt = cast(xt.to(tl.float32) * dropout_scale(seed, rows, cols, C, p), x_ptr.dtype.element_ty, UPCAST)
        acc = mma(pt, xt, acc, UPCAST, PRECISION)
    acc = acc * scale
    out = out_ptr + rr[:, None] * stride_or + cols64[None, :] * stride_oc
    if ATOMIC:
        tl.atomic_add(out, acc, mask=r_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out, acc, mask=r_ok[:, None] & col_ok[None, :])


def _matmul_configs():
    # The Triton matmul tutorial's CUDA configs plus two narrow-N ones; untuned on our shapes
    # until the GPU benchmark sets them (issue "GPU performance").
    shapes = [(128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
              (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps in shapes]


def _matmul_shared_bytes(cfg, named_args, kwargs):
    # The pipelined operand tiles, num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K elements: exactly what
    # Triton allocated for each config compiled by tests/compile_check.py. In fp32 the 128x256x64
    # 3-stage config needs 288 KiB, past an H100's 227 KiB.
    c = cfg.kwargs
    return cfg.num_stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * named_args["x_ptr"].element_size()


# One tuning per (size class of M, N, K, R): M varies call to call (batch x sequence) and would
# otherwise retune on every new value.
# restore_value: with ACCUMULATE the kernel updates `out` in place, so each tuning run must see the
# original values.
_lora_matmul_tuned = triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "R"],
                                     prune_configs_by={"early_config_prune": fit_shared_memory(_matmul_shared_bytes)},
                                     restore_value=["out_ptr"])(_lora_matmul_kernel)

# Small fixed tiles for the CPU interpreter, where every program instance runs in numpy.
_INTERPRET_MATMUL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def launch_matmul(kernel, tuned, M: int, N: int, args, meta) -> None:
    """Launch a GEMM kernel over (M, N) output tiles in the grouped order (one program per tile):
    ``tuned`` (its autotuned wrapper) on a GPU, ``kernel`` with :data:`_INTERPRET_MATMUL` under the
    interpreter. The LoRA, DoRA and QLoRA matmuls all launch this way."""
    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    if triton_interpret():
        kernel[grid(_INTERPRET_MATMUL)](*args, **meta, **_INTERPRET_MATMUL)
    else:
        tuned[grid](*args, **meta)


def lora_down(x, v, scale: float, out, *, dropout_p: float = 0.0, seed: int = 0):
    """``out = scale * D(x) @ v`` for x (M, C), v (C, R) (any strides), out (M, R)."""
    M, C = x.shape
    R = v.shape[1]
    block_r = pow2_block(R)
    block_m, block_c = (32, 32) if triton_interpret() else (64, 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    _lora_down_kernel[grid](
        x, v, out, M, C, R, scale, dropout_p, seed,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c,
        **dot_constexprs(x.dtype))
    return out


def lora_matmul(x, w, u, v, bias, out, *, dropout_p: float = 0.0, seed: int = 0, accumulate: bool = False):
    """``out = x @ w + D(u @ v) + bias`` (``out +=`` with ``accumulate``) for x (M, K), w (K, N),
    u (M, R), v (R, N), out (M, N). ``x = w = None`` leaves out the frozen product (K = 0)."""
    M, N = out.shape
    R = u.shape[1]
    if x is None:
        x, w, K = out, out, 0  # never read: the K loop runs zero times
    else:
        K = x.shape[1]
    # The kernel reads the bias as ``bias_ptr + col``: a strided or expanded one is copied (N elements).
    args = (x, w, u, v, bias.contiguous() if bias is not None else out, out, M, N, K, R, dropout_p, seed,
            max(M, 1).bit_length(), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    meta = dict(HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, ACCUMULATE=accumulate,
                BLOCK_R=pow2_block(R), **dot_constexprs(u.dtype))
    launch_matmul(_lora_matmul_kernel, _lora_matmul_tuned, M, N, args, meta)
    return out


def lora_reduce(pm, x, scale: float, out, *, dropout_p: float = 0.0, seed: int = 0,
                splits: int | None = None):
    """``out = scale * pm^T @ D(x)`` for pm (M, R), x (M, C), out (R, C) float32 (any strides).

    The M reduction is split across ``splits`` programs per output tile (default: enough to fill
    the GPU, 1 when deterministic algorithms are requested); splits > 1 accumulate with atomics.
    """
    M, R = pm.shape
    C = x.shape[1]
    block_r, block_c, block_m, rows_per_split = reduce_blocks(M, R, C, x.device, splits)
    splits = triton.cdiv(max(M, 1), rows_per_split)
    if splits > 1:
        out.zero_()
    _lora_reduce_kernel[(triton.cdiv(C, block_c), triton.cdiv(R, block_r), splits)](
        pm, x, out, M, C, R, scale, dropout_p, seed, rows_per_split,
        pm.stride(0), pm.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout_p > 0.0, ATOMIC=splits > 1, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_M=block_m,
        **dot_constexprs(x.dtype))
    return out


GEMM_ENV = "FASTADAPT_LORA_GEMM"


def frozen_gemm() -> str:
    """Who runs the frozen product: ``torch`` (cuBLAS, then one Triton pass adds the rank-r update
    in place) or ``triton`` (our GEMM with the update seeding its accumulator, no extra pass).

    ``torch`` is the default: on the H100 of DESIGN.md a plain Triton GEMM reached 518 TFLOP/s
    where cuBLAS did 709, which costs more than the extra pass over the output (cuBLAS + in-place
    update measured 1.28x the frozen fwd+bwd there, PEFT 1.62x). ``FASTADAPT_LORA_GEMM=triton``
    selects the single-kernel path, for devices and shapes where our GEMM wins.
    """
    choice = os.environ.get(GEMM_ENV, "torch")
    if choice not in ("torch", "triton"):
        raise ValueError(f"{GEMM_ENV}={choice!r}: expected 'torch' or 'triton'")
    return choice


def _frozen_plus_update(x, weight, transposed, u, v, bias, out, *, dropout_p=0.0, seed=0):
    """``out = x @ W^T + D(u @ v) + bias`` (``x @ W`` when ``transposed``) for the frozen (N, K)
    ``weight``: a tensor, by the strategy :func:`frozen_gemm` names, or an object with this
    function as its ``frozen_plus_update`` method (a quantized weight, kernels/qlora.py)."""
    if not isinstance(weight, torch.Tensor):
        return weight.frozen_plus_update(x, transposed, u, v, bias, out, dropout_p=dropout_p, seed=seed)
    w = weight if transposed else weight.t()
    if frozen_gemm() == "triton":
        return lora_matmul(x, w, u, v, bias, out, dropout_p=dropout_p, seed=seed)
    if bias is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(bias, x, w, out=out)
    return lora_matmul(None, None, u, v, None, out, dropout_p=dropout_p, seed=seed, accumulate=True)


def forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    """Fused forward for 2-D x (M, K): returns (y (M, N), u (M, r)). All inputs share one dtype;
    ``weight`` is a tensor or a quantized weight (see :func:`_frozen_plus_update`)."""
    M = x.shape[0]
    N, R = lora_B.shape
    u = torch.empty((M, R), device=x.device, dtype=x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, u
    for a, b, p, sd in rank_segments(R, dropout_p, seed, ranks, ranks_p):
        lora_down(x, lora_A[a:b].t(), scaling, u[:, a:b], dropout_p=p, seed=sd)
    _frozen_plus_update(x, weight, False, u, lora_B.t(), bias, y)
    return y, u


def backward(gy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None, ranks_p=None):
    """Fused backward: (gx, gA, gB, gbias, gweight), ``None`` where not needed."""
    need_x, need_A, need_B, need_bias, need_weight = needs
    M, K = x.shape
    N, R = lora_B.shape
    spans = rank_segments(R, dropout_p, seed, ranks, ranks_p)
    gx = gA = gB = gbias = gweight = None
    gu = None
    if need_x or need_A:
        gu = torch.empty((M, R), device=x.device, dtype=x.dtype)
        lora_down(gy, lora_B, scaling, gu)
    if need_x:
        gx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        (a, b, p, sd), *rest = spans
        _frozen_plus_update(gy, weight, True, gu[:, a:b], lora_A[a:b], None, gx, dropout_p=p, seed=sd)
        for a, b, p, sd in rest:
            lora_matmul(None, None, gu[:, a:b], lora_A[a:b], None, gx, dropout_p=p, seed=sd, accumulate=True)
    if need_A:
        gA = torch.empty((R, K), device=x.device, dtype=torch.float32)
        for a, b, p, sd in spans:
            lora_reduce(gu[:, a:b], x, 1.0, gA[a:b], dropout_p=p, seed=sd)
        gA = gA.to(lora_A.dtype)
    if need_B:
        # Written through transposed strides: the kernel produces gB^T = u^T gy into gB's memory.
        gB = torch.empty((N, R), device=x.device, dtype=torch.float32)
        lora_reduce(u, gy, 1.0, gB.t())
        gB = gB.to(lora_B.dtype)
    if need_bias:
        gbias = gy.sum(0, dtype=torch.float32).to(gy.dtype)
    if need_weight:
        gweight = gy.t() @ x
    return gx, gA, gB, gbias, gweight
