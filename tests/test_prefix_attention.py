"""fastadapt.prefix_attention (gated prefix attention and prefix tuning) against the float64
reference: output and every gradient, on every backend that can run here (the Triton kernels
through the interpreter on CPU). Interpreter shapes are kept small: every program runs in numpy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from harness import BOUND, DEVICES, DTYPES, assert_close, backends_for, rel_err

import fastadapt
from fastadapt import dispatch
from fastadapt.reference import prefix_attention as reference
from fastadapt.ops.prefix_attention import PREFIX_ATTENTION

OP = "prefix_attention"
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for(OP, d)]

CASES = [  # (B, H, Hkv, Sq, Sk, L, D)
    (1, 2, 2, 1, 1, 1, 16),      # one token, one prefix slot
    (2, 4, 2, 19, 19, 5, 32),    # GQA 2:1, sequence not a multiple of the block
    (1, 4, 1, 37, 37, 10, 16),   # MQA, several query and key blocks
    (1, 2, 2, 3, 21, 7, 32),     # decode-like: 3 queries at the end of a 21-key cache
    (1, 4, 2, 17, 17, 3, 80),    # head dim 80, padded to 128 inside the kernel
]


def _inputs(B, H, Hkv, Sq, Sk, L, D, dtype, device, prefix_batch=None):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)
    pb = B if prefix_batch is None else prefix_batch
    return [t(B, H, Sq, D), t(B, Hkv, Sk, D), t(B, Hkv, Sk, D), t(pb, Hkv, L, D), t(pb, Hkv, L, D)]


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _check(backend, device, dtype, shape, *, mode="gated", causal=True, pad=False, gate_shape="per_head",
           gate_tanh=False, prefix_batch=None, layout="bhsd"):
    B, H, Hkv, Sq, Sk, L, D = shape
    raw = _inputs(*shape, dtype, device, prefix_batch)
    if layout == "bshd":  # (B, S, H, D) memory seen as (B, H, S, D): read in place through strides
        raw[:3] = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in raw[:3]]
    gate = None
    if mode == "gated":
        gshape = {"per_head": (H,), "scalar": (1,), "llama_adapter": (1, H, 1, 1)}[gate_shape]
        gate = torch.randn(gshape, device=device)  # float32, as PEFT keeps it
    kpm = None
    if pad:
        kpm = torch.rand(B, Sk, device=device) > 0.3
        kpm[0, : Sk // 2 + 1] = False  # early queries of batch 0 see no token key (causal)
        kpm[-1, -1] = True

    ours = [_leaf(x) for x in raw]
    g_ours = _leaf(gate)
    with dispatch.use_backend(backend):
        out = fastadapt.prefix_attention(*ours, g_ours, mode=mode, causal=causal, key_padding_mask=kpm,
                                         gate_tanh=gate_tanh)
        gout = torch.randn_like(out)
        out.backward(gout)

    def reference_run(cast):
        ts = [_leaf(x, cast) for x in raw]
        g = _leaf(gate)
        g_eff = None
        if g is not None:
            g_eff = (torch.tanh(g) if gate_tanh else g).to(cast).reshape(-1).expand(H)
        kp, vp = (x.expand(B, -1, -1, -1) for x in ts[3:])
        o = reference.prefix_attention(*ts[:3], kp, vp, g_eff, joint=mode == "joint", causal=causal,
                                       key_padding_mask=kpm)
        o.backward(gout.to(cast))
        return o, ts + [g]

    o64, ref64 = reference_run(torch.float64)
    o_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert out.shape == (B, H, Sq, D) and out.dtype == dtype
    assert_close("out", out, o64, dtype, device, o_pt)
    names = ["q", "k", "v", "prefix_k", "prefix_v", "gate"]
    # A softmax over one key is constant in that key and its query: with Sk = 1 or L = 1 some grads
    # are exactly 0 mathematically, so their error is measured against the op's other grads.
    scale = max(r.grad.norm().item() for r in ref64[:5])
    for name, mine, r64, rpt in zip(names, ours + [g_ours], ref64, ref_pt):
        if mine is None:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape
        if torch.count_nonzero(r64.grad) == 0:
            err = rel_err(mine.grad, r64.grad) / scale
            assert err <= BOUND[dtype], f"grad {name}: {err:.3e} of the largest grad, should be 0"
            continue
        assert_close(f"grad {name}", mine.grad, r64.grad, dtype, device, rpt.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_gated_causal_matches_reference(backend, device, dtype, shape):
    _check(backend, device, dtype, shape)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [CASES[1], CASES[3], CASES[4]], ids=str)
def test_joint_causal_matches_reference(backend, device, dtype, shape):
    _check(backend, device, dtype, shape, mode="joint")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_causal(backend, device, mode, dtype):
    _check(backend, device, dtype, (2, 4, 2, 13, 29, 6, 32), mode=mode, causal=False)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_mask(backend, device, mode, causal):
    _check(backend, device, torch.float32, (2, 4, 2, 21, 21, 4, 32), mode=mode, causal=causal, pad=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("variant", ["scalar_gate_tanh", "llama_adapter_gate", "shared_prefix", "bshd_layout",
                                     "more_queries_than_keys", "long_prefix"])
def test_variants(backend, device, variant):
    shape, kwargs = {
        "scalar_gate_tanh": ((1, 2, 2, 9, 9, 3, 16), dict(gate_shape="scalar", gate_tanh=True)),
        "llama_adapter_gate": ((1, 2, 2, 9, 9, 3, 16), dict(gate_shape="llama_adapter", gate_tanh=True)),
        "shared_prefix": ((2, 4, 2, 9, 9, 5, 16), dict(prefix_batch=1)),  # (1, Hkv, L, D), broadcast view
        "bshd_layout": ((2, 4, 2, 11, 11, 3, 16), dict(layout="bshd")),
        # Bottom-right causal: the first Sq - Sk queries see no token key (gated: zero base part).
        "more_queries_than_keys": ((1, 2, 2, 21, 7, 3, 16), dict()),
        "long_prefix": ((1, 2, 1, 5, 5, 37, 16), dict()),
    }[variant]
    _check(backend, device, torch.float32, shape, **kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_zero_gate_is_exactly_base_attention(backend, device):
    """With g = 0 the prefix cannot leak into the output or into q/k/v's grads (bitwise), its
    own grads are exactly 0, the gate still gets its gradient, and the output is SDPA's."""
    B, H, Hkv, S, L, D = 2, 4, 2, 13, 5, 32
    q, k, v, kp, vp = _inputs(B, H, Hkv, S, S, L, D, torch.float32, device)
    runs = []
    for prefix in ((kp, vp), (3 * torch.randn_like(kp), -torch.randn_like(vp))):
        ts = [_leaf(x) for x in (q, k, v, *prefix)] + [torch.zeros(H, device=device, requires_grad=True)]
        with dispatch.use_backend(backend):
            out = fastadapt.prefix_attention(*ts[:5], ts[5])
            out.backward(torch.ones_like(out))
        runs.append((out, ts))
    (o1, t1), (o2, t2) = runs
    assert torch.equal(o1, o2)
    for a, b in zip(t1[:3], t2[:3]):
        assert torch.equal(a.grad, b.grad)
    for t in t1[3:5]:
        assert torch.count_nonzero(t.grad) == 0
    assert torch.count_nonzero(t1[5].grad) > 0
    base = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                          v.double().repeat_interleave(2, 1), is_causal=True)
    assert rel_err(o1, base) <= 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_decode_steps_match_full_sequence(backend, device, mode):
    """Bottom-right alignment: the last n queries against the whole cache give the last n rows of
    the full causal pass, for n = 1 (a decode step) and n = 4 (a chunk)."""
    B, H, Hkv, S, L, D = 1, 4, 2, 23, 6, 16
    q, k, v, kp, vp = _inputs(B, H, Hkv, S, S, L, D, torch.float32, device)
    gate = torch.randn(H, device=device) if mode == "gated" else None
    with dispatch.use_backend(backend), torch.no_grad():
        full = fastadapt.prefix_attention(q, k, v, kp, vp, gate, mode=mode)
        for n in (1, 4):
            step = fastadapt.prefix_attention(q[:, :, -n:], k, v, kp, vp, gate, mode=mode)
            assert rel_err(step, full[:, :, -n:]) <= 1e-5


