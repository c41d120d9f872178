"""The fused bottleneck adapter as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::bottleneck_adapter`` returns ``(out, h, stats)``: the pre-activation ``h`` (M, m) and
the LayerNorm row statistics ``stats`` (4, M) float32 are what the backward keeps besides the
inputs (eager keeps the LN outputs, h, a, u and the dropout mask: several (M, d) tensors). The
residual input is kept only when LN_after normalises ``o + r``; elsewhere its gradient is ``gout``.
``fastadapt::bottleneck_adapter_backward`` is one fused backward call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch
from fastadapt.backends import Capabilities
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.ops.lora import rows, seed_int
from fastadapt.reference import bottleneck as reference

OP = "bottleneck_adapter"
MAX_BOTTLENECK = 1024  # the Triton kernels hold the whole bottleneck in one register tile

# The differentiable arguments, in the order the backends return their gradients (and take ``needs``).
GRAD_NAMES = ("z", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale",
              "ln_before_weight", "ln_before_bias", "ln_after_weight", "ln_after_bias", "gate")


def _forward(impl, z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight,
             ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln,
             dropout_p, seed):
    out, h, stats = impl.forward(rows(z), rows(residual) if residual is not None else None, down_weight, down_bias,
                                 up_weight, up_bias, scale, ln_before_weight, ln_before_bias, ln_after_weight,
                                 ln_after_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p,
                                 seed_int(seed))
    return out.view(z.shape), h, stats


def _backward(impl, needs, gout, _gh, _gstats, z, residual, down_weight, down_bias, up_weight, up_bias, h, stats,
              scale, ln_before_weight, ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling, activation, eps,
              residual_before_ln, dropout_p, seed):
    """``residual`` is there only when LN_after normalises o + r (:func:`_unsaved`)."""
    grads = list(impl.backward(rows(gout), rows(z), rows(residual) if residual is not None else None, down_weight,
                               down_bias, up_weight, up_bias, h, stats, scale, ln_before_weight, ln_before_bias,
                               ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln,
                               dropout_p, seed_int(seed), needs))
    for i in (0, 1):  # computed (M, d), M possibly 0
        if grads[i] is not None:
            grads[i] = grads[i].view(z.shape)
    return grads


def _fake(z, down_weight, **_):
    M = z.shape[:-1].numel()
    return z.new_empty(z.shape), z.new_empty(M, down_weight.shape[0]), z.new_empty(4, M, dtype=torch.float32)


def _unsaved(residual, ln_after_weight, residual_before_ln, **_) -> frozenset:
    # out = ... + r unless LN_after normalises o + r: then the residual's gradient is the output's.
    in_ln = residual is not None and ln_after_weight is not None and residual_before_ln
    return frozenset() if in_ln else frozenset({"residual"})


def _grad(name: str, select: bool = False) -> Arg:
    return Arg(name, "Tensor" if name in ("z", "down_weight", "up_weight") else "Tensor?", grad=True, select=select)


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    lead = draw.choice([(0,), (1,), (7,), (2, 3)])
    d, m = draw.int(1, 24), draw.int(1, 12)

    def maybe(*shape, around=0.0):
        return torch.randn(*shape) / 4 + around if draw.bool() else None

    tensors = dict(z=torch.randn(*lead, d), residual=maybe(*lead, d), down_weight=torch.randn(m, d) / d**0.5,
                   down_bias=maybe(m), up_weight=torch.randn(d, m) / m**0.5, up_bias=maybe(d),
                   scale=draw.choice([None, torch.randn(1) + 1, torch.randn(d) + 1]),
                   lnb_weight=maybe(d, around=1.0), lnb_bias=maybe(d), lna_weight=maybe(d, around=1.0),
                   lna_bias=maybe(d), gate=torch.rand(lead) if draw.bool() else None)
    for w, b in (("lnb_weight", "lnb_bias"), ("lna_weight", "lna_bias")):  # LayerNorms come whole
        if (tensors[w] is None) != (tensors[b] is None):
            tensors[b] = torch.randn(d) / 4 if tensors[w] is not None else None
    activation = draw.choice(["relu", "gelu", "gelu_new", "silu", "tanh", "leakyrelu", "linear"])
    scaling, residual_before_ln = draw.choice([1.0, 0.5, -2.0]), draw.bool()
    p, training = draw.choice([0.0, 0.1, 0.999]), draw.bool()
    dropout = training and p > 0.0

    def pair(w, b):
        return None if w is None else (w, b)

    def call(z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight,
             lna_bias, gate):
        return bottleneck_adapter(z, down_weight, down_bias, up_weight, up_bias, residual, activation=activation,
                                  scaling=scaling, scale=scale, ln_before=pair(lnb_weight, lnb_bias),
                                  ln_after=pair(lna_weight, lna_bias), adapter_residual_before_ln=residual_before_ln,
                                  gate=gate, dropout_p=p, training=training)

    def exact(keep, z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight,
              lna_bias, gate):
        mask = keep(0, (z.shape[:-1].numel(), d), p).view(z.shape) if dropout else None
        return reference.bottleneck_adapter(
            z, down_weight, down_bias, up_weight, up_bias, residual, scaling=scaling, scale=scale,
            ln_before=pair(lnb_weight, lnb_bias), ln_after=pair(lna_weight, lna_bias),
            residual_before_ln=residual_before_ln, gate=None if gate is None else gate[..., None], keep=mask,
            dropout_p=p, activation_name=activation)[0]

    return FuzzCase(tensors, call, exact, grads=tuple(n for n, t in tensors.items() if t is not None),
                    dropout=dropout)


# ``fastadapt::bottleneck_adapter`` returns ``(out, h, stats)``: the pre-activation ``h`` (M, m) and
# the LayerNorm row statistics ``stats`` (4, M) float32 are what the backward keeps besides the
# inputs (eager keeps the LN outputs, h, a, u and the dropout mask: several (M, d) tensors).
BOTTLENECK_ADAPTER = declare(OpSpec(
    OP,
    args=(*(_grad(n, select=n in ("z", "down_weight", "up_weight")) for n in GRAD_NAMES),
          Arg("scaling", "float"), Arg("activation", "str"), Arg("eps", "float"), Arg("residual_before_ln", "bool"),
          Arg("dropout_p", "float"), Arg("seed", "Tensor?")),
    outputs=("out", "h", "stats"), saved=("h", "stats"), grads=GRAD_NAMES,
    fake=_fake, forward=_forward, backward=_backward, passthrough={"residual": "out"}, unsaved=_unsaved,
    autocast=False, fuzz=_fuzz))


def bottleneck_adapter(z: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                       up_bias: Optional[Tensor], residual: Optional[Tensor] = None, *,
                       activation: str = "relu", scaling: float = 1.0, scale: Optional[Tensor] = None,
                       ln_before: Optional[tuple[Tensor, Tensor]] = None,
                       ln_after: Optional[tuple[Tensor, Tensor]] = None,
                       adapter_residual_before_ln: bool = False, gate: Optional[Tensor] = None,
                       dropout_p: float = 0.0, training: bool = True, eps: float = 1e-5) -> Tensor:
    """Fused bottleneck adapter (AdapterHub ``Adapter.forward``): down-projection, activation,
    up-projection, scaling, dropout, gate, residual and LayerNorms in one kernel pass.

    Args:
        z: (..., d) adapter input, float16 / bfloat16 / float32 (float64 runs on the reference).
        down_weight: (m, d), down_bias: (m,) or None (``adapter_down[0]``, an nn.Linear(d, m)).
        up_weight: (d, m), up_bias: (d,) or None (``adapter_up``, an nn.Linear(m, d)).
        residual: same shape and dtype as ``z``, or None (parallel adapter: no residual).
        activation: relu | gelu | gelu_new (tanh approximation) | silu/swish | tanh | leakyrelu |
            linear/identity (``adapters``' ``non_linearity`` names).
        scaling: a finite float; ``scale``: None, (1,) (``scaling="learned"``) or (d,) ("channel");
            the up-projection is multiplied by ``scaling * scale``.
        ln_before / ln_after: (weight (d,), bias (d,)) of ``adapter_norm_before/after``, or None.
        adapter_residual_before_ln: add the residual before ``ln_after`` (else after it).
        gate: per-row gate broadcastable to ``z.shape[:-1]`` (``use_gating``: the caller computes
            ``sigmoid(gate(z)).mean(1)``), or None.
        dropout_p: dropout on the scaled up-projection, applied only when ``training``; the mask is
            drawn from a seed in the kernel and regenerated in the backward, never stored.

    Parameters whose dtype differs from ``z`` are used in ``z``'s dtype (fp32 accumulation) and
    get their gradients in their own dtype.

    Returns:
        (..., d) in ``z``'s dtype.

    Equivalent PyTorch::

        zn = F.layer_norm(z, (d,), *ln_before) if ln_before else z
        o = F.dropout(F.linear(act(F.linear(zn, down_weight, down_bias)), up_weight, up_bias)
                      * (scaling * scale), dropout_p, training) * gate[..., None]
        out = F.layer_norm(o + residual, (d,), *ln_after) if adapter_residual_before_ln and ln_after
              else (F.layer_norm(o, (d,), *ln_after) if ln_after else o) + residual
    """
    _checks.tensor("z", z, min_ndim=1)
    _checks.tensor("down_weight", down_weight, ndim=2)
    _checks.tensor("up_weight", up_weight, ndim=2)
    activation = reference.canonical_activation(activation)
    scaling = _checks.finite_float("scaling", scaling)
    eps = _checks.finite_float("eps", eps)
    if eps <= 0.0:
        raise ValueError(f"eps must be positive, got {eps}")
    dropout_p = _checks.probability("dropout_p", dropout_p)
    d = z.shape[-1]
    m = down_weight.shape[0]
    if m == 0:
        raise ValueError("down_weight has 0 rows: the bottleneck width must be at least 1")
    if d == 0:
        raise ValueError("z has an empty hidden dimension")
    _checks.dim_equal("down_weight.shape[1] (hidden size of z)", down_weight.shape[1], d)
    _checks.dim_equal("up_weight.shape[0] (hidden size of z)", up_weight.shape[0], d)
    _checks.dim_equal("up_weight.shape[1] (bottleneck width, down_weight.shape[0])", up_weight.shape[1], m)
    vectors = {"down_bias": (down_bias, m), "up_bias": (up_bias, d)}
    if scale is not None:
        _checks.tensor("scale", scale)
        if scale.numel() not in (1, d):
            raise ValueError(f"scale must have 1 element ('learned') or {d} ('channel'), got shape {tuple(scale.shape)}")
    for which, pair in (("ln_before", ln_before), ("ln_after", ln_after)):
        if pair is not None:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(t is None for t in pair):
                raise TypeError(f"{which} must be a (weight, bias) pair of tensors or None")
            vectors[f"{which} weight"] = (pair[0], d)
            vectors[f"{which} bias"] = (pair[1], d)
    for name, (t, size) in vectors.items():
        if t is not None:
            _checks.tensor(name, t, ndim=1)
            _checks.dim_equal(f"{name}.shape[0]", t.shape[0], size)
    if residual is not None:
        _checks.tensor("residual", residual)
        if residual.shape != z.shape:
            raise ValueError(f"residual must have z's shape {tuple(z.shape)}, got {tuple(residual.shape)}")
        _checks.same_dtype(z=z, residual=residual)
    if gate is not None:
        _checks.tensor("gate", gate)
        try:
            gate = gate.expand(z.shape[:-1])
        except RuntimeError:
            raise ValueError(f"gate of shape {tuple(gate.shape)} does not broadcast to the rows of z "
                             f"{tuple(z.shape[:-1])}") from None
        gate = gate.reshape(-1)
    lnb = ln_before if ln_before is not None else (None, None)
    lna = ln_after if ln_after is not None else (None, None)
    _checks.same_device(z=z, residual=residual, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                        up_bias=up_bias, scale=scale, ln_before_weight=lnb[0], ln_before_bias=lnb[1],
                        ln_after_weight=lna[0], ln_after_bias=lna[1], gate=gate)

    def cast(t):
        return t.to(z.dtype) if t is not None else None

    if scale is not None:
        scale = scale.reshape(-1)
    p = dropout_p if training else 0.0
    # Drawn on the CPU generator: no device sync, and torch.compile traces it.
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0.0 else None
    return BOTTLENECK_ADAPTER(z, residual, cast(down_weight), cast(down_bias), cast(up_weight), cast(up_bias),
                              cast(scale), cast(lnb[0]), cast(lnb[1]), cast(lna[0]), cast(lna[1]), cast(gate), scaling,
                              activation, eps, bool(adapter_residual_before_ln), p, seed)[0]


# ---------------------------------------------------------------------------------------------
# Backends


def _triton_width(backend, down_weight, **_):
    if backend == "triton" and down_weight.shape[0] > MAX_BOTTLENECK:
        return [f"bottleneck width {down_weight.shape[0]} > {MAX_BOTTLENECK} (one register tile)"]
    return []


CAPABILITIES = Capabilities("z", ("z", "down_weight", "up_weight"), extra=_triton_width)
_KERNELS = "fastadapt.kernels.bottleneck"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))


# csrc/bottleneck.cpp, csrc/bottleneck_cuda.cu
_native_forward, _native_backward = _native.calls("bottleneck")
for _backend in ("cuda", "cpp"):
    dispatch.register(OP, _backend, capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=reference.backward)
