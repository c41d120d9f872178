"""What every GPU benchmark script shares: the timing rule and the forward / forward+backward
closures. The scripts run as ``python benchmarks/bench_<op>.py``, which puts this folder on the path."""

from __future__ import annotations

import torch


def bench(fn, quick: bool) -> dict[str, float]:
    """Median, p20 and p80 in ms of ``fn`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10 if quick else 25, rep=30 if quick else 100)
    return {"p50": p50, "p20": p20, "p80": p80}


def forward_only(f):
    """``f()`` with autograd off: the inference cost."""
    def run():
        with torch.no_grad():
            f()
    return run


def forward_backward(f, leaves, grad_out):
    """``f().backward(grad_out)``, clearing the leaves' grads first so that nothing accumulates."""
    def run():
        for t in leaves:
            t.grad = None
        f().backward(grad_out)
    return run
