"""PEFT's adaption-prompt (LLaMA-Adapter) attention wrappers on the fused prefix-attention op.

PEFT's ``AdaptedAttention`` runs the model's attention, then recomputes the queries and runs a
second, eager attention over the prompt (recomputing the prompt's K/V at every call, also at every
decode step). Patching replaces the wrapper instance's ``forward`` only: the wrapped attention
module runs once, with its attention core routed through :mod:`fastadapt.inject.llama_adapter`
(transformers' ``AttentionInterface``), which adds the gated prefix in the same fused pass. PEFT
keeps its parameters (shared, not copied), adapter switching and ``save_pretrained``; what the fused
path does not serve (GPT-2 wrappers, an o_proj bias, ``output_attention``) runs PEFT's forward.
Each adapter has its own wrappers, which PEFT swaps in and out with ``set_adapter``: all are
patched, the inactive ones included, and those of an adapter added later as they join the model.
"""

from __future__ import annotations

from torch import nn

from fastadapt.inject import llama_adapter
from fastadapt.integrations import PatchReport, bind_forward, is_bound, report_of, track, unbind_forward
from fastadapt.nn.prefix_attention import GatedPrefixAttention

_MARK = "_fastadapt_adaption_prompt_patched"
_VIEW = "_fastadapt_adaption_view"  # on each patched wrapper: the op's view of its PEFT parameters


def _wrappers(model: nn.Module, prefix: str, layer) -> list[tuple[str, nn.Module]]:
    """(name, wrapper) of every adaption-prompt wrapper of ``model``: those in place, and those PEFT
    keeps aside for its inactive adapters (``AdaptionPromptModel._cached_adapters``, swapped in by
    ``set_adapter``), named ``<place>[<adapter>]``."""
    from peft.tuners.adaption_prompt import AdaptionPromptModel
    found, names = [], {}
    for name, module in model.named_modules(prefix=prefix):
        names[id(module)] = name
        if isinstance(module, layer._BaseAdaptedAttention):
            found.append((name, module))
    for module in model.modules():
        if isinstance(module, AdaptionPromptModel):
            for adapter, cached in module._cached_adapters.items():
                target = module.peft_config[adapter].target_modules
                found += [(f"{names[id(parent)]}.{target}[{adapter}]".lstrip("."), wrapper)
                          for parent, wrapper in zip(module._parents[adapter], cached)]
    return found


def _static_reasons(module, layer) -> list[str]:
    if type(module) is not layer.AdaptedAttention:
        return [f"{type(module).__name__} (GPT-2 style attention) is not supported"]
    if module.model_type not in ("llama", "mistral"):
        return [f"model type {module.model_type!r} is not supported"]
    inner = module.model
    if not all(hasattr(inner, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "head_dim")):
        return ["the wrapped attention has no q/k/v/o projections"]
    if inner.o_proj.bias is not None:
        # PEFT sends its prompt output through o_proj separately, adding the bias a second time.
        return ["o_proj has a bias (PEFT adds it twice; the fused path would not)"]
    return []


def _fused_forward(self, **kwargs):
    name, report = report_of(self)
    if kwargs.get("output_attention", False) or kwargs.get("output_attentions", False):
        report.fall_back(name, "attention weights requested (output_attentions)")
        return type(self).forward(self, **kwargs)
    report.fused()
    inner = self.model
    # The wrapped attention serves the wrapper of whichever adapter is active (their prompt lengths
    # may differ): its view, with PEFT's parameters looked up at call time (FSDP swaps them).
    view = self.__dict__[_VIEW]
    view.adaption_prompt, view.adaption_gate = self.adaption_prompt, self.adaption_gate
    object.__setattr__(inner, "_fastadapt_adaption", view)
    saved = inner.config
    inner.config = inner.__dict__["_fastadapt_config"]
    try:
        return inner(**kwargs)
    finally:
        inner.config = saved


class _PeftAdaptionPromptPatcher:
    name = "peft-adaption-prompt"
    library = "peft"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        try:
            from peft.tuners.adaption_prompt import layer
        except ImportError:
            return  # without peft there are no adaption-prompt wrappers to patch
        for name, module in _wrappers(model, prefix, layer):
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            reasons = _static_reasons(module, layer)
            if reasons:
                report.skipped.append((name, "; ".join(reasons)))
                continue
            inner = module.model
            cfg = inner.config
            heads = cfg.num_attention_heads
            kv_heads = inner.k_proj.out_features // inner.head_dim
            view = GatedPrefixAttention(cfg.hidden_size, heads, kv_heads, inner.head_dim, module.adapter_len,
                                        gate="scalar", gate_tanh=False, device="meta")
            view.adaption_prompt, view.adaption_gate = module.adaption_prompt, module.adaption_gate
            private = llama_adapter.private_config(inner, llama_adapter.ATTN_IMPLEMENTATION,
                                                  llama_adapter.adapter_attention)
            # Plain attributes (object.__setattr__): not submodules, so PEFT's state dict, parameter
            # list and save_pretrained are unchanged.
            object.__setattr__(module, _VIEW, view)
            object.__setattr__(inner, "_fastadapt_config", private)
            inner._fastadapt_base_attn = cfg._attn_implementation or "eager"
            bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                         what=f"peft AdaptionPrompt ({module.model_type}) -> fastadapt::prefix_attention",
                         fallbacks="attention weights requested (output_attentions)")

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        try:
            from peft.tuners.adaption_prompt import layer
        except ImportError:
            return
        for name, module in _wrappers(model, "", layer):
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                del module.__dict__[_VIEW]
                track(module, name, None)  # one PEFT keeps aside is out of unpatch's walk of the model
                inner = module.model
                for attr in ("_fastadapt_adaption", "_fastadapt_config", "_fastadapt_base_attn",
                             "_fastadapt_attention"):
                    inner.__dict__.pop(attr, None)
                report.patched.append((name, "restored PEFT's forward"))


PATCHER = _PeftAdaptionPromptPatcher()
