"""PEFT's prefix tuning (``PrefixTuningConfig``) on Llama / Mistral / Qwen2, on the joint mode of
the fused prefix-attention op.

PEFT hands every decoder layer a KV cache that starts with the adapter's ``num_virtual_tokens``
prefix keys and values, and extends the attention mask with ones for them; the model's attention
then runs one softmax over ``[prefix; tokens]`` with a bottom-right causal mask. Patching routes
the attention core of the base model's attention modules through transformers'
``AttentionInterface`` (as :mod:`fastadapt.inject.llama_adapter` does) to
``fastadapt.prefix_attention(mode="joint")``, with the prefix split off the front of the cached
keys: the prefix never goes through the token path's causal masking, and in decoding the cache's
tokens and the prefix are read in one pass.

The prefix is recognised by the cache it arrives in, not by the adapter set on the model: the
PeftModel's ``get_prompt`` (what its ``forward`` and ``generate`` put in front of the tokens) is
wrapped to mark the cache it returns with the prefix length, and a forward pre-hook on each
attention module reads the mark off the cache of that very call. A call whose cache carries no
prefix (``disable_adapter()``, the base model called directly, an active adapter that is not
prefix tuning) is plain attention: nothing is fused and nothing falls back. What the fused op does
not serve (a mask other than causal plus key padding, attention dropout, padding inside the prefix)
runs the model's own attention over the whole cache, which the patch report lists and the first
such call warns about.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``; peft 0.21.2 still
injects its prefix under the old name during generation, where ``generate`` also passes its own
(empty) ``cache``, so the model keeps ``cache`` and drops the prefix (PEFT's own generations then
ignore the adapter). The patched PeftModel's ``prepare_inputs_for_generation`` hands the prefix over
under the name the model reads (:func:`_prepare_inputs_for_generation`).
"""

from __future__ import annotations

from torch import nn

from fastadapt.inject import llama_adapter
from fastadapt.integrations import PatchReport, attach, bind, is_bound, mark_patched, report_of, unmark
from fastadapt.ops.prefix_attention import prefix_attention

_MARK = "_fastadapt_prefix_tuning_patched"
ATTN_IMPLEMENTATION = "fastadapt_prefix_tuning"
_LEN = "_fastadapt_prefix_len"  # on each attention module: the prefix length of the call in progress, or None
_TAG = "_fastadapt_prefix_len"  # on a cache made by the PeftModel's get_prompt: its prefix length
_ATTNS = "_fastadapt_prefix_attns"  # on the PeftModel: its base model's attention modules
_HOOKS = "_fastadapt_prefix_hooks"  # on the PeftModel: the attention modules' pre-hook handles
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # the cache's name: transformers >= 5.24, 4.56, older
_FALLBACKS = ("a mask other than causal + key padding (packed sequences, a sliding window shorter than the keys); "
              "attention dropout; padding inside the prefix")


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-interface function: (B, H, Sq, D) q, (B, Hkv, Lp + Sk, D) k/v whose
    first Lp keys are the prefix -> ((B, Sq, H, D), None)."""
    prefix_len = module.__dict__.get(_LEN)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    reason, kpm = None, None
    if prefix_len is None:  # no prefix in this call's cache: plain attention, nothing to fuse
        return llama_adapter.base_attention(module)(module, query, key, value, attention_mask, dropout=dropout,
                                                    scaling=scaling, **kwargs)
    if not 0 < prefix_len < k_len:
        reason = f"{k_len} keys cannot hold a {prefix_len}-token prefix and tokens"
    elif dropout != 0.0:
        reason = "attention dropout"
    elif (window is not None and k_len > window) or kwargs.get("cu_seq_lens_q") is not None:
        reason = "sliding window or packed sequences"
    else:
        served, kpm = llama_adapter.key_padding(attention_mask, q_len, k_len, causal)
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


def _read_prefix_len(attn, args, kwargs):
    """Forward pre-hook of a patched attention module: the prefix length marked on this call's cache."""
    cache = next((kwargs[k] for k in _CACHE_ARGS if kwargs.get(k) is not None), None)
    attn.__dict__[_LEN] = getattr(cache, _TAG, None)


def _get_prompt(self, *args, **kwargs):
    prompt = type(self).get_prompt(self, *args, **kwargs)
    config = self.active_peft_config
    from peft.utils import PeftType
    if config.peft_type == PeftType.PREFIX_TUNING:
        setattr(prompt, _TAG, config.num_virtual_tokens)
    return prompt


def _prepare_inputs_for_generation(self, *args, **kwargs):
    inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if "cache" in inputs and "past_key_values" in inputs:
        # PEFT's prefix under the name the model no longer reads (see the module docstring). PEFT
        # injects it whenever it sees no cache under the old name, i.e. at every step: the prefix
        # belongs in an empty cache only, as PEFT means it to.
        prompt, cache = inputs.pop("past_key_values"), inputs["cache"]
        if cache is None or not cache.get_seq_length():
            inputs["cache"] = prompt
    return inputs


class _PeftPrefixTuningPatcher:
    name = "peft-prefix-tuning"
    library = "peft"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        try:
            import peft
            from peft.utils import PeftType
        except ImportError:
            return  # without peft there is no prefix tuning to patch
        for name, module in model.named_modules(prefix=prefix):
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
            attns = llama_adapter.attention_modules(base)
            hooks = []
            for attn in attns:
                llama_adapter.route_attention(attn, ATTN_IMPLEMENTATION, _attention)
                attach(attn, f"{name}.{attn.__class__.__name__}[{attn.layer_idx}]".lstrip("."), report)
                attn.__dict__[_LEN] = None
                hooks.append(attn.register_forward_pre_hook(_read_prefix_len, with_kwargs=True))
            module.__dict__[_ATTNS] = attns
            module.__dict__[_HOOKS] = hooks
            bind(module, "get_prompt", _get_prompt)
            bind(module, "prepare_inputs_for_generation", _prepare_inputs_for_generation)
            mark_patched(module, _MARK, name=name or "<model>", report=report,
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
            for hook in module.__dict__.pop(_HOOKS):
                hook.remove()
            del module.get_prompt, module.prepare_inputs_for_generation
            unmark(module, _MARK)
            report.patched.append((name or "<model>", "restored PEFT's prefix tuning"))


PATCHER = _PeftPrefixTuningPatcher()
