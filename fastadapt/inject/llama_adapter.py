"""LLaMA-Adapter for Hugging Face Llama / Mistral / Qwen2 models, without PEFT, on the fused op.

:func:`add_adaption_prompt` gives the attention modules of the top ``adapter_layers`` decoder layers
a :class:`fastadapt.nn.GatedPrefixAttention` (submodule ``adaption``: ``adaption_prompt``,
``adaption_gate``) and routes their attention core through it. Nothing of the model's own forward
is copied: the adapted modules get a private copy of the config whose ``_attn_implementation``
names our function in transformers' ``AttentionInterface``, so HF still runs the projections,
RoPE and the KV cache, and hands us ``(q, k, v, mask)`` (the interface used by sdpa/flash/eager
since transformers 4.48). The prefix K/V are computed once per generation and cached.

The fused path serves masks that are "bottom-right causal + key padding" (what HF builds for
padded batches and for decoding with a cache); any other mask (sliding window shorter than the
keys, packed sequences, attention dropout) runs the model's own attention for the tokens plus an
eager pass over the prefix (PEFT's two-pass computation). :func:`set_fused` forces that two-pass
path, which is also the reference the tests compare the fused path with.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from fastadapt import _distributed
from fastadapt.nn.prefix_attention import GatedPrefixAttention

ATTN_IMPLEMENTATION = "fastadapt_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
CONFIG_NAME = "adaption_prompt_config.json"
WEIGHTS_NAME = "adaption_prompt.safetensors"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the decoder layers, in layer order."""
    mods = [m for m in model.modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "config"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def add_adaption_prompt(model: nn.Module, adapter_len: int, adapter_layers: int, gate: str = "scalar",
                        gate_tanh: bool = False, freeze_base: bool = True) -> nn.Module:
    """Add LLaMA-Adapter (zero-init gated adaption prompts) to the top ``adapter_layers`` layers.

    Args:
        model: a transformers Llama / Mistral / Qwen2 model (``...ForCausalLM`` or the bare model),
            GQA included.
        adapter_len: prompt length L per layer. adapter_layers: how many of the last layers get one.
        gate: ``"scalar"`` (one gate per layer, PEFT) or ``"per_head"`` (the LLaMA-Adapter paper).
        gate_tanh: use ``tanh(gate)`` (LLaMA-Adapter training code) instead of the raw gate (PEFT).
        freeze_base: leave only the adapter parameters trainable.

    Returns the model, modified in place; at initialisation its outputs are the base model's
    (the gates are zero). State-dict keys: ``...self_attn.adaption.adaption_prompt`` (1, L, hidden)
    and ``...self_attn.adaption.adaption_gate`` ((1,) or (num_heads,)).

    Equivalent PEFT (scalar gate, no tanh)::

        peft.get_peft_model(model, AdaptionPromptConfig(adapter_len=L, adapter_layers=N, task_type="CAUSAL_LM"))
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"add_adaption_prompt supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    _distributed.check_not_wrapped(model, "add_adaption_prompt")
    attns = attention_modules(model)
    if not isinstance(adapter_layers, int) or not 1 <= adapter_layers <= len(attns):
        raise ValueError(f"adapter_layers must be in [1, {len(attns)}] for this model, got {adapter_layers!r}")
    if any(hasattr(a, "adaption") for a in attns):
        raise ValueError("this model already has adaption prompts (call remove_adaption_prompt first)")
    for attn in attns[len(attns) - adapter_layers:]:
        cfg = attn.config
        w = attn.q_proj.weight
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        attn.adaption = GatedPrefixAttention(cfg.hidden_size, heads, kv_heads, attn.head_dim, adapter_len, gate=gate,
                                             gate_tanh=gate_tanh, device=w.device, dtype=w.dtype)
        attn._fastadapt_fused = True
        route_attention(attn, ATTN_IMPLEMENTATION, adapter_attention)
    if freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad_(".adaption." in f".{name}")
    return model


def remove_adaption_prompt(model: nn.Module) -> nn.Module:
    """Undo :func:`add_adaption_prompt` (the adapter parameters are dropped)."""
    for attn in attention_modules(model):
        if hasattr(attn, "adaption"):
            del attn.adaption, attn._fastadapt_fused
            unroute_attention(attn)
    return model


class _Registered:
    """``function`` under ``name`` in transformers' ``AttentionInterface``, registered when made and
    again when unpickled: the interface is per process, and a pickled model whose attention config
    names ``name`` must find it wherever it is loaded (``torch.load`` in a fresh process)."""

    def __init__(self, name: str, function):
        from transformers import AttentionInterface
        AttentionInterface.register(name, function)
        self.name, self.function = name, function

    def __reduce__(self):
        return _Registered, (self.name, self.function)


def private_config(attn: nn.Module, name: str, function):
    """A copy of ``attn``'s config whose attention implementation is ``function``, registered in
    transformers' ``AttentionInterface`` under ``name`` (kept on ``attn``, so that it is registered
    again wherever ``attn`` is unpickled)."""
    attn._fastadapt_attention = _Registered(name, function)
    config = copy.copy(attn.config)
    config._attn_implementation = name
    return config


def route_attention(attn: nn.Module, name: str, function) -> None:
    """Route ``attn``'s attention core to ``function`` (transformers' attention-interface signature)
    through a private copy of its config (:func:`private_config`): only this module's attention is
    ours, and the masks are still built from the model's config, in its own implementation's
    format. :func:`base_attention` is the model's own; :func:`unroute_attention` undoes it."""
    attn._fastadapt_base_attn = attn.config._attn_implementation or "eager"
    attn._fastadapt_config = attn.config
    attn.config = private_config(attn, name, function)