def test_triton_launchers_write_every_element(monkeypatch):
    if "triton" not in backends_for(OP, "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import prefix_attention as kernels

    def nan_empty(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernels, "_empty", nan_empty)
    B, H, Hkv, S, L, D = 2, 4, 2, 19, 5, 24
    q, k, v, kp, vp = _inputs(B, H, Hkv, S, S, L, D, torch.float32, "cpu")
    gate = torch.randn(H)
    for joint in (False, True):
        g = None if joint else gate
        out, lse, lse_p = kernels.forward(q, k, v, kp, vp, g, None, D**-0.5, True, joint)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(lse_p).all()
        grads = kernels.backward(torch.randn_like(out), q, k, v, kp, vp, g, None, out, lse, lse_p, D**-0.5,
                                 True, joint, [True, True, True, True, True, not joint])
        ref = reference.backward(torch.randn_like(out), q, k, v, kp, vp, g, None, out, lse, lse_p, D**-0.5,
                                 True, joint, [True, True, True, True, True, not joint])
        for mine, theirs in zip(grads, ref):
            assert (mine is None) == (theirs is None)
            assert mine is None or torch.isfinite(mine).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_backward_runs_on_the_forward_backend(backend, device, monkeypatch):
    # Whatever is forced when the backward runs, it is the forward's backend that serves it.
    impls = dispatch._REGISTRY[OP]

    def refuse(*_):
        raise AssertionError("backward dispatched to a backend other than the forward's")

    for name in impls:
        if name != backend:
            monkeypatch.setitem(impls, name, dataclasses.replace(impls[name], backward=refuse))
    q, k, v, kp, vp = (x.requires_grad_() for x in _inputs(1, 2, 1, 5, 5, 3, 16, torch.float32, device))
    gate = torch.randn(2, device=device, requires_grad=True)
    with dispatch.use_backend(backend):
        out = fastadapt.prefix_attention(q, k, v, kp, vp, gate)
    for other in (*[b for b, d in BACKEND_DEVICE if d == device and b != backend], None):
        with dispatch.use_backend(other):
            out.backward(torch.ones_like(out), retain_graph=True)
    assert gate.grad is not None


def test_opcheck():
    B, H, Hkv, S, L, D = 1, 2, 1, 5, 3, 16
    q, k, v, kp, vp = (x.requires_grad_() for x in _inputs(B, H, Hkv, S, S, L, D, torch.float32, "cpu"))
    gate = torch.randn(H, requires_grad=True)
    kpm = torch.tensor([[True, False, True, True, True]])
    for g, mask, causal, joint in ((gate, None, True, False), (gate, kpm, False, False), (None, kpm, True, True)):
        torch.library.opcheck(torch.ops.fastadapt.prefix_attention.default,
                              (q, k, v, kp, vp, g, mask, D**-0.5, causal, joint))
    args = (q.detach(), k.detach(), v.detach(), kp.detach(), vp.detach(), gate.detach(), None, D**-0.5, True, False)
    output = torch.ops.fastadapt.prefix_attention(*args)
    for needs in ([True] * 6, [False, False, False, True, True, True]):
        torch.library.opcheck(torch.ops.fastadapt.prefix_attention_backward.default,
                              PREFIX_ATTENTION.backward_inputs(args, output, needs))


@pytest.mark.parametrize("device", DEVICES)
def test_selects_triton_first_and_falls_back(device):
    q, k, v, kp, vp = _inputs(1, 2, 2, 4, 4, 2, 16, torch.float32, device)
    inputs = dict(q=q, k=k, v=v, k_p=kp, v_p=vp, key_padding_mask=None)
    expected = "triton" if "triton" in backends_for(OP, device) else "reference"
    assert dispatch.select(OP, **inputs).backend == expected
    big = _inputs(1, 2, 2, 4, 4, 2, 160, torch.float32, device)
    reasons = dispatch.explain(OP, **dict(zip(["q", "k", "v", "k_p", "v_p"], big)), key_padding_mask=None)
    assert any("head dim 160" in r for r in reasons["triton"])
    # The next backend that serves head dim 160: the C++ one when fastadapt._C is available here.
    fallback = "cpp" if "cpp" in backends_for(OP, device) else "reference"
    assert dispatch.select(OP, **dict(zip(["q", "k", "v", "k_p", "v_p"], big)), key_padding_mask=None).backend \
        == fallback
    if expected == "triton":
        with dispatch.use_backend("triton"), pytest.raises(fastadapt.BackendUnavailableError, match="head dim 160"):
            fastadapt.prefix_attention(*big, torch.zeros(2))


def _bad(q, k, v, kp, vp, gate, **kw):
    return fastadapt.prefix_attention(q, k, v, kp, vp, gate, **kw)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), ValueError, "head dim"),
    (lambda a: a.update(kp=a["kp"][..., :8], vp=a["vp"][..., :8]), ValueError, "head dim"),
    (lambda a: a.update(k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16), kp=torch.randn(2, 3, 3, 16),
                        vp=torch.randn(2, 3, 3, 16)), ValueError, "multiple of the number of key/value"),
    (lambda a: a.update(gate=torch.zeros(3)), ValueError, "gate must hold one value or one per query head"),
    (lambda a: a.update(gate=torch.zeros(2, 2)), ValueError, "gate must hold"),
    (lambda a: a.update(gate=None), ValueError, "needs a gate"),
    (lambda a: a.update(kw=dict(mode="joint")), ValueError, "has no gate"),
    (lambda a: a.update(kw=dict(mode="prefix")), ValueError, "mode must be one of"),
    (lambda a: a.update(v=a["v"][:, :, :5]), ValueError, "k and v must have the same shape"),
    (lambda a: a.update(kp=a["kp"][:, :, :0], vp=a["vp"][:, :, :0]), ValueError, "prefix is empty"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "must have 4 dimensions"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "dtypes must match"),
    (lambda a: a.update(kw=dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool))), ValueError, r"\(B, Sk\)"),
    (lambda a: a.update(kw=dict(key_padding_mask=torch.ones(2, 7))), TypeError, "must be bool"),
    (lambda a: a.update(kw=dict(scale=math.inf)), ValueError, "scale must be finite"),
])
def test_bad_input(mutate, error, match):
    B, H, Hkv, S, L, D = 2, 4, 2, 7, 3, 16
    q, k, v, kp, vp = _inputs(B, H, Hkv, S, S, L, D, torch.float32, "cpu")
    a = dict(q=q, k=k, v=v, kp=kp, vp=vp, gate=torch.zeros(H), kw={})
    mutate(a)
    with pytest.raises(error, match=match):
        _bad(a["q"], a["k"], a["v"], a["kp"], a["vp"], a["gate"], **a["kw"])


