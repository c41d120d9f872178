"""``fastadapt.nn.GatedPrefixAttention``: the LLaMA-Adapter attention core (learned adaption prompt
plus zero-init gate) on the fused prefix-attention op, with PEFT's parameter names."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastadapt import dispatch
from fastadapt.ops.prefix_attention import prefix_attention

GATES = ("scalar", "per_head")


class GatedPrefixAttention(nn.Module):
    """``softmax(q k^T/sqrt(D) + causal) v + g * softmax(q K_p^T/sqrt(D)) V_p`` in one fused op.

    Parameters (PEFT ``AdaptionPrompt`` names): ``adaption_prompt`` (1, adapter_len, hidden_size),
    standard normal as in the LLaMA-Adapter repository, and ``adaption_gate``, zeros, shape (1,)
    (``gate="scalar"``, PEFT) or (num_heads,) (``gate="per_head"``, the LLaMA-Adapter paper); with
    ``gate_tanh`` the effective gate is ``tanh(adaption_gate)`` (LLaMA-Adapter training code).
    The prefix keys/values are the prompt through the layer's frozen k/v projections, without
    RoPE: ``K_p = k_proj(adaption_prompt)``. Outside autograd (generation) they are computed once
    and cached until the prompt or the projections change.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim: the attention layer's sizes (GQA when
            num_kv_heads < num_heads).
        adapter_len: prompt length L (1 .. 512 tested).
        gate, gate_tanh: see above. mode: ``"gated"``; ``"joint"`` makes it prefix tuning on the
            same prompt (one softmax over [K_p; K], no gate: ``adaption_gate`` is then unused).

    Equivalent PyTorch (PEFT's ``AdaptedAttention``, GQA heads repeated, Sq == Sk)::

        k_p = k_proj(adaption_prompt).view(1, L, Hkv, D).transpose(1, 2)   # likewise v_p
        g = tanh(adaption_gate) if gate_tanh else adaption_gate
        out = sdpa(q, k, v, is_causal=True) + g.view(1, -1, 1, 1) * softmax(q @ k_p.mT / sqrt(D)) @ v_p
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, adapter_len: int,
                 gate: str = "scalar", gate_tanh: bool = False, mode: str = "gated", causal: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if not isinstance(adapter_len, int) or adapter_len < 1:
            raise ValueError(f"adapter_len must be a positive integer, got {adapter_len!r}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.adapter_len = head_dim, adapter_len
        self.gate, self.gate_tanh, self.mode, self.causal = gate, gate_tanh, mode, causal
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden_size, device=device, dtype=dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else num_heads, device=device,
                                                      dtype=dtype))
        self._kv_cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.adaption_prompt.normal_()
            self.adaption_gate.zero_()
        self._kv_cache = None

    def prefix_kv(self, k_proj: nn.Module, v_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(K_p, V_p), each (1, num_kv_heads, adapter_len, head_dim), from the frozen projections."""
        caching = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if caching:
            key = (self.adaption_prompt._version, self.adaption_prompt.data_ptr(), self.adaption_prompt.dtype,
                   tuple((p.data_ptr(), p._version) for p in (*k_proj.parameters(), *v_proj.parameters())))
            if self._kv_cache is not None and self._kv_cache[0] == key:
                return self._kv_cache[1]
        prompt = self.adaption_prompt
        shape = (1, self.adapter_len, self.num_kv_heads, self.head_dim)
        kv = (k_proj(prompt).view(shape).transpose(1, 2), v_proj(prompt).view(shape).transpose(1, 2))
        self._kv_cache = (key, kv) if caching else None
        return kv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_proj: nn.Module | None = None,
                v_proj: nn.Module | None = None, *, prefix_k: torch.Tensor | None = None,
                prefix_v: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
        """q (B, H, Sq, D), k/v (B, Hkv, Sk, D) (after RoPE and the KV cache) -> (B, H, Sq, D).

        The prefix comes from ``k_proj``/``v_proj`` applied to the prompt, or is given directly as
        ``prefix_k``/``prefix_v`` (1 or B, Hkv, L, D). Causal masking is bottom-right aligned
        (decode queries sit at the end of the cache); ``key_padding_mask`` (B, Sk) bool, True = attend.
        """
        if prefix_k is None:
            if k_proj is None or v_proj is None:
                raise ValueError("pass k_proj and v_proj (to project the prompt) or prefix_k and prefix_v")
            prefix_k, prefix_v = self.prefix_kv(k_proj, v_proj)
        gate = self.adaption_gate if self.mode == "gated" else None
        return prefix_attention(q, k, v, prefix_k.to(q.dtype), prefix_v.to(q.dtype), gate, mode=self.mode,
                                causal=self.causal, key_padding_mask=key_padding_mask,
                                scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                                gate_tanh=self.gate_tanh)

    def extra_repr(self) -> str:
        forced = dispatch.forced_backend()
        return (f"adapter_len={self.adapter_len}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, gate={self.gate}, gate_tanh={self.gate_tanh}, mode={self.mode}, "
                f"backend={forced or 'auto'}")
