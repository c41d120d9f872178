"""CPU backends: the C++ kernels of fastadapt._C against the plain PyTorch reference, per op.

Forward + backward through the public op (autograd included) under a forced backend, on the
shapes of issue 5 (M=2048, d=1024; LoRA r=16). Medians of repeated steps (p20/p80 shown) with
torch's intra-op threads as configured (all cores by default).

    python benchmarks/bench_cpu.py [--reps 15] [--dtype float32 bfloat16] [--ops lora bottleneck] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastadapt
from fastadapt import dispatch
from fastadapt.backends import native_status


def _time(fn, reps: int, warmup: int = 2) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]  # median, p20, p80


def lora_case(dtype, dropout_p, M=2048, d=1024, r=16):
    x = torch.randn(M, d, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, d, dtype=dtype) / d**0.5
    bias = torch.randn(d, dtype=dtype)
    lora_A = (torch.randn(r, d, dtype=dtype) / d**0.5).requires_grad_()
    lora_B = (torch.randn(d, r, dtype=dtype) / r**0.5).requires_grad_()
    gy = torch.randn(M, d, dtype=dtype)

    def step():
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, 2.0, bias, dropout_p=dropout_p)
        y.backward(gy)
        x.grad = lora_A.grad = lora_B.grad = None

    def floor():  # the frozen products alone: x W^T + b and gy W
        with torch.no_grad():
            torch.addmm(bias, x, weight.t())
            gy @ weight

    return f"lora fwd+bwd M={M} {d}x{d} r={r} p={dropout_p}", step, floor


def bottleneck_case(dtype, full, M=2048, d=1024, m=64):
    """Pfeiffer's core (relu, residual after, no adapter LayerNorms), or every stage on (LN before,
    LN after over o + r, gelu, per-channel scale, gate, dropout 0.1)."""
    from fastadapt.ops.bottleneck import bottleneck_adapter

    def leaf(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape) * std + mean).to(dtype).requires_grad_()

    z, r = leaf(M, d), leaf(M, d)
    wd, bd, wu, bu = leaf(m, d, std=d**-0.5), leaf(m, std=0.1), leaf(d, m, std=m**-0.5), leaf(d, std=0.1)
    kw = {}
    if full:
        kw = dict(activation="gelu", scale=leaf(d, mean=1.0, std=0.1), ln_before=(leaf(d, mean=1.0), leaf(d)),
                  ln_after=(leaf(d, mean=1.0), leaf(d)), adapter_residual_before_ln=True,
                  gate=torch.rand(M).to(dtype).requires_grad_(), dropout_p=0.1)
    gout = torch.randn(M, d).to(dtype)
    params = [z, r, wd, bd, wu, bu] + [t for v in kw.values() for t in (v if isinstance(v, tuple) else (v,))
                                       if isinstance(t, torch.Tensor)]

    def step():
        out = bottleneck_adapter(z, wd, bd, wu, bu, r, **kw)
        out.backward(gout)
        for t in params:
            t.grad = None

    def floor():  # the six projections' GEMMs of forward and backward, nothing else
        with torch.no_grad():
            h = torch.addmm(bd, z, wd.t())
            torch.addmm(bu, h, wu.t())
            gout.t() @ h
            g_h = gout @ wu
            g_h.t() @ z
            g_h @ wd

    label = "all stages (LN/gelu/scale/gate/p=0.1)" if full else "Pfeiffer core (relu, +r)"
    return f"bottleneck fwd+bwd M={M} d={d} m={m} {label}", step, floor


CASES = {
    "lora": lambda dtype: [lora_case(dtype, 0.0), lora_case(dtype, 0.1)],
    "bottleneck": lambda dtype: [bottleneck_case(dtype, False), bottleneck_case(dtype, True)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ops", nargs="+", default=list(CASES))
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's, all cores); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ok, why = native_status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fastadapt._C: {why}")
    if not ok:
        raise SystemExit("the cpp backend is unavailable; nothing to compare")
    # floor: the frozen / projection GEMMs alone (ATen), which both backends run; the speedup
    # over the reference cannot exceed reference / floor.
    print(f"{'case':<80} {'dtype':<9} {'reference ms':>18} {'cpp ms':>18} {'speedup':>8} {'floor ms':>9}")
    for op in args.ops:
        for dt in args.dtype:
            dtype = getattr(torch, dt)
            for name, step, floor in CASES[op](dtype):
                row = {}
                for backend in ("reference", "cpp"):
                    with dispatch.use_backend(backend):
                        row[backend] = _time(step, args.reps)
                low = _time(floor, args.reps)
                ref, cpp = row["reference"], row["cpp"]
                fmt = lambda t: f"{t[0] * 1e3:7.1f} ({t[1] * 1e3:.0f}-{t[2] * 1e3:.0f})"  # noqa: E731
                print(f"{name:<80} {dt:<9} {fmt(ref):>18} {fmt(cpp):>18} {ref[0] / cpp[0]:7.2f}x {low[0] * 1e3:9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
