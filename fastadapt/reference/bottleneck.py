"""Bottleneck adapter core in plain PyTorch: the oracle of the tests and the last-resort backend.

Math (AdapterHub ``adapters``' ``Adapter.forward``), per token row, with ``z`` (M, d) the adapter
input, ``r`` (M, d) the residual input (absent for a parallel adapter), ``W_d`` (m, d), ``W_u`` (d, m)::

    zn  = LN_before(z)                  optional (ln_before); else zn = z
    h   = zn W_d^T + b_d                (M, m), saved for the backward (pre-activation)
    a   = f(h)                          relu | gelu | gelu_tanh | silu | tanh | leakyrelu | identity
    u   = a W_u^T + b_u                 (M, d)
    q   = D(s * u)                      s = scaling * scale, scale absent | (1,) "learned" | (d,) "channel";
                                        D = inverted dropout (adapters drops the scaled up-projection)
    o   = g * q                         g (M,) per-row gate (use_gating), else g = 1
    out = LN_after(o + r)               residual_before_ln and ln_after (the public adapter_residual_before_ln)
        = LN_after(o) + r               ln_after, residual after the norm
        = o + r                         no ln_after (r absent: out = o)

Gradients (the fused backward computes exactly these; ``^`` = normalised, mean/rstd per row)::

    g_t  = LN_bwd(gout) = rstd_a (gout*gamma_a - mean(gout*gamma_a) - t^ * mean(gout*gamma_a*t^))
    g_o  = g_t if ln_after else gout;   g_r = g_t if (ln_after and residual before LN) else gout
    g_g  = sum_d g_o * q                (M,)
    g_u  = g_o * g * D' * s             (D' = dropout mask / (1 - p))
    g_scale = scaling * colsum(g_o * g * D' * u)     (summed to one number for "learned")
    g_W_u = g_u^T a,  g_b_u = colsum g_u,  g_a = g_u W_u
    g_h  = g_a * f'(h),  g_W_d = g_h^T zn,  g_b_d = colsum g_h,  g_zn = g_h W_d
    g_z  = LN_bwd(g_zn) if ln_before else g_zn

AdapterHub's ``BnConfig.residual_before_ln`` (where the host layer takes the residual, another flag
than this one's) and ``original_ln_before/after`` only choose which tensors are passed as ``z`` and
``r`` and what the host layer does afterwards: they live in ``fastadapt.nn.bottleneck``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastadapt.reference.dropout import dropout_keep

# Names as ``adapters``/transformers spell them -> the canonical name the kernels use.
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_orig": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "leakyrelu": "leakyrelu",
    "leaky_relu": "leakyrelu",
    "linear": "identity",
    "identity": "identity",
}

# F.leaky_relu's default, which is what ``adapters`` calls for "leakyrelu".
LEAKY_SLOPE = 0.01


def canonical_activation(name) -> str:
    """The canonical activation name for ``name`` (case-insensitive), or a ValueError listing them."""
    if name is None:
        return "identity"
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name.lower()]


def activation(name: str, h: torch.Tensor) -> torch.Tensor:
    name = canonical_activation(name)
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    if name == "tanh":
        return torch.tanh(h)
    if name == "leakyrelu":
        return F.leaky_relu(h, LEAKY_SLOPE)
    return h


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def bottleneck_adapter(z, down_weight, down_bias, up_weight, up_bias, residual=None, *, scaling=1.0,
                       scale=None, ln_before=None, ln_after=None, residual_before_ln=False,
                       gate=None, keep=None, dropout_p=0.0, activation_name="relu", eps=1e-5,
                       _ln_after_fn=None):
    """The adapter core with autograd, on (..., d) tensors; returns ``(out, h)``.

    ``ln_before`` / ``ln_after`` are ``(weight, bias)`` pairs or None; ``scale`` is None, (1,) or (d,);
    ``gate`` is None or broadcastable to ``z.shape[:-1] + (1,)``; ``keep`` is the dropout mask (or None).

    Equivalent ``adapters``: ``Adapter.forward(z, residual)`` with the same options.
    """
    zn = _layer_norm(z, *ln_before, eps) if ln_before is not None else z
    h = F.linear(zn, down_weight, down_bias)
    u = F.linear(activation(activation_name, h), up_weight, up_bias)
    s = u * scaling if scale is None else u * (scale * scaling)
    q = s if keep is None else s * keep.to(s.dtype) / (1.0 - dropout_p)
    o = q if gate is None else q * gate
    norm = _ln_after_fn or _layer_norm
    if ln_after is not None and residual_before_ln:
        out = norm(o + residual if residual is not None else o, *ln_after, eps)
    else:
        out = norm(o, *ln_after, eps) if ln_after is not None else o
        if residual is not None:
            out = out + residual
    return out, h


# ---------------------------------------------------------------------------------------------
# Backend entry points (2-D tensors, the signature every backend of the op shares)


def _stats(x, eps):
    x32 = x if x.dtype == torch.float64 else x.float()
    mean = x32.mean(-1)
    rstd = torch.rsqrt((x32 - mean[..., None]).square().mean(-1) + eps)
    return mean, rstd


def forward(z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias,
            lna_weight, lna_bias, gate, scaling, activation_name, eps, residual_before_ln, dropout_p, seed):
    """Backend forward: ``(out, h, stats)``; stats (4, M) float32 = mean/rstd of the input of
    LN_before and of LN_after (rows left unset where that norm is off)."""
    M = z.shape[0]
    keep = dropout_keep(seed, z.shape, dropout_p, z.device)
    stats = torch.zeros((4, M), device=z.device, dtype=torch.float32)
    if lnb_weight is not None:
        stats[0], stats[1] = _stats(z, eps)
    # The same statistics as the Triton forward saves, so that either backend's backward can
    # follow either forward (dropout masks aside: each backend draws its own).
    def ln_after(t, weight, bias, eps_):  # used only when there is an LN after
        stats[2], stats[3] = _stats(t, eps_)  # (float32 storage, as the kernels save)
        return _layer_norm(t, weight, bias, eps_)
    out, h = bottleneck_adapter(
        z, down_weight, down_bias, up_weight, up_bias, residual, scaling=scaling, scale=scale,
        ln_before=(lnb_weight, lnb_bias) if lnb_weight is not None else None,
        ln_after=(lna_weight, lna_bias) if lna_weight is not None else None,
        residual_before_ln=residual_before_ln, gate=None if gate is None else gate[:, None], keep=keep,
        dropout_p=dropout_p, activation_name=activation_name, eps=eps, _ln_after_fn=ln_after)
    return out, h, stats


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """f'(h), with torch's choices at the kinks (relu'(0) = 0, leaky_relu'(0) = slope) and at NaN
    (relu'(NaN) = 1, leaky_relu'(NaN) = slope)."""
    name = canonical_activation(name)
    if name == "relu":
        return (~(h <= 0)).to(h.dtype)
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(k * (h + c * h ** 3))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3.0 * c * h * h)
    if name == "silu":
        sg = torch.sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))
    if name == "tanh":
        return 1.0 - torch.tanh(h) ** 2
    if name == "leakyrelu":
        return torch.where(h > 0, 1.0, LEAKY_SLOPE).to(h.dtype)
    return torch.ones_like(h)


def _ln_backward(g, xhat, rstd, weight):
    """(g_x, g_weight, g_bias) of y = xhat * weight + bias, xhat = (x - mean) * rstd, per row."""
    gw = (g * xhat).sum(0)
    gb = g.sum(0)
    gg = g * weight
    gx = rstd[:, None] * (gg - gg.mean(-1, keepdim=True) - xhat * (gg * xhat).mean(-1, keepdim=True))
    return gx, gw, gb


def backward(gout, z, residual, down_weight, down_bias, up_weight, up_bias, h, stats, scale, lnb_weight,
             lnb_bias, lna_weight, lna_bias, gate, scaling, activation_name, eps, residual_before_ln, dropout_p,
             seed, needs):
    """Backend backward: the gradients of (z, residual, down_weight, down_bias, up_weight, up_bias,
    scale, lnb_weight, lnb_bias, lna_weight, lna_bias, gate), ``None`` where ``needs`` is False.

    The formulas of the module docstring, computed in float32 for half inputs. ``residual`` is
    given only when LN_after normalises o + r (elsewhere the caller passes ``gout`` on as g_r).
    """
    dtype = z.dtype
    ct = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def c(t):
        return t.to(ct) if t is not None else None

    gout, z32, residual, wd, wu, bu, scale, lnbw, lnbb, lnaw, gate = map(
        c, (gout, z, residual, down_weight, up_weight, up_bias, scale, lnb_weight, lnb_bias, lna_weight, gate))
    h32 = h.to(ct)
    a = activation(activation_name, h32).to(dtype).to(ct)  # rounded as the forward's a
    u = a @ wu.t() + (bu if bu is not None else 0.0)
    keep = dropout_keep(seed, z.shape, dropout_p, z.device)
    drop = keep.to(ct) / (1.0 - dropout_p) if keep is not None else torch.ones_like(u)
    fq = drop * (scale * scaling if scale is not None else scaling)
    q = u * fq
    o = q * gate[:, None] if gate is not None else q
    g_o = gout
    grads = [None] * 12
    if lnaw is not None:
        t = o + residual if residual is not None else o
        mean, rstd = _stats(t, eps)
        that = (t - mean[:, None]) * rstd[:, None]
        g_o, grads[9], grads[10] = _ln_backward(gout, that, rstd, lnaw)
        if residual is not None:
            grads[1] = g_o
    if gate is not None:
        grads[11] = (g_o * q).sum(-1)
        g_o = g_o * gate[:, None]
    g_u = g_o * fq
    if scale is not None:
        gs = scaling * (g_o * drop * u).sum(0)
        # One number summed from M*d terms of both signs: summed in float64 (cheap, and the sum
        # is otherwise at the mercy of cancellation).
        grads[6] = gs.double().sum().reshape(scale.shape) if scale.numel() == 1 else gs
    grads[4] = g_u.t() @ a
    grads[5] = g_u.sum(0)
    g_h = (g_u.to(dtype).to(ct) @ wu) * activation_grad(activation_name, h32)
    g_h = g_h.to(dtype).to(ct)
    grads[3] = g_h.sum(0)
    if lnbw is not None:
        mean, rstd = _stats(z32, eps)
        zhat = (z32 - mean[:, None]) * rstd[:, None]
        zn = zhat * lnbw + lnbb
        grads[0], grads[7], grads[8] = _ln_backward(g_h @ wd, zhat, rstd, lnbw)
    else:
        zn = z32
        grads[0] = g_h @ wd
    grads[2] = g_h.t() @ zn.to(dtype).to(ct)
    inputs = (z, residual, down_weight, down_bias, up_weight, up_bias, scale, lnb_weight, lnb_bias,
              lna_weight, lna_bias, gate)
    return tuple(g.to(t.dtype) if (g is not None and t is not None and need) else None
                 for g, t, need in zip(grads, inputs, needs))


def gelu_tanh_coeffs() -> tuple[float, float]:
    """(sqrt(2/pi), 0.044715) of ``gelu(x, approximate='tanh')``, shared with the kernels."""
    return math.sqrt(2.0 / math.pi), 0.044715
