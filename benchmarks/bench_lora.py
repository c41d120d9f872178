"""LoRA linear on CUDA: fastadapt vs PEFT vs eager vs torch.compile vs the frozen matmul, one run.

    python benchmarks/bench_lora.py [--quick]

Times with ``triton.testing.do_bench`` (median, p20, p80 in ms) and prints a table of ratios to the
frozen fwd+bwd (the floor: ``x W^T`` forward and ``dx = dy W`` backward) and to PEFT; writes
``benchmarks/results/lora-<device>.json``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from harness import bench, forward_backward

TRAIN_SHAPES = [  # (M, in, out, r)
    (8192, 4096, 4096, 16),
    (8192, 4096, 11008, 16),
    (8192, 11008, 4096, 16),
    (8192, 4096, 4096, 64),
    (2048, 4096, 4096, 16),
]
INFER_M = [1, 16, 256]


def _peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _train_cases(M, K, N, r, dtype):
    import peft

    import fastadapt
    from fastadapt.reference import lora as reference

    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    base = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    A = (torch.randn(r, K, device=dev, dtype=dtype) / K**0.5).requires_grad_()
    B = (torch.randn(N, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
    gy = torch.randn(M, N, device=dev, dtype=dtype)
    s = 2.0

    def step(forward):
        return forward_backward(forward, (x, A, B), gy)

    def peft_layer(dropout):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype))
        model.proj.weight.data.copy_(base.weight)
        cfg = peft.LoraConfig(r=r, lora_alpha=s * r, lora_dropout=dropout, target_modules=["proj"],
                              init_lora_weights=False, autocast_adapter_dtype=False)
        return peft.get_peft_model(model, cfg).base_model.model.proj

    eager = lambda: reference.lora_linear(x, base.weight, A, B, s)  # noqa: E731
    compiled = torch.compile(reference.lora_linear)
    peft0, peft5 = peft_layer(0.0), peft_layer(0.05)
    return {
        "frozen fwd+bwd(dx)": step(lambda: base(x)),
        "fastadapt": step(lambda: fastadapt.lora_linear(x, base.weight, A, B, s)),
        "fastadapt drop0.05": step(lambda: fastadapt.lora_linear(x, base.weight, A, B, s, dropout_p=0.05)),
        "peft": step(lambda: peft0(x)),
        "peft drop0.05": step(lambda: peft5(x)),
        "eager": step(eager),
        "compile": step(lambda: compiled(x, base.weight, A, B, s)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first two training shapes, fewer repetitions")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora.py needs a CUDA device; on the CPU, `fastadapt demo` runs the backends against the reference.")
        return 2
    import fastadapt

    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    results = {"device": device, "torch": torch.__version__, "dtype": args.dtype, "train": {}, "infer": {}}
    shapes = TRAIN_SHAPES[:2] if args.quick else TRAIN_SHAPES
    print(f"{device}, {args.dtype}, torch {torch.__version__}")
    print(f"{'case':34s} {'variant':20s} {'p50 ms':>9s} {'p20':>8s} {'p80':>8s} {'x floor':>8s} {'x peft':>7s} {'peak MiB':>9s}")
    for M, K, N, r in shapes:
        key = f"M{M} K{K} N{N} r{r}"
        cases = _train_cases(M, K, N, r, dtype)
        rows = {name: {**bench(fn, args.quick), "peak_mib": _peak_mib(fn)} for name, fn in cases.items()}
        floor, peft_t = rows["frozen fwd+bwd(dx)"]["p50"], rows["peft"]["p50"]
        for name, row in rows.items():
            print(f"{key:34s} {name:20s} {row['p50']:9.3f} {row['p20']:8.3f} {row['p80']:8.3f} "
                  f"{row['p50'] / floor:8.2f} {row['p50'] / peft_t:7.2f} {row['peak_mib']:9.1f}")
        results["train"][key] = rows
        del cases
        torch.cuda.empty_cache()

    # Inference, unmerged adapter, small M: latency against the merged (plain) matmul.
    K = N = 4096
    W = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    A = torch.randn(16, K, device="cuda", dtype=dtype) / K**0.5
    B = torch.randn(N, 16, device="cuda", dtype=dtype)
    for M in INFER_M:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        with torch.no_grad():
            rows = {"merged": bench(lambda: x @ W.t(), args.quick),
                    "fastadapt unmerged": bench(lambda: fastadapt.lora_linear(x, W, A, B, 2.0), args.quick),
                    "eager unmerged": bench(lambda: x @ W.t() + (x @ A.t()) @ B.t() * 2.0, args.quick)}
        for name, row in rows.items():
            print(f"{'infer M' + str(M):34s} {name:20s} {row['p50']:9.4f} {row['p20']:8.4f} {row['p80']:8.4f} "
                  f"{row['p50'] / rows['merged']['p50']:8.2f}")
        results["infer"][f"M{M}"] = rows

    out = pathlib.Path(__file__).parent / "results" / f"lora-{device.replace(' ', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
