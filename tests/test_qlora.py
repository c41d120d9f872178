"""fastadapt.qlora_linear (LoRA on an NF4 or FP8 frozen base) against the float64 reference: the
dequantization bit for bit, the output and every gradient, on every backend that can run here (the
Triton kernels through the interpreter on CPU); and bitsandbytes' own layout where it is installed."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICES, DTYPES, assert_close, backends_for, bound, rel_err, spy_calls

import fastadapt
from fastadapt import dispatch
from fastadapt.testing import dropout_mask
from fastadapt.reference import lora as lora_reference
from fastadapt.reference import qlora as reference
from fastadapt.ops.qlora import QLORA_LINEAR
from fastadapt.strategy import QLORA_DEQUANT

BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for("qlora_linear", d)]
BACKENDS_CPU = backends_for("qlora_linear", "cpu")
FORMATS = ["nf4", "nf4-nested", "fp8-tensor", "fp8-channel"]
CASES = [  # (leading shape of x, in, out, r): K=80 and N*K % 64 != 0 put blocks across rows
    ((1,), 64, 48, 1),
    ((7,), 80, 123, 7),
    ((2, 5, 7), 128, 80, 16),
    ((3, 11), 96, 40, 64),
]


def _quantized(fmt: str, n_out: int, n_in: int, device, blocksize: int = 64) -> fastadapt.QuantizedWeight:
    return reference.random_weight(fmt, n_out, n_in, device, blocksize)


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _check(backend, device, dtype, fmt, lead, n_in, n_out, r, *, dropout_p=0.0, bias=True, ranks=None):
    """Output and every gradient against float64 (and PyTorch's own error in ``dtype``) on fresh
    inputs; returns them, {name: tensor} with "y"."""
    q = _quantized(fmt, n_out, n_in, device)
    x = torch.randn(*lead, n_in, dtype=dtype, device=device)
    lora_A = torch.randn(r, n_in, dtype=dtype, device=device) / n_in**0.5
    lora_B = torch.randn(n_out, r, dtype=dtype, device=device) / r**0.5
    b = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    ours = [_leaf(t) for t in (x, lora_A, lora_B, b)]
    torch.manual_seed(1234)  # the op draws its dropout seed from the default CPU generator
    with dispatch.use_backend(backend):
        y = fastadapt.qlora_linear(ours[0], q, *ours[1:3], 0.5, ours[3], dropout_p=dropout_p, ranks=ranks)
        gy = torch.randn_like(y)
        y.backward(gy)

    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    keep = [dropout_mask(backend, seed + k, (x.numel() // n_in, n_in), p, device).view(x.shape) if p > 0 else None
            for k, p in enumerate([dropout_p] if ranks is None else dropout_p)]
    keep = keep[0] if ranks is None else keep
    # The truth: exact math on the weight dequantized to the compute dtype (bnb's rounding).
    weight = reference.dequantize(q, dtype)

    def reference_run(cast):
        ts = [_leaf(t, cast) for t in (x, lora_A, lora_B, b)]
        out = lora_reference.lora_linear(ts[0], weight.to(cast), ts[1], ts[2], 0.5, ts[3], keep, dropout_p, ranks)
        out.backward(gy.to(cast))
        return out, ts

    y64, ref64 = reference_run(torch.float64)
    y_pt, ref_pt = reference_run(dtype)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    assert_close("y", y, y64, dtype, device, y_pt)
    results = {"y": y}
    for name, mine, r64, rpt in zip(["x", "lora_A", "lora_B", "bias"], ours, ref64, ref_pt):
        if mine is not None:
            assert mine.grad is not None and mine.grad.dtype == dtype, f"grad {name}"
            assert_close(f"grad {name}", mine.grad, r64.grad, dtype, device, rpt.grad)
            results[name] = mine.grad
    return results


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lead,n_in,n_out,r", CASES)
def test_matches_reference(backend, device, dtype, fmt, lead, n_in, n_out, r):
    _check(backend, device, dtype, fmt, lead, n_in, n_out, r)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["nf4-nested", "fp8-channel"])
def test_dropout_same_mask_forward_and_backward(backend, device, dtype, fmt):
    _check(backend, device, dtype, fmt, (37,), 80, 48, 16, dropout_p=0.3, bias=False)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_adapters_each_draw_their_own_dropout_mask(backend, device, dtype):
    _check(backend, device, dtype, "nf4-nested", (37,), 80, 48, 12, dropout_p=[0.3, 0.0, 0.2], ranks=[4, 7, 1])


# --- The Triton backend's two strategies (fastadapt/strategy.py): dequantize in the GEMM, or once + cuBLAS

TRITON_DEVICES = [d for d in DEVICES if "triton" in backends_for("qlora_linear", d)]
DEQUANTS = (QLORA_DEQUANT.fused, QLORA_DEQUANT.split)
STRATEGY_CASES = [  # (format, leading shape of x, in, out, r, options of _check)
    ("nf4", (1,), 64, 48, 16, {}),
    ("nf4-nested", (2, 5, 7), 128, 80, 16, dict(dropout_p=0.3)),
    ("fp8-tensor", (7,), 80, 123, 7, dict(bias=False)),
    ("fp8-channel", (3, 11), 96, 40, 64, {}),
    ("nf4-nested", (37,), 80, 48, 12, dict(dropout_p=[0.3, 0.0, 0.2], ranks=[4, 7, 1])),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,lead,n_in,n_out,r,options", STRATEGY_CASES)
def test_dequant_strategies_match_reference_and_each_other(monkeypatch, device, dtype, fmt, lead, n_in, n_out, r,
                                                           options):
    results = {}
    for dequant in DEQUANTS:
        monkeypatch.setenv(QLORA_DEQUANT.env, dequant)
        torch.manual_seed(7)  # the same inputs for both
        results[dequant] = _check("triton", device, dtype, fmt, lead, n_in, n_out, r, **options)
    fused, split = (results[d] for d in DEQUANTS)
    assert fused.keys() == split.keys()
    for name in fused:  # the same weight bit for bit, the same masks: apart by rounding only
        assert rel_err(split[name], fused[name]) <= bound(dtype, device), name


def test_dequant_strategy_rule(monkeypatch):
    assert QLORA_DEQUANT.min_rows == 512  # the bench's M grid (fastadapt/bench/cases/qlora.py) brackets it
    assert [QLORA_DEQUANT.choose(m) for m in (0, 1, 511, 512, 8192)] == ["gemm"] * 3 + ["once"] * 2
    inputs = dict(x=torch.empty(512, 64), lora_A=torch.empty(2, 64), lora_B=torch.empty(8, 2), bias=None)
    if "triton" in backends_for("qlora_linear", "cpu"):
        assert dispatch.explain("qlora_linear", **inputs)["triton"] == ["strategy: once (M=512 >= 512 rows)"]
        monkeypatch.setenv(QLORA_DEQUANT.env, "gemm")
        assert dispatch.explain("qlora_linear", **inputs)["triton"] == \
            ["strategy: gemm (forced by FASTADAPT_QLORA_DEQUANT)"]
        assert QLORA_DEQUANT.choose(10**6) == "gemm"
    assert str(QLORA_DEQUANT) == dispatch.strategies()[("qlora_linear", "triton")]
    for source in ("unsloth #39", "axolotl #3743", "bitsandbytes #1319", "not measured on this device"):
        assert source in str(QLORA_DEQUANT)
    monkeypatch.setenv(QLORA_DEQUANT.env, "dense")
    with pytest.raises(ValueError, match="FASTADAPT_QLORA_DEQUANT='dense': expected 'gemm', 'once' or 'auto'"):
        QLORA_DEQUANT.choose(1)


def _triton_kernels():
    if "triton" not in backends_for("qlora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import qlora as kernels
    return kernels


@pytest.mark.parametrize("rows,ran", [(511, "qlora_matmul"), (512, "dequantized")])
def test_kernels_follow_the_rule(monkeypatch, rows, ran):
    # Below the crossover the GEMM dequantizes in its K loop; from it the weight is dequantized
    # once per product (forward, then the backward's gx) and LoRA's path runs on it.
    kernels = _triton_kernels()
    calls = spy_calls(monkeypatch, kernels, "qlora_matmul", "dequantized")
    q = _quantized("fp8-channel", 16, 32, "cpu")
    x, A, B = _leaf(torch.randn(rows, 32)), torch.randn(2, 32), torch.randn(16, 2)
    with dispatch.use_backend("triton"):
        y = fastadapt.qlora_linear(x, q, A, B, 0.5)
    y.backward(torch.ones_like(y))
    assert calls == [ran, ran]
    w = reference.dequantize(q, torch.float64)
    assert rel_err(y, lora_reference.lora_linear(x.double(), w, A.double(), B.double(), 0.5)) < 1e-5
    assert rel_err(x.grad, torch.ones(rows, 16, dtype=torch.float64) @ (w + 0.5 * B.double() @ A.double())) < 1e-5


def test_dequantization_buffer_is_reused_per_size_and_dtype(monkeypatch):
    kernels = _triton_kernels()
    monkeypatch.delenv(kernels.BUFFER_ENV, raising=False)
    q1, q2, q3 = (_quantized("nf4", *shape, "cpu") for shape in ((48, 80), (80, 48), (48, 64)))
    w1 = kernels.dequantized(q1, torch.bfloat16)
    assert torch.equal(w1, reference.dequantize(q1, torch.bfloat16))
    w2 = kernels.dequantized(q2, torch.bfloat16)  # as many elements: the same memory, rewritten
    assert w2.data_ptr() == w1.data_ptr() and w2.shape == (80, 48)
    assert torch.equal(w2, reference.dequantize(q2, torch.bfloat16))
    assert kernels.dequantized(q3, torch.bfloat16).data_ptr() != w1.data_ptr()
    assert kernels.dequantized(q1, torch.float32).data_ptr() != w1.data_ptr()
    monkeypatch.setenv(kernels.BUFFER_ENV, "free")  # one buffer per call, the kept ones dropped
    assert kernels.dequantized(q1, torch.bfloat16).data_ptr() != w1.data_ptr()
    assert not vars(kernels._buffers)
    monkeypatch.setenv(kernels.BUFFER_ENV, "never")
    with pytest.raises(ValueError, match="FASTADAPT_QLORA_BUFFER='never': expected 'keep' or 'free'"):
        kernels.dequantized(q1, torch.bfloat16)


@pytest.mark.parametrize("buffer", ["keep", "free"])
def test_layers_sharing_a_buffer_in_one_graph(monkeypatch, buffer):
    # Two layers of one size: each product dequantizes its own weight into the shared buffer just
    # before using it, so the second layer's forward does not disturb the first one's backward.
    _triton_kernels()
    monkeypatch.setenv(QLORA_DEQUANT.env, "once")
    monkeypatch.setenv("FASTADAPT_QLORA_BUFFER", buffer)
    q1, q2 = _quantized("nf4-nested", 48, 48, "cpu"), _quantized("fp8-tensor", 48, 48, "cpu")
    x, A1, B1, A2, B2 = (_leaf(torch.randn(*s)) for s in ((9, 48), (4, 48), (48, 4), (4, 48), (48, 4)))
    with dispatch.use_backend("triton"):
        y = fastadapt.qlora_linear(fastadapt.qlora_linear(x, q1, A1, B1, 0.5), q2, A2, B2, 0.5)
    gy = torch.randn_like(y)
    y.backward(gy)
    exact = [_leaf(t, torch.float64) for t in (x, A1, B1, A2, B2)]
    w1, w2 = (reference.dequantize(q, torch.float32).double() for q in (q1, q2))
    y64 = lora_reference.lora_linear(lora_reference.lora_linear(exact[0], w1, *exact[1:3], 0.5), w2, *exact[3:], 0.5)
    y64.backward(gy.double())
    assert rel_err(y, y64) < 1e-5
    for mine, ref in zip((x, A1, B1, A2, B2), exact):
        assert rel_err(mine.grad, ref.grad) < 1e-5


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKEND_DEVICE if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_backend_dequantization_is_exact(backend, device, dtype, fmt):
    # The Triton GEMMs' tile code run over the whole weight, and the C++ backend's dequantization:
    # bit for bit the reference's.
    if backend == "triton":
        from fastadapt.kernels import qlora as kernels

        def dequantize(q):
            return kernels.dequantize(q, torch.full(q.shape, float("nan"), dtype=dtype, device=device))
    else:
        from fastadapt.ops import qlora as qlora_op

        def dequantize(q):
            return qlora_op.native_dequantize(q, dtype)
    for n_out, n_in, blocksize in ((123, 80, 64), (7, 9, 32), (64, 4096, 64)):
        q = _quantized(fmt, n_out, n_in, device, blocksize)
        assert torch.equal(dequantize(q), reference.dequantize(q, dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("fmt,field", [("nf4", "blocksize"), ("nf4-nested", "blocksize"),
                                       ("nf4-nested", "blocksize2")])
def test_one_block_of_the_largest_blocksize(backend, device, fmt, field):
    # A block size of 2**63 - 1: one block for the whole weight (or for all of absmax). The cpp
    # check computed the block count as (numel + blocksize - 1) // blocksize, which wrapped.
    if field == "blocksize":
        q = _quantized(fmt, 8, 64, device, blocksize=2**63 - 1)  # absmax of one element
    else:
        q = _quantized(fmt, 8, 64, device)._replace(blocksize2=2**63 - 1)  # absmax2 of one element, as it was
    x, A, B = (torch.randn(*shape, device=device) for shape in ((5, 64), (2, 64), (8, 2)))
    with dispatch.use_backend(backend):
        y = fastadapt.qlora_linear(x, q, A, B, 0.5)
    expected = lora_reference.lora_linear(x.double(), reference.dequantize(q, torch.float32).double(), A.double(),
                                          B.double(), 0.5)
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_eval_mode_and_empty_batch(backend, device):
    q = _quantized("nf4", 32, 64, device)
    A, B = torch.randn(4, 64, device=device), torch.randn(32, 4, device=device)
    x = torch.randn(9, 64, device=device)
    with dispatch.use_backend(backend):
        y = fastadapt.qlora_linear(x, q, A, B, 2.0, dropout_p=0.5, training=False)
        empty = fastadapt.qlora_linear(x[:0], q, A, B, 2.0)
    w = reference.dequantize(q, torch.float64)
    assert rel_err(y, lora_reference.lora_linear(x.double(), w, A.double(), B.double(), 2.0)) < 1e-5
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_tables_in_float32(backend, device, autocast_dtype):
    # The region casts x, the adapters and the bias, never the weight's fp32 tables and scales.
    q = _quantized("nf4-nested", 48, 80, device)
    x, A, B, b = (_leaf(torch.randn(*s, device=device)) for s in ((3, 7, 80), (7, 80), (48, 7), (48,)))
    with dispatch.use_backend(backend), torch.autocast(device, autocast_dtype):
        y = fastadapt.qlora_linear(x, q, A, B, 0.5, b)
    assert y.dtype == autocast_dtype
    gy = torch.randn_like(y)
    y.backward(gy)
    exact = [_leaf(t.to(autocast_dtype), torch.float64) for t in (x, A, B, b)]
    y64 = lora_reference.lora_linear(exact[0], reference.dequantize(q, autocast_dtype).double(), *exact[1:3], 0.5,
                                     exact[3])
    y64.backward(gy.double())
    assert_close("y", y, y64, autocast_dtype, device)
    for name, mine, ref in zip(["x", "lora_A", "lora_B", "bias"], (x, A, B, b), exact):
        assert mine.grad.dtype == torch.float32
        assert_close(f"grad {name}", mine.grad, ref.grad, autocast_dtype, device)


def test_float32_adapters_on_half_input():
    q = _quantized("nf4", 32, 64, "cpu")
    x = torch.randn(11, 64, dtype=torch.bfloat16)
    A32, B32 = _leaf(torch.randn(4, 64)), _leaf(torch.randn(32, 4))
    y = fastadapt.qlora_linear(x, q, A32, B32, 2.0)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and A32.grad.dtype == B32.grad.dtype == torch.float32


def _args():
    q = _quantized("nf4-nested", 8, 64, "cpu")
    return [torch.randn(5, 64), q, torch.randn(2, 64), torch.randn(8, 2), torch.randn(8)]


def _replace(**fields):
    return lambda a: a.__setitem__(1, a[1]._replace(**fields))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.__setitem__(0, a[0][..., :-1]), ValueError, "in_features"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, r"lora_A.shape\[1\]"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, r"lora_B.shape\[0\]"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, "bias"),
    (lambda a: a.__setitem__(1, "w"), TypeError, "QuantizedWeight"),
    (lambda a: a.__setitem__(1, a[1]._replace(data=a[1].data[:-1])), ValueError, "weight.data has 255 bytes"),
    (lambda a: a.__setitem__(1, a[1]._replace(data=a[1].data.float())), TypeError, "weight.data must be torch.uint8"),
    (lambda a: a.__setitem__(1, a[1]._replace(code=a[1].code[:8])), ValueError, r"weight.code.numel\(\) is 8"),
    (lambda a: a.__setitem__(1, a[1]._replace(absmax=a[1].absmax[:-1])), ValueError, "absmax.numel"),
    (lambda a: a.__setitem__(1, a[1]._replace(absmax=a[1].absmax.float())), TypeError, "absmax must be torch.uint8"),
    (lambda a: a.__setitem__(1, a[1]._replace(offset=None)), ValueError, "absmax2, code2 and offset"),
    (lambda a: a.__setitem__(1, a[1]._replace(code2=a[1].code2[:255])), ValueError, "code2.numel"),
    (lambda a: a.__setitem__(1, a[1]._replace(blocksize=0)), ValueError, "blocksize must be a positive int"),
    (lambda a: a.__setitem__(1, a[1]._replace(bits=3)), ValueError, "bits must be 4"),
    (lambda a: a.__setitem__(1, a[1]._replace(shape=(8, 0))), ValueError, "non-empty"),
    # Metadata every backend must see as the same ints: floats and ints past int64 ran on the
    # reference and failed inside the native schema ("Expected int ... found int").
    (_replace(bits=4.0), TypeError, r"weight.bits must be an int, got 4.0 \(float\)"),
    (_replace(shape=(8.0, 64.0)), TypeError, r"weight.shape\[0\] must be an int, got 8.0"),
    (_replace(shape=(8, 64.5)), TypeError, r"weight.shape\[1\] must be an int, got 64.5"),
    (_replace(blocksize=2**63), ValueError,
     r"weight.blocksize must be a positive int below 2\*\*63, got 9223372036854775808"),
    (_replace(blocksize2=2**63), ValueError, r"weight.blocksize2 must be a positive int below 2\*\*63"),
    (_replace(blocksize=True), TypeError, "weight.blocksize must be an int, got True"),
])
def test_bad_input(mutate, error, match):
    args = _args()
    mutate(args)
    for backend in BACKENDS_CPU:  # raised before dispatch: the same error on every backend
        with pytest.raises(error, match=match), dispatch.use_backend(backend):
            fastadapt.qlora_linear(*args[:4], 1.0, args[4])


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_integer_metadata_of_any_integer_type(backend):
    # numpy's and torch's integers (a bnb QuantState's shape, a config's blocksize) are ints: each
    # backend gets them as Python ints.
    import numpy as np
    q = _quantized("nf4-nested", 8, 64, "cpu")
    odd = q._replace(bits=np.int64(4), shape=(torch.tensor(8), np.int32(64)), blocksize=np.int64(q.blocksize),
                     blocksize2=torch.tensor(q.blocksize2))
    x, A, B = torch.randn(5, 64), torch.randn(2, 64), torch.randn(8, 2)
    with dispatch.use_backend(backend):
        assert torch.equal(fastadapt.qlora_linear(x, odd, A, B, 0.5), fastadapt.qlora_linear(x, q, A, B, 0.5))


@pytest.mark.parametrize("per", ["tensor", "channel", "channel-column"])
def test_fp8_dequantization_is_torchs(per):
    # fp8_weight's table and scale layouts against torch's own e4m3 conversion.
    w = (torch.randn(37, 80) * 100).to(torch.float8_e4m3fn)
    scale = {"tensor": torch.rand(()), "channel": torch.rand(37), "channel-column": torch.rand(37, 1)}[per]
    expected = (w.float() * scale.reshape(-1, 1) if scale.dim() else w.float() * scale).to(torch.bfloat16)
    assert torch.equal(reference.dequantize(fastadapt.fp8_weight(w, scale), torch.bfloat16), expected)


def test_bad_nf4_weight():
    with pytest.raises(TypeError, match="absmax must be a torch.Tensor, got NoneType"):
        fastadapt.nf4_weight(torch.zeros(4, dtype=torch.uint8), None, (2, 4))


def test_fp8_scale_in_any_layout():
    # The per-channel scale as a column view of a wider tensor: copied, not reported as a problem
    # of weight.absmax (a name the caller never used).
    w = (torch.randn(8, 16) * 10).to(torch.float8_e4m3fn)
    scale = torch.rand(8, 3)[:, 1:2]
    assert not scale.is_contiguous()
    x, A, B = torch.randn(5, 16), torch.randn(2, 16), torch.randn(8, 2)
    for backend in BACKENDS_CPU:
        with dispatch.use_backend(backend):
            assert torch.equal(fastadapt.qlora_linear(x, fastadapt.fp8_weight(w, scale), A, B, 0.5),
                               fastadapt.qlora_linear(x, fastadapt.fp8_weight(w, scale.contiguous()), A, B, 0.5))


def test_bad_fp8_weight():
    w = torch.randn(8, 16).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale must have 1 element .* got \(3,\)"):
        fastadapt.fp8_weight(w, torch.ones(3))
    with pytest.raises(TypeError, match="scale must be float32"):
        fastadapt.fp8_weight(w, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fastadapt.fp8_weight(w.to(torch.float8_e5m2), torch.ones(1))
    with pytest.raises(ValueError, match="contiguous"):
        fastadapt.fp8_weight(w.t(), torch.ones(1))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_path_matches_the_custom_op(backend, device, dropout_p):
    # Eager calls go through an autograd.Function (fastadapt/ops/_declare.py), torch.compile through
    # the custom op: the same backend functions, so the same bits.
    q = _quantized("nf4-nested", 40, 48, device)
    parts = (q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits, 40)
    raw = [torch.randn(*s, device=device) for s in ((3, 5, 48), (6, 48), (40, 6), (40,))]
    results = []
    for eager in (True, False):
        x, lora_A, lora_B, b = (_leaf(t) for t in raw)
        torch.manual_seed(11)
        with dispatch.use_backend(backend):
            if eager:
                y = fastadapt.qlora_linear(x, q, lora_A, lora_B, 0.5, b, dropout_p=dropout_p)
            else:
                seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p else None
                y = torch.ops.fastadapt.qlora_linear(x, *parts, lora_A, lora_B, 0.5, b, dropout_p, seed)[0]
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, lora_A.grad, lora_B.grad, b.grad])
    for name, mine, op in zip(["y", "x", "lora_A", "lora_B", "bias"], *results):
        torch.testing.assert_close(mine, op, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_opcheck():
    q = _quantized("nf4-nested", 8, 64, "cpu")
    x, A, B, b = (torch.randn(*s) for s in ((2, 5, 64), (3, 64), (8, 3), (8,)))
    parts = (q.data, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, q.bits)
    for bias in (b, None):
        for p, seed in ((0.0, None), (0.2, torch.tensor(7))):
            args = (x.requires_grad_(), *parts, 8, A.requires_grad_(), B.requires_grad_(), 0.5, bias, p, seed)
            torch.library.opcheck(torch.ops.fastadapt.qlora_linear.default, args)
    for bias, needs in ((b, [True, True, True, True]), (None, [False, True, True, False])):
        args = (x.detach(), *parts, 8, A.detach(), B.detach(), 0.5, bias, 0.0, None)
        output = torch.ops.fastadapt.qlora_linear(*args)
        torch.library.opcheck(torch.ops.fastadapt.qlora_linear_backward.default,
                              QLORA_LINEAR.backward_inputs(args, output, needs))


def test_torch_compile_fullgraph_no_graph_break():
    q = _quantized("fp8-channel", 48, 64, "cpu")
    A, B = _leaf(torch.randn(4, 64)), _leaf(torch.randn(48, 4))
    x = torch.randn(2, 7, 64, requires_grad=True)

    def f(x):
        return fastadapt.qlora_linear(x, q, A, B, 0.5)

    def f_dropout(x):
        return fastadapt.qlora_linear(x, q, A, B, 0.5, dropout_p=0.1)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(y, f(x)) < 1e-6
    y.sum().backward()
    assert A.grad is not None and x.grad is not None
    # The dropout seed is drawn inside the graph.
    torch.compile(f_dropout, fullgraph=True, backend="aot_eager")(x).sum().backward()


# --- bitsandbytes' own layout (where it is installed) ---------------------------------------------


def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_dequantization_is_bitsandbytes(dtype, nested):
    # bnb's CPU dequantize kernel is right only when K is a multiple of the blocksize (see
    # fastadapt/reference/qlora.py); there our dequantization equals it bit for bit, and
    # nf4_from_bnb reads Params4bit / QuantState in place.
    bnbf = _bnb()
    import bitsandbytes as bnb
    w = torch.randn(80, 192, dtype=dtype)
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64)
    param = param.to("cpu")  # quantizes
    q = fastadapt.nf4_from_bnb(param)
    assert q.nested == nested and q.data.data_ptr() == param.data.data_ptr()
    expected = bnbf.dequantize_4bit(param.data, param.quant_state)
    assert expected.dtype == dtype
    assert torch.equal(reference.dequantize(q, dtype), expected)


def test_layout_is_bitsandbytes_quantizers_where_blocks_span_rows():
    # At K=80, 64-blocks span rows: bnb's quantizer (flat blocks, as on CUDA) must give back the
    # very bytes and absmax when it re-quantizes our dequantization of its output.
    bnbf = _bnb()
    w = torch.randn(37, 80)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = fastadapt.nf4_weight(packed, state.absmax, (37, 80), code=state.code)
    again, state2 = bnbf.quantize_4bit(reference.dequantize(q, torch.float32), blocksize=64, quant_type="nf4")
    assert torch.equal(again, packed) and torch.equal(state2.absmax, state.absmax)
    assert rel_err(reference.dequantize(q, torch.float32), w) < 0.1  # NF4's own error, ~0.09


def test_nf4_from_bnb_refuses_what_it_cannot_read():
    _bnb()
    import bitsandbytes as bnb
    param = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="'fp4' is not served"):
        fastadapt.nf4_from_bnb(param)
    with pytest.raises(ValueError, match="no quant_state"):
        fastadapt.nf4_from_bnb(torch.nn.Parameter(torch.randn(2, 2)))


@pytest.mark.parametrize("field,bad,match", [
    ("data", lambda t: t[:-1], r"data must have shape \(256,\), got \[255\]"),
    ("absmax", lambda t: t.float(), "absmax must be Float|absmax must be Byte"),
    ("code2", lambda t: t[:128], r"code2 must have shape \(256,\)"),
    ("offset", lambda t: None, "needs absmax2, code2 and offset"),
    ("blocksize", lambda t: 0, "blocksize must be positive"),
    ("bits", lambda t: 2, "bits must be 4"),
])
def test_native_backend_checks_its_arguments(field, bad, match):
    # The native ops are callable directly: each checks what it indexes, naming the argument.
    if "cpp" not in backends_for("qlora_linear", "cpu"):
        pytest.skip("cpp backend not available here")
    from fastadapt import _native
    from fastadapt.ops.qlora import _weight_args
    q = _quantized("nf4-nested", 8, 64, "cpu")
    q = q._replace(**{field: bad(getattr(q, field))})
    x, A, B = torch.randn(5, 64), torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match=match):
        _native.ops().qlora_forward(x, *_weight_args(q), 8, A, B, 1.0, None, 0.0, 0)
