"""Bottleneck adapters placed into Hugging Face models: ``add_adapter``, ``set_active``,
``save_adapter`` / ``load_adapter`` (safetensors) and ``remove_adapter``.

Placement follows AdapterHub ``adapters``: ``mh_adapter`` after the attention block, and
``output_adapter`` after the FFN, where the host layer adds its residual (and, in post-norm models
such as BERT, applies its LayerNorm); a parallel adapter reads the sublayer's input instead. Each
such place gets a :class:`BottleneckLayer` holding the named adapters, of which one is active.

Supported hosts: BERT-style post-norm blocks (``BertSelfOutput`` and ``BertOutput``, and modules of
any class with the same ``dense`` / ``dropout`` / ``LayerNorm`` / ``forward(hidden_states,
input_tensor)`` layout, e.g. RoBERTa's) and Llama-style pre-norm decoder layers (``self_attn``,
``mlp``, ``input_layernorm``, ``post_attention_layernorm``; Llama, Mistral, Qwen2). The host
module's own parameters and state-dict keys are untouched; adapters add keys under
``attention_adapters.adapters.<name>`` / ``output_adapters.adapters.<name>``.
"""

from __future__ import annotations

import json
import re
from typing import Optional

import torch
from torch import nn

from fastadapt import _distributed
from fastadapt.integrations import bind
from fastadapt.nn.bottleneck import BnConfig, BottleneckAdapter, resolve_config

_ORIGINAL_FORWARD = "_fastadapt_original_forward"


class BottleneckLayer(nn.Module):
    """The adapters at one place of a host layer; ``forward`` runs the active one (or none)."""

    def __init__(self, location: str):
        super().__init__()
        self.location = location  # "mh_adapter" | "output_adapter"
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None

    def forward(self, hidden_states, input_tensor, layer_norm=None):
        if self.active is not None and self.active in self.adapters:
            return self.adapters[self.active].layer_forward(hidden_states, input_tensor, layer_norm)
        hidden_states = hidden_states + input_tensor
        return layer_norm(hidden_states) if layer_norm is not None else hidden_states

    def extra_repr(self) -> str:
        return f"location={self.location}, active={self.active}"


# ---------------------------------------------------------------------------------------------
# Host layers


def _bert_output_forward(self, hidden_states, input_tensor):
    hidden_states = self.dense(hidden_states)
    hidden_states = self.dropout(hidden_states)
    return self._fastadapt_layer(hidden_states, input_tensor, self.LayerNorm)


def _llama_layer_forward(self, hidden_states, **kwargs):
    # transformers' LlamaDecoderLayer.forward (v5) with the two residual additions routed through
    # the adapter layers (no host LayerNorm there: the model is pre-norm). The attention gets the
    # layer's arguments as the model passed them (the cache is `cache` from transformers 5.24 on,
    # `past_key_values` before).
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    hidden_states = self.attention_adapters(hidden_states, residual, None)
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return self.output_adapters(hidden_states, residual, None)


def _is_bert_output(module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("dense", "dropout", "LayerNorm")) \
        and type(module).__name__.endswith(("SelfOutput", "Output")) and not type(module).__name__.endswith("Intermediate")


def _is_llama_layer(module) -> bool:
    return type(module).__name__.endswith("DecoderLayer") and all(
        isinstance(getattr(module, n, None), nn.Module)
        for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))


def _layer_index(name: str) -> Optional[int]:
    found = re.findall(r"\.(\d+)(?:\.|$)", "." + name)
    return int(found[0]) if found else None


def _sites(model: nn.Module):
    """(module name, host module, location, hidden size, layer index) of every adapter place."""
    for name, module in model.named_modules():
        if _is_llama_layer(module):
            hidden = module.post_attention_layernorm.weight.shape[0]
            yield name, module, "mh_adapter", hidden, _layer_index(name)
            yield name, module, "output_adapter", hidden, _layer_index(name)
        elif _is_bert_output(module) and isinstance(module.dense, nn.Linear):
            location = "mh_adapter" if type(module).__name__.endswith("SelfOutput") else "output_adapter"
            yield name, module, location, module.dense.out_features, _layer_index(name)


def _attach(host: nn.Module, location: str) -> BottleneckLayer:
    attr = "attention_adapters" if location == "mh_adapter" else "output_adapters"
    if _is_llama_layer(host):
        for a, loc in (("attention_adapters", "mh_adapter"), ("output_adapters", "output_adapter")):
            if not hasattr(host, a):
                host.add_module(a, BottleneckLayer(loc))
        if not hasattr(host, _ORIGINAL_FORWARD):
            setattr(host, _ORIGINAL_FORWARD, True)
            bind(host, "forward", _llama_layer_forward)
        return getattr(host, attr)
    if not hasattr(host, attr):
        host.add_module(attr, BottleneckLayer(location))
        # One BERT output module hosts one place; the forward reaches it under a fixed name.
        object.__setattr__(host, "_fastadapt_layer", getattr(host, attr))
        setattr(host, _ORIGINAL_FORWARD, True)
        bind(host, "forward", _bert_output_forward)
    return getattr(host, attr)


def _layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, BottleneckLayer):
            yield name, module


# ---------------------------------------------------------------------------------------------
# Public API


