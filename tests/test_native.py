"""The native extension fastadapt._C (csrc/): how it builds, loads and reports itself, and its CPU
kernels called directly against the float64 reference (the shared LoRA matrix in test_lora.py also
runs on the ``cpp`` backend through the public op once it is available)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import native_malformed
from harness import BOUND, assert_close, rel_err

import fastadapt
from fastadapt import _native, dispatch
from fastadapt.backends import device_reasons
from fastadapt.reference import lora as reference

ROOT = Path(__file__).resolve().parent.parent
NATIVE_OK, NATIVE_WHY = _native.status()
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"fastadapt._C unavailable: {NATIVE_WHY}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (imports and build state start from scratch)."""
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# Build, load, status


def test_status_is_a_reason_or_a_description():
    ok, why = _native.status()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    assert _native.status() == (ok, why)  # decided once per process


def test_import_does_not_build(tmp_path):
    proc = _python("""
        import fastadapt, fastadapt.nn, fastadapt.ops
        from fastadapt import _native
        assert _native._result is None, _native._result
        print("ok")
    """, FASTADAPT_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == [], "import fastadapt wrote to the build cache"


def test_disabled_by_env_falls_back_to_reference():
    proc = _python("""
        import torch, fastadapt
        from fastadapt import dispatch
        from fastadapt.backends import native_status
        ok, why = native_status()
        assert not ok and "FASTADAPT_NO_NATIVE" in why, why
        x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        impl = dispatch.select("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None)
        reasons = dispatch.explain("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None)
        assert impl.backend == "reference", impl.backend
        assert any("FASTADAPT_NO_NATIVE" in r for r in reasons["cpp"]), reasons
        fastadapt.lora_linear(x, w, a, b, 1.0)
        print("ok")
    """, FASTADAPT_NO_NATIVE="1", TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stderr


def test_no_compiler_gives_a_clear_reason(tmp_path):
    # An empty cache and no compiler: the backend says why, import and the reference still work.
    proc = _python("""
        import torch, fastadapt
        from fastadapt import dispatch, _native
        from fastadapt.backends import native_status
        _native._prebuilt = lambda: None  # ignore a setup.py build in the checkout, if any
        ok, why = native_status()
        assert not ok and "no C++ compiler" in why, why
        x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        reasons = dispatch.explain("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None)
        assert any("no C++ compiler" in r for r in reasons["cpp"]), reasons
        assert dispatch.select("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None).backend == "reference"
        print("ok")
    """, FASTADAPT_CACHE=str(tmp_path), CXX="/nonexistent/c++", TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stderr


def test_device_mismatch_is_reported_without_building():
    # The device check comes before the build: no status call needed to refuse a device.
    assert device_reasons("cuda", "cpu") == ["the cuda backend runs on cuda tensors, got cpu"]
    assert device_reasons("cpp", "meta") == ["the cpp backend runs on cpu tensors, got meta"]


@needs_native
def test_why_not_of_the_native_backends():
    x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    reasons = dispatch.explain("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None)
    assert len(reasons["cpp"]) == 1 and "passed over" in reasons["cpp"][0]  # the crossover, below
    assert any("cuda tensors" in r for r in reasons["cuda"])
    x64 = [t.double() for t in (x, w, a, b)]
    reasons = dispatch.explain("lora_linear", x=x64[0], weight=x64[1], lora_A=x64[2], lora_B=x64[3], bias=None)
    assert any("float64" in r for r in reasons["cpp"])
    mixed = dispatch.explain("lora_linear", x=x, weight=w, lora_A=a.half(), lora_B=b, bias=None)
    assert any("share one dtype" in r for r in mixed["cpp"])


def test_cpp_lora_crossover():
    # Below the measured crossover automatic dispatch passes over cpp for the eager composite (what
    # PEFT runs); forcing cpp still runs it; above, cpp serves; `fastadapt info` states the rule.
    w, a, b = torch.randn(64, 64), torch.randn(8, 64), torch.randn(64, 8)

    def select(rows, dtype=torch.float32):
        x = torch.randn(rows, 64, dtype=dtype)
        with dispatch.only_backends("cpp", "reference"):  # as on a user's CPU: no Triton interpreter
            return dispatch.select("lora_linear", x=x, weight=w.to(dtype), lora_A=a.to(dtype),
                                   lora_B=b.to(dtype), bias=None).backend

    assert select(255) == "reference" and select(2048) == "cpp"
    assert select(2048, torch.bfloat16) == "reference" and select(2**15, torch.bfloat16) == "cpp"
    with dispatch.use_backend("cpp"):
        assert select(8) == "cpp"
    x = torch.randn(8, 64, requires_grad=True)
    with dispatch.use_backend("cpp"):
        fused = fastadapt.lora_linear(x, w, a, b, 2.0)
    assert isinstance(fused.grad_fn, torch.autograd.function.BackwardCFunction)
    with dispatch.only_backends("cpp", "reference"):
        composite = fastadapt.lora_linear(x, w, a, b, 2.0)  # plain autograd graph, nothing of ours
    assert not isinstance(composite.grad_fn, torch.autograd.function.BackwardCFunction)
    torch.testing.assert_close(composite, fused)
    assert ("lora_linear", "cpp") in dispatch.crossovers()
    with pytest.raises(ValueError, match="unknown"):
        with dispatch.only_backends("gpu"):
            pass


def test_nondeterministic_backend_is_skipped_under_deterministic_algorithms():
    # The CUDA prefix-attention backward sums dK/dV with fp32 atomics: run to run it differs in the
    # last bits, so dispatch must not pick it when the user asked for deterministic algorithms.
    q, kp = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 2, 16)
    inputs = dict(q=q, k=q, v=q, k_p=kp, v_p=kp, key_padding_mask=None)
    assert "atomics" in dispatch.nondeterministic()[("prefix_attention", "cuda")]
    assert not any("non-deterministic" in r for r in dispatch.explain("prefix_attention", **inputs)["cuda"])
    torch.use_deterministic_algorithms(True)
    try:
        reasons = dispatch.explain("prefix_attention", **inputs)
        with dispatch.use_backend("cuda"), pytest.raises(dispatch.BackendUnavailableError, match="non-deterministic"):
            dispatch.select("prefix_attention", **inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    assert any("non-deterministic" in r and "use_deterministic_algorithms(True)" in r for r in reasons["cuda"])
    assert not any("non-deterministic" in r for name in ("triton", "cpp", "reference") for r in reasons[name])


@needs_native
def test_cuda_backend_says_why_it_has_no_kernels():
    if torch.version.cuda is None:
        assert not _native.has_cuda()
        assert "CPU-only" in _native.cuda_reason()
    info = _native.info()
    assert info["fastadapt._C"].startswith("available")


def test_sources_are_listed_and_each_op_is_defined_in_its_own_file():
    # _native.py's lists are what the JIT build, setup.py and the source hash read: a file missing
    # there is silently not compiled, or not hashed (a stale cached build).
    listed = _native.CPP_SOURCES + _native.CUDA_SOURCES + _native.HEADERS
    assert len(set(listed)) == len(listed)
    assert set(listed) == {p.name for p in _native.CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")}
    # csrc/OP.cpp defines the schemas of OP_* (ops.cpp: what every op shares), nowhere else.
    shared = {"build_info", "has_cuda", "dropout_keep"}
    for name in _native.CPP_SOURCES:
        text = (_native.CSRC / name).read_text()
        defined = re.findall(r'm\.def\("(\w+)\(', text)
        assert defined, f"{name} defines no schema"
        stem = Path(name).stem
        assert all(op.startswith(stem + "_") if stem != "ops" else op in shared for op in defined), (name, defined)
    assert "TORCH_LIBRARY(" in (_native.CSRC / "ops.cpp").read_text()


@needs_native
def test_forced_cpp_backend_runs_the_extension():
    x, w, a, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(3, 16), torch.randn(8, 3)
    with dispatch.use_backend("cpp"):
        impl = dispatch.select("lora_linear", x=x, weight=w, lora_A=a, lora_B=b, bias=None)
    assert impl.backend == "cpp"


# ---------------------------------------------------------------------------------------------
# CPU kernels against the float64 reference


def _lora_inputs(M, K, N, r, dtype, row_stride=None):
    x = torch.randn(M, row_stride or K, dtype=dtype)[:, :K]  # rows with a stride > K when asked
    weight = torch.randn(N, K, dtype=dtype) / K**0.5
    lora_A = torch.randn(r, K, dtype=dtype) / K**0.5
    lora_B = torch.randn(N, r, dtype=dtype) / r**0.5
    bias = torch.randn(N, dtype=dtype)
    return x, weight, lora_A, lora_B, bias


SHAPES = [  # M, K, N, r: tails of the 8-row blocks and 16-lane dots, r above one register chunk
    (1, 80, 123, 1), (7, 123, 80, 7), (9, 15, 17, 16), (129, 256, 80, 16), (33, 80, 48, 64), (20, 1, 3, 2),
]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_kernels_match_float64_reference(M, K, N, r, dtype, dropout_p):
    ops = _native.ops()
    x, weight, lora_A, lora_B, bias = _lora_inputs(M, K, N, r, dtype, row_stride=K + 3)
    scaling, seed = 0.75, 4321
    y, u = ops.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
    gy = torch.randn(M, N, dtype=dtype)
    grads = ops.lora_backward(gy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, [True] * 5)

    keep = ops.dropout_keep(x, dropout_p, seed) if dropout_p > 0 else None

    def run(cast):
        ts = [t.detach().to(cast).requires_grad_() for t in (x, weight, lora_A, lora_B, bias)]
        out = reference.lora_linear(ts[0], ts[1], ts[2], ts[3], scaling, ts[4], keep, dropout_p)
        out.backward(gy.to(cast))
        return out, ts

    y64, r64 = run(torch.float64)
    ypt, rpt = run(dtype)
    assert_close("y", y, y64, dtype, "cpu", ypt)
    u64 = reference._dropped(x.double(), keep, dropout_p) @ lora_A.double().t() * scaling
    assert rel_err(u, u64) <= BOUND[dtype]
    # backward order: x, lora_A, lora_B, bias, weight
    for name, g, idx in zip(["x", "lora_A", "lora_B", "bias", "weight"], grads, [0, 2, 3, 4, 1]):
        assert g.dtype == dtype and g.shape == r64[idx].shape, name
        assert_close(f"grad {name}", g, r64[idx].grad, dtype, "cpu", rpt[idx].grad)


@needs_native
@pytest.mark.parametrize("needs", [[False, False, True, False, False], [True, False, False, False, False],
                                   [False, True, False, True, False], [False] * 5])
def test_lora_backward_computes_only_what_is_needed(needs):
    ops = _native.ops()
    x, weight, lora_A, lora_B, bias = _lora_inputs(19, 40, 24, 5, torch.float32)
    y, u = ops.lora_forward(x, weight, lora_A, lora_B, 0.5, bias, 0.2, 9)
    gy = torch.randn(19, 24)
    full = ops.lora_backward(gy, x, weight, lora_A, lora_B, u, 0.5, 0.2, 9, [True] * 5)
    part = ops.lora_backward(gy, x, weight, lora_A, lora_B, u, 0.5, 0.2, 9, needs)
    for need, f, p in zip(needs, full, part):
        if need:
            assert torch.equal(f, p)
        else:
            assert p.numel() == 0


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks,ranks_p", [([3, 1, 4], [0.3, 0.0, 0.5]), ([5, 3], [0.0, 0.0])])
def test_lora_segments_match_float64_reference(dtype, ranks, ranks_p):
    # Several adapters summed, each rank segment with its own dropout drawn from seed + k.
    ops = _native.ops()
    M, K, N, r = 37, 50, 24, sum(ranks)
    x, weight, lora_A, lora_B, bias = _lora_inputs(M, K, N, r, dtype, row_stride=K + 3)
    scaling, seed = 0.75, 4321
    y, u = ops.lora_segments_forward(x, weight, lora_A, lora_B, scaling, bias, ranks, ranks_p, seed)
    gy = torch.randn(M, N, dtype=dtype)
    grads = ops.lora_segments_backward(gy, x, weight, lora_A, lora_B, u, scaling, ranks, ranks_p, seed,
                                       [True] * 5)
    keep = [ops.dropout_keep(x, p, seed + k) if p > 0 else None for k, p in enumerate(ranks_p)]

    def run(cast):
        ts = [t.detach().to(cast).requires_grad_() for t in (x, weight, lora_A, lora_B, bias)]
        out = reference.lora_linear(ts[0], ts[1], ts[2], ts[3], scaling, ts[4], keep, ranks_p, ranks)
        out.backward(gy.to(cast))
        return out, ts

    y64, r64 = run(torch.float64)
    ypt, rpt = run(dtype)
    assert_close("y", y, y64, dtype, "cpu", ypt)
    for name, g, idx in zip(["x", "lora_A", "lora_B", "bias", "weight"], grads, [0, 2, 3, 4, 1]):
        assert g.dtype == dtype and g.shape == r64[idx].shape, name
        assert_close(f"grad {name}", g, r64[idx].grad, dtype, "cpu", rpt[idx].grad)


@needs_native
def test_one_lora_segment_is_the_plain_kernel():
    ops = _native.ops()
    x, weight, lora_A, lora_B, bias = _lora_inputs(41, 40, 24, 5, torch.bfloat16)
    gy = torch.randn(41, 24, dtype=torch.bfloat16)
    plain = ops.lora_forward(x, weight, lora_A, lora_B, 0.5, bias, 0.2, 9)
    seg = ops.lora_segments_forward(x, weight, lora_A, lora_B, 0.5, bias, [5], [0.2], 9)
    assert all(torch.equal(a, b) for a, b in zip(plain, seg))
    plain = ops.lora_backward(gy, x, weight, lora_A, lora_B, plain[1], 0.5, 0.2, 9, [True] * 5)
    seg = ops.lora_segments_backward(gy, x, weight, lora_A, lora_B, seg[1], 0.5, [5], [0.2], 9, [True] * 5)
    assert all(torch.equal(a, b) for a, b in zip(plain, seg))


@needs_native
def test_lora_kernels_are_deterministic_and_write_fresh_outputs():
    ops = _native.ops()
    x, weight, lora_A, lora_B, bias = _lora_inputs(300, 64, 40, 8, torch.float32)
    y1, u1 = ops.lora_forward(x, weight, lora_A, lora_B, 2.0, bias, 0.1, 3)
    y2, u2 = ops.lora_forward(x, weight, lora_A, lora_B, 2.0, bias, 0.1, 3)
    assert torch.equal(y1, y2) and torch.equal(u1, u2)
    gy = torch.randn(300, 40)
    g1 = ops.lora_backward(gy, x, weight, lora_A, lora_B, u1, 2.0, 0.1, 3, [True] * 5)
    g2 = ops.lora_backward(gy, x, weight, lora_A, lora_B, u1, 2.0, 0.1, 3, [True] * 5)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    storages = {g.untyped_storage().data_ptr() for g in g1}
    assert len(storages) == 5, "gradients share storage"
    assert all(torch.isfinite(g).all() for g in g1)


@needs_native
def test_lora_empty_batch():
    ops = _native.ops()
    x, weight, lora_A, lora_B, bias = _lora_inputs(0, 16, 8, 2, torch.float32)
    y, u = ops.lora_forward(x, weight, lora_A, lora_B, 1.0, bias, 0.0, 0)
    assert y.shape == (0, 8) and u.shape == (0, 2)
    grads = ops.lora_backward(torch.empty(0, 8), x, weight, lora_A, lora_B, u, 1.0, 0.0, 0, [True] * 5)
    assert [tuple(g.shape) for g in grads] == [(0, 16), (2, 16), (8, 2), (8,), (8, 16)]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@needs_native
@pytest.mark.parametrize("call,match", [case[1:] for case in native_malformed.CASES],
                         ids=[case[0] for case in native_malformed.CASES])
def test_native_ops_reject_malformed_calls(call, match):
    # The ops are public (torch.ops.fastadapt_C.*): each checks its arguments and names the bad one.
    with pytest.raises(RuntimeError, match=match):
        call(_native.ops())


@needs_native
def test_native_ops_are_never_recorded_by_autograd():
    # Without an Autograd kernel of its own an op ran under PyTorch's fallback, which recorded the
    # kernel's inner ATen calls: here index_select's saved index, a view of a vector the kernel had
    # freed (use after free at backward). Every fastadapt_C op refuses instead, naming the argument.
    ops = _native.ops()
    x, weight = torch.randn(6, 16, requires_grad=True), torch.randn(8, 16)
    A, B = torch.randn(2, 3, 16), torch.randn(2, 8, 3)
    rest = (torch.ones(2), torch.tensor([3, 2], dtype=torch.int32), torch.tensor([0, 1, 0, -1, 1, 1]), None, None, 0)
    with pytest.raises(RuntimeError, match="multi_lora_forward: x requires grad, and the native kernels are not "
                                           "differentiable"):
        ops.multi_lora_forward(x, weight, A, B, *rest)
    with torch.no_grad():  # nothing to record: it runs, below autograd
        y, u = ops.multi_lora_forward(x, weight, A, B, *rest)
    assert y.grad_fn is None and not y.requires_grad
    y2, _ = ops.multi_lora_forward(x.detach(), weight, A, B, *rest)
    assert torch.equal(y, y2)


def _double_backward_call(op, x):
    """``op`` through the public API on x (4, 8): its output, a function of x."""
    w, A, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    if op == "lora_linear":
        return fastadapt.lora_linear(x, w, A, B, 1.0, dropout_p=0.1)
    if op == "dora_linear":
        return fastadapt.dora_linear(x, w, A, B, torch.rand(6) + 0.5, 1.0)
    if op == "multi_lora_linear":
        return fastadapt.multi_lora_linear(x, w, torch.stack([A, A]), torch.stack([B, B]), [1.0, 2.0],
                                           torch.tensor([0, 1, -1, 0]))
    if op == "qlora_linear":
        from fastadapt.reference.qlora import random_weight
        return fastadapt.qlora_linear(x, random_weight("nf4", 6, 8), A, B, 1.0)
    if op == "bottleneck_adapter":
        return fastadapt.bottleneck_adapter(x, torch.randn(3, 8), None, torch.randn(8, 3), None)
    q = x.view(1, 2, 2, 8)
    return fastadapt.prefix_attention(q, q, q, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(2))


@needs_native
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear", "multi_lora_linear", "qlora_linear",
                                "bottleneck_adapter", "prefix_attention"])
def test_double_backward_through_the_cpp_backend_is_refused(op):
    # The backward of a cpp forward runs the native backward kernel, never recorded by autograd
    # (it writes through raw pointers): the gradients it gives under create_graph=True have a
    # backward that refuses, by name.
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    with dispatch.use_backend("cpp"):
        y = _double_backward_call(op, x)
    assert isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)  # the fused op, not a composite
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"fastadapt::{op}: double backward \(create_graph=True"):
        gx.sum().backward()
    torch.autograd.grad(y.square().sum(), x)  # a plain backward is unaffected


@needs_native
@pytest.mark.parametrize("op,cls", [(op, cls) for op in native_malformed.ARGS
                                    for cls in (*native_malformed.CLASSES, "scalars")])
def test_native_ops_survive_the_generated_table(op, cls):
    # Every tensor argument of the op in the class (a view in any layout gives its contiguous copy's
    # outputs or is refused by name; an empty, absent, wrong-dtype, other-device or grad-requiring
    # one is run or refused by the op's own check), or its scalars' bad values.
    ops = _native.ops()
    failures = [f"{name}: {problem}" for o, c, name, check in native_malformed.fuzz_table(ops)
                if (o, c) == (op, cls) and (problem := check(ops))]
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not os.environ.get("FASTADAPT_SANITIZE_TEST"),
                    reason="set FASTADAPT_SANITIZE_TEST=1 (builds fastadapt._C under AddressSanitizer, "
                           "about 2 min on 2 cores)")
