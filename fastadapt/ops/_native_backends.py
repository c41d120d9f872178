"""The ``cpp`` (C++ CPU) and ``cuda`` backends: dispatch registrations of the kernels in csrc/.

The kernels are ops of the extension ``fastadapt._C`` (``torch.ops.fastadapt_C.*``, each registered
by its csrc/OP.cpp) with the same signatures as the Triton backends. Registering them costs nothing:
the extension is built or loaded only when dispatch first asks one of these backends whether it
can serve (:func:`fastadapt.backends.native_status`).
"""

from __future__ import annotations

import torch

from fastadapt import _native, dispatch
from fastadapt.backends import device_reasons, dtype_reasons


def _native_reasons(backend: str, device) -> list[str]:
    reasons = device_reasons(backend, device)
    if not reasons and backend == "cuda" and not _native.has_cuda():
        reasons.append(_native.cuda_reason())
    return reasons


def dropout_keep(seed: int, shape, p: float, device) -> torch.Tensor:
    """The mask (True = kept) the native kernels draw from ``seed`` for a 2-D input of ``shape``."""
    like = torch.empty(shape, device=device, dtype=torch.int8)
    return _native.ops().dropout_keep(like, p, seed)


# --- LoRA linear (csrc/lora.cpp, csrc/lora_cuda.cu) ---


def _lora_why_not(backend):
    def why_not(x, weight, lora_A, lora_B, bias, segmented=False):
        reasons = _native_reasons(backend, x.device) + dtype_reasons(x.dtype)
        if len({t.dtype for t in (x, weight, lora_A, lora_B, bias) if t is not None}) > 1:
            reasons.append("x, weight, lora_A, lora_B and bias must share one dtype")
        if segmented and backend == "cuda":
            reasons.append("several adapters with dropout (one mask each): the CUDA kernels draw one mask per call")
        return reasons
    return why_not


def _lora_forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    if segments is not None:
        return _native.ops().lora_segments_forward(x2d, weight, lora_A, lora_B, scaling, bias, segments, segment_p,
                                                   seed)
    return _native.ops().lora_forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


def _lora_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, segments=None,
                   segment_p=None):
    needs = [bool(n) for n in needs]
    if segments is not None:
        grads = _native.ops().lora_segments_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, segments, segment_p,
                                                     seed, needs)
    else:
        grads = _native.ops().lora_backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# Where the cpp kernels stop beating eager PyTorch (oneDNN/MKL GEMMs), fwd+bwd, r=16, measured on
# this 2-core x86 CI-class machine at 1 thread (`python benchmarks/cpu_crossover.py`), as eager/cpp:
# fp32 0.66 at M=128 64x64, 0.90 at M=128 512x512, 0.93 at M=1024 64x64, 1.04 at M=2048 64x64,
# 1.01 at M=512 256x256, 1.06 at M=256 512x512, 1.18 at M=1024 512x512; bf16 0.86 at M=256
# 512x512, 0.88 at M=1024 128x128, 1.09 at M=2048 128x128, 1.26 at M=1024 512x512. Below the
# line the per-call overhead (~60 us: autograd, checks, dispatch) outweighs what fusing saves.
CPP_LORA_CROSSOVER = {torch.float32: (256, 2**23), torch.float16: (512, 2**27), torch.bfloat16: (512, 2**27)}


def _cpp_lora_slower(x, weight, lora_A, lora_B, bias, segmented=False):
    """below M = 256 rows or M*K*N = 2^23 multiply-adds in float32 (512 rows, 2^27 in float16/bfloat16):
    eager PyTorch is faster there (measured: fastadapt/ops/_native_backends.py)"""
    rows = x.shape[:-1].numel()
    min_rows, min_work = CPP_LORA_CROSSOVER[x.dtype]
    if rows < min_rows or rows * weight.shape[0] * weight.shape[1] < min_work:
        return (f"M={rows}, {weight.shape[1]}->{weight.shape[0]} is below the cpp crossover "
                f"(M >= {min_rows} and M*K*N >= 2^{min_work.bit_length() - 1} in {x.dtype}): eager PyTorch is faster")
    return None


for _backend in ("cuda", "cpp"):
    dispatch.register("lora_linear", _backend, why_not=_lora_why_not(_backend), forward=_lora_forward,
                      backward=_lora_backward, slower=_cpp_lora_slower if _backend == "cpp" else None)


# --- DoRA linear (csrc/dora.cpp; no CUDA kernel: on CUDA the Triton backend or the reference serves) ---


def _dora_why_not(x, weight, lora_A, lora_B, magnitude, bias):
    reasons = _lora_why_not("cpp")(x, weight, lora_A, lora_B, bias)
    if magnitude.dtype != torch.float32:
        reasons.append(f"magnitude must be float32, got {magnitude.dtype}")
    return reasons


