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

from fastadapt import _checks, dispatch
from fastadapt.ops import _eager
from fastadapt.backends import device_reasons, dtype_reasons
from fastadapt.reference import bottleneck as reference

OP = "bottleneck_adapter"
MAX_BOTTLENECK = 1024  # the Triton kernels hold the whole bottleneck in one register tile

# Order of the gradients the backward returns (and of ``needs``).
GRAD_NAMES = ("z", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale",
              "ln_before_weight", "ln_before_bias", "ln_after_weight", "ln_after_bias", "gate")


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _select(z, residual, down_weight, down_bias, up_weight, *_) -> dispatch.Implementation:
    return dispatch.select(OP, z=z, down_weight=down_weight, up_weight=up_weight)


def _forward(impl, z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight,
             ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln,
             dropout_p, seed):
    z2d = z.reshape(-1, z.shape[-1])
    r2d = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
    out, h, stats = impl.forward(z2d, r2d, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight,
                                 ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling, activation,
                                 eps, residual_before_ln, dropout_p, _seed(seed))
    return out.view(z.shape), h, stats


@torch.library.custom_op("fastadapt::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter(
        z: Tensor, residual: Optional[Tensor], down_weight: Tensor, down_bias: Optional[Tensor],
        up_weight: Tensor, up_bias: Optional[Tensor], scale: Optional[Tensor],
        ln_before_weight: Optional[Tensor], ln_before_bias: Optional[Tensor],
        ln_after_weight: Optional[Tensor], ln_after_bias: Optional[Tensor], gate: Optional[Tensor],
        scaling: float, activation: str, eps: float, residual_before_ln: bool, dropout_p: float,
        seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = (z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight, ln_before_bias,
              ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed)
    return _forward(_select(*inputs), *inputs)


@_bottleneck_adapter.register_fake
def _(z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight, ln_before_bias,
      ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed):
    M = z.shape[:-1].numel()
    return (z.new_empty(z.shape), z.new_empty(M, down_weight.shape[0]),
            z.new_empty(4, M, dtype=torch.float32))


def _run_backward(
        gout: Tensor, z: Tensor, residual: Optional[Tensor], down_weight: Tensor, down_bias: Optional[Tensor],
        up_weight: Tensor, up_bias: Optional[Tensor], h: Tensor, stats: Tensor, scale: Optional[Tensor],
        ln_before_weight: Optional[Tensor], ln_before_bias: Optional[Tensor],
        ln_after_weight: Optional[Tensor], ln_after_bias: Optional[Tensor], gate: Optional[Tensor],
        scaling: float, activation: str, eps: float, residual_before_ln: bool, dropout_p: float,
        seed: Optional[Tensor], needs: list[bool], backend: str) -> tuple[
            Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The 12 gradients in :data:`GRAD_NAMES` order, on ``backend`` (the forward's); one not asked
    for in ``needs`` (or of an absent input) comes back empty. ``residual`` is passed only when
    LN_after normalises o + r."""
    z2d = z.reshape(-1, z.shape[-1])
    g2d = gout.reshape(-1, gout.shape[-1])
    r2d = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
    grads = dispatch.get(OP, backend).backward(g2d, z2d, r2d, down_weight, down_bias, up_weight, up_bias, h, stats, scale,
                          ln_before_weight, ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling,
                          activation, eps, residual_before_ln, dropout_p, _seed(seed), needs)
    grads = [g if g is not None else z.new_empty(0) for g in grads]
    for i in (0, 1):
        if grads[i].dim() == 2:  # computed (M, d), M possibly 0; not-needed ones are (0,)
            grads[i] = grads[i].view(z.shape)
    return tuple(grads)


_bottleneck_adapter_backward = torch.library.custom_op("fastadapt::bottleneck_adapter_backward",
                                                      mutates_args=())(_run_backward)


@_bottleneck_adapter_backward.register_fake
def _(gout, z, residual, down_weight, down_bias, up_weight, up_bias, h, stats, scale, ln_before_weight,
      ln_before_bias, ln_after_weight, ln_after_bias, gate, scaling, activation, eps, residual_before_ln,
      dropout_p, seed, needs, backend):
    inputs = (z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight,
              ln_before_bias, ln_after_weight, ln_after_bias, gate)
    return tuple(t.new_empty(t.shape) if (t is not None and need) else z.new_empty(0)
                 for t, need in zip(inputs, needs))


def _residual_in_ln(residual, ln_after_weight, residual_before_ln) -> bool:
    return residual is not None and ln_after_weight is not None and residual_before_ln


def _setup_context(ctx, inputs, output, backend=None):
    (z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_w, lnb_b, lna_w, lna_b, gate,
     scaling, activation, eps, residual_before_ln, dropout_p, seed) = inputs
    ctx.res_in_ln = _residual_in_ln(residual, lna_w, residual_before_ln)
    ctx.has_residual = residual is not None
    ctx.save_for_backward(z, residual if ctx.res_in_ln else None, down_weight, down_bias, up_weight, up_bias,
                          output[1], output[2], scale, lnb_w, lnb_b, lna_w, lna_b, gate, seed)
    ctx.args = (scaling, activation, eps, residual_before_ln, dropout_p)
    ctx.backend = backend or _select(*inputs).backend  # the one the forward just ran on


def _backward(ctx, gout, _gh, _gstats):
    (z, residual, down_weight, down_bias, up_weight, up_bias, h, stats, scale, lnb_w, lnb_b, lna_w, lna_b,
     gate, seed) = ctx.saved_tensors
    scaling, activation, eps, residual_before_ln, dropout_p = ctx.args
    n = ctx.needs_input_grad
    needs = [n[0], n[1] and ctx.res_in_ln, *n[2:12]]
    run = _run_backward if getattr(ctx, "eager", False) else torch.ops.fastadapt.bottleneck_adapter_backward
    grads = list(run(
        gout, z, residual, down_weight, down_bias, up_weight, up_bias, h, stats, scale, lnb_w, lnb_b,
        lna_w, lna_b, gate, scaling, activation, eps, residual_before_ln, dropout_p, seed, needs, ctx.backend))
    grads = [g if need else None for g, need in zip(grads, needs)]
    if ctx.has_residual and n[1] and not ctx.res_in_ln:
        grads[1] = gout  # out = ... + r: the residual's gradient is the output's
    return (*grads, None, None, None, None, None, None)


_bottleneck_adapter.register_autograd(_backward, setup_context=_setup_context)
_BottleneckAdapter = _eager.function("BottleneckAdapter", _forward, _setup_context, _backward)


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
    inputs = (z, residual, cast(down_weight), cast(down_bias), cast(up_weight), cast(up_bias), cast(scale),
              cast(lnb[0]), cast(lnb[1]), cast(lna[0]), cast(lna[1]), cast(gate), scaling, activation, eps,
              bool(adapter_residual_before_ln), p, seed)
    if _eager.fast_path(*(t for t in inputs[:12])):
        out, _, _ = _eager.run(_BottleneckAdapter, _select, *inputs)
    else:
        out, _, _ = torch.ops.fastadapt.bottleneck_adapter(*inputs)
    return out


# ---------------------------------------------------------------------------------------------
# Backends


def _triton_why_not(z, down_weight, up_weight):
    reasons = device_reasons("triton", z.device) + dtype_reasons(z.dtype)
    if down_weight.shape[0] > MAX_BOTTLENECK:
        reasons.append(f"bottleneck width {down_weight.shape[0]} > {MAX_BOTTLENECK} (one register tile)")
    if len({z.dtype, down_weight.dtype, up_weight.dtype}) > 1:
        reasons.append("z and the adapter weights must share one dtype")
    return reasons


_KERNELS = "fastadapt.kernels.bottleneck"
dispatch.register(OP, "triton", why_not=_triton_why_not, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"))
dispatch.register(OP, "reference", why_not=lambda **_: [], forward=reference.forward,
                  backward=reference.backward)
