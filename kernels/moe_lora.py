"""Triton backend of the MoE experts with per-expert LoRA (math: fastadapt/reference/moe_lora.py).

The (token, slot) pairs are grouped by expert on the device with no host synchronisation, by the
multi-LoRA machinery (``kernels/multi_lora.py``: :func:`group_rows` sorts them, :class:`Batch`
tiles each expert's rows), and each token's row is gathered once into grouped order (``xs``, the
grouped products' input, as transformers' ``grouped_mm`` experts do). Then, per projection:

* the frozen grouped product in ``torch._grouped_mm`` (cuBLAS / CUTLASS grouped GEMM) wherever it
  takes the operands (bfloat16 on CUDA, 16-byte aligned), else in :func:`_grouped_gemm_kernel`, a
  Triton grouped GEMM over the expert tiles (any dtype, any strides): the cuBLAS-first rule of
  DESIGN.md (cuBLAS 709 against a plain Triton GEMM's 518 TFLOP/s on an H100; unsloth's "split
  LoRA", base and LoRA as separate grouped products, ~2x over transformers' grouped_mm). Which
  one runs: ``fastadapt/strategy.py`` (``MOE_GEMM``);
* the LoRA terms by the multi-LoRA kernels with the expert as the adapter: ``u = s D(rows) A_e^T``
  (dropout drawn in-register), then ``+= u B_e^T`` in place on the frozen product; in the
  backward, ``gu = s g B_e``, ``+= D(gu A_e)`` on the frozen product's input gradient, and the
  per-expert reductions ``gA_e = gu^T D(rows)``, ``gB_e = g^T u`` (an expert with no row gets no
  program: its gradient stays exactly zero);
* the activation and its gradient in one pass each (:func:`_activation_kernel`, float32 inside,
  one rounding).

The routing's two ends are one pass each: :func:`_combine_kernel` sums each token's k expert
outputs times their weights in float32 (and the input gradients of its k pairs in the backward),
deterministically (no atomics); :func:`_route_backward_kernel` reads each pair's output gradient
row once for both the routing weight's gradient ``<gy_t, d_p>`` and ``gd_p = w_p gy_t``.
Block sizes are fixed, not tuned (no GPU measured them yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastadapt import strategy
from fastadapt.backends import triton_interpret
from fastadapt.kernels.common import cast, dot_constexprs, lowrank_acc
from fastadapt.kernels.multi_lora import Batch, _tile, group_rows, multi_down, multi_reduce, multi_update


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, table_ptr, perm_ptr,
    N, K,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[rows] = a[rows] @ w[e] (+ bias[e]) for the rows of one expert e (this program's tile).
    e, rows, row_ok, live = _tile(table_ptr, perm_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    acc = lowrank_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, w_ptr + e * stride_we, rows, row_ok,
                      cols64, col_ok, tl.where(live, K, 0), stride_am, stride_ak, stride_wk, stride_wn, UPCAST,
                      PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_be + cols64 * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols64[None, :] * stride_on,
             cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    src_ptr, w_ptr, inv_ptr, out_ptr,
    T, N, k,
    stride_sm, stride_sn, stride_wt, stride_wk, stride_ot, stride_on,
    WEIGHTED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[t] = sum_j w[t, j] * src[inv[t k + j]] (w = 1 unless WEIGHTED), in float32.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < T
    cols64 = cols.to(tl.int64)
    mask = t_ok[:, None] & (cols < N)[None, :]
    t64 = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, k):
        p = tl.load(inv_ptr + t64 * k + j, mask=t_ok, other=0)
        v = tl.load(src_ptr + p[:, None] * stride_sm + cols64[None, :] * stride_sn, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            v *= tl.load(w_ptr + t64 * stride_wt + j * stride_wk, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + t64[:, None] * stride_ot + cols64[None, :] * stride_on, cast(acc, out_ptr.dtype.element_ty,
             UPCAST), mask=mask)


@triton.jit
def _route_backward_kernel(
    gy_ptr, d_ptr, w_ptr, order_ptr, gd_ptr, gw_ptr,
    S, N, k,
    stride_gt, stride_gn, stride_dm, stride_dn, stride_wt, stride_wk, stride_om, stride_on,
    NEED_W: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # For grouped rows p (pair order[p], token t): gd[p] = w[pair] gy[t]; gw[pair] = <gy[t], d[p]>.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < S
    p64 = p.to(tl.int64)
    pair = tl.load(order_ptr + p64, mask=p_ok, other=0)
    t = pair // k
    w = tl.load(w_ptr + t * stride_wt + (pair % k) * stride_wk, mask=p_ok, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)
        mask = p_ok[:, None] & (cols < N)[None, :]
        gy = tl.load(gy_ptr + t[:, None] * stride_gt + cols64[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        tl.store(gd_ptr + p64[:, None] * stride_om + cols64[None, :] * stride_on,
                 cast(gy * w[:, None], gd_ptr.dtype.element_ty, UPCAST), mask=mask)
        if NEED_W:
            d = tl.load(d_ptr + p64[:, None] * stride_dm + cols64[None, :] * stride_dn, mask=mask,
                        other=0.0).to(tl.float32)
            dot += tl.sum(gy * d, axis=1)
    if NEED_W:
        tl.store(gw_ptr + pair, dot, mask=p_ok)


@triton.jit
def _activation_kernel(
    g_ptr, gh_ptr, out_ptr,
    S, I, alpha, limit,
    stride_gm, stride_gn, stride_hm, stride_hn, stride_om, stride_on,
    GPT_OSS: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Forward: out (S, I) = act(g) for g (S, 2I). Backward: out (S, 2I) = the gradient of g from
    # gh (S, I). One read of g (and gh), one write, in float32; the clamps' NaN and zero-gradient
    # rules of torch.clamp (fastadapt/reference/moe_lora.py).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < S)[:, None] & (cols < I)[None, :]
    if GPT_OSS:  # interleaved gate / up columns
        gate_cols, up_cols = 2 * cols, 2 * cols + 1
    else:  # [gate; up]
        gate_cols, up_cols = cols, I + cols
    g_rows = g_ptr + rows[:, None] * stride_gm
    gate = tl.load(g_rows + gate_cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(g_rows + up_cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
    if GPT_OSS:
        gc = tl.where(gate > limit, limit, gate)  # NaN stays NaN, as torch.clamp
        uc = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        sig = 1.0 / (1.0 + tl.exp(-alpha * gc))
    else:
        sig = 1.0 / (1.0 + tl.exp(-gate))
    if BACKWARD:
        d = tl.load(gh_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn, mask=mask,
                    other=0.0).to(tl.float32)
        if GPT_OSS:
            dgate = tl.where(gate <= limit, d * (uc + 1.0) * (sig + gc * alpha * sig * (1.0 - sig)), 0.0)
            dup = tl.where((up >= -limit) & (up <= limit), d * (gc * sig), 0.0)
        else:
            dgate = d * up * (sig * (1.0 + gate * (1.0 - sig)))
            dup = d * (gate * sig)
        out_rows = out_ptr + rows[:, None] * stride_om
        tl.store(out_rows + gate_cols[None, :] * stride_on, cast(dgate, out_ptr.dtype.element_ty, UPCAST), mask=mask)
        tl.store(out_rows + up_cols[None, :] * stride_on, cast(dup, out_ptr.dtype.element_ty, UPCAST), mask=mask)
    else:
        if GPT_OSS:
            h = (uc + 1.0) * (gc * sig)
        else:
            h = gate * sig * up
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 cast(h, out_ptr.dtype.element_ty, UPCAST), mask=mask)


class Routing:
    """The routing of one call as the kernels read it, built once per forward or backward call:
    the pairs grouped by expert (``order``, (S,) pair index per grouped row, and ``bounds``), each
    grouped row's token, the inverse permutation (``inv``: grouped row of each pair) and the
    ``torch._grouped_mm`` offsets. ``top_k_index`` may be strided or expanded: its flat copy is
    made here, once."""

    def __init__(self, top_k_index: torch.Tensor, n_experts: int):
        self.T, self.k = top_k_index.shape
        self.S, self.E = self.T * self.k, n_experts
        ids = top_k_index.reshape(-1)
        self.order, self.bounds = group_rows(ids, n_experts)
        self.expert = ids[self.order]
        self.token = self.order // self.k
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(self.S, device=ids.device)
        self.offs = self.bounds[1:].to(torch.int32)
        self.tiles = Batch.grouped(self.bounds, self.S)  # the expert tiles of the frozen Triton GEMM

    def lora(self, A: torch.Tensor | None, scaling: float, dropout_p: float) -> Batch | None:
        """The multi-LoRA batch of one projection's LoRA over the grouped rows (None without it)."""
        if A is None:
            return None
        device = self.bounds.device
        full = (lambda value, dtype: torch.full((self.E,), value, device=device, dtype=dtype))
        return Batch.grouped(self.bounds, self.S, full(scaling, torch.float32), full(A.shape[1], torch.int32),
                             full(dropout_p, torch.float64) if dropout_p > 0.0 else None)


