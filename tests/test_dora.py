"""fastadapt.dora_linear against the float64 reference and against PEFT's own DoRA layer: output
and every gradient, on every backend that can run here (the Triton kernels through the interpreter
on CPU)."""

from __future__ import annotations

import pytest
import torch
from harness import (DEVICES, DTYPES, assert_backward_on_forward_backend, assert_close, backends_for, bound, nan_like,
                     rel_err, spy_calls)
from test_lora import _leaf

import fastadapt
from fastadapt import dispatch
from fastadapt.testing import dropout_mask
from fastadapt.reference import dora as reference
from fastadapt.ops.dora import DORA_LINEAR
from fastadapt.strategy import DORA_NORM

CASES = [  # (leading shape of x, in, out, r)
    ((1,), 80, 123, 1),
    ((7,), 123, 80, 7),
    ((129,), 80, 48, 16),
    ((3, 43), 48, 80, 64),
    ((2, 5, 7), 123, 123, 16),
]
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for("dora_linear", d)]
NAMES = ["x", "weight", "lora_A", "lora_B", "magnitude", "bias"]


def _inputs(lead, n_in, n_out, r, dtype, device, bias=True):
    x = torch.randn(*lead, n_in, dtype=dtype, device=device)
    weight = torch.randn(n_out, n_in, dtype=dtype, device=device) / n_in**0.5
    lora_A = torch.randn(r, n_in, dtype=dtype, device=device) / n_in**0.5
    lora_B = torch.randn(n_out, r, dtype=dtype, device=device) / r**0.5
    # PEFT initialises the magnitude to the norm itself; a random one exercises g != 1.
    magnitude = (torch.rand(n_out, device=device) + 0.5).to(dtype)
    b = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    return [x, weight, lora_A, lora_B, magnitude, b]


