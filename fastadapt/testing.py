"""Error measure and bounds used to verify the fused ops against their float64 references, by the
test suite and by ``fastadapt demo`` and ``fastadapt bench`` (:mod:`fastadapt.verify`) alike
(DESIGN.md "Tests": one place for the bounds)."""

from __future__ import annotations

import torch

# Bound on ||out - ref|| / ||ref|| against the float64 reference, per compute dtype.
BOUND = {torch.float32: 1e-5, "tf32": 5e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


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
