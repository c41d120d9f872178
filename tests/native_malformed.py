"""Malformed direct calls of the native ops ``torch.ops.fastadapt_C.*``, each with the error that
must name the bad argument. test_native.py runs them in-process and, with the extension built
under AddressSanitizer (``FASTADAPT_SANITIZE=address``), in a subprocess where any out-of-bounds
read before the check would abort the process. Run as a script, it makes every call and exits 0
only if each one raised its error."""

from __future__ import annotations

import re
import sys

import torch

M, K, N, R = 5, 16, 8, 3  # LoRA: rows, in_features, out_features, rank
D, BN = 16, 4  # bottleneck: hidden size, bottleneck width
B, H, HKV, S, L, HD = 2, 4, 2, 6, 3, 8  # prefix attention: batch, heads, kv heads, seq, prefix, head dim


def _lora():
    return dict(x=torch.randn(M, K), weight=torch.randn(N, K), lora_A=torch.randn(R, K), lora_B=torch.randn(N, R),
                bias=torch.randn(N))


def _lora_forward(ops, p=0.0, **bad):
    t = {**_lora(), **bad}
    return ops.lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0, t["bias"], p, 0)


def _lora_backward(ops, p=0.0, **bad):
    t = {**_lora(), "gy": torch.randn(M, N), "u": torch.randn(M, R), **bad}
    return ops.lora_backward(t["gy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["u"], 1.0, p, 0, [True] * 5)


def _segments_forward(ops, segments=(1, 2), segment_p=(0.1, 0.2), **bad):
    t = {**_lora(), **bad}
    return ops.lora_segments_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0, t["bias"], list(segments),
                                     list(segment_p), 0)


def _segments_backward(ops, segments=(1, 2), segment_p=(0.1, 0.2), **bad):
    t = {**_lora(), "gy": torch.randn(M, N), "u": torch.randn(M, R), **bad}
    return ops.lora_segments_backward(t["gy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["u"], 1.0,
                                      list(segments), list(segment_p), 0, [True] * 5)


def _dora_forward(ops, p=0.0, **bad):
    t = {**_lora(), "magnitude": torch.rand(N), **bad}
    return ops.dora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 1.0, t["bias"], p, 0)


def _dora_backward(ops, p=0.0, **bad):
    t = {**_lora(), "magnitude": torch.rand(N), "gy": torch.randn(M, N), "u": torch.randn(M, R),
         "pre": torch.randn(M, N), "norm": torch.rand(N) + 0.5, **bad}
    return ops.dora_backward(t["gy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], t["u"], t["pre"],
                             t["norm"], 1.0, p, 0, [True] * 6)


NA = 2  # multi-adapter LoRA: adapters (rank R each)


def _multi():
    return dict(x=torch.randn(M, K), weight=torch.randn(N, K), A_stack=torch.randn(NA, R, K),
                B_stack=torch.randn(NA, N, R), scalings=torch.ones(NA), ranks=torch.tensor([R, 1], dtype=torch.int32),
                adapter_ids=torch.tensor([0, 1, -1, 1, 0]), bias=torch.randn(N), dropout_p=torch.tensor([0.1, 0.0]))


_MULTI_ORDER = ("x", "weight", "A_stack", "B_stack", "scalings", "ranks", "adapter_ids")


def _multi_forward(ops, **bad):
    t = {**_multi(), **bad}
    return ops.multi_lora_forward(*(t[k] for k in _MULTI_ORDER), t["bias"], t["dropout_p"], 0)


def _multi_backward(ops, **bad):
    t = {**_multi(), "gy": torch.randn(M, N), "u": torch.randn(M, R), **bad}
    return ops.multi_lora_backward(t["gy"], *(t[k] for k in _MULTI_ORDER[:4]), t["u"],
                                   *(t[k] for k in _MULTI_ORDER[4:]), t["dropout_p"], 0, [True] * 5)


QN, QK = 8, 64  # quantized weight: out_features, in_features (NF4 double-quantized, 64-element blocks)


def _qlora():
    from fastadapt.reference.qlora import random_weight
    q = random_weight("nf4-nested", QN, QK)
    return dict(data=q.data, code=q.code, absmax=q.absmax, absmax2=q.absmax2, code2=q.code2, offset=q.offset,
                blocksize=q.blocksize, blocksize2=q.blocksize2, bits=q.bits)


_Q_ORDER = ("data", "code", "absmax", "absmax2", "code2", "offset", "blocksize", "blocksize2", "bits")


def _dequantize(ops, out_features=QN, in_features=QK, **bad):
    t = {**_qlora(), **bad}
    return ops.qlora_dequantize(*(t[k] for k in _Q_ORDER), out_features, in_features, torch.float32)


def _bottleneck():
    return dict(z=torch.randn(M, D), residual=torch.randn(M, D), down_weight=torch.randn(BN, D),
                down_bias=torch.randn(BN), up_weight=torch.randn(D, BN), up_bias=torch.randn(D), scale=torch.randn(D),
                ln_before_weight=torch.randn(D), ln_before_bias=torch.randn(D), ln_after_weight=torch.randn(D),
                ln_after_bias=torch.randn(D), gate=torch.rand(M))


_BN_ORDER = ("z", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale", "ln_before_weight",
             "ln_before_bias", "ln_after_weight", "ln_after_bias", "gate")


def _bottleneck_forward(ops, eps=1e-5, p=0.1, **bad):
    t = {**_bottleneck(), **bad}
    return ops.bottleneck_forward(*(t[k] for k in _BN_ORDER), 0.5, "relu", eps, True, p, 3)


def _bottleneck_backward(ops, **bad):
    t = {**_bottleneck(), "gout": torch.randn(M, D), "h": torch.randn(M, BN),
         "stats": torch.rand(4, M) + 0.5, **bad}
    args = [t[k] for k in _BN_ORDER]
    return ops.bottleneck_backward(t["gout"], *args[:6], t["h"], t["stats"], *args[6:], 0.5, "relu", 1e-5, True,
                                   0.1, 3, [True] * 12)


def _prefix():
    return dict(q=torch.randn(B, H, S, HD), k=torch.randn(B, HKV, S, HD), v=torch.randn(B, HKV, S, HD),
                k_p=torch.randn(B, HKV, L, HD), v_p=torch.randn(B, HKV, L, HD), gate=torch.randn(H),
                key_padding_mask=torch.ones(B, S, dtype=torch.bool))


def _prefix_forward(ops, joint=False, **bad):
    t = {**_prefix(), **bad}
    return ops.prefix_attention_forward(t["q"], t["k"], t["v"], t["k_p"], t["v_p"], t["gate"],
                                        t["key_padding_mask"], HD**-0.5, True, joint)


def _prefix_backward(ops, **bad):
    t = {**_prefix(), "dout": torch.randn(B, H, S, HD), "out": torch.randn(B, H, S, HD),
         "stats": torch.rand(B, H, S, 2) + 0.5, "stats_p": torch.rand(B, H, S, 2) + 0.5, **bad}
    return ops.prefix_attention_backward(t["dout"], t["q"], t["k"], t["v"], t["k_p"], t["v_p"], t["gate"],
                                         t["key_padding_mask"], t["out"], t["stats"], t["stats_p"], HD**-0.5, True,
                                         False, [True] * 6)


# (id, call(ops), regex the error must match). Sizes that are short by one are the ones a kernel
# trusting its caller would read past.
CASES = [
    ("lora x 1-D", lambda ops: _lora_forward(ops, x=torch.randn(K)), r"x must have shape \(\*, \*\)"),
    ("lora x float64", lambda ops: _lora_forward(ops, **{k: v.double() for k, v in _lora().items()}),
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
    ("lora dropout_p 1", lambda ops: _lora_forward(ops, p=1.0), r"dropout_p must be in \[0, 1\)"),
    ("lora backward gy short", lambda ops: _lora_backward(ops, gy=torch.randn(M - 1, N)),
     r"gy must have shape \(5, 8\)"),
    ("lora backward u short", lambda ops: _lora_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("lora backward u dtype", lambda ops: _lora_backward(ops, u=torch.randn(M, R).half()), r"u must be Float"),
    ("lora segments sum", lambda ops: _segments_forward(ops, segments=(1, 1)), r"segments sum to 2, expected r = 3"),
    ("lora segments empty", lambda ops: _segments_forward(ops, segments=(3, 0), segment_p=(0.1, 0.1)),
     r"segment 1 has 0 rows"),
    ("lora segments negative", lambda ops: _segments_forward(ops, segments=(4, -1)), r"segment 1 has -1 rows"),
    ("lora segments p count", lambda ops: _segments_forward(ops, segment_p=(0.1,)),
     r"one entry per segment, got 2 and 1"),
    ("lora segments none", lambda ops: _segments_forward(ops, segments=(), segment_p=()), r"one entry per segment"),
    ("lora segments p 1", lambda ops: _segments_forward(ops, segment_p=(0.1, 1.0)),
     r"segment_p\[1\] must be in \[0, 1\)"),
    ("lora segments lora_B rank", lambda ops: _segments_forward(ops, lora_B=torch.randn(N, R - 1)),
     r"lora_B must have shape \(8, 3\)"),
    ("lora segments backward sum", lambda ops: _segments_backward(ops, segments=(2, 2)),
     r"segments sum to 4, expected r = 3"),
    # Sums that wrap to r: the segments ran past lora_A's rows.
    ("lora segments sum wraps", lambda ops: _segments_forward(ops, segments=(2**62,) * 3 + (2**62 + 3,),
                                                              segment_p=(0.1,) * 4),
     r"the sum of segments \(.*\) overflows int64"),
    ("lora segments backward sum wraps", lambda ops: _segments_backward(ops, segments=(2**63 - 1, 4),
                                                                        segment_p=(0.1, 0.1)),
     r"the sum of segments \(.*\) overflows int64"),
    ("lora segments backward u short", lambda ops: _segments_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("dora magnitude short", lambda ops: _dora_forward(ops, magnitude=torch.rand(N - 1)),
     r"magnitude must have shape \(8,\)"),
    ("dora magnitude half", lambda ops: _dora_forward(ops, magnitude=torch.rand(N).half()), r"magnitude must be Float"),
    ("dora weight in_features", lambda ops: _dora_forward(ops, weight=torch.randn(N, K - 1)),
     r"weight must have shape \(\*, 16\)"),
    ("dora bias short", lambda ops: _dora_forward(ops, bias=torch.randn(N - 1)), r"bias must have shape \(8,\)"),
    ("dora dropout_p 1", lambda ops: _dora_forward(ops, p=1.0), r"dropout_p must be in \[0, 1\)"),
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
    ("multi_lora dropout_p 1", lambda ops: _multi_forward(ops, dropout_p=torch.tensor([0.1, 1.0])),
     r"dropout_p must be in \[0, 1\)"),
    ("multi_lora bias short", lambda ops: _multi_forward(ops, bias=torch.randn(N - 1)), r"bias must have shape \(8,\)"),
    ("multi_lora backward u short", lambda ops: _multi_backward(ops, u=torch.randn(M, R - 1)),
     r"u must have shape \(5, 3\)"),
    ("multi_lora backward gy short", lambda ops: _multi_backward(ops, gy=torch.randn(M - 1, N)),
     r"gy must have shape \(5, 8\)"),
    ("multi_lora backward id past n", lambda ops: _multi_backward(ops, adapter_ids=torch.tensor([0, 1, -1, 2, 0])),
     r"adapter_ids must be in \[-1, 2\)"),
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
    ("bottleneck dropout_p", lambda ops: _bottleneck_forward(ops, p=-0.1), r"dropout_p must be in"),
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
    ("prefix q dtype", lambda ops: _prefix_forward(ops, **{k: v.double() for k, v in _prefix().items()}),
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
    ("lora forward", lambda ops: _lora_forward(ops, p=0.2)),
    ("lora backward", lambda ops: _lora_backward(ops, p=0.2)),
    ("dora forward", lambda ops: _dora_forward(ops, p=0.2)),
    ("dora backward", lambda ops: _dora_backward(ops, p=0.2)),
    ("multi_lora forward", lambda ops: _multi_forward(ops)),
    ("multi_lora backward", lambda ops: _multi_backward(ops)),
    ("qlora dequantize", lambda ops: _dequantize(ops)),
    ("qlora one block", lambda ops: _dequantize(ops, blocksize=2**63 - 1, blocksize2=2**63 - 1,
                                                absmax=torch.zeros(1, dtype=torch.uint8), absmax2=torch.ones(1))),
    ("bottleneck forward", lambda ops: _bottleneck_forward(ops)),
    ("bottleneck backward", lambda ops: _bottleneck_backward(ops)),
    ("prefix forward", lambda ops: _prefix_forward(ops)),
    ("prefix backward", lambda ops: _prefix_backward(ops)),
]


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
    return failures


if __name__ == "__main__":
    from fastadapt import _native

    ok, why = _native.status()
    if not ok:
        sys.exit(f"fastadapt._C unavailable: {why}")
    print(why)
    problems = run_all(_native.ops())
    print("\n".join(problems) or f"all {len(CASES)} malformed calls rejected, {len(VALID)} valid calls ran")
    sys.exit(1 if problems else 0)
