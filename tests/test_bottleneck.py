"""fastadapt.bottleneck_adapter against the float64 reference: output and every gradient, for every
option that changes the math, on every backend that can run here (the Triton kernels through the
interpreter on CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import DEVICES, DTYPES, assert_close, backends_for, nan_like, rel_err

import fastadapt
from fastadapt import dispatch
from fastadapt.ops.bottleneck import BOTTLENECK_ADAPTER, GRAD_NAMES, bottleneck_adapter
from fastadapt.testing import dropout_mask
from fastadapt.reference import bottleneck as reference

OP = "bottleneck_adapter"
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for(OP, d)]
SCALING = 0.7
SEED = 1234

# Options that change the math. ln_after: None | "after" (LN(o) + r) | "before" (LN(o + r));
# without a residual (parallel adapter) "before" is the same computation as "after": pruned.
STRUCTURE = [
    (ln_before, ln_after, residual, scale, gate)
    for ln_before, (residual, ln_after), scale, gate in itertools.product(
        (False, True), [(True, None), (True, "after"), (True, "before"), (False, None), (False, "after")],
        (None, "learned", "channel"), (False, True))
]
ACTIVATIONS = ["relu", "gelu", "gelu_new", "swish", "tanh", "leakyrelu", "linear"]


def _inputs(lead, d, m, dtype, device, *, ln_before=False, ln_after=None, residual=True, scale=None,
            gate=False, bias=True):
    """Fresh random tensors (fp32 draws cast to dtype), O(1) at every stage of the adapter.

    ``gate``: False (none), True (one per row) or a shape broadcastable to the rows."""
    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, device=device) * std + mean).to(dtype)

    # LN_after of o alone is invariant to a per-row or global factor on o: with O(1) o the
    # gradients of the gate and of a "learned" scalar scale are 0 but for eps, i.e. rounding noise
    # in any precision. An up-projection of Houlsby-init size (~1e-2, var(o) ~ eps) keeps eps in
    # play and those gradients well-conditioned.
    up = 3e-3 if ln_after == "after" or (ln_after and not residual) else 1.0

    t = {
        "z": rnd(*lead, d, mean=0.5),  # a nonzero mean exercises the LayerNorm centring
        "residual": rnd(*lead, d) if residual else None,
        "down_weight": rnd(m, d, std=d**-0.5),
        "down_bias": rnd(m, std=0.3) if bias else None,
        "up_weight": rnd(d, m, std=up * m**-0.5),
        # A "learned" scale's gradient is one number, sum(g_o * u) over M*d terms; a positive u
        # (with a positive-mean g_o, see _check) keeps that sum free of cancellation, which would
        # otherwise amplify the fp32 rounding of each term into the single number compared.
        "up_bias": rnd(d, std=0.3 * up, mean=up if scale == "learned" else 0.0) if bias else None,
        "scale": None,
        "ln_before_weight": rnd(d, std=0.2, mean=1.0) if ln_before else None,
        "ln_before_bias": rnd(d, std=0.2) if ln_before else None,
        "ln_after_weight": rnd(d, std=0.2, mean=1.0) if ln_after else None,
        "ln_after_bias": rnd(d, std=0.2) if ln_after else None,
        "gate": torch.rand(lead if gate is True else gate, device=device).to(dtype) if gate is not False else None,
    }
    if scale == "learned":
        t["scale"] = rnd(1, std=0.2, mean=1.0)
    elif scale == "channel":
        t["scale"] = rnd(d, std=0.2, mean=1.0)
    return t


def _call(fn_ln_pairs, t, *, activation, ln_after, dropout_p, keep=None, scaling=SCALING):
    """Run either the op or the reference on the tensors in t (a dict in GRAD_NAMES order)."""
    lnb = (t["ln_before_weight"], t["ln_before_bias"]) if t["ln_before_weight"] is not None else None
    lna = (t["ln_after_weight"], t["ln_after_bias"]) if t["ln_after_weight"] is not None else None
    if fn_ln_pairs == "op":
        return bottleneck_adapter(
            t["z"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"],
            activation=activation, scaling=scaling, scale=t["scale"], ln_before=lnb, ln_after=lna,
            adapter_residual_before_ln=ln_after == "before", gate=t["gate"], dropout_p=dropout_p)
    out, _ = reference.bottleneck_adapter(
        t["z"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"], scaling=scaling,
        scale=t["scale"], ln_before=lnb, ln_after=lna, residual_before_ln=ln_after == "before",
        gate=None if t["gate"] is None else t["gate"][..., None], keep=keep, dropout_p=dropout_p,
        activation_name=activation)
    return out


def _leaves(raw, dtype=None):
    return {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in raw.items()}


def _check(backend, device, dtype, lead, d, m, *, activation="relu", dropout_p=0.0, ln_after=None,
           transform=None, scaling=SCALING, **opts):
    raw = _inputs(lead, d, m, dtype, device, ln_after=ln_after, **opts)
    ours = _leaves(raw)
    if transform is not None:  # strided views of the same values (the leaves keep the grads)
        args = transform(ours)
    else:
        args = ours
    gout = torch.randn(raw["z"].shape, device=device).to(dtype) + (1.0 if opts.get("scale") == "learned" else 0.0)

    def run_op(args):
        torch.manual_seed(SEED)  # the op draws its dropout seed from the default CPU generator
        with dispatch.use_backend(backend):
            out = _call("op", args, activation=activation, ln_after=ln_after, dropout_p=dropout_p, scaling=scaling)
            out.backward(gout)
        return out

    out = run_op(args)

    keep = None
    if dropout_p > 0:
        torch.manual_seed(SEED)
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        keep = dropout_mask(backend, seed, (raw["z"].numel() // d, d), dropout_p, device).view(raw["z"].shape)

    def reference_run(cast):
        ts = _leaves(raw, cast)
        o = _call("ref", ts, activation=activation, ln_after=ln_after, dropout_p=dropout_p, keep=keep,
                  scaling=scaling)
        o.backward(gout.to(cast))
        return o, ts

    out64, ref64 = reference_run(torch.float64)
    out_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert_close("out", out, out64, dtype, device, out_pt)
    # Through LN_after, a "learned" scale's gradient is one number summed from M*d terms that
    # cancel (the LN backward is mean-free per row): PyTorch's own fp32 error on it swings from
    # 1e-8 to 6e-6 with the draw, so one-number comparisons say nothing. It is checked instead as
    # the float64 sum of the per-channel gradients of the same values as a "channel" scale,
    # each of which is held to the bounds below.
    learned_in_ln = opts.get("scale") == "learned" and ln_after is not None
    for name in GRAD_NAMES:
        mine = ours[name]
        if mine is None:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape, name
        if learned_in_ln and name == "scale":
            continue
        assert_close(f"grad {name}", mine.grad, ref64[name].grad, dtype, device, ref_pt[name].grad)
    if learned_in_ln:
        raw["scale"] = raw["scale"].expand(d).clone()
        channel = _leaves(raw)
        run_op(transform(channel) if transform is not None else channel)
        ref64 = reference_run(torch.float64)[1]["scale"].grad
        ref_pt = reference_run(dtype)[1]["scale"].grad
        assert_close("grad scale (channel)", channel["scale"].grad, ref64, dtype, device, ref_pt)
        parts = channel["scale"].grad.double()
        assert abs(ours["scale"].grad.double().item() - parts.sum().item()) <= 1e-6 * parts.abs().sum().item()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("ln_before,ln_after,residual,scale,gate", STRUCTURE)
def test_option_combinations(backend, device, ln_before, ln_after, residual, scale, gate):
    _check(backend, device, torch.float32, (3, 11), 48, 7, ln_before=ln_before, ln_after=ln_after,
           residual=residual, scale=scale, gate=gate)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("ln_after,residual,scale,gate", [
    (None, True, None, False), ("before", True, "channel", True), ("after", True, "learned", False),
    ("after", False, "channel", True)])
def test_dropout_same_mask_forward_and_backward(backend, device, ln_after, residual, scale, gate):
    _check(backend, device, torch.float32, (2, 9), 48, 7, dropout_p=0.3, ln_before=True, ln_after=ln_after,
           residual=residual, scale=scale, gate=gate)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_each_dtype(backend, device, dtype, activation):
    # Every stage on: LN before and after (residual inside), channel scale, gate, dropout. Not
    # LN_before with a kinked activation in half precision: eager rounds the LN output to the
    # dtype (and so do we), which moves h by ~4e-3 and flips relu'(h) wherever |h| is that small;
    # each flip costs ~1/sqrt(M*m) of g_h, over the bound for PyTorch's own computation too.
    kinked = activation in ("relu", "leakyrelu") and dtype != torch.float32
    _check(backend, device, dtype, (2, 5), 80, 16, activation=activation, dropout_p=0.1, ln_before=not kinked,
           ln_after="before", scale="channel", gate=True)


SHAPES = [  # (leading shape of z, hidden d, bottleneck m)
    # Not M=1 with m=1: g_z is then one number g_h times W_d, and g_h one cancelling sum of d
    # terms rounded to the dtype: a single draw decides the bf16 error, PyTorch's own included.
    ((1,), 48, 7),
    ((7,), 80, 1),
    ((33,), 100, 16),
    ((3, 11), 48, 64),
    ((2, 3, 5), 100, 33),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,m", SHAPES)
def test_shapes_each_dtype(backend, device, dtype, lead, d, m):
    # Pfeiffer's core (no adapter LayerNorms, residual after, float scaling) and Houlsby's swish.
    _check(backend, device, dtype, lead, d, m, activation="swish" if m % 2 else "relu")


def _strided(t):
    out = dict(t)
    # z and residual as transposed views (last-dim stride != 1), weights as transposes of (d, m) / (m, d).
    out["z"] = t["z"].t().contiguous().t() if t["z"].dim() == 2 else t["z"]
    out["residual"] = t["residual"].t().contiguous().t()
    out["down_weight"] = t["down_weight"].t().contiguous().t()
    out["up_weight"] = t["up_weight"].t().contiguous().t()
    return out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("variant", ["noncontiguous", "no_bias", "negative_scaling"])
def test_variants(backend, device, variant):
    kw = {"noncontiguous": dict(transform=_strided, ln_before=True, ln_after="before"),
          "no_bias": dict(bias=False, ln_after="after", scale="channel"),
          "negative_scaling": dict(scale="learned", scaling=-1.5)}[variant]
    _check(backend, device, torch.float32, (37,), 80, 16, **kw)


def test_triton_launchers_write_every_element():
    if "triton" not in backends_for(OP, "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import bottleneck as kernels

    M, d, m = 37, 80, 7
    t = _inputs((M,), d, m, torch.float32, "cpu", ln_before=True, ln_after="before", scale="channel", gate=True)
    args = (t["z"], t["residual"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["scale"],
            t["ln_before_weight"], t["ln_before_bias"], t["ln_after_weight"], t["ln_after_bias"], t["gate"],
            SCALING, "gelu", 1e-5, True, 0.0, 0)
    bufs = (nan_like(torch.empty(M, d)), nan_like(torch.empty(M, m)), nan_like(torch.empty(4, M)))
    out, h, stats = kernels.forward(*args, buffers=bufs)
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(stats).all()
    ref_out, ref_h, _ = reference.forward(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(out, ref_out) < 1e-5 and rel_err(h, ref_h) < 1e-5
    gout = torch.randn(M, d)
    needs = [True] * 12
    one = kernels.backward(gout, *args[:6], h, stats, *args[6:], needs, splits=1)
    three = kernels.backward(gout, *args[:6], h, stats, *args[6:], needs, splits=3)  # atomics across splits
    for name, a, b in zip(GRAD_NAMES, one, three):
        assert a is not None and torch.isfinite(a).all(), name
        assert rel_err(b, a) < 1e-6, name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_dropout_keeps_expected_fraction(backend, device):
    p = 0.25
    keep = dropout_mask(backend, 99, (64, 512), p, device)
    # 32768 Bernoulli(0.75) draws: std 0.0024; 5 sigma.
    assert abs(keep.float().mean().item() - (1 - p)) < 0.012
    assert torch.equal(keep, dropout_mask(backend, 99, (64, 512), p, device))
    assert not torch.equal(keep, dropout_mask(backend, 100, (64, 512), p, device))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_eval_mode_has_no_dropout(backend, device):
    t = _inputs((9,), 48, 8, torch.float32, device)
    with dispatch.use_backend(backend):
        out = bottleneck_adapter(t["z"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                                 t["residual"], scaling=SCALING, dropout_p=0.5, training=False)
    ref = _call("ref", {k: None if v is None else v.double() for k, v in t.items()}, activation="relu",
                ln_after=None, dropout_p=0.0)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_batch(backend, device, lead):
    t = _leaves(_inputs(lead, 48, 8, torch.float32, device, ln_before=True, ln_after="before", scale="channel"))
    with dispatch.use_backend(backend):
        out = _call("op", t, activation="relu", ln_after="before", dropout_p=0.0)
        out.sum().backward()
    assert out.shape == (*lead, 48)
    assert t["z"].grad.shape == t["z"].shape and t["residual"].grad.shape == t["residual"].shape
    assert t["up_weight"].grad is not None and t["up_weight"].grad.abs().sum() == 0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("gate_shape", [(), (1,), (1, 11), (3, 1)], ids=str)
def test_broadcast_gate(backend, device, gate_shape):
    # A gate broadcast over the rows reaches the backends as an expanded (stride 0) view. (A
    # "learned" scale keeps u and g_o of one sign, so that the gradient of a one-number gate is
    # no cancelling sum; see _inputs.)
    _check(backend, device, torch.float32, (3, 11), 48, 7, scale="learned", gate=gate_shape)


def _strided_vectors(t):
    # Every 1-D parameter (and the gate) as a stride-2 view of the same values.
    out = dict(t)
    for name in ("down_bias", "up_bias", "scale", "ln_before_weight", "ln_before_bias", "ln_after_weight",
                 "ln_after_bias", "gate"):
        if t[name] is not None:
            out[name] = torch.stack([t[name], torch.zeros_like(t[name])], -1)[..., 0]
    return out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_strided_vectors(backend, device):
    _check(backend, device, torch.float32, (37,), 80, 16, transform=_strided_vectors, ln_before=True,
           ln_after="before", scale="channel", gate=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_as_in_pytorch(backend, device, activation):
    # A NaN in one row of z must come out as eager PyTorch gives it (relu(NaN) = NaN, and
    # relu'(NaN) = 1 in the backward), in the output and every gradient, not vanish.
    t = _inputs((9,), 48, 7, torch.float32, device)
    t["z"][2, 5] = float("nan")
    ours, ref = _leaves(t), _leaves(t)
    gout = torch.randn(t["z"].shape, device=device)
    with dispatch.use_backend(backend):
        out = _call("op", ours, activation=activation, ln_after=None, dropout_p=0.0)
        out.backward(gout)
    expected = _call("ref", ref, activation=activation, ln_after=None, dropout_p=0.0)
    expected.backward(gout)
    assert expected.isnan().any()
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-4, atol=1e-5)
    for name in ("z", "residual", "down_weight", "down_bias", "up_weight", "up_bias"):
        torch.testing.assert_close(ours[name].grad, ref[name].grad, equal_nan=True, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_backward_runs_on_the_forward_backend(backend, device):
    # Dropout masks are regenerated from the seed by each backend's own generator: a backward run
    # under another forced backend must still be the forward backend's.
    others = [b for b, d in BACKEND_DEVICE if d == device and b != backend]
    if not others:
        pytest.skip("one backend only")
    t = _inputs((2, 9), 48, 7, torch.float32, device, ln_before=True, ln_after="before", scale="channel", gate=True)
    gout = torch.randn(t["z"].shape, device=device)
    grads = []
    for backward_backend in (backend, *others):
        leaves = _leaves(t)
        torch.manual_seed(SEED)
        with dispatch.use_backend(backend):
            out = _call("op", leaves, activation="gelu", ln_after="before", dropout_p=0.3)
        with dispatch.use_backend(backward_backend):
            out.backward(gout)
        grads.append({k: v.grad for k, v in leaves.items() if v is not None})
    for other, g in zip(others, grads[1:]):
        for name in g:
            torch.testing.assert_close(g[name], grads[0][name], msg=lambda m: f"{other} backward, {name}: {m}")


def test_opcheck():
    t = _inputs((2, 5), 48, 7, torch.float32, "cpu", ln_before=True, ln_after="before", scale="channel", gate=True)
    full = [t[k] for k in GRAD_NAMES]
    for i in (0, 2, 4, 5, 6, 7, 8, 9, 10):
        full[i] = full[i].detach().requires_grad_()
    bare = [t["z"], None, t["down_weight"], None, t["up_weight"], None, None, None, None, None, None, None]
    gate_rows = t["gate"].reshape(-1)
    full[11] = gate_rows
    cases = [(full, "gelu", True, 0.2, torch.tensor(7)), (bare, "relu", False, 0.0, None)]
    for tensors, act, residual_before_ln, p, seed in cases:
        args = (*tensors, SCALING, act, 1e-5, residual_before_ln, p, seed)
        torch.library.opcheck(torch.ops.fastadapt.bottleneck_adapter.default, args)
    args = (*(x.detach() if x is not None else None for x in full), SCALING, "gelu", 1e-5, True, 0.0, None)
    output = torch.ops.fastadapt.bottleneck_adapter(*args)
    for needs in ([True] * 12, [False, True, True, False, True, False, True, False, True, False, True, False]):
        torch.library.opcheck(torch.ops.fastadapt.bottleneck_adapter_backward.default,
                              BOTTLENECK_ADAPTER.backward_inputs(args, output, needs))


@pytest.mark.parametrize("device", DEVICES)
def test_selects_triton_first_and_falls_back(device):
    t = _inputs((3,), 16, 4, torch.float64, device)
    reasons = dispatch.explain(OP, z=t["z"], down_weight=t["down_weight"], up_weight=t["up_weight"])
    assert any("float64" in r for r in reasons["triton"])
    assert dispatch.select(OP, z=t["z"], down_weight=t["down_weight"], up_weight=t["up_weight"]).backend != "triton"
    with pytest.raises(fastadapt.BackendUnavailableError, match="float64"):
        with dispatch.use_backend("triton"):
            _call("op", t, activation="relu", ln_after=None, dropout_p=0.0)
    wide = _inputs((3,), 16, 1025, torch.float32, device)
    reasons = dispatch.explain(OP, z=wide["z"], down_weight=wide["down_weight"], up_weight=wide["up_weight"])
    assert any("1025 > 1024" in r for r in reasons["triton"])


def _bad(name, value):
    def mutate(t):
        t[name] = value(t) if callable(value) else value
    return mutate


@pytest.mark.parametrize("mutate,kwargs,error,match", [
    (_bad("down_weight", lambda t: t["down_weight"][:, :-1]), {}, ValueError, r"down_weight.shape\[1\]"),
    (_bad("up_weight", lambda t: t["up_weight"][:-1]), {}, ValueError, r"up_weight.shape\[0\]"),
    (_bad("up_weight", lambda t: t["up_weight"][:, :-1]), {}, ValueError, r"up_weight.shape\[1\] \(bottleneck"),
    (_bad("down_weight", lambda t: t["down_weight"][:0]), {}, ValueError, "bottleneck width must be at least 1"),
    (_bad("down_bias", lambda t: t["down_bias"][:-1]), {}, ValueError, r"down_bias.shape\[0\]"),
    (_bad("up_bias", lambda t: t["up_bias"][:-1]), {}, ValueError, r"up_bias.shape\[0\]"),
    (_bad("ln_before_weight", lambda t: torch.ones(15)), {}, ValueError, r"ln_before weight.shape\[0\]"),
    (_bad("ln_after_bias", lambda t: torch.zeros(17)), {}, ValueError, r"ln_after bias.shape\[0\]"),
    (_bad("scale", lambda t: torch.ones(3)), {}, ValueError, "scale must have 1 element"),
    (_bad("residual", lambda t: t["residual"][:-1]), {}, ValueError, "residual must have z's shape"),
    (_bad("residual", lambda t: t["residual"].double()), {}, TypeError, "residual: torch.float64"),
    (_bad("gate", lambda t: torch.rand(4)), {}, ValueError, "gate of shape"),
    (_bad("z", lambda t: t["z"].int()), {}, TypeError, "z must be a floating-point"),
    (None, {"activation": "softsign"}, ValueError, "unknown activation 'softsign'"),
    (None, {"scaling": float("nan")}, ValueError, "scaling must be finite"),
    (None, {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_input(mutate, kwargs, error, match):
    t = _inputs((5,), 16, 4, torch.float32, "cpu", ln_before=True, ln_after="after", scale="channel", gate=True)
    if mutate is not None:
        mutate(t)
    call = dict(activation="relu", scaling=1.0, dropout_p=0.0)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        bottleneck_adapter(t["z"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"],
                           activation=call["activation"], scaling=call["scaling"], scale=t["scale"],
                           ln_before=(t["ln_before_weight"], t["ln_before_bias"]),
                           ln_after=(t["ln_after_weight"], t["ln_after_bias"]), gate=t["gate"],
                           dropout_p=call["dropout_p"])


def test_ln_pair_must_be_two_tensors():
    t = _inputs((5,), 16, 4, torch.float32, "cpu")
    with pytest.raises(TypeError, match="ln_before must be a \\(weight, bias\\) pair"):
        bottleneck_adapter(t["z"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                           ln_before=(torch.ones(16), None))
