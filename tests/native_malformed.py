"""Direct calls of the native ops ``torch.ops.fastadapt_C.*`` with malformed arguments. test_native.py
runs them in-process and, with the extension built under AddressSanitizer
(``FASTADAPT_SANITIZE=address``), in a subprocess where any read past a buffer aborts the process.
Run as a script, it makes every call and exits 0 only if each one behaved.

* ``CASES``: hand-written calls, each with the error that must name the bad argument.
* ``FUZZ``: generated from two tables, ``ARGS`` (valid arguments of every op, by schema name) and
  ``CLASSES`` (what can be wrong with a tensor argument: its layout, size, dtype, device, grad),
  one check per op, tensor argument and class, plus ``SCALARS`` (bad integers and floats per op).
  A view (padded, strided, transposed, expanded) must give what its contiguous copy gives, or be
  refused by name; anything else must be refused by the op's own check (its message starts with
  ``fastadapt_C::``), never read past a buffer."""

from __future__ import annotations

import re
import sys

import torch

M, K, N, R = 5, 16, 8, 3  # LoRA: rows, in_features, out_features, rank
NA = 2  # multi-adapter LoRA: adapters (rank R and 1)
E, TOPK, MI = 3, 2, 4  # MoE LoRA: experts, slots per token, intermediate (M tokens, hidden K, ranks R and 2)
QN, QK = 8, 64  # quantized weight: out_features, in_features (NF4 double-quantized, 64-element blocks)
D, BN = 16, 4  # bottleneck: hidden size, bottleneck width
B, H, HKV, S, L, HD = 2, 4, 2, 6, 3, 8  # prefix attention: batch, heads, kv heads, seq, prefix, head dim


def _lora():
    return dict(x=torch.randn(M, K), weight=torch.randn(N, K), lora_A=torch.randn(R, K), lora_B=torch.randn(N, R),
                bias=torch.randn(N), scaling=1.0, dropout_p=0.2, seed=0)


def _lora_grads(n_needs):
    return dict(gy=torch.randn(M, N), u=torch.randn(M, R), needs=[True] * n_needs)


def _multi():
    return dict(x=torch.randn(M, K), weight=torch.randn(N, K), A_stack=torch.randn(NA, R, K),
                B_stack=torch.randn(NA, N, R), scalings=torch.ones(NA), ranks=torch.tensor([R, 1], dtype=torch.int32),
                adapter_ids=torch.tensor([0, 1, -1, 1, 0]), bias=torch.randn(N),
                dropout_p=torch.tensor([0.1, 0.0], dtype=torch.float64), seed=0)


def _moe():
    return dict(x=torch.randn(M, K), top_k_index=torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1], [2, 2]]),
                top_k_weights=torch.rand(M, TOPK), gate_up_proj=torch.randn(E, 2 * MI, K),
                gate_up_bias=torch.randn(E, 2 * MI), down_proj=torch.randn(E, K, MI), down_bias=torch.randn(E, K),
                gate_up_A=torch.randn(E, R, K), gate_up_B=torch.randn(E, 2 * MI, R), gate_up_scaling=0.5,
                down_A=torch.randn(E, 2, MI), down_B=torch.randn(E, K, 2), down_scaling=2.0, activation="gpt_oss",
                alpha=1.702, limit=1.5, dropout_p=0.2, seed=0)


def _moe_backward():
    args = {k: v for k, v in _moe().items() if k not in ("gate_up_bias", "down_bias")}
    S = M * TOPK
    return {**args, "gout": torch.randn(M, K), "g": torch.randn(S, 2 * MI), "u1": torch.randn(S, R),
            "u2": torch.randn(S, 2), "d": torch.randn(S, K), "needs": [True] * 6}


def _qlora():
    from fastadapt.reference.qlora import random_weight
    q = random_weight("nf4-nested", QN, QK)
    return dict(data=q.data, code=q.code, absmax=q.absmax, absmax2=q.absmax2, code2=q.code2, offset=q.offset,
                blocksize=q.blocksize, blocksize2=q.blocksize2, bits=q.bits, out_features=QN)


def _qlora_lora():
    return dict(x=torch.randn(M, QK), lora_A=torch.randn(R, QK), lora_B=torch.randn(QN, R), bias=torch.randn(QN),
                scaling=1.0, dropout_p=0.2, seed=0)


def _bottleneck():
    return dict(z=torch.randn(M, D), residual=torch.randn(M, D), down_weight=torch.randn(BN, D),
                down_bias=torch.randn(BN), up_weight=torch.randn(D, BN), up_bias=torch.randn(D), scale=torch.randn(D),
                ln_before_weight=torch.randn(D), ln_before_bias=torch.randn(D), ln_after_weight=torch.randn(D),
                ln_after_bias=torch.randn(D), gate=torch.rand(M), scaling=0.5, activation="relu", eps=1e-5,
                residual_before_ln=True, dropout_p=0.1, seed=3)


