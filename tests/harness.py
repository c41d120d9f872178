"""The shared test harness: the assertion against the float64 reference (bounds and error measure
live in fastadapt.testing), the backends and devices a test runs on. Every op's tests use these."""

from __future__ import annotations

import pytest
import torch

from fastadapt import dispatch
from fastadapt.backends import device_reasons
from fastadapt.testing import BOUND, bound, rel_err  # noqa: F401  (re-exported for the tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def assert_close(name: str, out, ref64, dtype, device, ref_same_dtype=None) -> None:
    """Within the dtype's bound of the float64 reference and, for accumulating ops, no worse than
    twice the error of PyTorch's own computation in the same dtype (flash-attention's rule)."""
    err = rel_err(out, ref64)
    limit = bound(dtype, device)
    assert err <= limit, f"{name}: relative error {err:.3e} > bound {limit:.1e} ({dtype})"
    if ref_same_dtype is not None:
        torch_err = rel_err(ref_same_dtype, ref64)
        # The 2x rule compares two rounding samples; it is a fair test only when the output sums
        # many independent accumulations. An output like gA at M=1, r=1 is one dot product times
        # x: a single, possibly ill-conditioned (cancelling) sample, where PyTorch's summation
        # order may be luckier by any factor (seen: the reference backend itself at 2.5x). The rule
        # therefore allows an additive quarter of the dtype's bound on top of 2x PyTorch's error.
        floor = limit / 4
        assert err <= 2 * torch_err + floor, (
            f"{name}: relative error {err:.3e} > 2x PyTorch's own {dtype} error {torch_err:.3e}")


def backends_for(op: str, device: str) -> list[str]:
    """The backends with an implementation of ``op`` that can run on ``device`` in this process."""
    return [name for name in dispatch._REGISTRY.get(op, {}) if not device_reasons(name, device)]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so that an element the kernel skips fails the test."""
    return torch.full_like(t, float("nan"))


def spy_calls(monkeypatch, module, *names: str) -> list[str]:
    """Wrap the functions ``names`` of ``module`` so that each call appends its name to the list
    returned (for the module's own code, which looks them up at call time)."""
    calls = []
    for name in names:
        def spy(*args, real=getattr(module, name), name=name, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return calls


def assert_backward_on_forward_backend(op: str, backend: str, device: str, call, raw, gy, names) -> None:
    """Dropout masks are regenerated from the seed by each backend's own generator: a backward run
    under another forced backend must still be the forward backend's. ``call(*leaves)`` runs the
    op with dropout on leaves made from ``raw``; the grads of every backward backend must agree."""
    others = [b for b in backends_for(op, device) if b != backend]
    if not others:
        pytest.skip("one backend only")
    grads = []
    for backward_backend in (backend, *others):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in raw]
        torch.manual_seed(1234)
        with dispatch.use_backend(backend):
            y = call(*leaves)
        with dispatch.use_backend(backward_backend):
            y.backward(gy)
        grads.append([None if t is None else t.grad for t in leaves])
    for other, g in zip(others, grads[1:]):
        for name, mine, first in zip(names, g, grads[0]):
            if first is not None:
                torch.testing.assert_close(mine, first, msg=lambda m: f"{other} backward, {name}: {m}")


class OpMask(torch.nn.Module):
    """A PEFT dropout module that applies the mask a fused LoRA op draws for the same adapter (the
    layer's k-th active adapter, from ``seed + k`` on ``backend``'s generator), so that an
    unpatched PEFT model computes what the patched one does with dropout on."""

    def __init__(self, backend: str, seed: int, k: int, p: float):
        super().__init__()
        self.backend, self.seed, self.k, self.p = backend, seed, k, p

    def forward(self, x):
        from fastadapt.testing import dropout_mask
        keep = dropout_mask(self.backend, self.seed + self.k, (x.numel() // x.shape[-1], x.shape[-1]), self.p, x.device)
        return x * keep.view(x.shape).to(x.dtype) / (1 - self.p)
