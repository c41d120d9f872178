"""The differential fuzz every declared op gets: random calls drawn by the op's own ``fuzz(draw)``
(beside its declaration), run on every backend that can serve the CPU here, against the float64
truth of the same call, with

- random small shapes (M = 0 and 1 included, 3-D inputs), every dtype, dropout 0 / 0.1 / 0.999 in
  training or not, a random subset of the inputs requiring grad;
- every tensor laid out at random: contiguous, a transposed view, a strided slice, or a stride-0
  broadcast (the values are the broadcast's);
- now and then a NaN or inf in the first input, which must reach the same outputs as in the truth;
- the output and every gradient within the dtype's bound and twice PyTorch's own error;
- the eager path and the custom op (what torch.compile runs) giving the same bits.

Bounded by a fixed hypothesis budget per op; ``FASTADAPT_FUZZ=long`` runs many more examples.
Compile, a backend switch between compiling and running, and double backward are checked per op
below the fuzz.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from harness import assert_close, backends_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastadapt import dispatch
from fastadapt.ops._declare import declared
from fastadapt.testing import bound, dropout_mask, rel_err

LONG = os.environ.get("FASTADAPT_FUZZ") == "long"
OPS = sorted(declared())
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The short run is derandomized (the same draws every run, printed on failure) and does not shrink:
# shrinking a failure took over 5 minutes of CI's 2 cores; the long run explores and shrinks.
FUZZ = settings(max_examples=400 if LONG else 12, deadline=None, derandomize=not LONG,
                phases=list(Phase) if LONG else [Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck), database=None)


class _Draw:
    """The op's choices, drawn from hypothesis (fastadapt.testing.Draw)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def bool(self):
        return self.data.draw(st.booleans())


class _Seeded:
    """The op's choices from a seeded generator: for the checks below the fuzz, which want a call
    of a kind (with dropout, say) rather than many calls."""

    def __init__(self, seed):
        self.random = random.Random(seed)

    def int(self, lo, hi):
        return self.random.randint(lo, hi)

    def choice(self, options):
        return self.random.choice(options)

    def bool(self):
        return self.random.random() < 0.5


def _first_call(op, wanted):
    """The first seeded call of ``op`` for which ``wanted(case, tensors, dtype)`` holds, or None."""
    for seed in range(1000):
        call = _draw_call(op, _Seeded(seed))
        if wanted(*call[:3]):
            return call
    return None


def _layout(t: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """``t``'s values (or a broadcast of one of its slices) in a random memory layout."""
    kind = draw.choice(["contiguous", "transposed", "strided", "broadcast"])
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "broadcast" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def _inject(t: torch.Tensor, draw: _Draw) -> bool:
    if t.numel() == 0 or not t.is_floating_point() or draw.int(0, 5) != 0:
        return False
    t.view(-1)[draw.int(0, t.numel() - 1)] = draw.choice([float("nan"), float("inf"), -float("inf")])
    return True


def _run(op, case, tensors, backend, seed, gout, eager=True):
    """(output, grads by name) of the public call on ``backend``; the custom op's path if not ``eager``."""
    leaves = {n: (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None)
              for n, t in tensors.items()}
    torch.manual_seed(seed)
    with dispatch.use_backend(backend), (_CustomOpPath() if not eager else _Nothing()):
        out = case.call(**leaves)
        spec = declared()[op].spec
        if spec.outputs[0] not in spec.saved:  # else autograd's version check refuses it, as it should
            out.mul_(1)  # an output may be modified in place (an activation's inplace=True, AdaLoRA's +=)
        if any(t is not None and t.requires_grad for t in leaves.values()):
            out.backward(gout.to(out.dtype))
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None and t.requires_grad}


class _CustomOpPath(torch.overrides.TorchFunctionMode):
    """Any function mode makes an op take its custom op, as torch.compile does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _seed_of_call(seed: int) -> int:
    """The dropout seed an op draws first after ``torch.manual_seed(seed)`` (CPU generator)."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def _exact(case, tensors, dtype, keep, gout):
    """(output, grads) of the case's plain-PyTorch formula on the inputs' values in ``dtype``."""
    leaves = {n: (t.detach().to(dtype if t.is_floating_point() and n not in case.fixed else t.dtype)
                  .requires_grad_(t.requires_grad) if t is not None else None) for n, t in tensors.items()}
    out = case.exact(keep, **leaves)
    if any(t is not None and t.requires_grad for t in leaves.values()):
        out.backward(gout.to(out.dtype))
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None and t.requires_grad}


