"""The shared test harness: error bounds (kept here, in one place), the error measure, the
backends and devices a test runs on. Every op's tests use these and nothing looser."""

from __future__ import annotations

import pytest
import torch

from fastadapt import dispatch
from fastadapt.backends import device_reasons

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bound on ||out - ref|| / ||ref|| against the float64 reference, per compute dtype.
BOUND = {torch.float32: 1e-5, "tf32": 5e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def bound(dtype: torch.dtype, device) -> float:
    """fp32 on CUDA runs the tensor cores in tf32 unless the matmul precision is 'highest'."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" \
            and torch.get_float32_matmul_precision() != "highest":
        return BOUND["tf32"]
    return BOUND[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/inf anywhere in out gives inf (never passes)."""
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(name: str, out, ref64, dtype, device, ref_same_dtype=None) -> None:
    """Within the dtype's bound of the float64 reference and, for accumulating ops, no worse than
    twice the error of PyTorch's own computation in the same dtype (flash-attention's rule)."""
    err = rel_err(out, ref64)
    limit = bound(dtype, device)
    assert err <= limit, f"{name}: relative error {err:.3e} > bound {limit:.1e} ({dtype})"
    if ref_same_dtype is not None:
        torch_err = rel_err(ref_same_dtype, ref64)
        # The floor covers results that PyTorch happens to get (near) exact in this dtype.
        floor = torch.finfo(dtype).eps
        assert err <= 2 * torch_err + floor, (
            f"{name}: relative error {err:.3e} > 2x PyTorch's own {dtype} error {torch_err:.3e}")


def backends_for(op: str, device: str) -> list[str]:
    """The backends with an implementation of ``op`` that can run on ``device`` in this process."""
    return [name for name in dispatch._REGISTRY.get(op, {}) if not device_reasons(name, device)]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so that an element the kernel skips fails the test."""
    return torch.full_like(t, float("nan"))