def _row_block() -> int:
    return 32 if triton_interpret() else 64


def grouped_product(a: torch.Tensor, w: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None):
    """(S, N): grouped row p of ``a`` (S, K) times ``w[e(p)]`` (E, K, N) (any strides), plus
    ``bias[e(p)]`` (E, N) if given."""
    N = w.shape[2]
    if strategy.MOE_GEMM.choose(a, w) == "grouped_mm":
        out = torch._grouped_mm(a, w, offs=routing.offs)
        return out if bias is None else out.add_(bias.index_select(0, routing.expert))
    out = torch.empty(a.shape[0], N, device=a.device, dtype=a.dtype)
    block_m = _row_block()
    block_n = 32 if triton_interpret() else 128
    tiles = routing.tiles
    _grouped_gemm_kernel[(tiles.entries(block_m), triton.cdiv(N, block_n))](
        a, w, bias if bias is not None else a, out, tiles.table(block_m), tiles.perm, N, a.shape[1],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        *(bias.stride() if bias is not None else (0, 0)), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32 if triton_interpret() else 64,
        **dot_constexprs(a.dtype))
    return out


def combine(src: torch.Tensor, routing: Routing, out: torch.Tensor, weights: torch.Tensor | None = None):
    """``out[t] = sum_j weights[t, j] * src[grouped row of (t, j)]`` (weights 1 if None), float32 sums."""
    block_t, block_n = 16, 32 if triton_interpret() else 128
    N = out.shape[1]
    _combine_kernel[(triton.cdiv(routing.T, block_t), triton.cdiv(N, block_n))](
        src, weights if weights is not None else src, routing.inv, out, routing.T, N, routing.k,
        src.stride(0), src.stride(1), *(weights.stride() if weights is not None else (0, 0)), out.stride(0),
        out.stride(1), WEIGHTED=weights is not None, UPCAST=dot_constexprs(out.dtype)["UPCAST"], BLOCK_T=block_t,
        BLOCK_N=block_n)
    return out