def unroute_attention(attn: nn.Module) -> None:
    attn.config = attn._fastadapt_config
    del attn._fastadapt_config, attn._fastadapt_base_attn, attn._fastadapt_attention


def set_fused(model: nn.Module, fused: bool) -> None:
    """Route the adapted layers through the fused op (default) or PEFT's two-pass computation."""
    for attn in attention_modules(model):
        if hasattr(attn, "adaption"):
            attn._fastadapt_fused = fused


def adaption_prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters (the parameters themselves, as sharded as the model is) by full name."""
    return {k: v for k, v in model.named_parameters() if ".adaption.adaption_" in k}


def save_adaption_prompt(model: nn.Module, directory: str) -> None:
    """Write the adapter (weights as safetensors, plus its configuration) to ``directory``.

    Under FSDP2 or DeepSpeed ZeRO-3 every rank must call it: the shards are gathered, rank 0 writes."""
    from safetensors.torch import save_file
    adapted = [a for a in attention_modules(model) if hasattr(a, "adaption")]
    if not adapted:
        raise ValueError("the model has no adaption prompts")
    first = adapted[0].adaption
    cfg = {"adapter_len": first.adapter_len, "adapter_layers": len(adapted), "gate": first.gate,
           "gate_tanh": first.gate_tanh}
    weights = _distributed.full_tensors(adaption_prompt_state_dict(model))
    if not _distributed.writes_files():
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(weights, os.path.join(directory, WEIGHTS_NAME))


def load_adaption_prompt(model: nn.Module, directory: str, freeze_base: bool = True) -> nn.Module:
    """Add the adapter saved by :func:`save_adaption_prompt` to ``model`` (the same base model)."""
    from safetensors.torch import load_file
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        cfg = json.load(f)
    add_adaption_prompt(model, freeze_base=freeze_base, **cfg)
    weights = load_file(os.path.join(directory, WEIGHTS_NAME))
    params = adaption_prompt_state_dict(model)
    if set(weights) != set(params):
        raise ValueError(f"adapter weights do not match the model: missing {sorted(set(params) - set(weights))}, "
                         f"unexpected {sorted(set(weights) - set(params))}")
    _distributed.copy_full(params, weights)
    return model


# ---------------------------------------------------------------------------------------------
# The attention function


def key_padding(mask, q_len: int, k_len: int, causal: bool):
    """(served, key_padding_mask or None): whether ``mask`` is exactly "bottom-right causal (if
    ``causal``) and key padding", and that padding as (B, Sk) bool (True = attend)."""
    if mask is None:
        return True, None
    if mask.dim() == 2:  # flash-attention format: (B, Sk) padding, causal implied
        return tuple(mask.shape[1:]) == (k_len,), mask.to(torch.bool)
    if mask.dim() == 4:
        mask = mask[..., :k_len]  # a static cache's mask can be longer than the keys (as HF slices it)
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, k_len) or mask.shape[1] != 1:
        return False, None
    if mask.dtype == torch.bool:
        attend = mask
    else:  # eager format: 0 where attended, the dtype's minimum elsewhere
        low = torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | (mask <= low)).all()):
            return False, None
        attend = mask == 0
    kpm = attend[:, 0, -1, :]  # the last query sees every key that is not padding
    expected = kpm[:, None, None, :]
    if causal:
        i = torch.arange(q_len, device=mask.device)[:, None]
        j = torch.arange(k_len, device=mask.device)[None, :]
        expected = expected & (j <= i + (k_len - q_len))
    if not torch.equal(attend.expand_as(expected), expected):
        return False, None
    return True, (None if bool(kpm.all()) else kpm.contiguous())


def _adapter(module) -> GatedPrefixAttention:
    """The adapter of an attention module: its ``adaption`` submodule, or the unregistered view that
    the PEFT patcher attaches (it shares PEFT's parameters and must stay out of the state dict)."""
    view = module.__dict__.get("_fastadapt_adaption")
    return view if view is not None else module.adaption


def base_attention(module):
    """The attention function the module's model was configured with (before we routed it to ours)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward
    name = module._fastadapt_base_attn
    return eager_attention_forward if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]


def _two_pass(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """The model's own attention for the tokens plus PEFT's eager pass over the prefix."""
    out, weights = base_attention(module)(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    adapter = _adapter(module)
    kp, vp = adapter.prefix_kv(module.k_proj, module.v_proj)
    group = query.shape[1] // kp.shape[1]
    kp = kp.to(query.dtype).repeat_interleave(group, 1)
    vp = vp.to(query.dtype).repeat_interleave(group, 1)
    scores = torch.softmax((query @ kp.transpose(-1, -2)) * scaling, dim=-1, dtype=torch.float32).to(query.dtype)
    if adapter.mode == "joint":
        raise NotImplementedError("the two-pass path computes gated (LLaMA-Adapter) attention only")
    g = torch.tanh(adapter.adaption_gate) if adapter.gate_tanh else adapter.adaption_gate
    g = g.to(query.dtype).reshape(-1).expand(query.shape[1]).view(1, -1, 1, 1)
    return out + (g * (scores @ vp)).transpose(1, 2), weights


def adapter_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-interface function: (B, H, Sq, D) q, (B, Hkv, Sk, D) k/v ->
    ((B, Sq, H, D), None)."""
    q_len, k_len = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True)
    served, kpm = (False, None)
    window = kwargs.get("sliding_window")
    if (getattr(module, "_fastadapt_fused", True) and dropout == 0.0 and (window is None or k_len <= window)
            and kwargs.get("cu_seq_lens_q") is None):
        served, kpm = key_padding(attention_mask, q_len, k_len, causal)
    if not served:
        return _two_pass(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = _adapter(module)(query, key, value, module.k_proj, module.v_proj, key_padding_mask=kpm, scale=scaling)
    return out.transpose(1, 2), None
