"""Error measure and bounds used to verify the fused ops against their float64 references, by the
test suite and by ``fastadapt demo`` and ``fastadapt bench`` (:mod:`fastadapt.verify`) alike
(DESIGN.md "Tests": one place for the bounds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

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


def dropout_mask(backend: str, seed: int, shape, p: float, device) -> torch.Tensor:
    """The mask (True = kept) that ``backend`` draws from ``seed`` over a 2-D tensor of ``shape``
    (LoRA: the input; bottleneck adapter: the up-projection's output). Every backend regenerates
    its own mask in the backward (never stores it), and the masks differ between backends (Philox
    in Triton, a counter hash in fastadapt._C, torch's generator in the reference)."""
    if backend == "triton":
        from fastadapt.kernels import common
        return common.dropout_keep(seed, shape, p, device)
    if backend == "reference":
        from fastadapt.reference import dropout
        return dropout.dropout_keep(seed, shape, p, device)
    if backend in ("cpp", "cuda"):
        from fastadapt import _native
        return _native.dropout_keep(seed, shape, p, device)
    raise ValueError(f"no dropout mask for backend {backend!r}")


class Draw(Protocol):
    """The choices an op's fuzz case makes (tests/test_fuzz.py backs them with hypothesis)."""

    def int(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence): ...

    def bool(self) -> bool: ...


@dataclass
class FuzzCase:
    """One random call of an op, for the differential fuzz every declared op gets
    (tests/test_fuzz.py): an op's spec draws it with its ``fuzz(draw)``.

    ``tensors``: every tensor input, by name, with random values; the fuzz casts the floating ones
    not in ``fixed`` to the dtype under test, lays them out in memory at random (transposed, sliced,
    expanded) and makes a random subset of ``grads`` require grad. ``call(**tensors)`` runs the
    public function; ``exact(keep, **tensors)`` computes the same in plain PyTorch with autograd
    (in float64 it is the truth), ``keep(k, shape, p)`` being the dropout mask (True = kept) of the
    call's k-th draw, as the backend under test draws it. ``dropout``: the call drops something.
    An op with a ``scaling`` takes it as a keyword of both, so that the fuzz can change it (a
    compiled call must not bake it in)."""

    tensors: dict[str, Optional[torch.Tensor]]
    call: Callable[..., torch.Tensor]
    exact: Callable[..., torch.Tensor]
    grads: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    dropout: bool = False