def _seed_of_call(seed):
    """The dropout seed the op draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def _check_against_reference(backend, device, dtype, lead, n_in, n_out, r, *, bias=True, dropout_p=0.0,
                             scaling=0.5, train_weight=False, noncontig=False, weight_view=False, raw=None):
    """Output and every gradient against float64 (and PyTorch's own error in ``dtype``); returns
    them, {name: tensor} with "y". ``raw``: the inputs, else fresh ones."""
    raw = list(raw or _inputs(lead, n_in, n_out, r, dtype, device, bias))
    if noncontig:  # x as a transposed view: its last dim has stride != 1
        raw[0] = raw[0].transpose(-1, -2).contiguous().transpose(-1, -2)
    ours = [_leaf(t) for t in raw]
    ours[1].requires_grad_(train_weight)
    weight = ours[1]
    if weight_view:  # a GPT-2 Conv1D keeps (in, out): the op takes the transposed view
        weight = ours[1].detach().t().contiguous().requires_grad_(train_weight)
    torch.manual_seed(1234)  # the op draws its dropout seed from the default CPU generator
    with dispatch.use_backend(backend):
        y = fastadapt.dora_linear(ours[0], weight.t() if weight_view else weight, *ours[2:5], scaling, ours[5],
                                  dropout_p=dropout_p)
        gy = torch.randn_like(y)
        y.backward(gy)
    if weight_view and train_weight:
        ours[1].grad = weight.grad.t()

    keep = None
    if dropout_p > 0:
        keep = dropout_mask(backend, _seed_of_call(1234), (raw[0].numel() // n_in, n_in), dropout_p, device)
        keep = keep.view(raw[0].shape)

    def reference_run(cast):
        ts = [_leaf(t, cast) for t in raw]
        ts[1].requires_grad_(train_weight)
        out = reference.dora_linear(*ts[:5], scaling, ts[5], keep, dropout_p)
        out.backward(gy.to(cast))
        return out, ts

    y64, ref64 = reference_run(torch.float64)
    y_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert_close("y", y, y64, dtype, device, y_pt)
    results = {"y": y}
    for name, mine, r64, rpt in zip(NAMES, ours, ref64, ref_pt):
        if mine is None or not mine.requires_grad:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape
        assert_close(f"grad {name}", mine.grad, r64.grad, dtype, device, rpt.grad)
        results[name] = mine.grad
    return results


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r", CASES)
def test_matches_reference(backend, device, dtype, lead, n_in, n_out, r):
    _check_against_reference(backend, device, dtype, lead, n_in, n_out, r)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_same_mask_forward_and_backward(backend, device, dtype):
    _check_against_reference(backend, device, dtype, (37,), 80, 48, 16, dropout_p=0.3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("variant", ["no_bias", "noncontiguous_x", "trainable_weight", "trainable_weight_dropout",
                                     "transposed_weight", "rslora_scale"])
def test_variants(backend, device, variant):
    kwargs = {"no_bias": dict(bias=False), "noncontiguous_x": dict(noncontig=True),
              "trainable_weight": dict(train_weight=True),
              "trainable_weight_dropout": dict(train_weight=True, dropout_p=0.2),
              "transposed_weight": dict(weight_view=True, train_weight=True),
              "rslora_scale": dict(scaling=16 / 7**0.5)}[variant]
    lead = (37,) if variant == "noncontiguous_x" else (2, 19)  # 2-D: the kernels see the strided view
    _check_against_reference(backend, device, torch.float32, lead, 80, 48, 7, **kwargs)


# --- The Triton backend's two strategies (fastadapt/strategy.py): norm in the GEMM, or separate + cuBLAS

TRITON_DEVICES = [d for d in DEVICES if "triton" in backends_for("dora_linear", d)]
NORMS = (DORA_NORM.fused, DORA_NORM.split)
STRATEGY_CASES = [  # (leading shape of x, in, out, r, options of _check_against_reference)
    ((1,), 80, 123, 16, {}),  # r > 1: at M = 1, r = 1, gA is one dot product, too ill-conditioned to compare
    ((129,), 80, 48, 16, {}),
    ((3, 43), 48, 80, 64, dict(bias=False)),
    ((2, 5, 7), 123, 123, 16, dict(dropout_p=0.3)),
    ((37,), 80, 48, 7, dict(noncontig=True, dropout_p=0.2)),
    ((2, 19), 80, 48, 7, dict(weight_view=True, train_weight=True, dropout_p=0.2, scaling=16 / 7**0.5)),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r,options", STRATEGY_CASES)
def test_norm_strategies_match_reference_and_each_other(monkeypatch, device, dtype, lead, n_in, n_out, r, options):
    raw = _inputs(lead, n_in, n_out, r, dtype, device, options.get("bias", True))
    results = {}
    for norm in NORMS:
        monkeypatch.setenv(DORA_NORM.env, norm)
        results[norm] = _check_against_reference("triton", device, dtype, lead, n_in, n_out, r, raw=raw, **options)
    fused, split = (results[n] for n in NORMS)
    assert fused.keys() == split.keys()
    for name in fused:  # the same dropout mask, the same math: apart by rounding only
        assert rel_err(split[name], fused[name]) <= bound(dtype, device), name


def test_norm_strategy_rule():
    assert DORA_NORM.min_rows == 512  # the bench's M grid (fastadapt/bench/cases/dora.py) brackets it
    assert [DORA_NORM.choose(m) for m in (0, 1, 511, 512, 8192)] == ["gemm"] * 3 + ["separate"] * 2
    x = torch.empty(2, 256, 16)  # 512 rows
    inputs = dict(x=x, weight=torch.empty(8, 16), lora_A=torch.empty(2, 16), lora_B=torch.empty(8, 2),
                  magnitude=torch.empty(8), bias=None)
    if "triton" in backends_for("dora_linear", "cpu"):
        assert dispatch.explain("dora_linear", **inputs)["triton"] == ["strategy: separate (M=512 >= 512 rows)"]
        assert dispatch.explain("dora_linear", **dict(inputs, x=x[:1]))["triton"] == \
            ["strategy: gemm (M=256 < 512 rows)"]
    assert str(DORA_NORM) == dispatch.strategies()[("dora_linear", "triton")]
    assert "FASTADAPT_DORA_NORM=gemm|separate forces one" in str(DORA_NORM) and "not measured" in str(DORA_NORM)


def test_norm_strategy_forced_by_the_environment(monkeypatch):
    for forced in NORMS:
        monkeypatch.setenv(DORA_NORM.env, forced)
        assert DORA_NORM.choose(1) == DORA_NORM.choose(10**6) == forced
        assert DORA_NORM(torch.empty(3, 4)) == f"{forced} (forced by FASTADAPT_DORA_NORM)"
    monkeypatch.setenv(DORA_NORM.env, "auto")
    assert DORA_NORM.choose(1) == "gemm"
    monkeypatch.setenv(DORA_NORM.env, "cublas")
    with pytest.raises(ValueError, match="FASTADAPT_DORA_NORM='cublas': expected 'gemm', 'separate' or 'auto'"):
        DORA_NORM.choose(1)


@pytest.mark.parametrize("rows,ran", [(511, "dora_matmul"), (512, "weight_norm")])
def test_kernels_follow_the_rule(monkeypatch, rows, ran):
    # The forward runs the norm-in-GEMM kernel below the crossover, the norm kernel + cuBLAS from it.
    if "triton" not in backends_for("dora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import dora as kernels

    calls = spy_calls(monkeypatch, kernels, "dora_matmul", "weight_norm")
    x, weight, lora_A, lora_B, m, b = _inputs((rows,), 16, 16, 2, torch.float32, "cpu")
    with dispatch.use_backend("triton"):
        y = fastadapt.dora_linear(x, weight, lora_A, lora_B, m, 0.5, b)
    assert calls == [ran]
    assert rel_err(y, reference.dora_linear(*(t.double() for t in (x, weight, lora_A, lora_B, m)), 0.5, b.double())) \
        < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_eval_mode_has_no_dropout(backend, device):
    x, weight, lora_A, lora_B, m, b = _inputs((9,), 48, 32, 4, torch.float32, device)
    with dispatch.use_backend(backend):
        y = fastadapt.dora_linear(x, weight, lora_A, lora_B, m, 2.0, b, dropout_p=0.5, training=False)
    ref = reference.dora_linear(*(t.double() for t in (x, weight, lora_A, lora_B, m)), 2.0, b.double())
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_empty_batch(backend, device):
    leaves = [_leaf(t) for t in _inputs((0,), 48, 32, 4, torch.float32, device)]
    with dispatch.use_backend(backend):
        y = fastadapt.dora_linear(*leaves[:5], 2.0, leaves[5])
        y.sum().backward()
    assert y.shape == (0, 32)
    assert torch.count_nonzero(leaves[4].grad) == 0 and torch.count_nonzero(leaves[2].grad) == 0


def test_triton_launchers_write_every_element():
    if "triton" not in backends_for("dora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import dora as kernels

    M, K, N, R = 37, 80, 48, 7
    x, weight, lora_A, lora_B, m, b = (t.double() for t in _inputs((M,), K, N, R, torch.float32, "cpu"))
    u = x @ lora_A.t() * 0.5
    y, pre, norm = kernels.dora_matmul(*(t.float() for t in (x, weight.t(), lora_A.t(), u, lora_B.t(), m)), 0.5,
                                       b.float(), nan_like(torch.empty(M, N)), nan_like(torch.empty(M, N)),
                                       nan_like(torch.empty(N)))
    n64 = reference.weight_norm(weight, lora_A, lora_B, 0.5, torch.float64)
    assert rel_err(norm, n64) < 1e-5
    assert rel_err(pre, x @ weight.t() + u @ lora_B.t()) < 1e-5
    assert rel_err(y, m / n64 * (x @ weight.t() + u @ lora_B.t()) + b) < 1e-5
    gy = torch.randn(M, N, dtype=torch.float64)
    gu = torch.randn(M, R, dtype=torch.float64)
    g = m / n64
    gx = kernels.dora_grad_x(*(t.float() for t in (gy, weight, gu, lora_A, g)), nan_like(torch.empty(M, K)))
    assert rel_err(gx, (gy * g) @ weight + gu @ lora_A) < 1e-5
    for splits in (1, 3):  # 3 splits of the M reduction accumulate with atomics
        gm, gb = kernels.dora_colsum(gy.float(), pre, norm, nan_like(torch.empty(N)), nan_like(torch.empty(N)),
                                     splits=splits)
        assert rel_err(gm, (gy * pre.double()).sum(0) / norm.double()) < 1e-5
        assert rel_err(gb, gy.sum(0)) < 1e-5
    # The separate strategy's pieces: cuBLAS's x W^T (and D(x) W^T) turned into P and y in one pass,
    # and gx from cuBLAS products.
    xw = (x @ weight.t()).float()
    for dropout in (False, True):
        y0 = (x @ weight.t() * 2).float() if dropout else nan_like(torch.empty(M, N))
        y, pre = kernels.dora_scale(xw.clone(), u.float(), lora_B.t().float(), m.float(), n64.float(), b.float(), y0,
                                    dropout=dropout)
        P = x @ weight.t() + u @ lora_B.t()
        assert rel_err(pre, P) < 1e-5
        assert rel_err(y, m / n64 * P + b + (x @ weight.t() if dropout else 0)) < 1e-5
    gx = kernels.grad_x_cublas(*(t.float() for t in (gy, weight, gu, lora_A, g)), nan_like(torch.empty(M, K)))
    assert rel_err(gx, (gy * g) @ weight + gu @ lora_A) < 1e-5


@pytest.mark.parametrize("n_out,n_in,r,transposed", [(123, 80, 7, False), (48, 300, 1, True), (37, 96, 100, False)])
def test_weight_norm_kernel(n_out, n_in, r, transposed):
    # One pass over W (any strides; r past the 64 of one rank block), the K reduction in one
    # program per block of rows or split across 3 with atomics; every row written.
    if "triton" not in backends_for("dora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import dora as kernels

    weight, lora_A, lora_B = (t.double() for t in _inputs((1,), n_in, n_out, r, torch.float32, "cpu")[1:4])
    weight = weight.t().contiguous().t() if transposed else weight  # a GPT-2 Conv1D's (in, out), viewed
    n64 = reference.weight_norm(weight, lora_A, lora_B, 0.75, torch.float64)
    for splits in (1, 3):
        n = kernels.weight_norm(weight.float(), lora_A.float(), lora_B.float(), 0.75, nan_like(torch.empty(n_out)),
                                splits=splits)
        assert rel_err(n, n64) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_selects_triton_first_and_falls_back(device):
    x, weight, lora_A, lora_B, m, b = _inputs((3,), 16, 8, 2, torch.float64, device)
    inputs = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=m, bias=b)
    reasons = dispatch.explain("dora_linear", **inputs)
    assert any("float64" in r for r in reasons["triton"])
    assert dispatch.select("dora_linear", **inputs).backend != "triton"
    with pytest.raises(fastadapt.BackendUnavailableError, match="float64"):
        with dispatch.use_backend("triton"):
            fastadapt.dora_linear(x, weight, lora_A, lora_B, m, 1.0, b)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.__setitem__(0, a[0][..., :-1]), ValueError, "in_features"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, r"lora_A.shape\[1\]"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, r"lora_B.shape\[0\]"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), ValueError, r"lora_B.shape\[1\] \(r\)"),
    (lambda a: a.__setitem__(2, a[2][:0]), ValueError, "rank 0"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, r"magnitude.shape\[0\]"),
    (lambda a: a.__setitem__(4, a[4][None]), ValueError, "magnitude must have 1 dimensions"),
    (lambda a: a.__setitem__(4, a[4].int()), TypeError, "magnitude must be a floating"),
    (lambda a: a.__setitem__(5, a[5][:-1]), ValueError, "bias"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "weight: torch.float64"),
    (lambda a: a.__setitem__(0, "x"), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(mutate, error, match):
    args = _inputs((5,), 16, 8, 2, torch.float32, "cpu")
    mutate(args)
    with pytest.raises(error, match=match):
        fastadapt.dora_linear(*args[:5], 1.0, args[5])


@pytest.mark.parametrize("scaling,dropout_p,match", [
    (float("nan"), 0.0, "scaling must be finite"), (1.0, 1.0, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_scalars(scaling, dropout_p, match):
    args = _inputs((5,), 16, 8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        fastadapt.dora_linear(*args[:5], scaling, args[5], dropout_p=dropout_p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_weights_in_float32_with_half_input(dtype):
    # PEFT keeps lora_A, lora_B and the magnitude in float32 while the base runs in bf16/fp16.
    x, weight, lora_A, lora_B, m, b = _inputs((11,), 48, 32, 4, dtype, "cpu")
    adapters = [_leaf(t, torch.float32) for t in (lora_A, lora_B, m)]
    y = fastadapt.dora_linear(x, weight, *adapters, 2.0, b)
    y.sum().backward()
    assert y.dtype == dtype and all(t.grad.dtype == torch.float32 for t in adapters)
    ref = reference.dora_linear(*(t.double() for t in (x, weight, lora_A, lora_B, m)), 2.0, b.double())
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_backward_runs_on_the_forward_backend(backend, device):
    assert_backward_on_forward_backend(
        "dora_linear", backend, device, lambda *t: fastadapt.dora_linear(*t[:5], 0.5, t[5], dropout_p=0.3),
        _inputs((2, 9), 48, 32, 4, torch.float32, device), torch.randn(2, 9, 32, device=device), NAMES)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dropout_p,autocast", [(0.0, False), (0.3, False), (0.0, True)])
def test_eager_path_matches_the_custom_op(backend, device, dropout_p, autocast):
    # Eager calls go through an autograd.Function (fastadapt/ops/_declare.py), torch.compile through
    # the custom op: the same backend functions, the same autocast rule (magnitude kept float32),
    # so the same bits.
    tensors = _inputs((3, 5), 48, 40, 6, torch.float32, device)
    results = []
    for eager in (True, False):
        x, lora_A, lora_B, m, b = (_leaf(t) for t in (tensors[0], *tensors[2:]))
        torch.manual_seed(11)
        with dispatch.use_backend(backend), torch.autocast(device, torch.bfloat16, enabled=autocast):
            if eager:
                y = fastadapt.dora_linear(x, tensors[1], lora_A, lora_B, m, 0.5, b, dropout_p=dropout_p)
            else:
                seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p else None
                y = torch.ops.fastadapt.dora_linear(x, tensors[1], lora_A, lora_B, m, 0.5, b, dropout_p, seed)[0]
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, lora_A.grad, lora_B.grad, m.grad, b.grad])
    for name, mine, op in zip(["y", "x", "lora_A", "lora_B", "magnitude", "bias"], *results):
        torch.testing.assert_close(mine, op, rtol=0, atol=0, msg=lambda msg: f"{name}: {msg}")


def test_opcheck():
    x, weight, lora_A, lora_B, m, b = _inputs((2, 5), 16, 8, 3, torch.float32, "cpu")
    for bias in (b, None):
        for p, seed in ((0.0, None), (0.2, torch.tensor(7))):
            args = (x.requires_grad_(), weight, lora_A.requires_grad_(), lora_B.requires_grad_(), m.requires_grad_(),
                    0.5, bias, p, seed)
            torch.library.opcheck(torch.ops.fastadapt.dora_linear.default, args)
    x, lora_A, lora_B, m = x.detach(), lora_A.detach(), lora_B.detach(), m.detach()
    for bias, needs in ((b, [True, True, True, True, True, False]), (None, [False, True, False, True, False, True])):
        args = (x, weight, lora_A, lora_B, m, 0.5, bias, 0.0, None)
        output = torch.ops.fastadapt.dora_linear(*args)
        torch.library.opcheck(torch.ops.fastadapt.dora_linear_backward.default,
                              DORA_LINEAR.backward_inputs(args, output, needs))


def test_compile_fullgraph():
    raw = _inputs((2, 7), 48, 32, 4, torch.float32, "cpu")

    def step(x, weight, lora_A, lora_B, m, b):
        return fastadapt.dora_linear(x, weight, lora_A, lora_B, m, 0.5, b).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [_leaf(t) for t in raw]
        fn(*leaves).backward()
        results.append(leaves)
    for name, a, c in zip(NAMES, *results):
        if a.grad is not None:
            torch.testing.assert_close(c.grad, a.grad, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_as_linear_does(backend, device, autocast_dtype):
    # Every floating input is cast to the region's dtype (float64 apart), and autograd returns
    # each grad in its input's dtype.
    raw = _inputs((3, 7), 80, 48, 7, torch.float32, device)
    leaves = [_leaf(t) for t in raw]
    leaves[1].requires_grad_(False)
    with dispatch.use_backend(backend), torch.autocast(device, autocast_dtype):
        y = fastadapt.dora_linear(*leaves[:5], 0.5, leaves[5])
    assert y.dtype == autocast_dtype
    gy = torch.randn_like(y)
    with dispatch.use_backend(backend):
        y.backward(gy)
    # The magnitude is kept in float32 (an fp32-policy operand), the rest is cast.
    exact = [_leaf(t if i == 4 else t.to(autocast_dtype), torch.float64) for i, t in enumerate(raw)]
    exact[1].requires_grad_(False)
    y64 = reference.dora_linear(*exact[:5], 0.5, exact[5])
    y64.backward(gy.double())
    assert_close("y", y, y64, autocast_dtype, device)
    for name, mine, ref in zip(NAMES, leaves, exact):
        if mine.requires_grad:
            assert mine.grad.dtype == torch.float32
            assert_close(f"grad {name}", mine.grad, ref.grad, autocast_dtype, device)


# --- PEFT's own DoRA layer as the oracle ---------------------------------------------------------

def _peft_dora(n_in, n_out, r, *, conv1d=False, dropout=0.0, bias=True, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(n_out, n_in)
    else:
        base = torch.nn.Linear(n_in, n_out, bias=bias)
    model = torch.nn.Sequential()
    model.add_module("proj", base)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["proj"], use_dora=True, lora_dropout=dropout,
                             init_lora_weights=False, fan_in_fan_out=conv1d)
    model = peft.get_peft_model(model, config).to(dtype)
    layer = model.base_model.model.proj
    with torch.no_grad():  # a magnitude away from its initial norm: g != 1
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(n_out, dtype=dtype) + 0.5)
    if layer.base_layer.bias is not None:
        layer.base_layer.bias.requires_grad_(True)
    return layer


def _peft_grads(layer, x, gy):
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(gy)
    named = {"x": x, "lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
             "magnitude": layer.lora_magnitude_vector["default"].weight, "bias": layer.base_layer.bias}
    return y.detach(), {k: v.grad.clone() for k, v in named.items() if v is not None}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_matches_peft_dora_layer(backend, device, conv1d):
    layer = _peft_dora(80, 48, 7, conv1d=conv1d).to(device)
    x = torch.randn(3, 11, 80, device=device)
    gy = torch.randn(3, 11, 48, device=device)
    y_peft, g_peft = _peft_grads(layer, x, gy)

    weight = layer.base_layer.weight
    weight = weight.t() if conv1d else weight
    leaves = {"x": _leaf(x), "lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
              "magnitude": layer.lora_magnitude_vector["default"].weight, "bias": layer.base_layer.bias}
    layer.zero_grad()
    with dispatch.use_backend(backend):
        y = fastadapt.dora_linear(leaves["x"], weight, leaves["lora_A"], leaves["lora_B"], leaves["magnitude"],
                                  layer.scaling["default"], leaves["bias"])
        y.backward(gy)
    assert rel_err(y, y_peft) < 1e-5
    for name, g in g_peft.items():
        assert rel_err(leaves[name].grad, g) < 1e-5, name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_matches_peft_dora_layer_with_dropout_mask(backend, device):
    # PEFT draws its dropout mask with torch's generator; hand PEFT's forward our mask through a
    # dropout module that applies it, and compare outputs and gradients.
    layer = _peft_dora(48, 32, 4, dropout=0.25).to(device)
    x = torch.randn(13, 48, device=device)
    gy = torch.randn(13, 32, device=device)
    keep = dropout_mask(backend, _seed_of_call(77), (13, 48), 0.25, device)

    class FixedDropout(torch.nn.Module):
        def forward(self, t):
            return t * keep.to(t.dtype) / 0.75

    layer.lora_dropout["default"] = FixedDropout()
    y_peft, g_peft = _peft_grads(layer, x, gy)
    leaves = {"x": _leaf(x), "lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
              "magnitude": layer.lora_magnitude_vector["default"].weight, "bias": layer.base_layer.bias}
    layer.zero_grad()
    torch.manual_seed(77)
    with dispatch.use_backend(backend):
        y = fastadapt.dora_linear(leaves["x"], layer.base_layer.weight, leaves["lora_A"], leaves["lora_B"],
                                  leaves["magnitude"], layer.scaling["default"], leaves["bias"], dropout_p=0.25)
        y.backward(gy)
    assert rel_err(y, y_peft) < 1e-5
    for name, g in g_peft.items():
        assert rel_err(leaves[name].grad, g) < 1e-5, name
