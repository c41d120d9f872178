"""Smoke test of an installed fastadapt, run by .ci/run from outside the checkout in a fresh venv
holding only the built wheel: the package comes from site-packages, fastadapt._C JIT-builds from
the csrc/ packaged with it, and every declared op runs on the cpp backend, forward and backward, in
agreement with the reference backend, on a call its fuzz case draws (fastadapt/ops/OP.py)."""

import random
import subprocess
import sys
from pathlib import Path

import torch

import fastadapt
from fastadapt import _native, dispatch
from fastadapt.ops._declare import declared
from fastadapt.testing import rel_err

package = Path(fastadapt.__file__).resolve().parent
assert "site-packages" in package.parts, f"fastadapt imported from {package}, not from an installed wheel"
assert _native.CSRC == package / "csrc", _native.CSRC
ok, why = _native.status()
assert ok, why
print(f"fastadapt {package}: {why}")


class FixedDraw:
    """The choices of an op's fuzz case (fastadapt.testing.Draw) from a seeded generator: one fixed call."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return self.rng.choice(list(options))

    def bool(self) -> bool:
        return self.rng.random() < 0.5


def fixed_case(spec):
    """The op's fuzz case at the first seed that draws rows and no dropout (the cpp backend and the
    reference draw different masks)."""
    for seed in range(100):
        torch.manual_seed(seed)
        case = spec.fuzz(FixedDraw(seed))
        if not case.dropout and all(t is None or t.numel() for t in case.tensors.values()):
            return seed, case
    raise AssertionError(f"{spec.name}: no fuzz draw without dropout and with rows in 100 seeds")


for op, declared_op in declared().items():
    assert declared_op.spec.fuzz is not None, f"{op} declares no fuzz case"
    seed, case = fixed_case(declared_op.spec)
    results = {}
    for backend in ("cpp", "reference"):
        tensors = {name: None if t is None else t.clone().requires_grad_(name in case.grads)
                   for name, t in case.tensors.items()}
        with dispatch.use_backend(backend):
            out = case.call(**tensors)
            out.square().sum().backward()
        results[backend] = [out, *(t.grad for t in tensors.values() if t is not None and t.requires_grad)]
    errors = [rel_err(mine, ref.double()) for mine, ref in zip(results["cpp"], results["reference"])]
    assert max(errors) < 1e-4, (op, seed, errors)
    print(f"{op}: cpp backend matches the reference at fuzz draw {seed} (max relative error {max(errors):.1e})")

info = subprocess.run([str(Path(sys.executable).parent / "fastadapt"), "info"], capture_output=True, text=True)
assert info.returncode == 0, info.stderr
print("the fastadapt command runs (fastadapt info)")
