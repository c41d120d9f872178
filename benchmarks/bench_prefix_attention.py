"""Gated prefix attention (LLaMA-Adapter) on CUDA: fastadapt vs SDPA alone (the floor) vs the
two-pass eager computation (PEFT / litgpt: SDPA over the tokens + an eager softmax over the prefix)
and its torch.compile, forward and forward+backward, one run.

    python benchmarks/bench_prefix_attention.py [--quick] [--dtype bfloat16|float16]

Times with ``triton.testing.do_bench`` (median, p20, p80 in ms) and prints the ratio of each
variant to SDPA alone (target for fastadapt fwd+bwd: <= 1.15x) and to the two-pass eager version;
writes ``benchmarks/results/prefix_attention-<device>.json``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

from harness import bench, forward_backward, forward_only

SHAPES = [  # (B, H, Hkv, S, D, L)
    (4, 32, 32, 2048, 128, 10),
    (1, 32, 32, 8192, 128, 10),
    (8, 32, 32, 512, 128, 30),
    (4, 32, 8, 2048, 128, 10),   # GQA 32 q heads / 8 kv heads
    (1, 32, 8, 8192, 128, 10),
    (8, 32, 8, 512, 128, 30),
]


def two_pass(q, k, v, kp, vp, gate):
    """PEFT's computation: the model's SDPA, then an eager softmax over the prompt, gated."""
    group = q.shape[1] // k.shape[1]
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    kp, vp = kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)
    scores = torch.softmax((q @ kp.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
    return base + gate.to(q.dtype).view(1, -1, 1, 1) * (scores.to(q.dtype) @ vp)


def _cases(B, H, Hkv, S, D, L, dtype):
    import fastadapt

    dev = "cuda"

    def t(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    q, k, v = t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D)
    kp, vp = t(1, Hkv, L, D), t(1, Hkv, L, D)
    gate = torch.randn(H, device=dev, requires_grad=True)
    gout = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    leaves = (q, k, v, kp, vp, gate)
    group = H // Hkv
    compiled = torch.compile(two_pass)

    variants = {
        "sdpa only": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1),
        "fastadapt": lambda: fastadapt.prefix_attention(q, k, v, kp, vp, gate),
        "two-pass eager": lambda: two_pass(q, k, v, kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1), gate),
        "two-pass compile": lambda: compiled(q, k, v, kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1), gate),
    }

    return {name: (forward_only(f), forward_backward(f, leaves, gout)) for name, f in variants.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape of each group, fewer repetitions")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prefix_attention.py needs a CUDA device; on the CPU, tests/test_prefix_attention.py checks "
              "the kernels (through the Triton interpreter) against the float64 reference.")
        return 2
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    results = {"device": device, "torch": torch.__version__, "dtype": args.dtype, "cases": {}}
    shapes = [SHAPES[0], SHAPES[3]] if args.quick else SHAPES
    print(f"{device}, {args.dtype}, torch {torch.__version__}")
    print(f"{'case':32s} {'variant':18s} {'pass':8s} {'p50 ms':>9s} {'p20':>8s} {'p80':>8s} {'x sdpa':>7s} "
          f"{'x eager':>8s}")
    for B, H, Hkv, S, D, L in shapes:
        key = f"B{B} H{H}/{Hkv} S{S} D{D} L{L}"
        cases = _cases(B, H, Hkv, S, D, L, dtype)
        rows = {}
        for name, (fwd, fwd_bwd) in cases.items():
            rows[name] = {"fwd": bench(fwd, args.quick), "fwd+bwd": bench(fwd_bwd, args.quick)}
        for name, row in rows.items():
            for kind in ("fwd", "fwd+bwd"):
                r = row[kind]
                floor = rows["sdpa only"][kind]["p50"]
                eager = rows["two-pass eager"][kind]["p50"]
                print(f"{key:32s} {name:18s} {kind:8s} {r['p50']:9.3f} {r['p20']:8.3f} {r['p80']:8.3f} "
                      f"{r['p50'] / floor:7.2f} {r['p50'] / eager:8.2f}")
        results["cases"][key] = rows
        del cases
        torch.cuda.empty_cache()

    out = pathlib.Path(__file__).parent / "results" / f"prefix_attention-{device.replace(' ', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
