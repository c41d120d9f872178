"""Where the cpp LoRA kernels start beating eager PyTorch on this CPU: the measurement behind
``CPP_CROSSOVER`` in fastadapt/ops/lora.py.

Times one fwd+bwd of ``fastadapt.lora_linear`` forced onto the cpp backend and of the eager
composite PEFT runs (``F.linear(x, W) + (x @ A.T) @ B.T * s``), r=16, in process CPU time (so a
busy machine inflates both alike), and prints eager/cpp per shape: above 1 the fused path wins.

    python benchmarks/cpu_crossover.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastadapt
from fastadapt import dispatch


def cpu_time_us(fn, budget_s: float = 0.3) -> float:
    """Best of three batches of ``fn`` calls, in process CPU microseconds per call."""
    for _ in range(3):
        fn()
    start, calls = time.process_time(), 0
    while time.process_time() - start < budget_s:
        fn()
        calls += 1
    batch = max(1, calls // 3)
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(batch):
            fn()
        best = min(best, (time.process_time() - start) / batch * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), r={args.rank}; eager/cpp > 1: cpp is faster")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (64, 128, 256, 512, 1024, 2048, 4096):
            for width in (64, 128, 256, 512, 1024):
                x = torch.randn(rows, width, dtype=dtype, requires_grad=True)
                weight = torch.randn(width, width, dtype=dtype)
                lora_A = torch.randn(args.rank, width, dtype=dtype, requires_grad=True)
                lora_B = torch.randn(width, args.rank, dtype=dtype, requires_grad=True)

                def fused():
                    with dispatch.use_backend("cpp"):
                        fastadapt.lora_linear(x, weight, lora_A, lora_B, 2.0).sum().backward()

                def eager():
                    (torch.nn.functional.linear(x, weight) + (x @ lora_A.t()) @ lora_B.t() * 2.0).sum().backward()

                cpp_us, eager_us = cpu_time_us(fused), cpu_time_us(eager)
                print(f"{str(dtype)[6:]:9} M={rows:5} {width:5}x{width:<5} cpp {cpp_us:10.1f} us  "
                      f"eager {eager_us:10.1f} us  eager/cpp {eager_us / cpp_us:5.2f}", flush=True)


if __name__ == "__main__":
    main()
