"""How ``fastadapt bench`` and ``fastadapt demo`` time one variant: ``triton.testing.do_bench`` on CUDA
(CUDA events, L2 flushed between runs), a wall-clock loop on the CPU, or a given number of synced
wall-clock runs (the demo's); median, p20 and p80 in ms either way. Also the peak memory of one
step, the copy bandwidth behind the HBM floors, and the forward / forward+backward closures that
every case times."""

from __future__ import annotations

import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


def measure(fn, device: str, rep_ms: float = 100.0, warmup_ms: float = 25.0, runs: int | None = None,
            untimed: int = 1) -> dict[str, float]:
    """{"p50", "p20", "p80"} in ms of ``fn()``, run for about ``rep_ms`` after ``warmup_ms``; or, given
    ``runs``, that many timed calls after ``untimed`` untimed ones, each between two device syncs (the
    demo's ``--steps``). The first call (compilation, autotuning) is never timed, unless the caller
    has just made it (``untimed=0``)."""
    if runs is not None:
        return _counted(fn, device, runs, untimed)
    if device == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return {"p50": p50, "p20": p20, "p80": p80}
    return _cpu_measure(fn, rep_ms, warmup_ms)


def _counted(fn, device: str, runs: int, untimed: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(untimed):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def _cpu_measure(fn, rep_ms: float, warmup_ms: float, min_runs: int = 5, max_runs: int = 200) -> dict[str, float]:
    fn()
    start = time.perf_counter()
    fn()
    estimate = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / estimate)):
        fn()
    times = []
    for _ in range(max(min_runs, min(max_runs, int(rep_ms / estimate)))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def quantiles(times_ms: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of a list of times (linear interpolation, as torch.quantile)."""
    if len(times_ms) == 1:  # a one-step demo
        return dict.fromkeys(("p50", "p20", "p80"), times_ms[0])
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return {"p50": statistics.median(times_ms), "p20": q[1], "p80": q[7]}


def peak_mib(fn, device: str, clear=()) -> float | None:
    """Memory one call of ``fn`` allocates at its peak beyond what was allocated before it, in MiB
    (activations, gradients, workspaces), on CUDA; None on the CPU. The gradients of ``clear`` are
    dropped first so that the previous call's do not count as already allocated."""
    if device != "cuda":
        return None
    for t in clear:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per ms that a device-to-device copy of ``nbytes`` reaches (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, rep_ms=100, warmup_ms=25)["p50"]
    return 2 * nbytes / ms


def forward_only(f):
    """``f()`` with autograd off: the inference cost."""
    def run():
        with torch.no_grad():
            f()
    return run


def forward_backward(f, leaves, grad_out):
    """``f().backward(grad_out)``, dropping the leaves' grads first so that nothing accumulates."""
    def run():
        for t in leaves:
            t.grad = None
        f().backward(grad_out)
    return run
