"""PEFT's prefix tuning (``PrefixTuningConfig``) on Llama / Mistral / Qwen2, on the joint mode of
the fused prefix-attention op.

PEFT hands every decoder layer a KV cache that starts with the adapter's ``num_virtual_tokens``
prefix keys and values, and extends the attention mask with ones for them; the model's attention
then runs one softmax over ``[prefix; tokens]`` with a bottom-right causal mask. Patching routes
the attention core of the base model's attention modules through transformers'
``AttentionInterface`` (as :mod:`fastadapt.llama_adapter` does) to
``fastadapt.prefix_attention(mode="joint")``, with the prefix split off the front of the cached
keys: the prefix never goes through the token path's causal masking, and in decoding the cache's
tokens and the prefix are read in one pass.

The prefix length is the active adapter's, set on the attention modules at each call of the
PeftModel's ``forward`` and ``generate``; it persists after the call, so the recomputation of
gradient checkpointing takes the same path as the forward. What the fused op does not serve (a
mask other than causal plus key padding, attention dropout, padding inside the prefix, an active
adapter that is not prefix tuning) runs the model's own attention over the whole cache, which the
patch report lists and the first such call warns about.
"""

from __future__ import annotations

import types

from torch import nn

from fastadapt import llama_adapter
from fastadapt.integrations import PatchReport, attach, bind_forward, is_bound, report_of, unbind_forward
from fastadapt.ops.prefix_attention import prefix_attention

_MARK = "_fastadapt_prefix_tuning_patched"
ATTN_IMPLEMENTATION = "fastadapt_prefix_tuning"
_LEN = "_fastadapt_prefix_len"  # on each attention module: the active prefix length, or None
_ATTNS = "_fastadapt_prefix_attns"  # on the PeftModel: its base model's attention modules
_FALLBACKS = ("a mask other than causal + key padding (packed sequences, a sliding window shorter than the keys); "
              "attention dropout; padding inside the prefix; an active adapter that is not prefix tuning")


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-interface function: (B, H, Sq, D) q, (B, Hkv, Lp + Sk, D) k/v whose
    first Lp keys are the prefix -> ((B, Sq, H, D), None)."""
    prefix_len = module.__dict__.get(_LEN)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    reason, kpm = None, None
    if prefix_len is None:
        reason = "the active adapter is not prefix tuning"
    elif not 0 < prefix_len < k_len:
        reason = f"{k_len} keys cannot hold a {prefix_len}-token prefix and tokens"
    elif dropout != 0.0:
        reason = "attention dropout"
    elif (window is not None and k_len > window) or kwargs.get("cu_seq_lens_q") is not None:
        reason = "sliding window or packed sequences"
    else:
        served, kpm = llama_adapter._key_padding(attention_mask, q_len, k_len, causal)
        if not served:
            reason = "a mask other than causal + key padding"
        elif kpm is not None and not bool(kpm[:, :prefix_len].all()):
            reason = "padding inside the prefix"
    if reason is not None:
        name, report = report_of(module)
        report.fall_back(name, reason)
        return llama_adapter.base_attention(module)(module, query, key, value, attention_mask, dropout=dropout,
                                                    scaling=scaling, **kwargs)
    report_of(module)[1].fused()
    if kpm is not None:
        kpm = kpm[:, prefix_len:]
        kpm = None if bool(kpm.all()) else kpm.contiguous()
    out = prefix_attention(query, key[:, :, prefix_len:], value[:, :, prefix_len:], key[:, :, :prefix_len],
                           value[:, :, :prefix_len], mode="joint", causal=causal, key_padding_mask=kpm,
                           scale=scaling)
    return out.transpose(1, 2), None


def _set_prefix_len(peft_model) -> None:
    config = peft_model.active_peft_config
    from peft.utils import PeftType
    length = config.num_virtual_tokens if config.peft_type == PeftType.PREFIX_TUNING else None
    for attn in peft_model.__dict__[_ATTNS]:
        attn.__dict__[_LEN] = length


def _forward(self, *args, **kwargs):
    _set_prefix_len(self)
    return type(self).forward(self, *args, **kwargs)


def _generate(self, *args, **kwargs):
    _set_prefix_len(self)
    return type(self).generate(self, *args, **kwargs)


class _PeftPrefixTuningPatcher:
    name = "peft-prefix-tuning"

    def patch(self, model: nn.Module, report: PatchReport) -> None:
        try:
            import peft
            from peft.utils import PeftType
        except ImportError:
            return  # without peft there is no prefix tuning to patch
        for name, module in model.named_modules():
            if not isinstance(module, peft.PeftModel):
                continue
            if not any(c.peft_type == PeftType.PREFIX_TUNING for c in module.peft_config.values()):
                continue
            if is_bound(module, _MARK):
                report.skipped.append((name or "<model>", "already patched"))
                continue
            base = module.get_base_model()
            model_type = getattr(getattr(base, "config", None), "model_type", None)
            if model_type not in llama_adapter.SUPPORTED_MODEL_TYPES:
                report.skipped.append((name or "<model>", f"prefix tuning on model type {model_type!r} is not "
                                                          f"supported (only {llama_adapter.SUPPORTED_MODEL_TYPES})"))
                continue
            from transformers import AttentionInterface
            AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
            attns = llama_adapter._attention_modules(base)
            for attn in attns:
                llama_adapter.route_attention(attn, ATTN_IMPLEMENTATION)
                attach(attn, f"{name}.{attn.__class__.__name__}[{attn.layer_idx}]".lstrip("."), report)
                attn.__dict__[_LEN] = None
            module.__dict__[_ATTNS] = attns
            module.generate = types.MethodType(_generate, module)
            bind_forward(module, _forward, _MARK, name=name or "<model>", report=report,
                         what=f"peft prefix tuning ({len(attns)} attention layers) -> fastadapt::prefix_attention "
                              "(joint)", fallbacks=_FALLBACKS)

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if not is_bound(module, _MARK):
                continue
            for attn in module.__dict__.pop(_ATTNS):
                llama_adapter.unroute_attention(attn)
                del attn.__dict__[_LEN]
                attach(attn, None, None)
            del module.generate
            unbind_forward(module, _MARK)
            report.patched.append((name or "<model>", "restored PEFT's prefix tuning"))


PATCHER = _PeftPrefixTuningPatcher()