def _check(name, mine, truth, same, dtype, nonfinite, scale):
    if nonfinite:
        # The output is non-finite exactly where the truth is; a gradient may be finite where the
        # truth has a 0 * inf (an inactive ReLU's zero times an infinite input: IEEE's NaN is
        # not the derivative), but never non-finite where the truth is finite. The rest is held
        # to the bound.
        mine64, truth64 = mine.double(), truth.double()
        bad, truth_bad = ~torch.isfinite(mine64), ~torch.isfinite(truth64)
        if name == "output":
            assert torch.equal(bad, truth_bad), f"{name}: non-finite entries differ"
        else:
            assert not (bad & ~truth_bad).any(), f"{name}: non-finite where the truth is finite"
        mine, truth, same = mine64[~truth_bad], truth64[~truth_bad], same.double()[~truth_bad]
    if dtype == torch.float64:
        # Relative to the case's largest result too: a result that cancels to rounding noise in the
        # truth has no digits to compare (the LayerNorm weight's gradient over a hidden size of 1,
        # where x - mean is 0 but the float64 formula gives 6e-17).
        err = (mine.double() - truth.double()).norm().item()
        assert err <= 1e-10 * max(truth.double().norm().item(), 1e-2 * scale), (
            f"{name}: float64 error {err:.2e} against a result of norm {truth.double().norm().item():.2e}")
    elif rel_err(same, truth) <= bound(dtype, "cpu"):
        assert_close(name, mine, truth, dtype, "cpu", ref_same_dtype=same)
    else:  # ill-conditioned in this dtype (random shapes and broadcasts cancel): PyTorch's own error is
        # past the bound, so the rule is the relative one alone, twice PyTorch's plus a quarter bound
        err, torch_err = rel_err(mine, truth), rel_err(same, truth)
        assert err <= 2 * torch_err + bound(dtype, "cpu") / 4, (
            f"{name}: relative error {err:.3e} > 2x PyTorch's own {dtype} error {torch_err:.3e}")


def _finite_norm(t: torch.Tensor) -> float:
    t = t.double()
    return t[torch.isfinite(t)].norm().item()


def _detached(tensors: dict) -> dict:
    return {n: (t.detach() if t is not None else None) for n, t in tensors.items()}


def _draw_call(op, draw):
    """(case, its tensors in the drawn dtype and layouts, dtype, backend, whether a non-finite value
    was put in the first input)."""
    torch.manual_seed(draw.int(0, 2**31 - 1))  # the case's random values, replayable
    case = declared()[op].spec.fuzz(draw)
    dtype = draw.choice(DTYPES)
    backend = "reference" if dtype == torch.float64 else draw.choice(backends_for(op, "cpu"))
    tensors, nonfinite = {}, False
    for i, (name, t) in enumerate(case.tensors.items()):
        if t is not None:
            if t.is_floating_point() and name not in case.fixed:
                t = t.to(dtype)
            if i == 0:
                nonfinite = _inject(t, draw)
            t = _layout(t, draw)
            if name in case.grads and draw.bool():
                t = t.detach().requires_grad_()
        tensors[name] = t
    return case, tensors, dtype, backend, nonfinite


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_fuzz(op, data):
    case, tensors, dtype, backend, nonfinite = _draw_call(op, _Draw(data))
    seed = data.draw(st.integers(0, 2**20))
    with dispatch.use_backend(backend), torch.no_grad():  # the output's shape, for its gradient
        torch.manual_seed(seed)
        shape = case.call(**_detached(tensors)).shape
    gout = torch.randn(shape, dtype=torch.float64)
    out, grads = _run(op, case, tensors, backend, seed, gout)
    call_seed = _seed_of_call(seed)

    def keep(k, shape, p):
        return dropout_mask(backend, call_seed + k, shape, p, "cpu")

    truth, truth_grads = _exact(case, tensors, torch.float64, keep, gout)
    same, same_grads = _exact(case, tensors, dtype, keep, gout)
    assert out.dtype == dtype and out.shape == truth.shape
    scale = max(_finite_norm(t) for t in (truth, *truth_grads.values()))
    _check("output", out, truth, same, dtype, nonfinite, scale)
    assert grads.keys() == truth_grads.keys()
    for name in grads:
        assert grads[name].dtype == tensors[name].dtype, name
        _check(f"grad {name}", grads[name], truth_grads[name], same_grads[name], dtype, nonfinite, scale)
    # The custom op (what torch.compile runs) computes the same bits as the eager path.
    op_out, op_grads = _run(op, case, tensors, backend, seed, gout, eager=False)
    torch.testing.assert_close(op_out, out, rtol=0, atol=0, equal_nan=True)
    for name in grads:
        torch.testing.assert_close(op_grads[name], grads[name], rtol=0, atol=0, equal_nan=True, msg=name)