def _prefix():
    return dict(q=torch.randn(B, H, S, HD), k=torch.randn(B, HKV, S, HD), v=torch.randn(B, HKV, S, HD),
                k_p=torch.randn(B, HKV, L, HD), v_p=torch.randn(B, HKV, L, HD), gate=torch.randn(H),
                key_padding_mask=torch.ones(B, S, dtype=torch.bool), scale=HD**-0.5, causal=True, joint=False)


# Valid arguments of every native op with tensor arguments, by schema name (the schema gives the order).
ARGS = {
    "dropout_keep": lambda: dict(like=torch.empty(M, K), p=0.3, seed=7),
    "lora_forward": _lora,
    "lora_backward": lambda: {**_lora(), **_lora_grads(5)},
    "lora_segments_forward": lambda: {**_lora(), "ranks": [1, 2], "ranks_p": [0.1, 0.2]},
    "lora_segments_backward": lambda: {**_lora(), **_lora_grads(5), "ranks": [1, 2], "ranks_p": [0.1, 0.2]},
    "dora_forward": lambda: {**_lora(), "magnitude": torch.rand(N)},
    "dora_backward": lambda: {**_lora(), **_lora_grads(6), "magnitude": torch.rand(N), "pre": torch.randn(M, N),
                              "norm": torch.rand(N) + 0.5},
    "multi_lora_forward": _multi,
    "multi_lora_backward": lambda: {**_multi(), **_lora_grads(5)},
    "moe_lora_forward": _moe,
    "moe_lora_backward": _moe_backward,
    "qlora_dequantize": lambda: {**_qlora(), "in_features": QK, "dtype": torch.float32},
    "qlora_forward": lambda: {**_qlora(), **_qlora_lora()},
    "qlora_backward": lambda: {**_qlora(), **_qlora_lora(), "gy": torch.randn(M, QN), "u": torch.randn(M, R),
                               "needs": [True] * 4},
    "bottleneck_forward": _bottleneck,
    "bottleneck_backward": lambda: {**_bottleneck(), "gout": torch.randn(M, D), "h": torch.randn(M, BN),
                                    "stats": torch.rand(4, M) + 0.5, "needs": [True] * 12},
    "prefix_attention_forward": _prefix,
    "prefix_attention_backward": lambda: {**_prefix(), "dout": torch.randn(B, H, S, HD),
                                          "out": torch.randn(B, H, S, HD), "stats": torch.rand(B, H, S, 2) + 0.5,
                                          "stats_p": torch.rand(B, H, S, 2) + 0.5, "needs": [True] * 6},
}


def _schema(ops, op: str):
    return getattr(ops, op).default._schema.arguments


def _run(ops, op: str, args: dict):
    return getattr(ops, op)(*(args[a.name] for a in _schema(ops, op)))


def call(ops, op: str, **changed):
    """fastadapt_C::op on ARGS[op] with some arguments changed."""
    return _run(ops, op, {**ARGS[op](), **{k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}})


def _doubled(args):
    return {k: v.double() for k, v in args.items() if isinstance(v, torch.Tensor)}


def _caller(op):
    return lambda ops, **changed: call(ops, op, **changed)


_lora_forward, _lora_backward = _caller("lora_forward"), _caller("lora_backward")
_segments_forward, _segments_backward = _caller("lora_segments_forward"), _caller("lora_segments_backward")
_dora_forward, _dora_backward = _caller("dora_forward"), _caller("dora_backward")
_multi_forward, _multi_backward = _caller("multi_lora_forward"), _caller("multi_lora_backward")
_moe_forward, _moe_backward_call = _caller("moe_lora_forward"), _caller("moe_lora_backward")
_dequantize = _caller("qlora_dequantize")
_bottleneck_forward, _bottleneck_backward = _caller("bottleneck_forward"), _caller("bottleneck_backward")
_prefix_forward, _prefix_backward = _caller("prefix_attention_forward"), _caller("prefix_attention_backward")


