"""The dropout mask each backend draws from a seed, for the tests: every backend regenerates its
own mask in the backward (never stores it), and the masks differ between backends (Philox in
Triton, a counter hash in fastadapt._C, torch's generator in the reference)."""

from __future__ import annotations

from torch import Tensor


def dropout_keep(backend: str, seed: int, shape, p: float, device) -> Tensor:
    """The mask (True = kept) that ``backend`` draws from ``seed`` over a 2-D tensor of ``shape``
    (LoRA: the input; bottleneck adapter: the up-projection's output)."""
    if backend == "triton":
        from fastadapt.kernels import common
        return common.dropout_keep(seed, shape, p, device)
    if backend == "reference":
        from fastadapt.reference import dropout
        return dropout.dropout_keep(seed, shape, p, device)
    if backend in ("cpp", "cuda"):
        from fastadapt.ops import _native_backends
        return _native_backends.dropout_keep(seed, shape, p, device)
    raise ValueError(f"no dropout mask for backend {backend!r}")
