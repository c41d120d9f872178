"""fastadapt.moe_lora_experts (MoE experts with per-expert LoRA) against the float64 reference: output
and every gradient (x, routing weights, each expert's A and B), on every backend that can run here
(the Triton kernels through the interpreter on CPU), over routings that leave experts without
tokens, send everything to one expert, T=1, k=1 and k=8. The shared fuzz (tests/test_fuzz.py)
adds random layouts, NaN/inf, dtypes, compile and the eager-vs-custom-op equality."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICES, DTYPES, assert_backward_on_forward_backend, assert_close, backends_for

import fastadapt
from fastadapt import dispatch
from fastadapt.ops.moe_lora import MOE_LORA_EXPERTS
from fastadapt.reference import moe_lora as reference
from fastadapt.testing import dropout_mask

OP = "moe_lora_experts"
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for(OP, d)]
LORA = ("gate_up_A", "gate_up_B", "down_A", "down_B")
GRADS = ("x", "top_k_weights") + LORA


def _routing(pattern: str, T: int, E: int, k: int, gen) -> torch.Tensor:
    if pattern == "random":
        return torch.randint(0, E, (T, k), generator=gen)
    if pattern == "one_expert":
        return torch.full((T, k), 2)
    if pattern == "absent":  # experts 0 and 3 get no token
        return torch.tensor([1, 2, 4])[torch.randint(0, 3, (T, k), generator=gen)]
    if pattern == "distinct":  # top-k as routers give it: k different experts per token
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    raise ValueError(pattern)


def _inputs(T, H, I, E, k, r1, r2, bias, idx, gen):
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale
    return dict(x=randn(T, H), top_k_index=idx, top_k_weights=torch.rand(T, k, generator=gen),
                gate_up_proj=randn(E, 2 * I, H, scale=H**-0.5), down_proj=randn(E, H, I, scale=I**-0.5),
                gate_up_bias=randn(E, 2 * I) if bias else None, down_bias=randn(E, H) if bias else None,
                gate_up_A=randn(E, r1, H, scale=H**-0.5) if r1 else None,
                gate_up_B=randn(E, 2 * I, r1, scale=r1**-0.5) if r1 else None,
                down_A=randn(E, r2, I, scale=I**-0.5) if r2 else None,
                down_B=randn(E, H, r2, scale=r2**-0.5) if r2 else None)


def _leaves(raw: dict, dtype, device, weights_dtype=None) -> dict:
    out = {}
    for name, t in raw.items():
        if t is not None and t.is_floating_point():
            t = t.to(device, weights_dtype if name == "top_k_weights" and weights_dtype else dtype, copy=True)
            t.requires_grad_(name in GRADS)
        elif t is not None:
            t = t.to(device)
        out[name] = t
    return out


def _call(t: dict, activation, dropout_p, scalings=(0.5, 2.0)):
    return fastadapt.moe_lora_experts(
        t["x"], t["top_k_index"], t["top_k_weights"], t["gate_up_proj"], t["down_proj"],
        gate_up_bias=t["gate_up_bias"], down_bias=t["down_bias"], gate_up_A=t["gate_up_A"], gate_up_B=t["gate_up_B"],
        gate_up_scaling=scalings[0], down_A=t["down_A"], down_B=t["down_B"], down_scaling=scalings[1],
        activation=activation, limit=1.5, dropout_p=dropout_p)


def _check(backend, device, dtype, T, H, I, E, k, pattern="random", r1=3, r2=2, activation="silu", bias=False,
           dropout_p=0.0, weights_dtype=None, layout=None):
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    raw = _inputs(T, H, I, E, k, r1, r2, bias, _routing(pattern, T, E, k, gen), gen)
    gy = torch.randn(T, H, generator=gen)
    ours = _leaves(raw, dtype, device, weights_dtype)

    def laid_out(leaves):  # the op normalises any layout of its inputs, or reads them through their strides
        return {n: (layout(t) if t is not None and layout else t) for n, t in leaves.items()}
    torch.manual_seed(1234)  # the op draws its dropout seed from the default CPU generator
    with dispatch.use_backend(backend):
        out = _call(laid_out(ours), activation, dropout_p)
        out.backward(gy.to(device, dtype))
    keep1 = keep2 = None
    if dropout_p:
        torch.manual_seed(1234)
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        S = T * k
        keep1 = dropout_mask(backend, seed, (S, H), dropout_p, device) if r1 else None
        keep2 = dropout_mask(backend, seed + 1, (S, I), dropout_p, device) if r2 else None

    def reference_run(cast):
        leaves = _leaves({n: (v.detach() if v is not None else None) for n, v in ours.items()}, cast, device,
                         cast if weights_dtype is None or cast == torch.float64 else weights_dtype)
        t = laid_out(leaves)
        y = reference.experts(t["x"], t["top_k_index"], t["top_k_weights"], t["gate_up_proj"], t["down_proj"],
                              t["gate_up_bias"], t["down_bias"], t["gate_up_A"], t["gate_up_B"], 0.5, t["down_A"],
                              t["down_B"], 2.0, activation, 1.702, 1.5, keep1, keep2, dropout_p)[0]
        y.backward(gy.to(device, cast))
        return y, leaves

    y64, ref64 = reference_run(torch.float64)
    y_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert out.dtype == dtype

    def close(name, mine, truth, same):
        if backend == "reference" and dtype != torch.float32:
            # The backend is PyTorch's own computation in this dtype (its half-precision error is
            # the bound's size, not ours to meet): it must be that computation, bit for bit.
            torch.testing.assert_close(mine, same, rtol=0, atol=0, msg=name)
        else:
            assert_close(name, mine, truth, dtype, device, same)

    close("out", out, y64, y_pt)
    used = set(raw["top_k_index"].reshape(-1).tolist())
    for name in GRADS:
        mine = ours[name]
        if mine is None:
            continue
        assert mine.grad is not None and mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape, name
        if name in LORA:
            for e in set(range(E)) - used:  # exactly zero for an expert that got no token
                assert torch.equal(mine.grad[e], torch.zeros_like(mine.grad[e])), f"grad {name}[{e}]"
        close(f"grad {name}", mine.grad, ref64[name].grad, ref_pt[name].grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("pattern", ["random", "one_expert", "absent"])
def test_routings(backend, device, pattern):
    _check(backend, device, torch.float32, 9, 24, 8, 5, 2, pattern)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (7, 4, 1), (5, 8, 8)], ids=["T=1", "k=1", "k=8"])
def test_token_counts_and_top_k(backend, device, T, E, k):
    _check(backend, device, torch.float32, T, 16, 8, E, k, "distinct")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, device, dtype):
    _check(backend, device, dtype, 9, 32, 16, 4, 2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("case", ["gpt_oss_bias", "gate_up_only", "down_only", "odd_sizes", "float32_routing"])
def test_variants(backend, device, case):
    kwargs = {"gpt_oss_bias": dict(activation="gpt_oss", bias=True), "gate_up_only": dict(r2=None),
              "down_only": dict(r1=None), "odd_sizes": dict(r1=1, r2=5),
              "float32_routing": dict(weights_dtype=torch.float32)}[case]
    dtype = torch.bfloat16 if case == "float32_routing" else torch.float32
    H, I = (13, 5) if case == "odd_sizes" else (16, 8)
    _check(backend, device, dtype, 7, H, I, 4, 2, **kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_inputs_in_any_layout(backend, device, layout):
    # Transposed / strided weights (gpt-oss's transposed storage), an expanded routing (one token's
    # routing for all), strided x: normalised once (the routing), or read through their strides.
    def strided(t):
        if t.dim() < 2:
            return t
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def expanded(t):
        return t[:1].expand(t.shape) if t.dim() == 2 and t.shape[0] == 7 else t
    _check(backend, device, torch.float32, 7, 16, 8, 4, 2, layout=strided if layout == "strided" else expanded)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_dropout(backend, device):
    _check(backend, device, torch.float32, 9, 16, 8, 4, 2, dropout_p=0.3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_backward_runs_on_the_forward_backend(backend, device):
    gen = torch.Generator().manual_seed(0)
    raw = _inputs(6, 16, 8, 4, 2, 3, 2, False, _routing("random", 6, 4, 2, gen), gen)
    names = ["x", "top_k_weights", "gate_up_A", "gate_up_B", "down_A", "down_B"]

    def call(x, w, A1, B1, A2, B2):
        return _call(dict(raw, x=x, top_k_weights=w, gate_up_A=A1, gate_up_B=B1, down_A=A2, down_B=B2), "silu", 0.4)

    assert_backward_on_forward_backend(OP, backend, device, call, [raw[n].to(device) for n in names],
                                       torch.randn(6, 16, device=device), names)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_empty_batch(backend, device):
    gen = torch.Generator().manual_seed(0)
    t = _leaves(_inputs(0, 16, 8, 4, 2, 3, 2, False, torch.zeros(0, 2, dtype=torch.long), gen), torch.float32, device)
    with dispatch.use_backend(backend):
        out = _call(t, "silu", 0.0)
        out.sum().backward()
    assert out.shape == (0, 16)
    assert torch.equal(t["gate_up_A"].grad, torch.zeros_like(t["gate_up_A"]))


@pytest.mark.skipif("triton" not in backends_for(OP, "cpu"), reason="Triton cannot run here")
@pytest.mark.parametrize("choice", ["grouped_mm", "triton"])
def test_frozen_product_strategies(choice, monkeypatch):
    # The Triton backend's frozen products in torch._grouped_mm or in its own grouped GEMM.
    monkeypatch.setenv("FASTADAPT_MOE_GEMM", choice)
    _check("triton", "cpu", torch.float32, 9, 16, 8, 4, 2, bias=True)


def test_dispatch_explains_the_strategy():
    gen = torch.Generator().manual_seed(0)
    t = _inputs(3, 16, 8, 4, 2, 3, 2, False, torch.zeros(3, 2, dtype=torch.long), gen)
    inputs = {n: t[n] for n in ("x", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias") + LORA}
    if "triton" in backends_for(OP, "cpu"):
        assert dispatch.explain(OP, **inputs)["triton"] == ["strategy: grouped_mm"]
        odd = dict(inputs, x=torch.randn(3, 13), gate_up_proj=torch.randn(4, 16, 13))
        assert "triton (" in dispatch.explain(OP, **odd)["triton"][0]
    assert any("float64" in r for r in dispatch.explain(OP, **dict(inputs, x=inputs["x"].double()))["cpp"])


def _bad_args():
    gen = torch.Generator().manual_seed(0)
    return _inputs(5, 16, 8, 4, 2, 3, 2, True, torch.randint(0, 4, (5, 2), generator=gen), gen)


def _set(name, value):
    return lambda a: a.__setitem__(name, value(a[name]) if callable(value) else value)


@pytest.mark.parametrize("mutate,kwargs,error,match", [
    (lambda a: a["top_k_index"].__setitem__((0, 0), 4), {}, RuntimeError, r"top_k_index must be in \[0, 4\)"),
    (lambda a: a["top_k_index"].__setitem__((1, 1), -1), {}, RuntimeError, r"top_k_index must be in \[0, 4\)"),
    (_set("top_k_index", lambda t: t.float()), {}, TypeError, "top_k_index must be an int32 or int64"),
    (_set("top_k_index", lambda t: t[:-1]), {}, ValueError, r"top_k_index must have shape \(T, k\)"),
    (_set("top_k_weights", lambda t: t[:, :1]), {}, ValueError, "top_k_weights must have top_k_index's shape"),
    (_set("top_k_weights", lambda t: t.long()), {}, TypeError, "top_k_weights must be a floating-point tensor"),
    (_set("x", lambda t: t[None]), {}, ValueError, "x must have 2 dimensions"),
    (_set("x", lambda t: t[:, :-1]), {}, ValueError, r"gate_up_proj.shape\[2\] \(hidden"),
    (_set("gate_up_proj", lambda t: t[:, :-1]), {}, ValueError, "must be even"),
    (_set("down_proj", lambda t: t[:-1]), {}, ValueError, r"down_proj.shape\[0\] \(experts\)"),
    (_set("down_proj", lambda t: t.double()), {}, TypeError, "down_proj: torch.float64"),
    (_set("gate_up_bias", lambda t: t[:, :-1]), {}, ValueError, r"gate_up_bias.shape\[1\]"),
    (_set("gate_up_A", lambda t: t[:-1]), {}, ValueError, r"gate_up_A.shape\[0\] \(experts"),
    (_set("down_B", lambda t: t[:-1]), {}, ValueError, r"down_B.shape\[0\] \(experts"),
    (_set("down_B", lambda t: t[:, :, :-1]), {}, ValueError, r"down_B.shape\[2\] \(r"),
    (_set("gate_up_B", None), {}, ValueError, "gate_up_A and gate_up_B must be given together"),
    (_set("down_A", lambda t: t[:, :0]), {}, ValueError, "down_A has rank 0"),
    (_set("gate_up_proj", lambda t: t.requires_grad_()), {}, ValueError, "gate_up_proj require"),
    (lambda a: None, dict(activation="gelu"), ValueError, "activation must be one of"),
    (lambda a: None, dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: None, dict(gate_up_scaling=float("nan")), ValueError, "gate_up_scaling must be finite"),
])
def test_bad_input(mutate, kwargs, error, match):
    args = _bad_args()
    mutate(args)
    with pytest.raises(error, match=match):
        fastadapt.moe_lora_experts(args.pop("x"), args.pop("top_k_index"), args.pop("top_k_weights"),
                                   args.pop("gate_up_proj"), args.pop("down_proj"), **args, **kwargs)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    t = _inputs(5, 16, 8, 4, 2, 3, 2, True, torch.randint(0, 4, (5, 2), generator=gen), gen)
    for name in GRADS:
        t[name].requires_grad_()
    for activation, p, seed in (("silu", 0.0, None), ("gpt_oss", 0.2, torch.tensor(7))):
        args = (t["x"], t["top_k_index"], t["top_k_weights"], t["gate_up_proj"], t["gate_up_bias"], t["down_proj"],
                t["down_bias"], t["gate_up_A"], t["gate_up_B"], 0.5, t["down_A"], t["down_B"], 2.0, activation, 1.702,
                1.5, p, seed)
        torch.library.opcheck(torch.ops.fastadapt.moe_lora_experts.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    output = torch.ops.fastadapt.moe_lora_experts(*detached)
    for needs in ((True,) * 6, (False, True, False, True, True, False)):
        torch.library.opcheck(torch.ops.fastadapt.moe_lora_experts_backward.default,
                              MOE_LORA_EXPERTS.backward_inputs(detached, output, needs))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(0)
    t = _inputs(6, 16, 8, 4, 2, 3, 2, False, torch.randint(0, 4, (6, 2), generator=gen), gen)
    for name in LORA:
        t[name].requires_grad_()

    def step(x, idx, w, A1, B1, A2, B2):
        return _call(dict(t, x=x, top_k_index=idx, top_k_weights=w, gate_up_A=A1, gate_up_B=B1, down_A=A2,
                          down_B=B2), "silu", 0.1)

    args = [t[n] for n in ("x", "top_k_index", "top_k_weights") + LORA]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(*args)
    y.sum().backward()
    grads = [t[n].grad.clone() for n in LORA]
    for n in LORA:
        t[n].grad = None
    torch.manual_seed(0)
    y_eager = step(*args)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grads, [t[n].grad for n in LORA])