def _with_grads(case, tensors):
    return {n: (t.detach().requires_grad_() if n in case.grads and t is not None and t.is_floating_point() else t)
            for n, t in tensors.items()}


@pytest.mark.parametrize("op", OPS)
def test_compiled_call_runs_where_it_is_run(op):
    # Compiled under one backend, run under another: the forward and the backward run on the backend
    # in force when the graph runs (the backward reads which one the forward used), so the dropout
    # masks and gradients are that backend's; a second scaling reuses the graph's op, not a constant.
    case, tensors, dtype, _, nonfinite = (
        _first_call(op, lambda case, tensors, dtype: case.dropout and dtype != torch.float64)
        or _first_call(op, lambda case, tensors, dtype: dtype != torch.float64))  # an op without dropout
    tensors = _with_grads(case, tensors)
    backends = backends_for(op, "cpu")
    compiled = torch.compile(case.call, fullgraph=True, backend="aot_eager")
    with dispatch.use_backend(backends[0]):
        compiled(**_detached(tensors))
    rescale = {"scaling": 1.75} if "scaling" in case.call.__code__.co_varnames else {}
    for backend in backends[::-1]:
        leaves = {n: (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None)
                  for n, t in tensors.items()}
        torch.manual_seed(7)
        with dispatch.use_backend(backend):
            out = compiled(**leaves, **rescale)
            gout = torch.randn(out.shape, dtype=torch.float64)
            out.backward(gout.to(out.dtype))
        call_seed = _seed_of_call(7)

        def keep(k, shape, p, backend=backend, call_seed=call_seed):
            return dropout_mask(backend, call_seed + k, shape, p, "cpu")

        truth, truth_grads = _exact(_Rescaled(case, rescale), tensors, torch.float64, keep, gout)
        same, same_grads = _exact(_Rescaled(case, rescale), tensors, dtype, keep, gout)
        scale = max(_finite_norm(t) for t in (truth, *truth_grads.values()))
        _check(f"{backend} output", out.detach(), truth, same, dtype, nonfinite, scale)
        for name, t in leaves.items():
            if t is not None and t.requires_grad:
                _check(f"{backend} grad {name}", t.grad, truth_grads[name], same_grads[name], dtype, nonfinite,
                       scale)


class _Rescaled:
    """A fuzz case whose exact formula takes other keyword values (a new scaling)."""

    def __init__(self, case, kwargs):
        self.case, self.kwargs = case, kwargs
        self.fixed, self.grads = case.fixed, case.grads

    def exact(self, keep, **tensors):
        return self.case.exact(keep, **tensors, **self.kwargs)


@pytest.mark.parametrize("op", OPS)
def test_double_backward_says_it_is_not_supported(op):
    # Every path raises one clear error, except the reference's eager composite: PyTorch's own
    # autograd, which differentiates twice.
    case, tensors, _, _, _ = _first_call(
        op, lambda case, tensors, dtype: dtype == torch.float32 and next(iter(tensors.values())).numel() > 0)
    for backend in backends_for(op, "cpu"):
        for path in (_Nothing, _CustomOpPath):
            leaves = _with_grads(case, tensors)
            wrt = [t for t in leaves.values() if t is not None and t.requires_grad]
            with dispatch.use_backend(backend), path():
                out = case.call(**leaves)
                grads = torch.autograd.grad(out.square().sum(), wrt, create_graph=True, allow_unused=True)
                total = sum(g.sum() for g in grads if g is not None and g.requires_grad)
                composite = dispatch.get(op, backend).composite is not None and path is _Nothing
                if composite or not torch.is_tensor(total):
                    continue
                with pytest.raises(RuntimeError, match=f"fastadapt::{op}: double backward"):
                    total.backward()