def test_malformed_calls_under_address_sanitizer():
    # Any read past a buffer before an argument check would abort this process with a report.
    # The ASan runtime must be loaded first, and libstdc++ with it: python does not link it, and
    # ASan's interceptor of C++ throws (every TORCH_CHECK) needs the real one at startup.
    libs = [subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={lib}"], capture_output=True,
                           text=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        pytest.skip(f"the C++ compiler has no ASan runtime or libstdc++ ({libs})")
    env = {**os.environ, "FASTADAPT_SANITIZE": "address", "LD_PRELOAD": " ".join(libs),
           # CPython's allocations look like leaks to LeakSanitizer; out-of-bounds accesses abort.
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "native_malformed.py")], cwd=ROOT / "tests",
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "AddressSanitizer" in proc.stdout, proc.stdout  # the build_info of the extension it loaded
    assert "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr[-6000:]


@needs_native
def test_dropout_mask_statistics():
    ops = _native.ops()
    like = torch.empty(256, 512)
    for p in (0.05, 0.3, 0.9):
        keep = ops.dropout_keep(like, p, 11)
        # 131072 Bernoulli draws: 5 sigma <= 0.007
        assert abs(keep.float().mean().item() - (1 - p)) < 0.007
    assert ops.dropout_keep(like, 0.0, 11).all()
    a, b = ops.dropout_keep(like, 0.5, 1), ops.dropout_keep(like, 0.5, 2)
    assert 0.4 < (a == b).float().mean().item() < 0.6  # different seeds: independent masks
    # Rows and columns decorrelated: neighbouring elements agree about half of the time.
    assert 0.45 < (a[:, 1:] == a[:, :-1]).float().mean().item() < 0.55
    assert 0.45 < (a[1:] == a[:-1]).float().mean().item() < 0.55


