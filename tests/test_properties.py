"""Property-based tests (hypothesis): every backend against the float64 reference on random small
shapes, strides and options, through each op's own checker (the bounds of fastadapt.testing).

Examples are few (the Triton interpreter costs ~2 s an example) and derandomized: the same ones on
every run, chosen from each test's name, so the suite stays within CI's budget and a failure
reproduces. ``FASTADAPT_HYPOTHESIS_EXAMPLES=N`` explores N fresh random examples per test instead.
Explored at N=150-200 on the cpp and reference backends, what it still finds are results of a few
elements (a near-zero dk row, a 16-wide LayerNorm bias grad in bf16) whose relative error no bound
holds, the reference backend's own backward included; the sizes below exclude the ones seen."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
from harness import DTYPES
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_bottleneck import ACTIVATIONS, _strided, _strided_vectors
from test_bottleneck import BACKEND_DEVICE as BOTTLENECK_BACKENDS
from test_bottleneck import _check as check_bottleneck
from test_lora import BACKEND_DEVICE as LORA_BACKENDS
from test_lora import _check_against_reference as check_lora
from test_prefix_attention import BACKEND_DEVICE as PREFIX_BACKENDS
from test_prefix_attention import _check as check_prefix

_EXPLORE = int(os.environ.get("FASTADAPT_HYPOTHESIS_EXAMPLES", "0"))


def _run(backend, strategies, check):
    """Run ``check(**example)`` on the examples hypothesis draws from ``strategies``, the tensors
    of each drawn from a seed of its own (a failure then replays)."""
    def seeded(**example):
        torch.manual_seed(zlib.crc32(repr(sorted(example.items())).encode()))
        check(**example)

    examples = _EXPLORE or (6 if backend == "triton" and not torch.cuda.is_available() else 25)
    run = settings(max_examples=examples, derandomize=not _EXPLORE, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])(
        given(**strategies)(seeded))
    run()


dtypes = st.sampled_from(DTYPES)
lead_shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


@pytest.mark.parametrize("backend,device", LORA_BACKENDS)
def test_lora_linear(backend, device):
    def check(dtype, lead, n_in, n_out, r, bias, dropout_p, scaling, train_weight, noncontig):
        # In half precision a result of a few elements, each of a few terms (n_in = 1: x w + s x a b;
        # n_out = 2: gB is 2 r numbers), can cancel to any relative error, PyTorch's own included:
        # half-precision examples are kept to sizes like the curated cases'.
        assume(dtype == torch.float32 or (n_in >= 16 and n_out >= 16 and math.prod(lead) >= 8))
        check_lora(backend, device, dtype, lead, n_in, n_out, r, bias=bias, dropout_p=dropout_p, scaling=scaling,
                   train_weight=train_weight, noncontig=noncontig and len(lead) > 1)

    _run(backend, dict(dtype=dtypes, lead=lead_shapes, n_in=st.integers(1, 48), n_out=st.integers(1, 48),
                       r=st.integers(1, 9), bias=st.booleans(), dropout_p=st.sampled_from([0.0, 0.3]),
                       scaling=st.sampled_from([-2.0, 0.5, 16 / 7**0.5]), train_weight=st.booleans(),
                       noncontig=st.booleans()), check)


@pytest.mark.parametrize("backend,device", BOTTLENECK_BACKENDS)
def test_bottleneck_adapter(backend, device):
    def check(dtype, lead, d, m, activation, ln_before, ln_after, residual, scale, gate, bias, dropout_p, layout):
        if dtype != torch.float32:
            # The exclusions of the curated half-precision tests (test_bottleneck.py says why): a
            # few rows and bottleneck channels (a gate or z gradient is then a handful of cancelling
            # sums, whose rounding decides the error, PyTorch's own too), no LayerNorm before a
            # kinked activation, and no "learned" scale, one number summed from M*d rounded terms.
            assume(math.prod(lead) >= 8 and m >= 4)
            ln_before = ln_before and activation not in ("relu", "leakyrelu")
            scale = None if scale == "learned" else scale
        transform = {None: None, "strided": _strided, "strided_vectors": _strided_vectors}[layout]
        if layout == "strided" and (not residual or len(lead) > 1):
            transform = None  # _strided transposes a 2-D residual
        check_bottleneck(backend, device, dtype, lead, d, m, activation=activation, dropout_p=dropout_p,
                         ln_after=ln_after, transform=transform, ln_before=ln_before, residual=residual,
                         scale=scale, gate=gate, bias=bias)

    _run(backend, dict(dtype=dtypes, lead=lead_shapes, d=st.integers(16, 64), m=st.integers(2, 12),
                       activation=st.sampled_from(ACTIVATIONS), ln_before=st.booleans(),
                       ln_after=st.sampled_from([None, "after", "before"]), residual=st.booleans(),
                       scale=st.sampled_from([None, "learned", "channel"]), gate=st.booleans(), bias=st.booleans(),
                       dropout_p=st.sampled_from([0.0, 0.2]),
                       layout=st.sampled_from([None, "strided", "strided_vectors"])), check)


@st.composite
def prefix_shapes(draw):
    """(B, H, Hkv, Sq, Sk, L, D) with H a multiple of Hkv, 2 <= Sq <= Sk and L >= 3: with one
    query row or a softmax over one or two keys, dq is a few cancelling terms whose float32
    rounding no relative bound holds (the reference backend's own backward fails it too)."""
    hkv = draw(st.integers(1, 2))
    sk = draw(st.integers(3, 12))
    return (draw(st.integers(1, 2)), hkv * draw(st.integers(1, 2)), hkv, draw(st.integers(2, sk)), sk,
            draw(st.integers(3, 6)), draw(st.sampled_from([8, 16, 24])))


@pytest.mark.parametrize("backend,device", PREFIX_BACKENDS)
def test_prefix_attention(backend, device):
    def check(dtype, shape, mode, causal, pad, gate_shape, gate_tanh, shared_prefix, layout):
        check_prefix(backend, device, dtype, shape, mode=mode, causal=causal, pad=pad, gate_shape=gate_shape,
                     gate_tanh=gate_tanh, prefix_batch=1 if shared_prefix else None, layout=layout)

    # float32: at these few-row sizes a half-precision dq is a few cancelling terms (bf16 error
    # 3e-2 seen on the reference backend); half precision is covered by the curated cases.
    _run(backend, dict(dtype=st.just(torch.float32), shape=prefix_shapes(), mode=st.sampled_from(["gated", "joint"]),
                       causal=st.booleans(), pad=st.booleans(),
                       gate_shape=st.sampled_from(["per_head", "scalar", "llama_adapter"]), gate_tanh=st.booleans(),
                       shared_prefix=st.booleans(), layout=st.sampled_from(["bhsd", "bshd"])), check)
