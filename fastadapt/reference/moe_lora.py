"""MoE experts with per-expert LoRA in plain PyTorch: the oracle of the tests and the last-resort backend.

Math, with tokens ``x`` (T, H), routing ``top_k_index`` / ``top_k_weights`` (T, k) as transformers'
experts functions receive them, expert ``e``'s frozen ``W1_e`` (2I, H) (``gate_up_proj[e]``) and
``W2_e`` (H, I) (``down_proj[e]``), optional biases ``b1_e``, ``b2_e`` and optional LoRA factors
``A1_e`` (r1, H), ``B1_e`` (2I, r1), ``A2_e`` (r2, I), ``B2_e`` (H, r2). The S = T k (token, slot)
pairs are taken grouped by expert: ``p`` runs over the stable sort of ``top_k_index.reshape(-1)``,
pair ``p`` belonging to token ``t(p)``, expert ``e(p)``, with routing weight ``w_p``::

    u1_p = s1 D1(x_t) A1_e^T                         (S, r1)   D: inverted dropout, rows = p
    g_p  = x_t W1_e^T + b1_e + u1_p B1_e^T            (S, 2I)   gate and up, pre-activation
    h_p  = act(g_p)                                   (S, I)
    u2_p = s2 D2(h_p) A2_e^T                          (S, r2)
    d_p  = h_p W2_e^T + b2_e + u2_p B2_e^T            (S, H)
    out_t = sum over the pairs of t of w_p d_p        (T, H)

``act``: ``silu`` is SwiGLU on the concatenated layout (Qwen-MoE, Mixtral, DeepSeek, OLMoE, GLM:
``gate, up = g.chunk(2)``, ``silu(gate) * up``); ``gpt_oss`` is gpt-oss's clamped SwiGLU on the
interleaved layout (``gate, up = g[..., ::2], g[..., 1::2]``, gate clamped above at ``limit``, up
to ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(alpha * gate)``). The dropout masks are drawn
over the grouped rows: ``D1`` over an (S, H) matrix from ``seed``, ``D2`` over (S, I) from
``seed + 1``; each pair of a token gets its own mask, as each expert of PEFT's older per-expert
``nn.Linear`` LoRA layers draws its own.

Gradients flow to x, top_k_weights (``gw_p = <gy_t, d_p>``, transformers' eager path) and every
expert's A and B (exactly zero for an expert with no pair); the frozen weights and biases get none.
The fused backends save ``g``, ``u1``, ``u2`` and ``d`` in grouped order; this reference returns
them too (for the custom op's outputs) and takes its gradients through autograd, on the eager path
and the custom op's alike, so that both give the same bits. It loops over the experts reading the
routing on the host (a synchronisation per expert on CUDA), as transformers' eager experts do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadapt.reference.dropout import dropout_keep

ACTIVATIONS = ("silu", "gpt_oss")


def grouped_order(top_k_index: torch.Tensor) -> torch.Tensor:
    """(S,) the pairs (flat indices into ``top_k_index``) grouped by expert, stable: the row order
    of every grouped tensor and of the dropout masks."""
    return torch.sort(top_k_index.reshape(-1), stable=True).indices


def activation(g: torch.Tensor, kind: str, alpha: float, limit: float) -> torch.Tensor:
    """``act(g)`` for g (..., 2I): (..., I), in g's dtype, as transformers computes it."""
    if kind == "silu":
        gate, up = g.chunk(2, dim=-1)
        return F.silu(gate) * up
    gate, up = g[..., ::2].clamp(max=limit), g[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def activation_wide(g: torch.Tensor, kind: str, alpha: float, limit: float) -> torch.Tensor:
    """:func:`activation` computed in float32 (float64 for float64 g) and rounded once to g's dtype:
    what the fused backends compute."""
    wide = torch.promote_types(g.dtype, torch.float32)
    return activation(g.to(wide), kind, alpha, limit).to(g.dtype)


def activation_backward(g: torch.Tensor, gh: torch.Tensor, kind: str, alpha: float, limit: float) -> torch.Tensor:
    """The gradient of g (..., 2I) from that of ``act(g)`` (..., I), in float32 (float64 for float64),
    rounded once to g's dtype. Where a clamp is active the gradient is zero (a NaN input included),
    as torch.clamp's backward gives."""
    dtype = g.dtype
    wide = torch.promote_types(dtype, torch.float32)
    g, gh = g.to(wide), gh.to(wide)
    if kind == "silu":
        gate, up = g.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        return torch.cat([gh * up * (sig * (1 + gate * (1 - sig))), gh * (gate * sig)], dim=-1).to(dtype)
    gate, up = g[..., ::2], g[..., 1::2]
    gc, uc = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(gc * alpha)
    zero = gh.new_zeros(())
    ggate = torch.where(gate <= limit, gh * (uc + 1) * (sig + gc * alpha * sig * (1 - sig)), zero)
    gup = torch.where((up >= -limit) & (up <= limit), gh * (gc * sig), zero)
    return torch.stack([ggate, gup], dim=-1).flatten(-2).to(dtype)


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """keep * t / (1 - p), computed in float32 (float64 for float64 t) and rounded once to t's dtype,
    as eager dropout does with its scalar."""
    if keep is None:
        return t
    wide = torch.promote_types(t.dtype, torch.float32)
    return (t.to(wide) * keep.to(wide) / (1.0 - p)).to(t.dtype)


def _lora(t, keep, p, A, B, s):
    """(u = s D(t) A^T, u B^T) of one expert's rows, or (None, None) without LoRA."""
    if A is None:
        return None, None
    u = (_dropped(t, keep, p) @ A.t()) * s
    return u, u @ B.t()


def experts(x, top_k_index, top_k_weights, W1, W2, b1=None, b2=None, A1=None, B1=None, s1=1.0, A2=None, B2=None,
            s2=1.0, kind="silu", alpha=1.702, limit=7.0, keep1=None, keep2=None, p=0.0):
    """``(out, g, u1, u2, d)`` (module docstring) with autograd, ``keep1`` / ``keep2`` the dropout
    masks of the grouped (S, H) and (S, I) rows, or None. ``g``, ``u1``, ``u2``, ``d`` are in grouped
    order; ``u1`` / ``u2`` are (S, 0) without that LoRA."""
    T, k = top_k_index.shape
    E = W1.shape[0]
    order = grouped_order(top_k_index)
    experts_of = top_k_index.reshape(-1)[order]
    weights = top_k_weights.reshape(-1)
    width = torch.promote_types(x.dtype, top_k_weights.dtype)
    out = x.new_zeros(T, x.shape[1], dtype=width)
    g_rows, u1_rows, u2_rows, d_rows = [], [], [], []
    for e in range(E):
        # Its pairs' grouped positions (a host read). An expert without any still runs its empty
        # products: its factors' gradients are then exactly zero, not missing (T = 0 included).
        pos = (experts_of == e).nonzero()[:, 0]
        pairs = order[pos]
        tokens = pairs // k
        xe = x[tokens]
        u1, up1 = _lora(xe, None if keep1 is None else keep1[pos], p, None if A1 is None else A1[e],
                        None if B1 is None else B1[e], s1)
        g = F.linear(xe, W1[e], None if b1 is None else b1[e])
        g = g if up1 is None else g + up1
        h = activation(g, kind, alpha, limit)
        u2, up2 = _lora(h, None if keep2 is None else keep2[pos], p, None if A2 is None else A2[e],
                        None if B2 is None else B2[e], s2)
        d = F.linear(h, W2[e], None if b2 is None else b2[e])
        d = d if up2 is None else d + up2
        out = out.index_add(0, tokens, d.to(width) * weights[pairs, None].to(width))
        g_rows.append(g)
        d_rows.append(d)
        u1_rows.append(u1 if u1 is not None else g.new_empty(len(pos), 0))
        u2_rows.append(u2 if u2 is not None else g.new_empty(len(pos), 0))

    return out.to(x.dtype), torch.cat(g_rows), torch.cat(u1_rows), torch.cat(u2_rows), torch.cat(d_rows)


def masks(seed: int, S: int, H: int, I: int, p: float, device):
    """The reference backend's dropout masks (keep1 (S, H), keep2 (S, I)), or (None, None)."""
    return dropout_keep(seed, (S, H), p, device), dropout_keep(seed + 1, (S, I), p, device)


def composite(x, top_k_index, top_k_weights, gate_up_proj, gate_up_bias, down_proj, down_bias, gate_up_A, gate_up_B,
              gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit, dropout_p, seed):
    """The reference backend, with the op's arguments: its outputs with autograd."""
    # seed: the op's 0-d tensor (None without dropout) on the eager path, its int on the custom op's.
    keep1, keep2 = masks(0 if seed is None else int(seed), top_k_index.numel(), x.shape[1], down_proj.shape[2],
                         dropout_p, x.device)
    return experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, gate_up_A,
                   gate_up_B, gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit,
                   keep1 if gate_up_A is not None else None, keep2 if down_A is not None else None, dropout_p)


def forward(*args):
    """The reference backend's forward on the custom op's path: the composite's outputs, detached."""
    with torch.no_grad():
        return composite(*args)