# ---------------------------------------------------------------------------------------------
# Compile-only check of the CUDA sources (no GPU needed; skipped without nvcc or torch headers)


def _nvcc() -> str | None:
    from torch.utils import cpp_extension
    for cand in ([str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")] if cpp_extension.CUDA_HOME else []) + ["nvcc"]:
        if shutil.which(cand):
            return shutil.which(cand)
    return None


@pytest.mark.parametrize("source", _native.CUDA_SOURCES)
def test_cuda_sources_compile_for_sm80_and_sm90(source, tmp_path):
    """nvcc -c of each .cu file against this torch's headers, for sm_80 and sm_90.

    A CPU-only torch wheel ships the ATen/c10 CUDA headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h (C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for it) and a
    minimal toolkit has no cuBLAS headers (the kernels include none). The result is cached per
    source, header and nvcc version, since the compile takes about a minute on two cores.
    """
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = Path(torch.__file__).parent / "include"
    if not (include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip(f"torch {torch.__version__} ships no c10/cuda headers")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    flags = ["-std=c++20", "-O3", "-DFASTADAPT_WITH_CUDA", "--expt-relaxed-constexpr",
             "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *cpp_extension.COMMON_NVCC_FLAGS]
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    import sysconfig
    flags.append(f"-I{sysconfig.get_paths()['include']}")

    key = hashlib.sha256()  # the source and the headers it may include
    for path in [_native.CSRC / source] + sorted(_native.CSRC.glob("*.h")) + sorted(_native.CSRC.glob("*.cuh")):
        key.update(path.read_bytes())
    key.update((version + torch.__version__ + " ".join(flags)).encode())
    stamp = _native.cache_dir() / "nvcc-check" / f"{source}-{key.hexdigest()[:16]}.ok"
    if stamp.exists():
        return
    proc = subprocess.run([nvcc, "-c", str(_native.CSRC / source), "-o", str(tmp_path / "out.o"), *flags],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("No such file or directory" in proc.stderr and "fatal error" in proc.stderr):
        missing = [line for line in proc.stderr.splitlines() if "fatal error" in line]
        pytest.skip(f"headers missing for a CUDA compile here: {missing[0].strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{nvcc}: {version}\n")


# ---------------------------------------------------------------------------------------------
# The build lock: a killed or foreign build never blocks first use


def _hold_build_lock(build: Path) -> subprocess.Popen:
    """A process that takes the build lock, leaves cpp_extension's ``lock`` file as a build would,
    and sleeps: a builder, alive until killed."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fastadapt import _native
        build = Path({str(build)!r})
        with _native.build_lock(build):
            (build / "lock").touch()
            print("ready", flush=True)
            time.sleep(600)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_killed_build_does_not_block(tmp_path):
    builder = _hold_build_lock(tmp_path)
    builder.kill()  # SIGKILL: no cleanup, cpp_extension's lock file stays
    builder.wait()
    assert (tmp_path / "lock").exists()
    start = time.monotonic()
    with _native.build_lock(tmp_path, wait_s=60):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - start < 3


def test_foreign_lock_file_is_taken_over(tmp_path):
    (tmp_path / "lock").touch()  # a lock file without an owner (another tool, an older fastadapt)
    start = time.monotonic()
    with _native.build_lock(tmp_path, wait_s=60):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - start < 3


def test_live_build_is_waited_on_up_to_a_limit(tmp_path):
    builder = _hold_build_lock(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(_native.BuildBusy, match=f"process {builder.pid}@"):
            with _native.build_lock(tmp_path, wait_s=1):
                pass
        assert time.monotonic() - start < 3
    finally:
        builder.kill()
        builder.wait()


def test_first_use_after_a_killed_build_does_not_hang(tmp_path):
    # The whole first use, with cpp_extension.load replaced by its lock protocol (wait while the
    # lock file exists, as torch's FileBaton does; here for at most 30 s) and no compile.
    proc = _python("""
        import os, time
        from torch.utils import cpp_extension
        from fastadapt import _native
        _native._prebuilt = lambda: None
        _native.cuda_build_reason = lambda: "not in this test"
        build = _native.build_dir(_native.build_tag(False, None), False)
        build.mkdir(parents=True)
        (build / "lock").touch()  # left by a build killed before it could remove it

        def load(build_directory, **_):
            start = time.monotonic()
            while os.path.exists(os.path.join(build_directory, "lock")):
                assert time.monotonic() - start < 30, "waited 30 s on a stale lock"
                time.sleep(0.1)
            raise RuntimeError("the fake load got the lock")

        cpp_extension.load = load
        start = time.monotonic()
        ok, why = _native.status()
        assert not ok and "the fake load got the lock" in why, why
        print(f"{time.monotonic() - start:.1f}")
    """, FASTADAPT_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) < 5


@needs_native
def test_a_built_extension_loads_without_the_build_lock():
    # Once built, a process (a rank of a distributed job, an xdist worker) loads the extension
    # while another holds the build lock: it neither waits nor rebuilds.
    build = _native.build_dir(_native.build_tag(_native.has_cuda(), None), _native.has_cuda())
    if not (build / _native._BUILT).exists():
        pytest.skip(f"this process did not load a JIT build ({NATIVE_WHY})")
    holder = _hold_build_lock(build)
    try:
        proc = _python("""
            import time
            from fastadapt import _native
            start = time.monotonic()
            ok, why = _native.status()
            assert ok and "loaded from cache" in why, why
            print(f"{time.monotonic() - start:.1f}")
        """)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) < 30 and "waiting for process" not in proc.stderr, proc.stderr