# ---------------------------------------------------------------------------------------------
# Module


def _module(gate="per_head", gate_tanh=False, H=4, Hkv=2, D=16, L=5):
    from fastadapt.nn import GatedPrefixAttention
    m = GatedPrefixAttention(hidden_size=32, num_heads=H, num_kv_heads=Hkv, head_dim=D, adapter_len=L, gate=gate,
                             gate_tanh=gate_tanh)
    k_proj, v_proj = torch.nn.Linear(32, Hkv * D, bias=False), torch.nn.Linear(32, Hkv * D, bias=False)
    k_proj.requires_grad_(False)
    v_proj.requires_grad_(False)
    return m, k_proj, v_proj


def test_module_zero_init_is_base_attention_and_matches_two_pass():
    m, k_proj, v_proj = _module()
    assert m.adaption_gate.shape == (4,) and torch.count_nonzero(m.adaption_gate) == 0
    assert set(m.state_dict()) == {"adaption_prompt", "adaption_gate"}
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out = m(q, k, v, k_proj, v_proj)
    base = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert rel_err(out, base.double()) <= 1e-5
    with torch.no_grad():
        m.adaption_gate.copy_(torch.randn(4))
    # PEFT's two-pass formula, per-head gate.
    kp = k_proj(m.adaption_prompt).view(1, 5, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
    vp = v_proj(m.adaption_prompt).view(1, 5, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
    two_pass = base + m.adaption_gate.view(1, 4, 1, 1) * torch.softmax(q @ kp.transpose(-1, -2) / 4.0, -1) @ vp
    out = m(q, k, v, k_proj, v_proj)
    assert rel_err(out, two_pass.detach().double()) <= 1e-5
    out.sum().backward()
    assert m.adaption_prompt.grad is not None and m.adaption_gate.grad is not None


def test_module_caches_prefix_kv_outside_autograd():
    m, k_proj, v_proj = _module(gate="scalar", gate_tanh=True)
    with torch.no_grad():
        a = m.prefix_kv(k_proj, v_proj)
        assert m.prefix_kv(k_proj, v_proj)[0] is a[0]
        m.adaption_prompt.add_(1.0)  # in-place update (an optimizer step) invalidates the cache
        assert not torch.equal(m.prefix_kv(k_proj, v_proj)[0], a[0])
    assert m.prefix_kv(k_proj, v_proj)[0].requires_grad
    assert "gate=scalar" in repr(m) and "gate_tanh=True" in repr(m)


def test_module_torch_compile_fullgraph_no_graph_break():
    m, k_proj, v_proj = _module(gate="scalar", gate_tanh=True)
    with torch.no_grad():
        m.adaption_gate.fill_(0.5)
    q = torch.randn(1, 4, 7, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)

    def step(q, k, v):
        return m(q, k, v, k_proj, v_proj)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    assert rel_err(out, step(q, k, v).detach()) < 1e-6
    out.sum().backward()
    assert q.grad is not None and m.adaption_gate.grad is not None and m.adaption_prompt.grad is not None