def add_adapter(model: nn.Module, name: str, config=None, *, set_active: bool = True,
                freeze_base: bool = True) -> list[str]:
    """Insert a bottleneck adapter called ``name`` into every supported layer of ``model``.

    ``config``: a :class:`~fastadapt.nn.bottleneck.BnConfig`, a preset name ("pfeiffer" /
    "seq_bn", "houlsby" / "double_seq_bn", "parallel" / "par_bn"), a dict of ``adapters``' option
    names, or an ``adapters`` config object. Adapters are created in the dtype and on the device of
    the host's weights. With ``freeze_base`` every parameter that is not an adapter's stops
    requiring grad; with ``set_active`` the new adapter becomes the active one.

    Returns the names of the modules that received the adapter. Raises if ``name`` exists already
    or no supported layer is found.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    config = resolve_config(config)
    _distributed.check_not_wrapped(model, "add_adapter")
    if name in list_adapters(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model")
    placed = []
    for mod_name, host, location, hidden, layer in list(_sites(model)):
        if not getattr(config, location) or (layer is not None and layer in config.leave_out):
            continue
        ref = next(host.parameters())
        adapter = BottleneckAdapter(hidden, config, down_sample=config.bottleneck_size(hidden, layer),
                                    device=ref.device, dtype=ref.dtype)
        _attach(host, location).adapters[name] = adapter
        placed.append(f"{mod_name}:{location}")
    if not placed:
        raise ValueError("no supported layer found for a bottleneck adapter (BERT-style *Output modules or "
                         "Llama-style *DecoderLayer modules) or the config places it nowhere")
    model._fastadapt_adapter_configs = {**getattr(model, "_fastadapt_adapter_configs", {}), name: config}
    if freeze_base:
        adapter_params = {id(p) for _, layer in _layers(model) for p in layer.parameters()}
        for p in model.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
    if set_active:
        set_active_adapter(model, name)
    return placed


def list_adapters(model: nn.Module) -> list[str]:
    names = []
    for _, layer in _layers(model):
        names += [n for n in layer.adapters if n not in names]
    return names


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the active adapter everywhere (``None``: run the base model). Only the active
    adapter's parameters require grad."""
    if name is not None and name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    for _, layer in _layers(model):
        layer.active = name
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n == name)


set_active = set_active_adapter


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of adapter ``name`` (the parameters themselves, as sharded as the model is),
    keyed by their full name in ``model``."""
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    out = {}
    for layer_name, layer in _layers(model):
        if name in layer.adapters:
            # Every name of a shared submodule, as state_dict() keys it (adapter_down.0 is adapter_norm_before).
            for k, v in layer.adapters[name].named_parameters(remove_duplicate=False):
                out[f"{layer_name}.adapters.{name}.{k}"] = v
    return out


def save_adapter(model: nn.Module, name: str, path: str) -> None:
    """Write adapter ``name`` to a safetensors file (its config in the file's metadata).

    Under FSDP2 or DeepSpeed ZeRO-3 every rank must call it: the shards are gathered, rank 0 writes."""
    from safetensors.torch import save_file
    config = getattr(model, "_fastadapt_adapter_configs", {}).get(name)
    # Shared submodules (adapter_down.0 is adapter_norm_before) appear twice: keep one copy each.
    params = {k: v for k, v in adapter_state_dict(model, name).items() if ".adapter_norm_before." not in k}
    state = _distributed.full_tensors(params)
    meta = {"fastadapt_adapter_name": name, "fastadapt_config": json.dumps(config.to_dict() if config else {})}
    if _distributed.writes_files():
        save_file(state, path, metadata=meta)


def load_adapter(model: nn.Module, path: str, name: Optional[str] = None, *, set_active: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter`; it is created first if the model lacks it.
    Returns its name. Every tensor in the file must find its parameter and vice versa. Into a model
    sharded by FSDP2 or ZeRO-3 (every rank calls), each rank keeps its shard of the file's tensors."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved_name = meta.get("fastadapt_adapter_name")
    if saved_name is None:
        raise ValueError(f"{path} was not written by fastadapt.save_adapter (no adapter name in its metadata)")
    name = name or saved_name
    if name not in list_adapters(model):
        add_adapter(model, name, BnConfig.from_dict(json.loads(meta.get("fastadapt_config", "{}"))),
                    set_active=False)
    renamed = {k.replace(f".adapters.{saved_name}.", f".adapters.{name}."): v for k, v in tensors.items()}
    params = {k: v for k, v in adapter_state_dict(model, name).items() if ".adapter_norm_before." not in k}
    missing = sorted(set(params) - set(renamed))
    unexpected = sorted(set(renamed) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter file {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in renamed.items():
        if tuple(_distributed.full_shape(params[k])) != tuple(v.shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the file, "
                             f"{tuple(_distributed.full_shape(params[k]))} in the model")
    _distributed.copy_full(params, renamed)
    if set_active:
        set_active_adapter(model, name)
    return name


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; host layers left with no adapter get their own forward back."""
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    for _, layer in list(_layers(model)):
        if name in layer.adapters:
            del layer.adapters[name]
        if layer.active == name:
            layer.active = None
    for _, module in list(model.named_modules()):
        if not hasattr(module, _ORIGINAL_FORWARD):
            continue
        layers = [getattr(module, a) for a in ("attention_adapters", "output_adapters") if hasattr(module, a)]
        if all(len(layer.adapters) == 0 for layer in layers):
            for a in ("attention_adapters", "output_adapters"):
                if hasattr(module, a):
                    delattr(module, a)
            module.__dict__.pop("_fastadapt_layer", None)
            module.__dict__.pop("forward", None)  # back to the class's forward
            delattr(module, _ORIGINAL_FORWARD)
    configs = getattr(model, "_fastadapt_adapter_configs", {})
    configs.pop(name, None)
