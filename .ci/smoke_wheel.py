"""Smoke test of an installed fastadapt, run by .ci/run from outside the checkout in a fresh venv
holding only the built wheel: the package comes from site-packages, fastadapt._C JIT-builds from
the csrc/ packaged with it, and every op runs on the cpp backend, forward and backward, in
agreement with the reference backend."""

import subprocess
import sys
from pathlib import Path

import torch

import fastadapt
from fastadapt import _native, dispatch
from fastadapt.testing import rel_err

package = Path(fastadapt.__file__).resolve().parent
assert "site-packages" in package.parts, f"fastadapt imported from {package}, not from an installed wheel"
assert _native.CSRC == package / "csrc", _native.CSRC
ok, why = _native.status()
assert ok, why
print(f"fastadapt {package}: {why}")

torch.manual_seed(0)
x, w, a, b = torch.randn(2, 7, 32), torch.randn(24, 32), torch.randn(4, 32), torch.randn(24, 4)
z, wd, wu = torch.randn(9, 32), torch.randn(8, 32) / 6, torch.randn(32, 8) / 3
q, k, v, kp, vp = torch.randn(1, 4, 5, 16), *(torch.randn(1, 2, n, 16) for n in (5, 5, 3, 3))
gate = torch.randn(4)
magnitude = torch.rand(24) + 0.5
A_stack, B_stack, ids = torch.randn(3, 4, 32), torch.randn(3, 24, 4), torch.tensor([2, -1])  # one id per sequence
fp8 = fastadapt.fp8_weight(w.to(torch.float8_e4m3fn), torch.tensor(0.5))
cases = {
    "lora_linear": lambda t: fastadapt.lora_linear(*t, 0.5),
    "dora_linear": lambda t: fastadapt.dora_linear(*t, magnitude, 0.5),
    "multi_lora_linear": lambda t: fastadapt.multi_lora_linear(t[0], t[1], t[2], t[3], [0.5, 1.0, 2.0], ids,
                                                               ranks=[4, 2, 3]),
    "qlora_linear": lambda t: fastadapt.qlora_linear(t[0], fp8, t[1], t[2], 0.5),
    "bottleneck_adapter": lambda t: fastadapt.bottleneck_adapter(t[0], t[1], None, t[2], None, activation="gelu"),
    "prefix_attention": lambda t: fastadapt.prefix_attention(*t),
}
inputs = {"lora_linear": (x, w, a, b), "dora_linear": (x, w, a, b), "multi_lora_linear": (x, w, A_stack, B_stack),
          "qlora_linear": (x, a, b), "bottleneck_adapter": (z, wd, wu), "prefix_attention": (q, k, v, kp, vp, gate)}
for op, call in cases.items():
    results = {}
    for backend in ("cpp", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs[op]]
        with dispatch.use_backend(backend):
            out = call(leaves)
            out.square().sum().backward()
        results[backend] = [out, *(t.grad for t in leaves)]
    errors = [rel_err(mine, ref.double()) for mine, ref in zip(results["cpp"], results["reference"])]
    assert max(errors) < 1e-4, (op, errors)
    print(f"{op}: cpp backend matches the reference (max relative error {max(errors):.1e})")

info = subprocess.run([str(Path(sys.executable).parent / "fastadapt"), "info"], capture_output=True, text=True)
assert info.returncode == 0, info.stderr
print("the fastadapt command runs (fastadapt info)")
