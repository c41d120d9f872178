"""Gated prefix attention (LLaMA-Adapter) and prefix tuning in plain PyTorch: the oracle of the
tests and the last-resort backend.

Shapes: ``q`` (B, H, Sq, D); ``k``, ``v`` (B, Hkv, Sk, D); ``k_p``, ``v_p`` (B, Hkv, L, D), with
H a multiple of Hkv (GQA: query head h reads key/value head ``h // (H / Hkv)``). ``gate`` is the
effective per-head gate (H,) (tanh already applied by the caller if wanted).

Visibility of token key j from query i (0-based, Sq queries, Sk keys)::

    causal:  j <= i + (Sk - Sq)          (bottom-right alignment, as flash-attn >= 2.1: the last
                                          query sees every key; q of a decode step sits at the end
                                          of the KV cache. NB: SDPA's is_causal is top-left.)
    padding: key_padding_mask[b, j]      (True = attend)

Prefix keys are visible from every query (no causal or padding mask on them).

Gated mode (LLaMA-Adapter, ``joint=False``), with ``s = scale``::

    P   = softmax(s Q K^T + mask)       O_b = P V         (a row that sees no key: P = 0, O_b = 0)
    P_p = softmax(s Q K_p^T)            O_p = P_p V_p
    O   = O_b + g_h O_p

Joint mode (prefix tuning, ``joint=True``): one softmax over the keys ``[K_p; K]``, no gate::

    P = softmax(s Q [K_p; K]^T + [0; mask]),  O = P [V_p; V]

Backward (flash-attention 2), ``dO`` the output grad, all row sums over the head dim::

    gated:  r_p = rowsum(dO * O_p)            dgate_h = sum_{b,i} r_p
            delta = rowsum(dO * O) - g r_p  (= rowsum(dO * O_b)),  delta_p = g r_p
            dV = P^T dO,   dS = P * (dO V^T - delta),          dK = s dS^T Q
            dV_p = g P_p^T dO,  dS_p = P_p * (g dO V_p^T - delta_p),  dK_p = s dS_p^T Q
            dQ = s (dS K + dS_p K_p)
    joint:  delta = rowsum(dO * O), and the same with g = 1, delta_p = delta (P_p, P: one softmax).

GQA sums dK, dV, dK_p, dV_p over the query heads of a group. The fused kernels compute exactly
these quantities; this module states them once, readably.
"""

from __future__ import annotations

import math

