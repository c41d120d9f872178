"""Pieces every Triton kernel of fastadapt shares: the dot-product wrapper, the dropout draw, and
the launch-time choices (precision, interpreter) that the kernels take as constexprs."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastadapt.backends import triton_interpret


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    UPCAST is set only under the CPU interpreter, which stores bfloat16 as raw uint16 and would
    multiply bit patterns; products of two bf16 (or fp16) values are exact in fp32, so the upcast
    computes the same numbers the tensor cores do.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even.

    Triton 3.9's CPU interpreter truncates fp32 -> bfloat16 (and ignores ``fp_downcast_rounding``):
    measured, the truncation's bias doubled every bf16 error in the tests (prefix attention dV:
    6.6e-3 against PyTorch's 3e-3). Under the interpreter (UPCAST) the fp32 bits are rounded first,
    so that the truncation is exact; compiled kernels already round to nearest even, and there
    this branch compiles away.
    """
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program over an (M, N) output in the grouped launch order of the
    Triton matmul tutorial: GROUP_M row blocks run together and share their columns of W in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % group_size, (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def dropout_scale(seed, rows, cols, n_cols, p):
    """``1/(1-p)`` where element (row, col) of an (., n_cols) tensor is kept, else 0.

    The draw is Philox on the element's flat int64 index, so the forward and the backward (and
    any tile shape) regenerate the same mask from ``seed`` without storing it.
    """
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    # p may be a float64 table entry (multi-LoRA): the threshold in float32 as for a scalar p, the
    # scale from p unrounded.
    keep = tl.rand(seed, offsets) >= tl.cast(p, tl.float32)
    return tl.where(keep, tl.cast(1.0 / (1.0 - p), tl.float32), 0.0)


@triton.jit
def down_acc(acc, x_ptr, v_ptr, rows64, row_ok, rcols, r_ok, C, seed, p,
             stride_xm, stride_xc, stride_vc, stride_vr,
             DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr):
    """``acc + D(X[rows, :C]) @ V[:C, rcols]``: the skinny product of a LoRA down-projection, X read
    once, the dropout of X (p, over an (., C) tensor) drawn in-register."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xc,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            # Rounded back to the input dtype before the product, as eager dropout(x) would be.
            xt = cast(xt.to(tl.float32) * dropout_scale(seed, rows64, cols, C, p), x_ptr.dtype.element_ty, UPCAST)
        vt = tl.load(v_ptr + cols[:, None].to(tl.int64) * stride_vc + rcols[None, :] * stride_vr,
                     mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        acc = mma(xt, vt, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def lowrank_acc(acc, u_ptr, v_ptr, rows64, row_ok, cols64, col_ok, R,
                stride_um, stride_ur, stride_vr, stride_vn,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + U[rows, :R] @ V[:R, cols]``: a rank-R update of an output tile."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        ut = tl.load(u_ptr + rows64[:, None] * stride_um + rr[None, :] * stride_ur,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + rr[:, None] * stride_vr + cols64[None, :] * stride_vn,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(ut, vt, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _dropout_kernel(x_ptr, out_ptr, M, N, p, seed, stride_xm, stride_xn, stride_om, stride_on,
                    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    value = tl.load(x_ptr + rows64[:, None] * stride_xm + cols64[None, :] * stride_xn, mask=mask,
                    other=0.0).to(tl.float32) * dropout_scale(seed, rows, cols, N, p)
    out = out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on
    if ACCUMULATE:
        value += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, cast(value, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None,
            accumulate: bool = False) -> torch.Tensor:
    """``out = D(x)`` (``out += D(x)`` with ``accumulate``) for 2-D x and out (any strides), with the
    mask :func:`dropout_scale` draws over x's (M, N), rounded once to out's dtype: the very operand
    the kernels that drop in-register feed their products, for cuBLAS to take instead."""
    M, N = x.shape
    out = torch.empty_like(x) if out is None else out
    block = 32 if triton_interpret() else 64
    _dropout_kernel[(triton.cdiv(M, block), triton.cdiv(N, block))](
        x, out, M, N, p, seed, x.stride(0), x.stride(1), out.stride(0), out.stride(1), ACCUMULATE=accumulate,
        UPCAST=dot_constexprs(out.dtype)["UPCAST"], BLOCK_M=block, BLOCK_N=block)
    return out


def dropout_keep(seed: int, shape, p: float, device) -> torch.Tensor:
    """The mask :func:`dropout_scale` draws over an (M, N) tensor (True = kept), so that tests can
    hand the reference the very mask the Triton kernels used."""
    return dropout(torch.ones(shape, device=device), p, seed) != 0


def dot_constexprs(dtype: torch.dtype) -> dict:
    """UPCAST / PRECISION for :func:`mma`: fp32 inputs follow torch's matmul precision setting
    (``torch.set_float32_matmul_precision``), as cuBLAS does for ``torch.mm``."""
    if dtype == torch.float32:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "tf32"  # Triton's default; only fp32 operands read it
    return {"UPCAST": triton_interpret() and dtype != torch.float32, "PRECISION": precision}


def pow2_block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two block for a dimension of size n, in [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def split_rows(M: int, tiles: int, block_m: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, rows per split) of a reduction over M rows whose output has ``tiles`` tiles:
    ``splits`` if given, else enough programs to fill the GPU, 1 on the CPU or when deterministic
    algorithms are requested (more than one split accumulates with atomics)."""
    if splits is None:
        if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
            splits = 1
        else:
            splits = max(1, min(triton.cdiv(M, block_m), 4 * sm_count(device.index or 0) // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(max(M, 1), splits), block_m) * block_m
    return triton.cdiv(max(M, 1), rows_per_split), rows_per_split


def reduce_blocks(M: int, R: int, C: int, device: torch.device, splits: int | None = None):
    """(BLOCK_R, BLOCK_C, BLOCK_M, rows per split) of a product that reduces M rows into an (R, C)
    output: the rows are split across programs per output tile as :func:`split_rows` chooses."""
    block_r = pow2_block(R)
    block_c, block_m = (32, 32) if triton_interpret() else (64, 64)
    tiles = triton.cdiv(C, block_c) * triton.cdiv(R, block_r)
    return block_r, block_c, block_m, split_rows(M, tiles, block_m, device, splits)[1]


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fit_shared_memory(size):
    """An autotune ``early_config_prune`` keeping the configs for which ``size(config, named_args,
    kwargs)`` (bytes of shared memory, estimated) fits the device (the smallest one if none does):
    a config past the limit would be compiled at tuning time only to fail at launch."""
    def prune(configs, named_args, **kwargs):
        device = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
        limit = shared_memory_limit(device)
        fits = [c for c in configs if size(c, named_args, kwargs) <= limit]
        return fits or [min(configs, key=lambda c: size(c, named_args, kwargs))]
    return prune


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA device: what Triton checks a compiled
    kernel's ``metadata.shared`` against at launch (OutOfResources past it)."""
    return _shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory_limit(device_index: int) -> int:
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