def _activation(g: torch.Tensor, kind: str, alpha: float, limit: float, gh: torch.Tensor | None = None):
    """``act(g)`` (S, I) for g (S, 2I), or with ``gh`` (S, I) the gradient of g (S, 2I): one pass,
    float32 inside, rounded once to g's dtype (:func:`fastadapt.reference.moe_lora.activation_wide`
    and ``activation_backward``)."""
    S, I = g.shape[0], g.shape[1] // 2
    out = torch.empty((S, 2 * I) if gh is not None else (S, I), device=g.device, dtype=g.dtype)
    block_m, block_n = (16, 32) if triton_interpret() else (32, 128)
    _activation_kernel[(triton.cdiv(S, block_m), triton.cdiv(I, block_n))](
        g, gh if gh is not None else g, out, S, I, alpha, limit, g.stride(0), g.stride(1),
        *(gh.stride() if gh is not None else (0, 0)), out.stride(0), out.stride(1), GPT_OSS=kind == "gpt_oss",
        BACKWARD=gh is not None, UPCAST=dot_constexprs(g.dtype)["UPCAST"], BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def forward(x, top_k_index, top_k_weights, gate_up_proj, gate_up_bias, down_proj, down_bias, gate_up_A, gate_up_B,
            gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit, dropout_p, seed):
    """Fused forward: (out (T, H), g (S, 2I), u1 (S, r1), u2 (S, r2), d (S, H)), grouped rows."""
    T, H = x.shape
    S = top_k_index.numel()
    new = (lambda *shape: torch.empty(shape, device=x.device, dtype=x.dtype))
    rank = (lambda A: 0 if A is None else A.shape[1])
    u1, u2 = x.new_zeros(S, rank(gate_up_A)), x.new_zeros(S, rank(down_A))
    if S == 0:
        return new(T, H), new(0, gate_up_proj.shape[1]), u1, u2, new(0, H)
    routing = Routing(top_k_index, gate_up_proj.shape[0])
    xs = x[routing.token]
    g = grouped_product(xs, gate_up_proj.transpose(1, 2), routing, gate_up_bias)
    lora1 = routing.lora(gate_up_A, gate_up_scaling, dropout_p)
    if lora1 is not None:
        multi_down(xs, gate_up_A.transpose(1, 2), lora1, u1, dropout=True, seed=seed)
        multi_update(u1, gate_up_B.transpose(1, 2), lora1, g)
    h = _activation(g, activation, alpha, limit)
    d = grouped_product(h, down_proj.transpose(1, 2), routing, down_bias)
    lora2 = routing.lora(down_A, down_scaling, dropout_p)
    if lora2 is not None:
        multi_down(h, down_A.transpose(1, 2), lora2, u2, dropout=True, seed=seed + 1)
        multi_update(u2, down_B.transpose(1, 2), lora2, d)
    return combine(d, routing, new(T, H), top_k_weights), g, u1, u2, d


def _reduced(pm, rows, batch, like, transposed=False, **dropout):
    """The per-expert reduction ``pm^T D(rows)`` (E, r, C) float32 (written as (E, C, r) if
    ``transposed``), in ``like``'s dtype."""
    E, r = like.shape[0], pm.shape[1]
    C = rows.shape[1]
    out = torch.empty((E, C, r) if transposed else (E, r, C), device=rows.device, dtype=torch.float32)
    multi_reduce(pm, rows, batch, out.transpose(1, 2) if transposed else out, **dropout)
    return out.to(like.dtype)


def backward(gout, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_A, gate_up_B, gate_up_scaling,
             down_A, down_B, down_scaling, activation, alpha, limit, dropout_p, seed, g, u1, u2, d, needs):
    """Fused backward: (gx, gweights, g gate_up_A, g gate_up_B, g down_A, g down_B), None where not needed."""
    need_x, need_w, need_A1, need_B1, need_A2, need_B2 = needs
    T, H = x.shape
    S = top_k_index.numel()
    gx = gw = gA1 = gB1 = gA2 = gB2 = None
    if S == 0:
        zeros = (lambda t, need: torch.zeros_like(t) if need else None)
        return (zeros(x, need_x), zeros(top_k_weights, need_w), zeros(gate_up_A, need_A1), zeros(gate_up_B, need_B1),
                zeros(down_A, need_A2), zeros(down_B, need_B2))
    routing = Routing(top_k_index, gate_up_proj.shape[0])
    gd = torch.empty(S, H, device=x.device, dtype=x.dtype)
    gw_flat = torch.empty(S, device=x.device, dtype=torch.float32) if need_w else None
    _route_backward_kernel[(triton.cdiv(S, 16),)](
        gout, d, top_k_weights, routing.order, gd, gw_flat if need_w else gd, S, H, routing.k,
        gout.stride(0), gout.stride(1), d.stride(0), d.stride(1), top_k_weights.stride(0), top_k_weights.stride(1),
        gd.stride(0), gd.stride(1), NEED_W=need_w, UPCAST=dot_constexprs(x.dtype)["UPCAST"], BLOCK_P=16,
        BLOCK_N=32 if triton_interpret() else 128)
    if need_w:
        gw = gw_flat.view(T, routing.k).to(top_k_weights.dtype)
    lora1 = routing.lora(gate_up_A, gate_up_scaling, dropout_p)
    lora2 = routing.lora(down_A, down_scaling, dropout_p)
    if lora2 is not None and (need_A2 or need_B2 or need_x or need_A1 or need_B1):
        gu2 = torch.zeros_like(u2)
        multi_down(gd, down_B, lora2, gu2)
        if need_A2:
            gA2 = _reduced(gu2, _activation(g, activation, alpha, limit), lora2, down_A, dropout=True,
                           seed=seed + 1)
        if need_B2:
            gB2 = _reduced(u2, gd, lora2, down_B, transposed=True)
    if not (need_x or need_A1 or need_B1):
        return gx, gw, gA1, gB1, gA2, gB2
    gh = grouped_product(gd, down_proj, routing)
    if lora2 is not None:
        multi_update(gu2, down_A, lora2, gh, dropout=True, seed=seed + 1)
    gg = _activation(g, activation, alpha, limit, gh)
    del gh
    gu1 = None
    if lora1 is not None:
        gu1 = torch.zeros_like(u1)
        multi_down(gg, gate_up_B, lora1, gu1)
        if need_A1:
            gA1 = _reduced(gu1, x[routing.token], lora1, gate_up_A, dropout=True, seed=seed)
        if need_B1:
            gB1 = _reduced(u1, gg, lora1, gate_up_B, transposed=True)
    if need_x:
        gxs = grouped_product(gg, gate_up_proj, routing)
        if lora1 is not None:
            multi_update(gu1, gate_up_A, lora1, gxs, dropout=True, seed=seed)
        gx = combine(gxs, routing, torch.empty_like(x, memory_format=torch.contiguous_format))
    return gx, gw, gA1, gB1, gA2, gB2