import torch


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D), query head h reading kv head h // (H / Hkv)."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _reduce_kv(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The adjoint of :func:`_expand_kv`: sum the grads of a group's query heads."""
    B, H, S, D = t.shape
    return t if H == kv_heads else t.view(B, kv_heads, H // kv_heads, S, D).sum(2)


def visible(q_len: int, k_len: int, causal: bool, key_padding_mask, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Sq, Sk) mask of the token keys each query may attend, or None (all)."""
    mask = None
    if causal:
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        mask = (j <= i + (k_len - q_len))[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``torch.softmax`` over the last dim; a row with no visible key gets P = 0 (and no NaN in
    its gradient: its scores are replaced by zeros before the softmax)."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    seen = mask.any(dim=-1, keepdim=True)
    scores = torch.where(mask, scores, float("-inf"))
    p = torch.softmax(torch.where(seen, scores, 0.0), dim=-1)
    return torch.where(seen, p, 0.0)


def prefix_attention(q, k, v, k_p, v_p, gate=None, *, joint: bool = False, causal: bool = True,
                     key_padding_mask=None, scale: float | None = None):
    """Gated prefix attention (or, with ``joint=True``, prefix tuning) with autograd.

    Matmuls run in the inputs' dtype, the softmax in float32 (or float64 for float64 inputs), as in
    eager Hugging Face attention; with float64 inputs this is the oracle of the tests. ``gate`` (H,)
    is the effective gate (None only in joint mode).

    Equivalent two-pass (PEFT AdaptionPrompt / litgpt)::

        sdpa(q, k, v, attn_mask=bottom_right_causal) + gate[:, None, None] * sdpa(q, k_p, v_p)
    """
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v, k_p, v_p = (_expand_kv(t, heads) for t in (k, v, k_p, v_p))
    soft = torch.promote_types(q.dtype, torch.float32)
    mask = visible(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    scores = (q @ k.transpose(-1, -2)).to(soft) * scale
    scores_p = (q @ k_p.transpose(-1, -2)).to(soft) * scale
    if joint:
        if mask is not None:
            ones = torch.ones(*mask.shape[:-1], k_p.shape[2], dtype=torch.bool, device=q.device)
            mask = torch.cat([ones, mask], dim=-1)
        p = _softmax(torch.cat([scores_p, scores], dim=-1), mask)
        p = p.to(q.dtype)
        return p @ torch.cat([v_p, v], dim=2)
    p = _softmax(scores, mask)
    p_p = _softmax(scores_p, None)
    out_p = p_p.to(q.dtype) @ v_p
    return p.to(q.dtype) @ v + gate.to(q.dtype)[:, None, None] * out_p


# ---------------------------------------------------------------------------------------------
# Backend entry points (the signatures of the fused backends)
#
# What the forward saves per softmax ("stats", (B, H, Sq, 2)): the row max m of the base-2 scores
# ``s2 = (q k^T) * scale * log2(e)`` and the row sum l of ``exp2(s2 - m)``, so that the backward
# recomputes ``P = exp2(s2 - m) / l`` exactly as the forward formed it. A row that sees no key
# saves (m, l) = (+inf, 1), which recomputes P = 0.

LOG2E = 1.4426950408889634


def _stats_softmax(s2: torch.Tensor, mask: torch.Tensor | None):
    """(P, stats (..., 2)) of base-2 scores ``s2``, masked entries excluded."""
    if mask is not None:
        s2 = s2.masked_fill(~mask, float("-inf"))
    m = s2.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)
    m = torch.where(empty, float("inf"), m)
    e = torch.exp2(s2 - m)
    l = torch.where(empty, 1.0, e.sum(-1, keepdim=True))
    return e / l, torch.cat([m, l], dim=-1)


def _recompute(s2: torch.Tensor, mask: torch.Tensor | None, stats: torch.Tensor) -> torch.Tensor:
    if mask is not None:
        s2 = s2.masked_fill(~mask, float("-inf"))
    return torch.exp2(s2 - stats[..., :1]) / stats[..., 1:]


def _joint_mask(mask, q_len, prefix_len, device):
    if mask is None:
        return None
    ones = torch.ones(*mask.shape[:-1], prefix_len, dtype=torch.bool, device=device)
    return torch.cat([ones.expand(*mask.shape[:-2], q_len, prefix_len), mask.expand(*mask.shape[:-2], q_len, -1)],
                     dim=-1)


def _scores(q, k, v, k_p, v_p, key_padding_mask, scale, causal):
    heads = q.shape[1]
    soft = torch.promote_types(q.dtype, torch.float32)
    kx, vx, kpx, vpx = (_expand_kv(t, heads).to(soft) for t in (k, v, k_p, v_p))
    qf = q.to(soft)
    mask = visible(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    # scale * log2(e) as hi + lo parts, as the kernels do: one rounded fp32 constant would shift
    # every score of the tensor by the same relative error.
    hi = float(torch.tensor(scale * LOG2E, dtype=qf.dtype))
    lo = scale * LOG2E - hi
    s2 = qf @ kx.transpose(-1, -2)
    s2 = s2 * hi + s2 * lo
    s2_p = qf @ kpx.transpose(-1, -2)
    s2_p = s2_p * hi + s2_p * lo
    return qf, kx, vx, kpx, vpx, mask, s2, s2_p


def forward(q, k, v, k_p, v_p, gate, key_padding_mask, scale, causal, joint):
    """Backend forward: (out (B, H, Sq, D) q.dtype, stats, stats_p (B, H, Sq, 2)), the stats in
    float32 (float64 for float64 inputs); stats_p is empty in joint mode."""
    qf, kx, vx, kpx, vpx, mask, s2, s2_p = _scores(q, k, v, k_p, v_p, key_padding_mask, scale, causal)
    if joint:
        p, stats = _stats_softmax(torch.cat([s2_p, s2], dim=-1),
                                  _joint_mask(mask, q.shape[2], k_p.shape[2], q.device))
        out = p @ torch.cat([vpx, vx], dim=2)
        stats_p = stats.new_empty((0,))  # one softmax: its statistics serve both runs
    else:
        p, stats = _stats_softmax(s2, mask)
        p_p, stats_p = _stats_softmax(s2_p, None)
        out = p @ vx + gate.to(qf.dtype)[:, None, None] * (p_p @ vpx)
    return out.to(v.dtype), stats, stats_p


def backward(dout, q, k, v, k_p, v_p, gate, key_padding_mask, out, stats, stats_p, scale, causal, joint,
             needs):
    """Backend backward: (dq, dk, dv, dk_p, dv_p, dgate (H,) in the stats' dtype), ``None`` where
    not needed. Uses only what the forward saves (out and the softmax statistics), with the
    formulas of the module docstring, so that it documents (and cross-checks) the fused backward.
    """
    heads, kv_heads, L = q.shape[1], k.shape[1], k_p.shape[2]
    qf, kx, vx, kpx, vpx, mask, s2, s2_p = _scores(q, k, v, k_p, v_p, key_padding_mask, scale, causal)
    do, of = dout.to(qf.dtype), out.to(qf.dtype)
    if joint:
        p_all = _recompute(torch.cat([s2_p, s2], dim=-1), _joint_mask(mask, q.shape[2], L, q.device), stats)
        p_p, p = p_all[..., :L], p_all[..., L:]
    else:
        p = _recompute(s2, mask, stats)
        p_p = _recompute(s2_p, None, stats_p)
    delta = (do * of).sum(-1, keepdim=True)
    if joint:
        g = torch.ones(heads, dtype=qf.dtype, device=q.device)
        delta_p = delta
        dgate = None
    else:
        g = gate.to(qf.dtype)
        r_p = (p_p * (do @ vpx.transpose(-1, -2))).sum(-1, keepdim=True)  # = rowsum(dO * O_p)
        delta_p = g[:, None, None] * r_p
        delta = delta - delta_p
        dgate = r_p.sum((0, 2, 3))
    gh = g[:, None, None]
    ds = p * (do @ vx.transpose(-1, -2) - delta)
    ds_p = p_p * (gh * (do @ vpx.transpose(-1, -2)) - delta_p)
    need_q, need_k, need_v, need_kp, need_vp, need_gate = needs
    dq = (scale * (ds @ kx + ds_p @ kpx)).to(q.dtype) if need_q else None
    dk = _reduce_kv(scale * ds.transpose(-1, -2) @ qf, kv_heads).to(k.dtype) if need_k else None
    dv = _reduce_kv(p.transpose(-1, -2) @ do, kv_heads).to(v.dtype) if need_v else None
    dk_p = _reduce_kv(scale * ds_p.transpose(-1, -2) @ qf, kv_heads).to(k_p.dtype) if need_kp else None
    dv_p = _reduce_kv(gh * p_p.transpose(-1, -2) @ do, kv_heads).to(v_p.dtype) if need_vp else None
    return dq, dk, dv, dk_p, dv_p, (dgate if need_gate else None)
