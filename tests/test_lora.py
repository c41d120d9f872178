"""fastadapt.lora_linear against the float64 reference: output and every gradient, on every
backend that can run here (the Triton kernels through the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from harness import (DEVICES, DTYPES, assert_backward_on_forward_backend, assert_close, backends_for, gpu, nan_like,
                     rel_err)

import fastadapt
from fastadapt import dispatch
from fastadapt.testing import dropout_mask
from fastadapt.reference import lora as reference
from fastadapt.ops.lora import LORA_LINEAR

CASES = [  # (leading shape of x, in, out, r)
    ((1,), 80, 123, 1),
    ((7,), 123, 80, 7),
    ((129,), 80, 256, 16),
    ((3, 43), 256, 80, 64),
    ((2, 5, 7), 123, 123, 16),
]
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for("lora_linear", d)]
# The Triton backend's two ways to run the frozen product (kernels/lora.py, frozen_gemm).
BACKEND_DEVICE_GEMM = [(b, d, g) for b, d in BACKEND_DEVICE for g in (("torch", "triton") if b == "triton" else ("-",))]


def _inputs(lead, n_in, n_out, r, dtype, device, bias=True):
    x = torch.randn(*lead, n_in, dtype=dtype, device=device)
    weight = torch.randn(n_out, n_in, dtype=dtype, device=device) / n_in**0.5
    lora_A = torch.randn(r, n_in, dtype=dtype, device=device) / n_in**0.5
    lora_B = torch.randn(n_out, r, dtype=dtype, device=device) / r**0.5
    b = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    return [x, weight, lora_A, lora_B, b]


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _run(backend, tensors, scaling, dropout_p, seed, ranks=None):
    x, weight, lora_A, lora_B, b = tensors
    torch.manual_seed(seed)  # the op draws its dropout seed from the default CPU generator
    with dispatch.use_backend(backend):
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, b, dropout_p=dropout_p, ranks=ranks)
        gy = torch.randn_like(y)
        y.backward(gy)
    return y, gy


def _masks(backend, device, x, dropout_p, ranks=None):
    """The masks the op drew for x after ``torch.manual_seed(1234)``: one, or one per adapter of
    ``ranks`` (seed + k), None where there is no dropout."""
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    shape = (x.numel() // x.shape[-1], x.shape[-1])
    ps = [dropout_p] if ranks is None else dropout_p
    keep = [dropout_mask(backend, seed + k, shape, p, device).view(x.shape) if p > 0 else None
            for k, p in enumerate(ps)]
    return keep[0] if ranks is None else keep


def _check_against_reference(backend, device, dtype, lead, n_in, n_out, r, *, bias=True, dropout_p=0.0,
                             scaling=0.5, train_weight=False, noncontig=False, ranks=None):
    raw = _inputs(lead, n_in, n_out, r, dtype, device, bias)
    if noncontig:  # x as a transposed view: its last dim has stride != 1
        raw[0] = raw[0].transpose(-1, -2).contiguous().transpose(-1, -2) if raw[0].dim() > 1 else raw[0]
        raw[0] = raw[0].detach()
    ours = [_leaf(t) for t in raw]
    ours[1].requires_grad_(train_weight)
    y, gy = _run(backend, ours, scaling, dropout_p, 1234, ranks)
    keep = _masks(backend, device, raw[0], dropout_p, ranks)

    def reference_run(cast):
        ts = [_leaf(t, cast) for t in raw]
        ts[1].requires_grad_(train_weight)
        out = reference.lora_linear(ts[0], ts[1], ts[2], ts[3], scaling, ts[4], keep, dropout_p, ranks)
        out.backward(gy.to(cast))
        return out, ts

    y64, ref64 = reference_run(torch.float64)
    y_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert_close("y", y, y64, dtype, device, y_pt)
    names = ["x", "weight", "lora_A", "lora_B", "bias"]
    for name, mine, r64, rpt in zip(names, ours, ref64, ref_pt):
        if mine is None or not mine.requires_grad:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape
        assert_close(f"grad {name}", mine.grad, r64.grad, dtype, device, rpt.grad)


@pytest.mark.parametrize("backend,device,gemm", BACKEND_DEVICE_GEMM)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r", CASES)
def test_matches_reference(backend, device, gemm, dtype, lead, n_in, n_out, r, monkeypatch):
    monkeypatch.setenv("FASTADAPT_LORA_GEMM", gemm)
    _check_against_reference(backend, device, dtype, lead, n_in, n_out, r)


@pytest.mark.parametrize("backend,device,gemm", BACKEND_DEVICE_GEMM)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_same_mask_forward_and_backward(backend, device, gemm, dtype, monkeypatch):
    monkeypatch.setenv("FASTADAPT_LORA_GEMM", gemm)
    _check_against_reference(backend, device, dtype, (37,), 80, 48, 16, dropout_p=0.3)


@pytest.mark.parametrize("backend,device,gemm", BACKEND_DEVICE_GEMM)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks,dropout_p", [([5, 16, 1], [0.3, 0.0, 0.5]), ([7, 7], [0.2, 0.2])])
def test_several_adapters_each_draw_their_own_dropout_mask(backend, device, gemm, dtype, ranks, dropout_p,
                                                           monkeypatch):
    # PEFT's several active adapters with dropout: one call, adapter k masked by its own draw
    # (seed + k), of its own probability; no dropout on an adapter of p = 0.
    monkeypatch.setenv("FASTADAPT_LORA_GEMM", gemm)
    _check_against_reference(backend, device, dtype, (2, 19), 80, 48, sum(ranks), dropout_p=dropout_p, ranks=ranks)
    # The masks differ between adapters: one mask for all would not pass the check above.
    masks = _masks(backend, device, torch.empty(38, 80), [0.2, 0.2], [1, 1])
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_several_adapters_without_dropout_are_one_rank_r_call(backend, device):
    # Without dropout in effect (p = 0 or eval) the adapters' split changes nothing: the same bits.
    x, weight, lora_A, lora_B, b = _inputs((2, 9), 48, 32, 6, torch.float32, device)
    with dispatch.use_backend(backend):
        plain = fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b)
        for p, training in (([0.0, 0.0], True), ([0.3, 0.1], False)):
            y = fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b, dropout_p=p, training=training, ranks=[2, 4])
            assert torch.equal(y, plain)
        # One adapter: its p is the call's.
        torch.manual_seed(3)
        one = fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b, dropout_p=[0.3], ranks=[6])
        torch.manual_seed(3)
        assert torch.equal(one, fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b, dropout_p=0.3))


@pytest.mark.parametrize("ranks,dropout_p,error,match", [
    ([2, 2], 0.1, ValueError, r"sum\(ranks\) \(lora_A.shape\[0\], r\) is 4, expected 3"),
    ([3, 0], 0.1, ValueError, "ranks must be positive ints"),
    ([1.5, 1.5], 0.1, ValueError, "ranks must be positive ints"),
    ([], 0.1, TypeError, "non-empty sequence"),
    (3, 0.1, TypeError, "non-empty sequence"),
    ([1, 2], [0.1], ValueError, r"len\(dropout_p\) \(one per adapter of ranks\) is 1, expected 2"),
    ([1, 2], [0.1, 1.0], ValueError, r"dropout_p\[1\] must be in \[0, 1\)"),
    ([1, 2], "0.1", TypeError, "dropout_p must be a float or a sequence"),
    ([1] * 3, [0.1, 0.2], ValueError, "len"),
])
def test_bad_ranks(ranks, dropout_p, error, match):
    args = _inputs((5,), 16, 8, 3, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        fastadapt.lora_linear(*args[:4], 1.0, args[4], dropout_p=dropout_p, ranks=ranks)
    with pytest.raises(TypeError, match="dropout_p must be a real number"):  # a sequence needs ranks
        fastadapt.lora_linear(*args[:4], 1.0, args[4], dropout_p=[0.1, 0.2])


def test_cuda_kernels_leave_several_adapters_with_dropout_to_triton():
    x, weight, lora_A, lora_B, b = _inputs((3,), 16, 8, 2, torch.float32, "cpu")
    why_not = dispatch.get("lora_linear", "cuda").why_not
    assert any("one mask per call" in r for r in why_not(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=b,
                                                         ranks=(1, 1)))
    assert not any("mask" in r for r in why_not(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("variant", ["no_bias", "noncontiguous_x", "trainable_weight", "rslora_scale"])
def test_variants(backend, device, variant):
    kwargs = {"no_bias": dict(bias=False), "noncontiguous_x": dict(noncontig=True),
              "trainable_weight": dict(train_weight=True), "rslora_scale": dict(scaling=16 / 7**0.5)}[variant]
    lead = (37,) if variant == "noncontiguous_x" else (2, 19)  # 2-D: the kernels see the strided view
    _check_against_reference(backend, device, torch.float32, lead, 80, 48, 7, **kwargs)


@pytest.mark.parametrize("backend,device,gemm", BACKEND_DEVICE_GEMM)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_views(backend, device, gemm, layout, monkeypatch):
    # A bias that is a view (every other element of a buffer, or one value broadcast) must be read
    # through its strides or copied, whichever GEMM path adds it.
    monkeypatch.setenv("FASTADAPT_LORA_GEMM", gemm)
    x, weight, lora_A, lora_B, _ = _inputs((2, 19), 80, 48, 7, torch.float32, device)
    raw = torch.randn(96 if layout == "strided" else 1, device=device)

    def run(cast, backend_name):
        leaves = [_leaf(t, cast) for t in (x, weight, lora_A, lora_B, raw)]
        bias = leaves[4][::2] if layout == "strided" else leaves[4].expand(48)
        with dispatch.use_backend(backend_name):
            y = fastadapt.lora_linear(*leaves[:4], 0.5, bias)
            y.backward(gy.to(cast))
        return y, leaves

    gy = torch.randn(2, 19, 48, device=device)
    y, ours = run(torch.float32, backend)
    y64, ref = run(torch.float64, "reference")
    assert_close("y", y, y64, torch.float32, device)
    for name, mine, r64 in zip(["x", "lora_A", "lora_B", "bias"], [ours[0], *ours[2:]], [ref[0], *ref[2:]]):
        assert_close(f"grad {name}", mine.grad, r64.grad, torch.float32, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_dropout_keeps_expected_fraction(backend, device):
    p = 0.25
    keep = dropout_mask(backend, 99, (64, 512), p, device)
    frac = keep.float().mean().item()
    # 32768 Bernoulli(0.75) draws: std 0.0024; 5 sigma.
    assert abs(frac - (1 - p)) < 0.012
    again = dropout_mask(backend, 99, (64, 512), p, device)
    other = dropout_mask(backend, 100, (64, 512), p, device)
    assert torch.equal(keep, again) and not torch.equal(keep, other)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dropout_writes_the_operand_its_kernels_drop_in_register(dtype):
    # D(x) for a cuBLAS product (DoRA's separate strategy): the mask of dropout_keep, the scale
    # 1/(1-p) in fp32, one rounding to the dtype; into a strided output, or added to it.
    if "triton" not in backends_for("lora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import common

    p, seed = 0.3, 5
    x = torch.randn(48, 37, dtype=dtype).t()  # (37, 48), strides (1, 37)
    keep = common.dropout_keep(seed, x.shape, p, "cpu")
    assert 0.6 < keep.float().mean() < 0.8
    dropped = x.float() * keep * (1.0 / (1.0 - torch.tensor(p, dtype=torch.float32)))  # as the kernels, in fp32
    out = nan_like(torch.empty(48, 37, dtype=dtype)).t()
    assert torch.equal(common.dropout(x, p, seed, out=out), dropped.to(dtype))
    base = torch.randn(37, 48, dtype=dtype)
    assert torch.equal(common.dropout(x, p, seed, out=base.clone(), accumulate=True),
                       (dropped + base.float()).to(dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_eval_mode_has_no_dropout(backend, device):
    x, weight, lora_A, lora_B, b = _inputs((9,), 48, 32, 4, torch.float32, device)
    with dispatch.use_backend(backend):
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, 2.0, b, dropout_p=0.5, training=False)
    assert rel_err(y, reference.lora_linear(x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                            2.0, b.double())) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_empty_batch(backend, device):
    x, weight, lora_A, lora_B, b = _inputs((0,), 48, 32, 4, torch.float32, device)
    with dispatch.use_backend(backend):
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, 2.0, b)
    assert y.shape == (0, 32)


def test_triton_launchers_write_every_element():
    if "triton" not in backends_for("lora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import lora as kernels

    M, K, N, R = 37, 80, 48, 7
    x, weight, lora_A, lora_B, b = _inputs((M,), K, N, R, torch.float32, "cpu")
    u = kernels.lora_down(x, lora_A.t(), 0.5, nan_like(torch.empty(M, R)))
    y = kernels.lora_matmul(x, weight.t(), u, lora_B.t(), b, nan_like(torch.empty(M, N)))
    assert torch.isfinite(u).all() and torch.isfinite(y).all()
    frozen = x @ weight.t() + b
    updated = kernels.lora_matmul(None, None, u, lora_B.t(), None, frozen.clone(), accumulate=True)
    assert rel_err(updated, y.double()) < 1e-5
    gy = torch.randn(M, N)
    for splits in (1, 3):  # 3 splits of the M reduction accumulate with atomics
        gB = kernels.lora_reduce(u, gy, 1.0, nan_like(torch.empty(N, R)).t(), splits=splits).t()
        assert rel_err(gB, gy.double().t() @ u.double()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_selects_triton_first_and_falls_back(device):
    x, weight, lora_A, lora_B, b = _inputs((3,), 16, 8, 2, torch.float64, device)
    reasons = dispatch.explain("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=b)
    assert any("float64" in r for r in reasons["triton"])
    assert dispatch.select("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=b).backend != "triton"
    with pytest.raises(fastadapt.BackendUnavailableError, match="float64"):
        with dispatch.use_backend("triton"):
            fastadapt.lora_linear(x, weight, lora_A, lora_B, 1.0, b)


def test_bad_gemm_choice(monkeypatch):
    if "triton" not in backends_for("lora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    monkeypatch.setenv("FASTADAPT_LORA_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTADAPT_LORA_GEMM"), dispatch.use_backend("triton"):
        fastadapt.lora_linear(*_inputs((3,), 16, 8, 2, torch.float32, "cpu")[:4], 1.0)


def test_env_var_forces_backend(monkeypatch):
    x, weight, lora_A, lora_B, b = _inputs((3,), 16, 8, 2, torch.float32, "cpu")
    monkeypatch.setenv("FASTADAPT_BACKEND", "reference")
    assert dispatch.select("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=b).backend == "reference"
    monkeypatch.setenv("FASTADAPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTADAPT_BACKEND"):
        fastadapt.lora_linear(x, weight, lora_A, lora_B, 1.0, b)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.__setitem__(0, a[0][..., :-1]), ValueError, "in_features"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, r"lora_A.shape\[1\]"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, r"lora_B.shape\[0\]"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), ValueError, r"lora_B.shape\[1\] \(r\)"),
    (lambda a: a.__setitem__(2, a[2][:0]), ValueError, "rank 0"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, "bias"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "weight: torch.float64"),
    (lambda a: a.__setitem__(0, a[0].int()), TypeError, "x must be a floating-point"),
    (lambda a: a.__setitem__(1, a[1][0]), ValueError, "weight must have 2 dimensions"),
    (lambda a: a.__setitem__(0, "x"), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(mutate, error, match):
    args = _inputs((5,), 16, 8, 2, torch.float32, "cpu")
    mutate(args)
    with pytest.raises(error, match=match):
        fastadapt.lora_linear(*args[:4], 1.0, args[4])


@pytest.mark.parametrize("scaling,dropout_p,match", [
    (float("nan"), 0.0, "scaling must be finite"), (float("inf"), 0.0, "scaling must be finite"),
    (1.0, 1.0, r"dropout_p must be in \[0, 1\)"), (1.0, -0.1, "dropout_p"),
])
def test_bad_scalars(scaling, dropout_p, match):
    args = _inputs((5,), 16, 8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        fastadapt.lora_linear(*args[:4], scaling, args[4], dropout_p=dropout_p)


@gpu
def test_device_mismatch():
    args = _inputs((5,), 16, 8, 2, torch.float32, "cpu")
    args[2] = args[2].cuda()
    with pytest.raises(ValueError, match="one device"):
        fastadapt.lora_linear(*args[:4], 1.0, args[4])


def test_adapter_weights_in_float32_with_half_input():
    # PEFT keeps adapters in float32 by default while the base runs in bf16/fp16.
    x, weight, lora_A, lora_B, b = _inputs((11,), 48, 32, 4, torch.bfloat16, "cpu")
    A32, B32 = _leaf(lora_A, torch.float32), _leaf(lora_B, torch.float32)
    y = fastadapt.lora_linear(x, weight, A32, B32, 2.0, b)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and A32.grad.dtype == torch.float32 and B32.grad.dtype == torch.float32
    ref = reference.lora_linear(x.double(), weight.double(), lora_A.double(), lora_B.double(), 2.0, b.double())
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("ranks", [None, [1, 3]])
def test_backward_runs_on_the_forward_backend(backend, device, ranks):
    dropout_p = 0.3 if ranks is None else [0.3, 0.2]
    assert_backward_on_forward_backend(
        "lora_linear", backend, device,
        lambda x, w, a, b, bias: fastadapt.lora_linear(x, w, a, b, 0.5, bias, dropout_p=dropout_p, ranks=ranks),
        _inputs((2, 9), 48, 32, 4, torch.float32, device), torch.randn(2, 9, 32, device=device),
        ["x", "weight", "lora_A", "lora_B", "bias"])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dropout_p,ranks", [(0.0, None), (0.3, None), ([0.3, 0.1], [2, 4])])
def test_eager_path_matches_the_custom_op(backend, device, dropout_p, ranks):
    # Eager calls go through an autograd.Function (fastadapt/ops/_declare.py), torch.compile through
    # the custom op: the same backend functions, so the same bits (the reference backend's eager
    # path is the autograd composite, which computes in the same order).
    tensors = _inputs((3, 5), 48, 40, 6, torch.float32, device)
    results = []
    for eager in (True, False):
        x, lora_A, lora_B, b = (_leaf(t) for t in (tensors[0], *tensors[2:]))
        torch.manual_seed(11)
        with dispatch.use_backend(backend):
            if eager:
                y = fastadapt.lora_linear(x, tensors[1], lora_A, lora_B, 0.5, b, dropout_p=dropout_p, ranks=ranks)
            elif ranks is None:
                seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p else None
                y = torch.ops.fastadapt.lora_linear(x, tensors[1], lora_A, lora_B, 0.5, b, dropout_p, seed)[0]
            else:
                seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
                y = torch.ops.fastadapt.lora_linear(x, tensors[1], lora_A, lora_B, 0.5, b, 0.0, seed, ranks,
                                                    dropout_p)[0]
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, lora_A.grad, lora_B.grad, b.grad])
    for name, mine, op in zip(["y", "x", "lora_A", "lora_B", "bias"], *results):
        torch.testing.assert_close(mine, op, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_with_several_adapters_and_dropout():
    raw = _inputs((2, 7), 48, 32, 6, torch.float32, "cpu")

    def step(x, weight, lora_A, lora_B, b):
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b, dropout_p=[0.2, 0.4], ranks=[2, 4])
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [_leaf(t) for t in raw]
        torch.manual_seed(5)  # the same dropout seed
        fn(*leaves).backward()
        results.append(leaves)
    for name, a, c in zip(["x", "weight", "lora_A", "lora_B", "bias"], *results):
        torch.testing.assert_close(c.grad, a.grad, msg=lambda msg: f"{name}: {msg}")


def test_opcheck():
    x, weight, lora_A, lora_B, b = _inputs((2, 5), 16, 8, 3, torch.float32, "cpu")
    for bias in (b, None):
        for p, seed in ((0.0, None), (0.2, torch.tensor(7))):
            args = (x.requires_grad_(), weight, lora_A.requires_grad_(), lora_B.requires_grad_(), 0.5, bias, p, seed)
            torch.library.opcheck(torch.ops.fastadapt.lora_linear.default, args)
        # several adapters, each with its own dropout
        torch.library.opcheck(torch.ops.fastadapt.lora_linear.default,
                              (x, weight, lora_A, lora_B, 0.5, bias, 0.0, torch.tensor(7), [1, 2], [0.2, 0.1]))
    x, lora_A, lora_B = x.detach(), lora_A.detach(), lora_B.detach()
    for args, needs in (((x, weight, lora_A, lora_B, 0.5, b, 0.0, None), [True, True, True, True, False]),
                        ((x, weight, lora_A, lora_B, 0.5, None, 0.0, None), [False, True, True, False, True]),
                        ((x, weight, lora_A, lora_B, 0.5, b, 0.0, torch.tensor(7), [2, 1], [0.0, 0.3]), [True] * 5)):
        output = torch.ops.fastadapt.lora_linear(*args)
        torch.library.opcheck(torch.ops.fastadapt.lora_linear_backward.default,
                              LORA_LINEAR.backward_inputs(args, output, needs))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_as_linear_does(backend, device, autocast_dtype):
    # torch.autocast casts every floating input of F.linear to the region's dtype (float64 apart);
    # the op does the same at its Autocast dispatch key, and autograd returns each grad in its input's dtype.
    x, weight, lora_A, lora_B, b = _inputs((3, 7), 80, 48, 7, torch.float32, device)
    leaves = [_leaf(t) for t in (x, lora_A, lora_B, b)]
    with dispatch.use_backend(backend), torch.autocast(device, autocast_dtype):
        y = fastadapt.lora_linear(leaves[0], weight, leaves[1], leaves[2], 0.5, leaves[3])
        direct = torch.ops.fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.5, b, 0.0, None)[0]
    assert y.dtype == direct.dtype == autocast_dtype
    gy = torch.randn_like(y)
    with dispatch.use_backend(backend):
        y.backward(gy)
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    # The float64 truth of the same computation on the inputs rounded to the autocast dtype.
    exact = [_leaf(t.to(autocast_dtype), torch.float64) for t in (x, lora_A, lora_B, b)]
    y64 = reference.lora_linear(exact[0], weight.to(autocast_dtype).double(), exact[1], exact[2], 0.5, exact[3])
    y64.backward(gy.double())
    assert_close("y", y, y64, autocast_dtype, device)
    for name, mine, ref in zip(["x", "lora_A", "lora_B", "bias"], leaves, exact):
        assert_close(f"grad {name}", mine.grad, ref.grad, autocast_dtype, device)
    # float64 is never autocast.
    with torch.autocast(device, autocast_dtype):
        y64_in = fastadapt.lora_linear(x.double(), weight.double(), lora_A.double(), lora_B.double(), 0.5, b.double())
    assert y64_in.dtype == torch.float64


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_tensor_scaling_is_read_on_the_device(backend, device):
    # PEFT's compiled hotswap keeps each scaling as a 0-d tensor: the same result as the float, a
    # gradient for it, and no recompile when its value changes under torch.compile.
    x, weight, lora_A, lora_B, b = _inputs((3, 5), 24, 16, 4, torch.float32, device)
    with dispatch.use_backend(backend):
        expected = fastadapt.lora_linear(x, weight, lora_A, lora_B, 0.75, b)
        scaling = torch.tensor(0.75, device=device, requires_grad=True)
        y = fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, b)
        y.sum().backward()
    assert rel_err(y, expected) < 1e-6
    exact = (x.double() @ lora_A.double().t()) @ lora_B.double().t()
    assert rel_err(scaling.grad, exact.sum()) < 1e-5
    with pytest.raises(ValueError, match="one value"):
        fastadapt.lora_linear(x, weight, lora_A, lora_B, torch.ones(2, device=device), b)


def test_tensor_scaling_needs_no_recompile():
    x, weight, lora_A, lora_B, b = _inputs((2, 5), 24, 16, 4, torch.float32, "cpu")
    scaling = torch.tensor(0.5)
    compiled = torch.compile(lambda x: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, b), fullgraph=True,
                             backend="aot_eager")
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (2.0, -1.5):
            scaling.fill_(value)
            assert rel_err(compiled(x), fastadapt.lora_linear(x, weight, lora_A, lora_B, value, b)) < 1e-6