# (id, call(ops), regex the error must match). Sizes that are short by one are the ones a kernel
# trusting its caller would read past.
CASES = [
    ("lora x 1-D", lambda ops: _lora_forward(ops, x=torch.randn(K)), r"x must have shape \(\*, \*\)"),
    ("lora x float64", lambda ops: _lora_forward(ops, **_doubled(_lora())),
     r"x has dtype Double"),
    ("lora weight in_features", lambda ops: _lora_forward(ops, weight=torch.randn(N, K - 1)),
     r"weight must have shape \(\*, 16\)"),
    ("lora weight dtype", lambda ops: _lora_forward(ops, weight=torch.randn(N, K).half()), r"weight must be Float"),
    ("lora lora_A in_features", lambda ops: _lora_forward(ops, lora_A=torch.randn(R, K - 1)),
     r"lora_A must have shape \(\*, 16\)"),
    ("lora lora_B rank", lambda ops: _lora_forward(ops, lora_B=torch.randn(N, R - 1)),
     r"lora_B must have shape \(8, 3\)"),
    ("lora bias short", lambda ops: _lora_forward(ops, bias=torch.randn(N - 1)), r"bias must have shape \(8,\)"),
    ("lora bias dtype", lambda ops: _lora_forward(ops, bias=torch.randn(N).double()), r"bias must be Float"),
    ("lora dropout_p 1", lambda ops: _lora_forward(ops, dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ("lora backward gy short", lambda ops: _lora_backward(ops, gy=torch.randn(M - 1, N)),
     r"gy must have shape \(5, 8\)"),
    ("lora backward u short", lambda ops: _lora_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("lora backward u dtype", lambda ops: _lora_backward(ops, u=torch.randn(M, R).half()), r"u must be Float"),
    ("lora ranks sum", lambda ops: _segments_forward(ops, ranks=(1, 1)), r"ranks sum to 2, expected r = 3"),
    ("lora ranks empty", lambda ops: _segments_forward(ops, ranks=(3, 0), ranks_p=(0.1, 0.1)),
     r"ranks\[1\] is 0, expected at least 1"),
    ("lora ranks negative", lambda ops: _segments_forward(ops, ranks=(4, -1)), r"ranks\[1\] is -1, expected"),
    ("lora ranks p count", lambda ops: _segments_forward(ops, ranks_p=(0.1,)),
     r"one entry per adapter, got 2 and 1"),
    ("lora ranks none", lambda ops: _segments_forward(ops, ranks=(), ranks_p=()), r"one entry per adapter"),
    ("lora ranks p 1", lambda ops: _segments_forward(ops, ranks_p=(0.1, 1.0)),
     r"ranks_p\[1\] must be in \[0, 1\)"),
    ("lora ranks lora_B rank", lambda ops: _segments_forward(ops, lora_B=torch.randn(N, R - 1)),
     r"lora_B must have shape \(8, 3\)"),
    ("lora ranks backward sum", lambda ops: _segments_backward(ops, ranks=(2, 2)),
     r"ranks sum to 4, expected r = 3"),
    # Sums that wrap to r: the ranks ran past lora_A's rows.
    ("lora ranks sum wraps", lambda ops: _segments_forward(ops, ranks=(2**62,) * 3 + (2**62 + 3,),
                                                           ranks_p=(0.1,) * 4),
     r"the sum of ranks \(.*\) overflows int64"),
    ("lora ranks backward sum wraps", lambda ops: _segments_backward(ops, ranks=(2**63 - 1, 4),
                                                                     ranks_p=(0.1, 0.1)),
     r"the sum of ranks \(.*\) overflows int64"),
    ("lora ranks backward u short", lambda ops: _segments_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("dora magnitude short", lambda ops: _dora_forward(ops, magnitude=torch.rand(N - 1)),
     r"magnitude must have shape \(8,\)"),
    ("dora magnitude half", lambda ops: _dora_forward(ops, magnitude=torch.rand(N).half()), r"magnitude must be Float"),
    ("dora weight in_features", lambda ops: _dora_forward(ops, weight=torch.randn(N, K - 1)),
     r"weight must have shape \(\*, 16\)"),
    ("dora bias short", lambda ops: _dora_forward(ops, bias=torch.randn(N - 1)), r"bias must have shape \(8,\)"),
    ("dora dropout_p 1", lambda ops: _dora_forward(ops, dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ("dora backward pre short", lambda ops: _dora_backward(ops, pre=torch.randn(M - 1, N)),
     r"pre must have shape \(5, 8\)"),
    ("dora backward norm short", lambda ops: _dora_backward(ops, norm=torch.rand(N - 1)),
     r"norm must have shape \(8,\)"),
    ("dora backward norm dtype", lambda ops: _dora_backward(ops, norm=torch.rand(N).double()), r"norm must be Float"),
    ("dora backward u short", lambda ops: _dora_backward(ops, u=torch.randn(M, R - 1)), r"u must have shape \(5, 3\)"),
    ("dora backward gy short", lambda ops: _dora_backward(ops, gy=torch.randn(M, N - 1)),
     r"gy must have shape \(5, 8\)"),
    ("dora backward magnitude short", lambda ops: _dora_backward(ops, magnitude=torch.rand(N + 1)),
     r"magnitude must have shape \(8,\)"),
    ("multi_lora A_stack in_features", lambda ops: _multi_forward(ops, A_stack=torch.randn(NA, R, K - 1)),
     r"A_stack must have shape \(\*, \*, 16\)"),
    ("multi_lora B_stack adapters", lambda ops: _multi_forward(ops, B_stack=torch.randn(NA - 1, N, R)),
     r"B_stack must have shape \(2, 8, 3\)"),
    ("multi_lora B_stack rank", lambda ops: _multi_forward(ops, B_stack=torch.randn(NA, N, R - 1)),
     r"B_stack must have shape \(2, 8, 3\)"),
    ("multi_lora scalings short", lambda ops: _multi_forward(ops, scalings=torch.ones(NA - 1)),
     r"scalings must have shape \(2,\)"),
    ("multi_lora ranks dtype", lambda ops: _multi_forward(ops, ranks=torch.tensor([R, 1])), r"ranks must be Int"),
    ("multi_lora rank past r_max", lambda ops: _multi_forward(ops, ranks=torch.tensor([R + 1, 1], dtype=torch.int32)),
     r"ranks must be in \[1, r_max = 3\], got 4"),
    ("multi_lora ids short", lambda ops: _multi_forward(ops, adapter_ids=torch.tensor([0, 1, -1, 1])),
     r"adapter_ids must have shape \(5,\)"),
    ("multi_lora ids dtype", lambda ops: _multi_forward(ops, adapter_ids=torch.tensor([0, 1, -1, 1, 0]).int()),
     r"adapter_ids must be Long"),
    ("multi_lora id past n", lambda ops: _multi_forward(ops, adapter_ids=torch.tensor([0, 1, -1, 2, 0])),
     r"adapter_ids must be in \[-1, 2\), got 2 at row 3"),
    ("multi_lora id below -1", lambda ops: _multi_forward(ops, adapter_ids=torch.tensor([0, -2, -1, 1, 0])),
     r"adapter_ids must be in \[-1, 2\), got -2"),
    ("multi_lora dropout_p 1",
     lambda ops: _multi_forward(ops, dropout_p=torch.tensor([0.1, 1.0], dtype=torch.float64)),
     r"dropout_p must be in \[0, 1\)"),
    ("multi_lora bias short", lambda ops: _multi_forward(ops, bias=torch.randn(N - 1)), r"bias must have shape \(8,\)"),
    ("multi_lora backward u short", lambda ops: _multi_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("multi_lora backward gy short", lambda ops: _multi_backward(ops, gy=torch.randn(M - 1, N)),
     r"gy must have shape \(5, 8\)"),
    ("multi_lora backward id past n", lambda ops: _multi_backward(ops, adapter_ids=torch.tensor([0, 1, -1, 2, 0])),
     r"adapter_ids must be in \[-1, 2\)"),
    ("moe index past E", lambda ops: _moe_forward(ops, top_k_index=torch.tensor([[0, 2], [1, 3]] + [[0, 0]] * 3)),
     r"top_k_index must be in \[0, 3\), got 3 at token 1, slot 1"),
    ("moe index negative", lambda ops: _moe_backward_call(ops, top_k_index=torch.tensor([[0, -1]] + [[0, 0]] * 4)),
     r"top_k_index must be in \[0, 3\), got -1"),
    ("moe index int32", lambda ops: _moe_forward(ops, top_k_index=torch.zeros(M, TOPK, dtype=torch.int32)),
     r"top_k_index must be Long"),
    ("moe weights short", lambda ops: _moe_forward(ops, top_k_weights=torch.rand(M, TOPK - 1)),
     r"top_k_weights must have shape \(5, 2\)"),
    ("moe weights int", lambda ops: _moe_forward(ops, top_k_weights=torch.ones(M, TOPK, dtype=torch.int32)),
     r"top_k_weights must be floating"),
    ("moe gate_up odd", lambda ops: _moe_forward(ops, gate_up_proj=torch.randn(E, 7, K)), r"an even 2I"),
    ("moe down_proj experts", lambda ops: _moe_forward(ops, down_proj=torch.randn(E - 1, K, MI)),
     r"down_proj must have shape \(3, 16, 4\)"),
    ("moe gate_up_A experts", lambda ops: _moe_forward(ops, gate_up_A=torch.randn(E + 1, R, K)),
     r"gate_up_A must have shape \(3, \*, 16\)"),
    ("moe down_B rank", lambda ops: _moe_forward(ops, down_B=torch.randn(E, K, 3)),
     r"down_B must have shape \(3, 16, 2\)"),
    ("moe down_A without B", lambda ops: _moe_forward(ops, down_B=None), r"down_A and down_B must be given together"),
    ("moe activation", lambda ops: _moe_forward(ops, activation="gelu"), r"activation must be silu or gpt_oss"),
    ("moe backward d short", lambda ops: _moe_backward_call(ops, d=torch.randn(M * TOPK - 1, K)),
     r"d must have shape \(10, 16\)"),
    ("moe backward u1 rank", lambda ops: _moe_backward_call(ops, u1=torch.randn(M * TOPK, R + 1)),
     r"u1 must have shape \(10, 3\)"),
    # A block count that wrapped: a short or empty absmax (absmax2) passed, the kernel left the
    # weight unwritten (read past absmax2).
    ("qlora blocksize wraps",
     lambda ops: _dequantize(ops, blocksize=2**63 - 1, absmax=torch.empty(0, dtype=torch.uint8)),
     r"absmax must have shape \(1,\), got \[0\]"),
    ("qlora blocksize2 wraps", lambda ops: _dequantize(ops, blocksize2=2**63 - 1, absmax2=torch.empty(0)),
     r"absmax2 must have shape \(1,\), got \[0\]"),
    ("qlora weight size overflows", lambda ops: _dequantize(ops, out_features=2**32, in_features=2**32),
     r"out_features \* in_features \(4294967296 \* 4294967296\) overflows int64"),
    ("dropout_keep 1-D", lambda ops: ops.dropout_keep(torch.empty(7), 0.5, 1), r"like must have shape \(\*, \*\)"),
    ("dropout_keep p", lambda ops: ops.dropout_keep(torch.empty(2, 7), 1.5, 1), r"p must be in \[0, 1\)"),
    ("bottleneck ln_before_weight short", lambda ops: _bottleneck_forward(ops, ln_before_weight=torch.randn(D - 1)),
     r"ln_before_weight must have shape \(16,\)"),
    ("bottleneck ln_before_bias short", lambda ops: _bottleneck_forward(ops, ln_before_bias=torch.randn(D - 1)),
     r"ln_before_bias must have shape \(16,\)"),
    ("bottleneck ln_after_weight short", lambda ops: _bottleneck_forward(ops, ln_after_weight=torch.randn(D - 1)),
     r"ln_after_weight must have shape \(16,\)"),
    ("bottleneck ln_after without bias", lambda ops: _bottleneck_forward(ops, ln_after_bias=None),
     r"ln_after_weight and ln_after_bias come together"),
    ("bottleneck residual short", lambda ops: _bottleneck_forward(ops, residual=torch.randn(M - 1, D)),
     r"residual must have shape \(5, 16\)"),
    ("bottleneck residual dtype", lambda ops: _bottleneck_forward(ops, residual=torch.randn(M, D).half()),
     r"residual must be Float"),
    ("bottleneck gate short", lambda ops: _bottleneck_forward(ops, gate=torch.rand(M - 1)),
     r"gate must have shape \(5,\)"),
    ("bottleneck scale size", lambda ops: _bottleneck_forward(ops, scale=torch.randn(3)), r"scale must have 1 or d"),
    ("bottleneck down_bias short", lambda ops: _bottleneck_forward(ops, down_bias=torch.randn(BN - 1)),
     r"down_bias must have shape \(4,\)"),
    ("bottleneck up_bias short", lambda ops: _bottleneck_forward(ops, up_bias=torch.randn(D - 1)),
     r"up_bias must have shape \(16,\)"),
    ("bottleneck up_weight", lambda ops: _bottleneck_forward(ops, up_weight=torch.randn(D, BN + 1)),
     r"up_weight must have shape \(16, 4\)"),
    ("bottleneck down_weight", lambda ops: _bottleneck_forward(ops, down_weight=torch.randn(BN, D - 1)),
     r"down_weight must have shape \(\*, 16\)"),
    ("bottleneck z int", lambda ops: _bottleneck_forward(ops, z=torch.ones(M, D, dtype=torch.int32)),
     r"z has dtype Int"),
    ("bottleneck eps", lambda ops: _bottleneck_forward(ops, eps=0.0), r"eps must be positive"),
    ("bottleneck dropout_p", lambda ops: _bottleneck_forward(ops, dropout_p=-0.1), r"dropout_p must be in"),
    ("bottleneck backward h short", lambda ops: _bottleneck_backward(ops, h=torch.randn(M - 1, BN)),
     r"h must have shape \(5, 4\)"),
    ("bottleneck backward stats short", lambda ops: _bottleneck_backward(ops, stats=torch.rand(4, M - 1)),
     r"stats must have shape \(4, 5\)"),
    ("bottleneck backward stats dtype", lambda ops: _bottleneck_backward(ops, stats=torch.rand(4, M).half()),
     r"stats must be Float"),
    ("bottleneck backward gout short", lambda ops: _bottleneck_backward(ops, gout=torch.randn(M, D - 1)),
     r"gout must have shape \(5, 16\)"),
    ("bottleneck backward gate short", lambda ops: _bottleneck_backward(ops, gate=torch.rand(M - 1)),
     r"gate must have shape \(5,\)"),
    ("bottleneck backward ln_before_weight short",
     lambda ops: _bottleneck_backward(ops, ln_before_weight=torch.randn(D - 1)),
     r"ln_before_weight must have shape \(16,\)"),
    ("prefix k head dim", lambda ops: _prefix_forward(ops, k=torch.randn(B, HKV, S, HD - 1)),
     r"k must have shape \(2, \*, \*, 8\)"),
    ("prefix v short", lambda ops: _prefix_forward(ops, v=torch.randn(B, HKV, S - 1, HD)),
     r"v must have shape \(2, 2, 6, 8\)"),
    ("prefix heads", lambda ops: _prefix_forward(ops, k=torch.randn(B, 3, S, HD), v=torch.randn(B, 3, S, HD)),
     r"must be a multiple of those of k"),
    ("prefix k_p batch", lambda ops: _prefix_forward(ops, k_p=torch.randn(1, HKV, L, HD)),
     r"k_p must have shape \(2, 2, \*, 8\)"),
    ("prefix v_p short", lambda ops: _prefix_forward(ops, v_p=torch.randn(B, HKV, L - 1, HD)),
     r"v_p must have shape \(2, 2, 3, 8\)"),
    ("prefix mask short", lambda ops: _prefix_forward(ops, key_padding_mask=torch.ones(B, S - 1, dtype=torch.bool)),
     r"key_padding_mask must have shape \(2, 6\)"),
    ("prefix mask dtype", lambda ops: _prefix_forward(ops, key_padding_mask=torch.ones(B, S)),
     r"key_padding_mask must be Bool"),
    ("prefix gate short", lambda ops: _prefix_forward(ops, gate=torch.randn(H - 1)), r"gate must have shape \(4,\)"),
    ("prefix gate missing", lambda ops: _prefix_forward(ops, gate=None), r"gated mode \(joint=False\) needs a gate"),
    ("prefix q dtype", lambda ops: _prefix_forward(ops, **_doubled(_prefix())),
     r"q has dtype Double"),
    ("prefix backward stats short", lambda ops: _prefix_backward(ops, stats=torch.rand(B, H, S - 1, 2)),
     r"stats must have shape \(2, 4, 6, 2\)"),
    ("prefix backward stats_p short", lambda ops: _prefix_backward(ops, stats_p=torch.rand(B * H * S * 2)),
     r"stats_p must have shape \(2, 4, 6, 2\)"),
    ("prefix backward dout short", lambda ops: _prefix_backward(ops, dout=torch.randn(B, H, S - 1, HD)),
     r"dout must have shape \(2, 4, 6, 8\)"),
    ("prefix backward out dtype", lambda ops: _prefix_backward(ops, out=torch.randn(B, H, S, HD).half()),
     r"out must be Float"),
]

# The same calls well-formed: they must run (under ASan: without a report).
VALID = [
    ("lora forward", lambda ops: _lora_forward(ops)),
    ("lora backward", lambda ops: _lora_backward(ops)),
    ("dora forward", lambda ops: _dora_forward(ops)),
    ("dora backward", lambda ops: _dora_backward(ops)),
    ("multi_lora forward", lambda ops: _multi_forward(ops)),
    ("multi_lora backward", lambda ops: _multi_backward(ops)),
    ("moe_lora forward", lambda ops: _moe_forward(ops)),
    ("moe_lora backward", lambda ops: _moe_backward_call(ops)),
    ("moe_lora without LoRA", lambda ops: _moe_forward(ops, gate_up_A=None, gate_up_B=None, down_A=None, down_B=None)),
    ("qlora dequantize", lambda ops: _dequantize(ops)),
    ("qlora one block", lambda ops: _dequantize(ops, blocksize=2**63 - 1, blocksize2=2**63 - 1,
                                                absmax=torch.zeros(1, dtype=torch.uint8), absmax2=torch.ones(1))),
    ("bottleneck forward", lambda ops: _bottleneck_forward(ops)),
    ("bottleneck backward", lambda ops: _bottleneck_backward(ops)),
    ("prefix forward", lambda ops: _prefix_forward(ops)),
    ("prefix backward", lambda ops: _prefix_backward(ops)),
]


# ---------------------------------------------------------------------------------------------
# FUZZ: every op x tensor argument x class, and every op's scalar arguments x their bad values.

def _junk(dtype):
    """A value that shows if a kernel reads it: NaN, or an integer out of every valid range."""
    return float("nan") if dtype.is_floating_point else {torch.bool: True, torch.uint8: 255, torch.int32: 2**30,
                                                          torch.int64: 2**40}[dtype]


def _inside(t, width, cut):
    """t written into a wider tensor of junk, and the view of it there."""
    big = torch.full((*t.shape[:-1], width), _junk(t.dtype), dtype=t.dtype)
    big[cut] = t
    return big[cut]


# Layouts: the same values as a view. (None: the class does not apply to this tensor.)
LAYOUTS = {
    # rows of a wider tensor at an offset: row stride > row length, storage_offset 3
    "padded": lambda t: _inside(t, t.shape[-1] + 3, (..., slice(3, None))) if t.dim() else None,
    # every other element of the last dimension
    "strided": lambda t: _inside(t, 2 * t.shape[-1], (..., slice(None, None, 2))) if t.dim() else None,
    # column-major in the last two dimensions
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else None,
    # one row for all: stride 0 in dimension 0 (other values than t, compared with their copy)
    "expanded": lambda t: t[:1].expand_as(t) if t.dim() and t.shape[0] > 1 else None,
}
_WRONG_DTYPE = {torch.float32: torch.float64, torch.float64: torch.float32, torch.int64: torch.float32,
                torch.int32: torch.int64, torch.bool: torch.uint8, torch.uint8: torch.int8}
# Other classes: a replacement, and what the op must do with it.
OTHERS = {
    "empty": lambda t: t.new_empty((0, *t.shape[1:])) if t.dim() and t.shape[0] else None,  # runs, or refused
    "dtype": lambda t: t.to(_WRONG_DTYPE[t.dtype]),  # refused by name
    # refused (on a CPU-only machine the dispatcher refuses a meta tensor before any kernel)
    "device": lambda t: t.to("cuda" if torch.cuda.is_available() else "meta"),
    "requires_grad": lambda t: t.detach().clone().requires_grad_() if t.is_floating_point() else None,  # by name
    "absent": lambda t: None,  # optional arguments only: runs, or refused
}
CLASSES = (*LAYOUTS, *OTHERS)
# only the shape is read; the routing weights are read in any floating dtype
ANY_DTYPE = {("dropout_keep", "like"), ("moe_lora_forward", "top_k_weights"), ("moe_lora_backward", "top_k_weights")}

NAN, INF = float("nan"), float("inf")
_P = r"must be in \[0, 1\)"
# Bad values of scalar arguments, by schema name (applied where the argument is not a tensor), and
# the error each must raise (None: it must run). Seeds are any int64; a NaN scaling is no error.
SCALARS = {
    "seed": [(-2**63, None), (2**63 - 1, None)],
    "p": [(NAN, "p " + _P), (1.0, "p " + _P), (-1e-9, "p " + _P)],
    "dropout_p": [(NAN, "dropout_p " + _P), (1.0, "dropout_p " + _P), (-1e-9, "dropout_p " + _P)],
    "scaling": [(NAN, None), (INF, None)],
    "gate_up_scaling": [(NAN, None)],
    "limit": [(NAN, None), (-1.0, None)],
    "scale": [(NAN, None)],
    "eps": [(NAN, "eps must be positive and finite"), (0.0, "eps must be"), (INF, "eps must be")],
    "activation": [("bogus", "activation")],
    "ranks": [([3, 0], r"ranks\[1\] is 0"), ([-1, 4], r"ranks\[0\] is -1"),
              ([2**63 - 1, 2**63 - 1], r"the sum of ranks \(.*\) overflows int64")],
    "ranks_p": [([NAN, 0.1], r"ranks_p\[0\] " + _P), ([0.1], "one entry per adapter")],
    # a block size past the weight is one block: the 8 of absmax are then too many
    "blocksize": [(0, "blocksize must be positive"), (-1, "blocksize must be positive"),
                  (2**63 - 1, r"absmax must have shape \(1,\)")],
    "blocksize2": [(0, "blocksize2 must be positive"), (-(2**63), "blocksize2 must be positive"), (2**63 - 1, None)],
    "bits": [(0, "bits must be 4"), (5, "bits must be 4"), (-4, "bits must be 4"), (2**62, "bits must be 4")],
    "out_features": [(0, "must be non-empty"), (-1, "must be non-empty"), (2**62, "overflows int64")],
    "in_features": [(-(2**63), "must be non-empty"), (2**62, "overflows int64")],
    "dtype": [(torch.float64, "unsupported dtype Double")],
    "needs": [("none", None)],  # every gradient unwanted: empty tensors back
}


def _outcome(fn):
    try:
        return fn(), None
    except RuntimeError as exc:  # NotImplementedError (the dispatcher's) included
        return None, exc


def _ours(exc, name=None) -> bool:
    """The op's own check raised it (naming ``name``, if given)."""
    text = str(exc)
    return "fastadapt_C::" in text and (name is None or re.search(rf"\b{re.escape(name)}\b", text) is not None)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _differ(got, want) -> str | None:
    for i, (a, b) in enumerate(zip(_flat(got), _flat(want))):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {a.dtype}{tuple(a.shape)} against {b.dtype}{tuple(b.shape)}"
        same = (torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True) if a.is_floating_point()
                else torch.equal(a, b))
        if not same:
            return f"output {i} differs from the contiguous copy's"
    return None


def _layout_check(op, name, view_of):
    def check(ops):
        args = ARGS[op]()
        view = view_of(args[name])
        if view is None:
            return None
        got, got_err = _outcome(lambda: _run(ops, op, {**args, name: view}))
        want, want_err = _outcome(lambda: _run(ops, op, {**args, name: view.contiguous()}))
        if got_err is not None:  # refused: by name, or as the copy is
            if _ours(got_err, name) or (want_err is not None and str(got_err) == str(want_err)):
                return None
            return f"raised {str(got_err).splitlines()[0]!r}" + ("" if want_err else ", its contiguous copy ran")
        if want_err is not None:
            return f"ran, its contiguous copy raised {str(want_err).splitlines()[0]!r}"
        return _differ(got, want)
    return check


def _other_check(op, name, cls, replace):
    def check(ops):
        args = ARGS[op]()
        if args[name] is None:
            return None
        new = replace(args[name])
        if new is None and cls != "absent":
            return None
        _, err = _outcome(lambda: _run(ops, op, {**args, name: new}))
        if cls in ("empty", "absent") or (cls == "dtype" and (op, name) in ANY_DTYPE):
            ok = err is None or _ours(err)
        elif cls == "device":
            ok = err is not None
        elif cls == "requires_grad":
            ok = err is not None and _ours(err, name) and "requires grad" in str(err)
        else:
            ok = err is not None and _ours(err, name)
        return None if ok else ("no error" if err is None else f"raised {str(err).splitlines()[0]!r}")
    return check


def _scalar_check(op, name, value, pattern):
    def check(ops):
        args = ARGS[op]()
        bad = [False] * len(args[name]) if value == "none" else value
        _, err = _outcome(lambda: _run(ops, op, {**args, name: bad}))
        if pattern is None:
            return None if err is None else f"raised {str(err).splitlines()[0]!r}"
        if err is None:
            return "no error"
        return None if _ours(err) and re.search(pattern, str(err)) else f"raised {str(err).splitlines()[0]!r}"
    return check


def fuzz_table(ops) -> list[tuple[str, str, str, object]]:
    """(op, class, id, check(ops) -> failure or None) for every op, argument and class that applies;
    the classes of scalar arguments are "scalars"."""
    table = []
    for op in ARGS:
        for arg in _schema(ops, op):
            kind = str(arg.type)
            if kind in ("Tensor", "Optional[Tensor]"):
                for cls, view_of in LAYOUTS.items():
                    table.append((op, cls, f"{op} {arg.name} {cls}", _layout_check(op, arg.name, view_of)))
                for cls, replace in OTHERS.items():
                    if cls != "absent" or kind == "Optional[Tensor]":
                        table.append((op, cls, f"{op} {arg.name} {cls}", _other_check(op, arg.name, cls, replace)))
            else:
                for value, pattern in SCALARS.get(arg.name, []):
                    table.append((op, "scalars", f"{op} {arg.name}={value!r}", _scalar_check(op, arg.name, value,
                                                                                              pattern)))
    return table


def run_all(ops) -> list[str]:
    """Every case, returning the failures (a call that passed, or raised the wrong error)."""
    failures = []
    for name, call in VALID:
        try:
            call(ops)
        except Exception as exc:  # noqa: BLE001  (reported, not hidden)
            failures.append(f"{name}: valid call raised {type(exc).__name__}: {exc}")
    for name, call, pattern in CASES:
        try:
            call(ops)
        except RuntimeError as exc:
            if not re.search(pattern, str(exc)):
                failures.append(f"{name}: error {str(exc).splitlines()[0]!r} does not match {pattern!r}")
            continue
        failures.append(f"{name}: no error")
    for _, _, name, check in fuzz_table(ops):
        problem = check(ops)
        if problem:
            failures.append(f"{name}: {problem}")
    return failures


if __name__ == "__main__":
    from fastadapt import _native

    ok, why = _native.status()
    if not ok:
        sys.exit(f"fastadapt._C unavailable: {why}")
    print(why)
    problems = run_all(_native.ops())
    print("\n".join(problems) or f"all {len(CASES)} malformed calls rejected, {len(VALID)} valid calls ran, "
                                 f"{len(fuzz_table(_native.ops()))} generated checks passed")
    sys.exit(1 if problems else 0)
