"""Triton kernels of LoRA on a quantized frozen base (NF4 QLoRA, FP8): the frozen product either
with the dequantization inside its tile loop, or on the weight dequantized once per product.

The strategy is chosen per call by ``fastadapt.strategy.QLORA_DEQUANT``, a rule on the number of
rows M (``FASTADAPT_QLORA_DEQUANT`` forces one); both save the same tensors, so either backward
serves either forward.

``gemm`` (below 512 rows: decode, rollouts, where the product is bound by reading the weight and
reading 4 or 8 bits an element is the point): the weight is never dequantized to memory. Each K
step of ``_qlora_matmul_kernel`` loads the tile's codes (4-bit NF4, two per byte, or e4m3 bytes)
and their block scales, looks the codes up in the value table, multiplies in fp32 and rounds to the
compute dtype (exactly bitsandbytes' dequantization, ``fastadapt/reference/qlora.py``), then feeds
the tensor cores; the accumulator is seeded with the rank-r update as in ``_lora_matmul_kernel``.
The same kernel runs the forward ``y = x W^T + D(u B^T) + b`` and the backward ``gx = gy W + D(gu A)``:
only the order in which the weight's flat index is walked differs.

``once`` (from 512 rows up, training): ``_dequantize_kernel`` (the same tile code, so bit for bit
the same weight) writes the whole weight into a compute-dtype buffer, and the frozen products run
on it as ``lora_linear``'s do (cuBLAS plus the rank-r update added in place, or whatever
``FASTADAPT_LORA_GEMM`` chooses), in the forward and again in the backward's gx. The buffer is kept
and reused (:func:`dequantized`).

The low-rank products (``u``, ``gu``, ``gA``, ``gB``) are kernels/lora.py's, and so is the op's
structure (:func:`fastadapt.kernels.lora.forward`).

Codes and scales are gathered per element on the flat index ``n * K + k``, so any (N, K) and any
blocksize are served: a block may span rows. The per-element gathers hit a 64 B (NF4) or 1 KiB
(FP8) table and one scale per 64 elements, all L1-resident; their cost on a GPU is not measured.

FP8 goes through the same table lookup (its 256 byte values) rather than Triton's e4m3 type: one
code path for both formats, and it compiles for sm_80, where Triton has no fp8e4nv conversion.
(Triton 3.9's CPU interpreter does load fp8e4nv exactly, checked; whether the native conversion is
faster on sm_89+ is not measured.)
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from fastadapt.kernels import lora
from fastadapt.kernels.common import cast, dot_constexprs, fit_shared_memory, grouped_tile, mma, pow2_block
from fastadapt.strategy import QLORA_DEQUANT


@triton.jit
def dequantize_tile(data_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask,
                    blocksize, blocksize2, BITS: tl.constexpr, NESTED: tl.constexpr):
    """The fp32 weight values at int64 flat indices ``flat``: ``code[q] * absmax[flat // blocksize]``."""
    if BITS == 4:
        byte = tl.load(data_ptr + flat // 2, mask=mask, other=0)
        q = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # element 2j is byte j's high nibble
    else:
        q = tl.load(data_ptr + flat, mask=mask, other=0)
    value = tl.load(code_ptr + q.to(tl.int32), mask=mask, other=0.0)
    block = flat // blocksize
    if NESTED:
        # bnb's double quantization: the absmax is 8-bit, blockwise over blocksize2 absmax values.
        qa = tl.load(absmax_ptr + block, mask=mask, other=0)
        scale = (tl.load(code2_ptr + qa.to(tl.int32), mask=mask, other=0.0)
                 * tl.load(absmax2_ptr + block // blocksize2, mask=mask, other=0.0) + tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _qlora_matmul_kernel(
    x_ptr, data_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, u_ptr, v_ptr, bias_ptr, out_ptr,
    M, N, K, R, p, seed, M_BUCKET, blocksize, blocksize2,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    BITS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # out (M, N) = x (M, K) @ Wq + D(U @ V) + b, where Wq's element (k, n) is the quantized weight's
    # flat index k * stride_wk + n * stride_wn (forward: n * in_features + k; backward: the transpose).
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = lora.update_accumulator(u_ptr, v_ptr, rows, cols, M, N, R, p, seed, stride_um, stride_ur, stride_vr,
                                  stride_vn, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        xt, ks64, k_ok = lora.x_tile(x_ptr, rows, k0, M, K, stride_xm, stride_xk, BLOCK_K)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wt = dequantize_tile(data_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             ks64[:, None] * stride_wk + cols64[None, :] * stride_wn, w_mask, blocksize, blocksize2,
                             BITS, NESTED)
        # Rounded to the compute dtype before the product, as bnb's dequantize_4bit(..., dtype) is.
        acc = mma(xt, cast(wt, x_ptr.dtype.element_ty, UPCAST), acc, UPCAST, PRECISION)
    lora.store_output(acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, stride_on, HAS_BIAS, False, UPCAST)


@triton.jit
def _dequantize_kernel(data_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
                       blocksize, blocksize2, BITS: tl.constexpr, NESTED: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK: tl.constexpr):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    w = dequantize_tile(data_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask,
                        blocksize, blocksize2, BITS, NESTED)
    tl.store(out_ptr + flat, cast(w, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def _qlora_shared_bytes(cfg, named_args, kwargs):
    # Fitted over 15 sm_90 compiles of this kernel (Triton 3.9; fp32 / bf16, NF4, nested NF4, FP8;
    # 7 tile shapes) as an upper bound on each: per stage, 1.5 x the x tile (its layout conversion)
    # plus the gathered codes and scales, 4 bytes per weight element beyond its dequantized value
    # (8 with bnb's double-quantized absmax). E.g. bf16 128x128x32, 4 stages: NF4 139264 B
    # compiled (estimate 147456), nested 188416 (212992), FP8 131072 (147456).
    c = cfg.kwargs
    es = named_args["x_ptr"].element_size()
    extra = 8 if kwargs["NESTED"] else 4
    return cfg.num_stages * c["BLOCK_K"] * (3 * c["BLOCK_M"] * es // 2 + c["BLOCK_N"] * (es + extra))


_qlora_matmul_tuned = triton.autotune(
    configs=lora._matmul_configs(), key=["M_BUCKET", "N", "K", "R", "BITS", "NESTED"],
    prune_configs_by={"early_config_prune": fit_shared_memory(_qlora_shared_bytes)})(_qlora_matmul_kernel)


def _qweight_args(q):
    """The kernel's pointer arguments of a QuantizedWeight (absent nested parts point at absmax)."""
    nested = q.absmax2 is not None
    return (q.data, q.code, q.absmax, q.absmax2 if nested else q.absmax, q.code2 if nested else q.code,
            q.offset if nested else q.code), nested


def qlora_matmul(x, q, transposed: bool, u, v, bias, out, *, dropout_p: float = 0.0, seed: int = 0):
    """``out = x @ W^T + D(u @ v) + bias`` (``x @ W`` when ``transposed``) for x (M, K'), the
    quantized (N, K) weight ``q`` (a :class:`fastadapt.reference.qlora.QuantizedWeight`), u (M, R),
    v (R, N'), out (M, N')."""
    M, n_out = out.shape
    R = u.shape[1]
    n_rows, n_cols = q.shape
    # The logical (K', N') operand's strides over the weight's row-major flat index.
    stride_wk, stride_wn = (n_cols, 1) if transposed else (1, n_cols)
    pointers, nested = _qweight_args(q)
    args = (x, *pointers, u, v, bias.contiguous() if bias is not None else out, out,
            M, n_out, x.shape[1], R, dropout_p, seed, max(M, 1).bit_length(), q.blocksize, q.blocksize2,
            x.stride(0), x.stride(1), stride_wk, stride_wn, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1))
    meta = dict(BITS=q.bits, NESTED=nested, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0,
                BLOCK_R=pow2_block(R), **dot_constexprs(x.dtype))
    lora.launch_matmul(_qlora_matmul_kernel, _qlora_matmul_tuned, M, n_out, args, meta)
    return out


def dequantize(q, out):
    """The whole weight into ``out`` (N, K) with the kernels' own tile code: what the tests compare
    bit for bit with bitsandbytes' dequantization."""
    pointers, nested = _qweight_args(q)
    block = 1024
    _dequantize_kernel[(triton.cdiv(out.numel(), block),)](*pointers, out, out.numel(), q.blocksize, q.blocksize2,
                                                           BITS=q.bits, NESTED=nested, BLOCK=block,
                                                           UPCAST=dot_constexprs(out.dtype)["UPCAST"])
    return out


BUFFER_ENV = "FASTADAPT_QLORA_BUFFER"
_buffers = threading.local()


def dequantized(q, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight dequantized into a ``dtype`` buffer by :func:`dequantize`.

    The buffer is kept for the next call over a weight of as many elements in this dtype, on this
    device and CUDA stream, from this thread (``FASTADAPT_QLORA_BUFFER=keep``, the default): every
    QLoRA layer of a model shares one per size (a Llama's 4096 x 4096 and 4096 x 11008 / 11008 x 4096
    weights: two), forward on the caller's thread and backward on autograd's. Safe because a call
    uses it only between its dequantization and its GEMM, which the stream orders before the next
    call's dequantization; per thread and per stream, because calls from other threads or on
    other streams are not so ordered. ``FASTADAPT_QLORA_BUFFER=free`` allocates one per call instead
    (back to PyTorch's caching allocator after the product) and drops this thread's kept ones. A
    CUDA graph capture allocates per call too: its memory must come from the graph's own pool.
    """
    mode = os.environ.get(BUFFER_ENV, "keep") or "keep"
    if mode not in ("keep", "free"):
        raise ValueError(f"{BUFFER_ENV}={mode!r}: expected 'keep' or 'free'")
    device = q.data.device
    numel = q.shape[0] * q.shape[1]
    cuda = device.type == "cuda"
    if mode == "free" or (cuda and torch.cuda.is_current_stream_capturing()):
        if mode == "free":
            vars(_buffers).clear()
        buffer = torch.empty(numel, device=device, dtype=dtype)
    else:
        key = (device, torch.cuda.current_stream(device).stream_id if cuda else None, dtype, numel)
        buffer = vars(_buffers).get(key)
        if buffer is None:
            buffer = vars(_buffers)[key] = torch.empty(numel, device=device, dtype=dtype)
    return dequantize(q, buffer.view(q.shape))


class _Frozen:
    """The quantized weight as kernels/lora.py's frozen operand (see its ``_frozen_plus_update``):
    the GEMM dequantizes in its tile loop, or the weight is dequantized once for LoRA's path,
    as ``QLORA_DEQUANT`` chooses for the call's rows."""

    def __init__(self, q):
        self.q = q

    def frozen_plus_update(self, x, transposed, u, v, bias, out, *, dropout_p=0.0, seed=0):
        if QLORA_DEQUANT.choose(x.shape[0]) == "once":
            return lora._frozen_plus_update(x, dequantized(self.q, x.dtype), transposed, u, v, bias, out,
                                            dropout_p=dropout_p, seed=seed)
        return qlora_matmul(x, self.q, transposed, u, v, bias, out, dropout_p=dropout_p, seed=seed)


def forward(x, q, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    """Fused forward for 2-D x (M, K): (y (M, N), u (M, r))."""
    return lora.forward(x, _Frozen(q), lora_A, lora_B, scaling, bias, dropout_p, seed, ranks, ranks_p)


def backward(gy, x, q, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None, ranks_p=None):
    """Fused backward: (gx, gA, gB, gbias), ``None`` where ``needs`` says not needed."""
    return lora.backward(gy, x, _Frozen(q), lora_A, lora_B, u, scaling, dropout_p, seed, (*needs, False), ranks,
                         ranks_p)[:4]
