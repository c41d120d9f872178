"""Gated prefix attention (LLaMA-Adapter) and prefix tuning as a ``torch.library`` custom op with
autograd, and its backends.

``fastadapt::prefix_attention`` returns ``(out, stats, stats_p)``: the forward saves only the
output and, per softmax, the row max and row sum of the base-2 scores, (B, H, Sq, 2) fp32
(``stats_p`` is empty in joint mode), as flash-attention saves its logsumexp; the prefix part of
the output is recomputed from ``stats_p`` in the backward (L keys, cheap). Every backend saves the
same statistics, so a forward and a backward served by different backends still agree.
``fastadapt::prefix_attention_backward`` is one fused backward call returning every gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch
from fastadapt.backends import Capabilities
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.reference import prefix_attention as reference

OP = "prefix_attention"
MODES = ("gated", "joint")
# The kernels keep a (BLOCK, head_dim) fp32 tile per operand in registers; past 128 they spill.
MAX_TRITON_HEAD_DIM = 128
MAX_CUDA_HEAD_DIM = 256  # the CUDA kernel spreads a head over one warp's registers, 8 per lane


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(impl, q, k, v, k_p, v_p, gate, key_padding_mask, scale, causal, joint):
    return impl.forward(q, k, v, k_p, v_p, gate, key_padding_mask, scale, causal, joint)


def _backward(impl, needs, dout, _dstats, _dstats_p, q, k, v, k_p, v_p, gate, key_padding_mask, out, stats, stats_p,
              scale, causal, joint):
    return impl.backward(dout, q, k, v, k_p, v_p, gate, key_padding_mask, out, stats, stats_p, scale, causal, joint,
                         needs)


def _fake(q, joint, **_):
    B, H, Sq, D = q.shape
    stats = q.new_empty((B, H, Sq, 2), dtype=_stats_dtype(q.dtype))
    return q.new_empty((B, H, Sq, D)), stats, stats.new_empty((0,) if joint else (B, H, Sq, 2))


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    B, kv_heads, group, D = draw.int(1, 2), draw.int(1, 2), draw.int(1, 2), draw.choice([4, 8, 16])
    H, Sk, L = kv_heads * group, draw.int(1, 9), draw.int(1, 5)
    Sq = draw.int(1, Sk)
    joint, causal, gate_tanh = draw.bool(), draw.bool(), draw.bool()
    tensors = dict(q=torch.randn(B, H, Sq, D), k=torch.randn(B, kv_heads, Sk, D), v=torch.randn(B, kv_heads, Sk, D),
                   prefix_k=torch.randn(draw.choice([1, B]), kv_heads, L, D),
                   gate=None if joint else torch.randn(draw.choice([1, H])),
                   key_padding_mask=torch.rand(B, Sk) > 0.3 if draw.bool() else None)
    tensors["prefix_v"] = torch.randn_like(tensors["prefix_k"])

    def call(q, k, v, prefix_k, prefix_v, gate, key_padding_mask):
        return prefix_attention(q, k, v, prefix_k, prefix_v, gate, mode="joint" if joint else "gated", causal=causal,
                                key_padding_mask=key_padding_mask, gate_tanh=gate_tanh)

    def exact(keep, q, k, v, prefix_k, prefix_v, gate, key_padding_mask):
        g = None if joint else (torch.tanh(gate) if gate_tanh else gate).reshape(-1).expand(H)
        return reference.prefix_attention(q, k, v, prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1), g,
                                          joint=joint, causal=causal, key_padding_mask=key_padding_mask)

    return FuzzCase(tensors, call, exact, grads=("q", "k", "v", "prefix_k", "prefix_v", "gate"),
                    fixed=("key_padding_mask",))


# ``fastadapt::prefix_attention`` returns ``(out, stats, stats_p)``: the forward saves only the
# output and, per softmax, the row max and row sum of the base-2 scores, (B, H, Sq, 2) fp32
# (``stats_p`` is empty in joint mode), as flash-attention saves its logsumexp; the prefix part of
# the output is recomputed from ``stats_p`` in the backward (L keys, cheap). Every backend saves the
# same statistics, so a forward and a backward served by different backends still agree.
PREFIX_ATTENTION = declare(OpSpec(
    OP,
    args=(*(Arg(n, "Tensor", grad=True, select=True) for n in ("q", "k", "v", "k_p", "v_p")),
          Arg("gate", "Tensor?", grad=True), Arg("key_padding_mask", "Tensor?", select=True), Arg("scale", "float"),
          Arg("causal", "bool"), Arg("joint", "bool")),
    outputs=("out", "stats", "stats_p"), saved=("out", "stats", "stats_p"), grads=("q", "k", "v", "k_p", "v_p", "gate"),
    fake=_fake, forward=_forward, backward=_backward, autocast=False, fuzz=_fuzz))


def _effective_gate(gate, gate_tanh: bool, heads: int, dtype: torch.dtype) -> Tensor:
    """The gate as (H,) in the softmax dtype, accepting PEFT's (1,) and LLaMA-Adapter's (1, H, 1, 1)."""
    _checks.tensor("gate", gate)
    if gate.numel() not in (1, heads) or sum(s != 1 for s in gate.shape) > 1:
        raise ValueError(
            f"gate must hold one value or one per query head ({heads}): shape (), (1,), ({heads},) "
            f"or (1, {heads}, 1, 1); got shape {tuple(gate.shape)}")
    g = torch.tanh(gate) if gate_tanh else gate
    return g.to(_stats_dtype(dtype)).reshape(-1).expand(heads)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     gate: Optional[Tensor] = None, *, mode: str = "gated", causal: bool = True,
                     key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                     gate_tanh: bool = False) -> Tensor:
    """Fused attention over the tokens plus a learned prefix, in one flash-attention pass.

    Args:
        q: (B, H, Sq, D) queries, float16 / bfloat16 / float32 (float64 runs on the reference).
            Any strides: a (B, S, H, D) tensor passed as ``x.transpose(1, 2)`` is read in place.
        k, v: (B, Hkv, Sk, D) token keys/values (a KV cache in decode); H must be a multiple of Hkv
            (GQA: query head h reads kv head ``h // (H // Hkv)``). Same dtype as ``q``.
        prefix_k, prefix_v: (B or 1, Hkv, L, D) prefix keys/values (LLaMA-Adapter: the adaption
            prompt through the frozen k/v projections, no RoPE); a batch of 1 is broadcast as a view.
        gate: ``mode="gated"`` only: shape (), (1,) (PEFT), (H,) or (1, H, 1, 1) (LLaMA-Adapter);
            zero-initialised in training. ``gate_tanh``: use ``tanh(gate)`` (LLaMA-Adapter training).
        mode: ``"gated"`` (LLaMA-Adapter, own softmax for the prefix, times the gate) or ``"joint"``
            (prefix tuning: one softmax over ``[prefix_k; k]``, no gate).
        causal: bottom-right aligned causal mask on the token keys: query i sees key j iff
            ``j <= i + Sk - Sq`` (flash-attn >= 2.1; for Sq == Sk it is the usual mask, and a decode
            step's queries sit at the end of the cache). The prefix is visible to every query.
        key_padding_mask: (B, Sk) bool, True where a token key may be attended. A query that sees
            no token key gets 0 from the token part (gated mode).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        (B, H, Sq, D) in ``q``'s dtype. Gradients flow to q, k, v, prefix_k, prefix_v and gate.

    Equivalent PyTorch (gated, Sq == Sk, no padding, no GQA)::

        sdpa(q, k, v, is_causal=causal, scale=scale) \\
            + gate.view(-1, 1, 1) * sdpa(q, prefix_k, prefix_v, scale=scale)
        # joint: sdpa(q, cat([prefix_k, k], 2), cat([prefix_v, v], 2), attn_mask=cat([ones, causal], -1))
    """
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.tensor("prefix_k", prefix_k, ndim=4)
    _checks.tensor("prefix_v", prefix_v, ndim=4)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    joint = mode == "joint"
    if joint and gate is not None:
        raise ValueError('mode="joint" (prefix tuning) has no gate; pass gate=None or mode="gated"')
    if not joint and gate is None:
        raise ValueError('mode="gated" needs a gate tensor (zeros at initialisation)')
    _checks.same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, gate=gate,
                        key_padding_mask=key_padding_mask)
    _checks.same_dtype(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                         f"and {tuple(prefix_v.shape)}")
    _checks.dim_equal("k.shape[-1] (head dim)", k.shape[-1], D)
    _checks.dim_equal("prefix_k.shape[-1] (head dim)", prefix_k.shape[-1], D)
    _checks.dim_equal("k.shape[0] (batch)", k.shape[0], B)
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of key/value "
                         f"heads ({Hkv}) (GQA)")
    _checks.dim_equal("prefix_k.shape[1] (key/value heads)", prefix_k.shape[1], Hkv)
    if prefix_k.shape[0] not in (1, B):
        raise ValueError(f"prefix_k.shape[0] must be 1 or the batch size {B}, got {prefix_k.shape[0]}")
    if prefix_k.shape[2] == 0:
        raise ValueError("the prefix is empty: prefix_k.shape[2] (L) must be at least 1")
    if Sq == 0 or Sk == 0 or D == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"key_padding_mask must have shape (B, Sk) = {(B, Sk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else _checks.finite_float("scale", scale)
    g = None if joint else _effective_gate(gate, gate_tanh, H, q.dtype)
    # Broadcast views, no copies: the kernels read through strides (batch stride 0).
    prefix_k = prefix_k.expand(B, -1, -1, -1)
    prefix_v = prefix_v.expand(B, -1, -1, -1)
    return PREFIX_ATTENTION(q, k, v, prefix_k, prefix_v, g, key_padding_mask, scale, causal, joint)[0]


# ---------------------------------------------------------------------------------------------
# Backends


def _head_dim(backend, q, **_):
    limit = {"triton": MAX_TRITON_HEAD_DIM, "cuda": MAX_CUDA_HEAD_DIM}.get(backend)
    return [f"head dim {q.shape[-1]} > {limit}"] if limit is not None and q.shape[-1] > limit else []


CAPABILITIES = Capabilities("q", ("q", "k", "v", "k_p", "v_p"), extra=_head_dim)
_KERNELS = "fastadapt.kernels.prefix_attention"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))


# csrc/prefix_attention.cpp, csrc/prefix_attention_cuda.cu
_native_forward, _native_backward = _native.calls("prefix_attention")
dispatch.register(OP, "cuda", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward,
                  nondeterministic="the backward sums dK, dV over queries with fp32 atomics")
dispatch.register(OP, "cpp", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=reference.backward)
