"""Per-call cost of the eager path on the CPU: each op's public function, forward + backward, at a
size where the kernels cost little (so the Python and dispatch layers show), on one thread.

    python benchmarks/call_overhead.py [--backend cpp] [--repeats 2000]

The op wiring (argument checks, backend choice, the autograd.Function around the backend) is what
this measures; run it before and after a change to that wiring, interleaved, on an idle machine. It
times the calling thread's CPU time (``time.thread_time``; one thread, so that this is the whole
call's CPU time), which leaves out the time other processes hold the core, but not what they do to
its caches: at a load of 4 on 2 cores the same tree measured 10-50 % slower than idle.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastadapt
from fastadapt import dispatch


def _cases():
    torch.manual_seed(0)
    x, w, a, b = torch.randn(64, 64), torch.randn(128, 64), torch.randn(8, 64), torch.randn(128, 8)
    m = torch.rand(128) + 0.5
    A, B, ids = torch.randn(3, 8, 64), torch.randn(3, 128, 8), torch.randint(-1, 3, (64,))
    fp8 = fastadapt.fp8_weight(w.to(torch.float8_e4m3fn), torch.tensor(0.5))
    z, wd, wu = torch.randn(64, 64), torch.randn(16, 64), torch.randn(64, 16)
    q, k, v, kp, vp = torch.randn(1, 4, 16, 16), *(torch.randn(1, 2, n, 16) for n in (16, 16, 4, 4))
    gate = torch.randn(4)
    return {
        "lora_linear": ((x, a, b), lambda x, a, b: fastadapt.lora_linear(x, w, a, b, 2.0)),
        "dora_linear": ((x, a, b, m), lambda x, a, b, m: fastadapt.dora_linear(x, w, a, b, m, 2.0)),
        "multi_lora_linear": ((x, A, B), lambda x, A, B: fastadapt.multi_lora_linear(x, w, A, B, [1.0, 2.0, 0.5], ids)),
        "qlora_linear": ((x, a, b), lambda x, a, b: fastadapt.qlora_linear(x, fp8, a, b, 2.0)),
        "bottleneck_adapter": ((z, wd, wu), lambda z, wd, wu: fastadapt.bottleneck_adapter(z, wd, None, wu, None)),
        "prefix_attention": ((q, k, v, kp, vp, gate), lambda *t: fastadapt.prefix_attention(*t)),
    }


def _time(call, leaves, repeats: int) -> float:
    leaves = [t.clone().requires_grad_() for t in leaves]

    def step():
        call(*leaves).sum().backward()

    for _ in range(50):
        step()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        step()
        samples.append(time.thread_time() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"eager fwd+bwd per call, median of {args.repeats}, 1 thread's CPU time, backend {args.backend} (us)")
    for op, (leaves, call) in _cases().items():
        with dispatch.use_backend(args.backend):
            us = _time(call, leaves, args.repeats)
        print(f"{op:20s} {us:8.1f}")


if __name__ == "__main__":
    main()