def _dora_backward(gy, x2d, weight, lora_A, lora_B, magnitude, u, pre, norm, scaling, dropout_p, seed, needs):
    needs = [bool(n) for n in needs]
    grads = _native.ops().dora_backward(gy, x2d, weight, lora_A, lora_B, magnitude, u, pre, norm, scaling, dropout_p,
                                        seed, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _dora_forward(x2d, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed):
    return _native.ops().dora_forward(x2d, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, seed)


dispatch.register("dora_linear", "cpp", why_not=_dora_why_not, forward=_dora_forward, backward=_dora_backward)


# --- Multi-adapter LoRA linear (csrc/multi_lora.cpp; no CUDA kernel: Triton serves CUDA) ---


def _multi_lora_why_not(x, weight, A_stack, B_stack, bias):
    reasons = _native_reasons("cpp", x.device) + dtype_reasons(x.dtype)
    if len({t.dtype for t in (x, weight, A_stack, B_stack, bias) if t is not None}) > 1:
        reasons.append("x, weight, A_stack, B_stack and bias must share one dtype")
    return reasons


def _multi_lora_forward(*args):
    y, u = _native.ops().multi_lora_forward(*args)
    return y, u


def _multi_lora_backward(*args):
    needs = [bool(n) for n in args[-1]]
    grads = _native.ops().multi_lora_backward(*args[:-1], needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


dispatch.register("multi_lora_linear", "cpp", why_not=_multi_lora_why_not, forward=_multi_lora_forward,
                  backward=_multi_lora_backward)


# --- LoRA on a quantized base (csrc/qlora.cpp; CPU only) ---


def _qlora_weight_args(q):
    return (q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits)


# Several adapters with their own dropout (rank segments): the LoRA kernels' segmented form on the
# dequantized weight, which is what qlora_forward/backward do with one segment.
def _qlora_forward(x2d, q, lora_A, lora_B, scaling, bias, dropout_p, seed, segments=None, segment_p=None):
    if segments is not None:
        return _lora_forward(x2d, qlora_dequantize(q, x2d.dtype), lora_A, lora_B, scaling, bias, 0.0, seed, segments,
                             segment_p)
    return _native.ops().qlora_forward(x2d, *_qlora_weight_args(q), q.shape[0], lora_A, lora_B, scaling, bias,
                                       dropout_p, seed)


def _qlora_backward(gy, x2d, q, lora_A, lora_B, u, scaling, dropout_p, seed, needs, segments=None, segment_p=None):
    needs = [bool(n) for n in needs]
    if segments is not None:
        return _lora_backward(gy, x2d, qlora_dequantize(q, x2d.dtype), lora_A, lora_B, u, scaling, 0.0, seed,
                              [*needs, False], segments, segment_p)[:4]
    grads = _native.ops().qlora_backward(gy, x2d, *_qlora_weight_args(q), lora_A, lora_B, u, scaling, dropout_p,
                                         seed, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def qlora_dequantize(q, dtype: torch.dtype) -> torch.Tensor:
    """The cpp backend's dequantized (N, K) weight, for the tests."""
    return _native.ops().qlora_dequantize(*_qlora_weight_args(q), *q.shape, dtype)


def _qlora_why_not(x, lora_A, lora_B, bias):
    reasons = _native_reasons("cpp", x.device) + dtype_reasons(x.dtype)
    if len({t.dtype for t in (x, lora_A, lora_B, bias) if t is not None}) > 1:
        reasons.append("x, lora_A, lora_B and bias must share one dtype")
    return reasons


dispatch.register("qlora_linear", "cpp", why_not=_qlora_why_not, forward=_qlora_forward, backward=_qlora_backward)


# --- Bottleneck adapter (csrc/bottleneck.cpp, csrc/bottleneck_cuda.cu) ---


def _bottleneck_why_not(backend):
    def why_not(z, down_weight, up_weight):
        reasons = _native_reasons(backend, z.device) + dtype_reasons(z.dtype)
        if len({z.dtype, down_weight.dtype, up_weight.dtype}) > 1:
            reasons.append("z and the adapter weights must share one dtype")
        return reasons
    return why_not


def _bottleneck_forward(*args):
    out, h, stats = _native.ops().bottleneck_forward(*args)
    return out, h, stats


def _bottleneck_backward(*args):
    needs = [bool(n) for n in args[-1]]
    grads = _native.ops().bottleneck_backward(*args[:-1], needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


for _backend in ("cuda", "cpp"):
    dispatch.register("bottleneck_adapter", _backend, why_not=_bottleneck_why_not(_backend),
                      forward=_bottleneck_forward, backward=_bottleneck_backward)


# --- Gated prefix attention / prefix tuning (csrc/prefix_attention.cpp, csrc/prefix_attention_cuda.cu) ---

MAX_CUDA_HEAD_DIM = 256  # the CUDA kernel spreads a head over one warp's registers, 8 per lane


def _prefix_why_not(backend):
    def why_not(q, k, v, k_p, v_p, key_padding_mask):
        reasons = _native_reasons(backend, q.device) + dtype_reasons(q.dtype)
        if backend == "cuda" and q.shape[-1] > MAX_CUDA_HEAD_DIM:
            reasons.append(f"head dim {q.shape[-1]} > {MAX_CUDA_HEAD_DIM}")
        if len({t.dtype for t in (q, k, v, k_p, v_p)}) > 1:
            reasons.append("q, k, v, prefix_k and prefix_v must share one dtype")
        return reasons
    return why_not


def _prefix_forward(*args):
    out, stats, stats_p = _native.ops().prefix_attention_forward(*args)
    return out, stats, stats_p


def _prefix_backward(*args):
    needs = [bool(n) for n in args[-1]]
    grads = _native.ops().prefix_attention_backward(*args[:-1], needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


for _backend in ("cuda", "cpp"):
    dispatch.register("prefix_attention", _backend, why_not=_prefix_why_not(_backend), forward=_prefix_forward,
                      backward=_prefix_backward,
                      nondeterministic="the backward sums dK, dV over queries with fp32 atomics"
                      if _backend == "cuda" else None)
