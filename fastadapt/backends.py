"""What each backend needs from the machine, and the capability checks shared by every op.

Availability is decided once per process (imports, the interpreter flag); per-call checks
(device, dtype, shapes) live in each op's ``why_not``. Nothing here raises at import time: a
missing Triton or compiler makes its backend report itself unavailable, with the reason.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Dtypes the fused kernels compute in (fp32 accumulation throughout). float64 is served by the
# reference, which is also the float64 oracle of the tests.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(available, description or reason)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError on non-Linux wheels, or a broken install
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    mode = "CPU interpreter (TRITON_INTERPRET=1)" if triton_interpret() else "compiled, CUDA tensors"
    return True, f"triton {triton.__version__}, {mode}"


def native_status() -> tuple[bool, str]:
    """(available, description or reason) of the compiled extension fastadapt._C (cpp and cuda backends).

    The first call loads it, JIT-compiling csrc/ if needed (fastadapt/_native.py); never raises."""
    from fastadapt import _native
    return _native.status()


def device_reasons(backend: str, device: torch.device | str) -> list[str]:
    """Why ``backend`` cannot run on ``device`` in this process (empty list: it can). Each op's
    ``why_not`` starts from this and adds its own limits (dtypes, sizes)."""
    device = torch.device(device)
    if backend == "reference":
        return []
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return [why]
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return []
        if device.type == "cpu":
            return ["tensors are on the CPU and TRITON_INTERPRET is not set"]
        return [f"device {device.type!r} is not supported by the Triton kernels"]
    if backend in ("cpp", "cuda"):
        # The device first: a backend that cannot serve this device must not trigger a build.
        wanted = "cpu" if backend == "cpp" else "cuda"
        if device.type != wanted:
            return [f"the {backend} backend runs on {wanted} tensors, got {device.type}"]
        ok, why = native_status()
        if not ok:
            return [why]
        if backend == "cuda":
            from fastadapt import _native
            why = _native.cuda_reason()
            return [why] if why else []
        return []
    raise ValueError(f"unknown backend {backend!r}")


def dtype_reasons(dtype: torch.dtype, allowed=KERNEL_DTYPES) -> list[str]:
    return [] if dtype in allowed else [f"dtype {dtype} is not supported (supported: {', '.join(map(str, allowed))})"]


@dataclass(frozen=True)
class Capabilities:
    """What one backend of an op serves, as data; :meth:`why_not` is the one check over it.

    ``first``: the input whose device and dtype decide (x, z, q); ``dtypes``: the dtypes it
    computes in; ``same_dtype``: inputs that must share ``first``'s dtype (absent ones are
    skipped); ``extra(backend, **inputs)``: the op's own limits (sizes, modes), as reasons."""

    first: str
    same_dtype: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    extra: Optional[Callable[..., list[str]]] = None

    def why_not(self, backend: str) -> Callable[..., list[str]]:
        def why_not(**inputs) -> list[str]:
            first = inputs[self.first]
            reasons = device_reasons(backend, first.device) + dtype_reasons(first.dtype, self.dtypes)
            if len({inputs[n].dtype for n in self.same_dtype if inputs.get(n) is not None}) > 1:
                reasons.append(f"{', '.join(self.same_dtype[:-1])} and {self.same_dtype[-1]} must share one dtype")
            if self.extra is not None:
                reasons += self.extra(backend, **inputs)
            return reasons
        return why_not
