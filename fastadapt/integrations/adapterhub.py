"""AdapterHub ``adapters``: bottleneck adapters on ``fastadapt::bottleneck_adapter``, plain LoRA on
``fastadapt::lora_linear``; every other method is reported, and its calls counted as fallbacks.

Patching replaces instance methods only (``forward`` of the adapter modules and LoRA layers,
``compose_single`` / ``compose_fuse`` of each ``BottleneckLayer``): the library keeps its
parameters, its composition blocks, ``set_active_adapters``, ``save_adapter`` and so on, and a
``copy.deepcopy`` of a patched model is a patched model of its own (no reference into the original).

Bottleneck adapters: the patched forward returns ``(output, None, None)``: the bottleneck activation
and the up-projection, which the library's own forward also returns, are never materialised. The
only consumer of those is AdapterFusion (``compose_fuse`` stacks each adapter's up-projection), so
an adapter called by ``compose_fuse`` (a ``Fuse`` block of the active setup, not merely a fusion
layer present in the layer) runs the library's forward. An adapter added or loaded after
``patch()`` is patched at its first call (its layer's ``compose_single`` checks).

Under ``torch.autocast`` the patched adapter computes what the library's does there: the
projections in the region's dtype, the adapter LayerNorms with float32 statistics, and the output
in the dtype the library's type promotion gives (see :func:`_autocast_call`).

Not served (listed in the report as left alone; their calls, when one of their adapters is active,
counted as fallbacks, and refused under ``strict``): prefix tuning (the prefix is concatenated in
each model's own attention code), gated LoRA (UniPELT), DoRA, LoRA on merged or quantized layers
or under a composition block, invertible adapters, ReFT and prompt tuning.

Tested against adapters 1.3 with the transformers it pins (``tests/test_adapterhub.py``, run by
``.ci/run`` in a venv of its own: ``.ci/constraints-adapterhub.txt``).
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from fastadapt.integrations import (PatchReport, attach, bind, bind_forward, is_bound, mark_patched, report_of,
                                    unbind_forward, unmark)
from fastadapt.ops.bottleneck import bottleneck_adapter
from fastadapt.ops.lora import lora_linear

_MARK = "_fastadapt_bottleneck_patched"
_LAYER_MARK = "_fastadapt_adapterhub_layer"
_LORA_MARK = "_fastadapt_adapterhub_lora"

# Set while a BottleneckLayer's compose_fuse runs: its adapters' up-projections are needed.
_IN_FUSE = contextvars.ContextVar("fastadapt_adapterhub_in_fuse", default=False)


def _activation_name(act_module) -> str | None:
    """Our name for an ``Activation_Function_Class`` (its ``f`` is a transformers ACT2FN module,
    ``nn.Identity`` or ``F.leaky_relu``), or None if unknown."""
    f = getattr(act_module, "f", act_module)
    if f is torch.nn.functional.leaky_relu:
        return "leakyrelu"
    name = type(f).__name__
    if name == "GELUActivation":  # transformers' "gelu": exact unless built with use_gelu_python
        return "gelu"
    table = {"ReLU": "relu", "GELU": "gelu", "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
             "GELUTanh": "gelu_tanh", "FastGELUActivation": None, "SiLU": "silu", "SiLUActivation": "silu",
             "Tanh": "tanh", "LinearActivation": "identity", "Identity": "identity", "LeakyReLU": None}
    if name == "GELU" and getattr(f, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name == "LeakyReLU":
        return "leakyrelu" if getattr(f, "negative_slope", None) == 0.01 else None
    return table.get(name)


def _static_reasons(module) -> list[str]:
    down = getattr(module, "adapter_down", None)
    if not isinstance(down, nn.Sequential):
        return ["no adapter_down Sequential"]
    layers = list(down)
    linear = layers[-2] if len(layers) >= 2 else None
    if type(linear) is not nn.Linear or type(getattr(module, "adapter_up", None)) is not nn.Linear:
        return ["projections are not nn.Linear (PHM layers)"]
    if getattr(module, "add_layer_norm_before", False) and type(layers[0]) is not nn.LayerNorm:
        return ["ln_before is not an nn.LayerNorm"]
    if _activation_name(layers[-1]) is None:
        return [f"activation {type(getattr(layers[-1], 'f', layers[-1])).__name__} is not supported"]
    if hasattr(module, "DropPath"):
        return ["stochastic_depth (DropPath) is not supported"]
    for ln in (getattr(module, "adapter_norm_before", None), getattr(module, "adapter_norm_after", None)):
        if ln is not None and (not ln.elementwise_affine or ln.bias is None):
            return ["adapter LayerNorm without affine weight and bias"]
    return []


# The call-time conditions _call_reason hands to the library, as the patch report lists them.
_FALLBACKS = ("gating scores requested; in a Fuse block (AdapterFusion); gating on a 1-D input; "
              "adapter LayerNorms with different eps")


def _call_reason(module, x, output_gating) -> str | None:
    if output_gating:
        return "gating scores requested"
    if _IN_FUSE.get():
        return "AdapterFusion needs the up-projection output"
    if module.use_gating and x.dim() < 2:
        return "gating on a 1-D input"
    if module.add_layer_norm_before and module.add_layer_norm_after \
            and module.adapter_norm_before.eps != module.adapter_norm_after.eps:
        return "adapter LayerNorms with different eps"
    return None


def _autocast_call(x, residual, scale, ln_after, residual_before_ln):
    """Inside ``torch.autocast(dtype=half)``, the library's adapter computes its projections in
    ``half`` (``nn.Linear``), its LayerNorms in float32 (autocast's fp32 policy) and everything else
    by type promotion. Returns the inputs for the fused op (``x`` and the residual in ``half``, the
    kernel's LayerNorm statistics are float32), the residual to add after it in a wider dtype
    (None if the op adds it), and the output dtype the library's forward would return:

    - ``up * scaling``: ``half``, or float32 with a learned / channel ``scaling`` (a float32 vector);
    - ``LN_after(...)``: float32;
    - ``... + residual``: promoted with the residual's dtype.

    A residual wider than ``half`` that is added after the adapter's output is added outside the op,
    in the wider dtype, as the library does (it is the residual stream: rounding it to ``half``
    would cost its precision); one inside ``LN_after`` is rounded to ``half`` for the op.
    """
    half = torch.get_autocast_dtype(x.device.type)
    out_dtype = half
    if scale is not None:
        out_dtype = torch.promote_types(out_dtype, scale.dtype)
    if ln_after:
        out_dtype = torch.float32
    after = None
    if residual is not None:
        out_dtype = torch.promote_types(out_dtype, residual.dtype)
        if residual.dtype != half and not (ln_after and residual_before_ln):
            residual, after = None, residual
        else:
            residual = residual.to(half)
    return x.to(half), residual, after, out_dtype


def _fused_forward(self, x, residual_input, output_gating=False):
    name, report = report_of(self)
    reason = _call_reason(self, x, output_gating)
    if reason is not None:
        report.fall_back(name, reason)
        return type(self).forward(self, x, residual_input, output_gating)
    report.fused()
    layers = list(self.adapter_down)
    down = layers[-2]
    lnb = (layers[0].weight, layers[0].bias) if self.add_layer_norm_before else None
    lna = (self.adapter_norm_after.weight, self.adapter_norm_after.bias) if self.add_layer_norm_after else None
    eps = layers[0].eps if lnb is not None else (self.adapter_norm_after.eps if lna is not None else 1e-5)
    learned = isinstance(self.scaling, torch.Tensor)
    parallel = type(self).__name__ == "ParallelAdapter"
    residual_before_ln = bool(self.adapter_residual_before_ln) and not parallel
    residual = None if parallel else residual_input
    gate = torch.sigmoid(self.gate(x)).mean(1) if self.use_gating else None  # nn.Linear: autocast as the library's
    z, after, out_dtype = x, None, None
    autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    if autocast:
        z, residual, after, out_dtype = _autocast_call(x, residual, self.scaling if learned else None, lna is not None,
                                                       residual_before_ln)
    # The op's inputs are cast already; inside, no backend's own ATen calls are autocast again.
    with torch.autocast(x.device.type, enabled=False):
        out = bottleneck_adapter(
            z, down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias, residual,
            activation=_activation_name(layers[-1]), scaling=1.0 if learned else float(self.scaling),
            scale=self.scaling if learned else None, ln_before=lnb, ln_after=lna,
            adapter_residual_before_ln=residual_before_ln, gate=gate, dropout_p=self.dropout.p,
            training=self.dropout.training, eps=eps)
    if autocast:
        out = out.to(out_dtype) if after is None else out.to(out_dtype) + after
    return out, None, None


def _bind_adapter(module, name: str, report: PatchReport, late: bool = False) -> None:
    when = " (added after fastadapt.patch(), patched at its first call)" if late else ""
    bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                 what=f"adapters {type(module).__name__} -> fastadapt::bottleneck_adapter{when}", fallbacks=_FALLBACKS)


def _compose_single(self, adapter_setup, state, lvl=0):
    """``BottleneckLayer.compose_single``, which calls one adapter: one not patched yet (added or
    loaded after ``patch()``) is patched now, or its call counted as a fallback."""
    adapter = self.adapters[adapter_setup]
    if not is_bound(adapter, _MARK):
        layer_name, report = report_of(self)
        name = f"{layer_name}.adapters.{adapter_setup}"
        reasons = _static_reasons(adapter)
        if reasons:
            report.fall_back(name, "; ".join(reasons))
        else:
            _bind_adapter(adapter, name, report, late=True)
    return type(self).compose_single(self, adapter_setup, state, lvl)


def _compose_fuse(self, *args, **kwargs):
    token = _IN_FUSE.set(True)
    try:
        return type(self).compose_fuse(self, *args, **kwargs)
    finally:
        _IN_FUSE.reset(token)


# ---------------------------------------------------------------------------------------------
# LoRA (``LoRAConfig``, UniPELT's LoRA part)


def _lora_reason(layer, setup):
    """(None, the LoRA module) when ``setup`` reduces, on this layer, to one plain LoRA; else (why, None)."""
    from adapters.composition import Stack
    from adapters.methods.lora import LoRA

    names = [setup] if isinstance(setup, str) else list(setup) if type(setup) is Stack else None
    if names is None or not all(isinstance(n, str) for n in names):
        return f"composition {type(setup).__name__}", None
    mine = [n for n in names if n in layer.loras]
    if len(mine) != 1:
        return "several LoRA adapters stacked", None
    lora = layer.loras[mine[0]]
    if type(lora) is not LoRA:
        return f"{type(lora).__name__} is not plain LoRA", None
    if lora.use_gating:
        return "gated LoRA (UniPELT)", None
    if lora.use_dora:
        return "DoRA", None
    return None, lora


_LORA_FALLBACKS = "a composition block over several LoRAs; gated LoRA (UniPELT); DoRA; LoRA variants; fan_in_fan_out"


def _lora_forward(self, input_states):
    setup = None if self.merged else self.get_active_setup()
    if setup is None:  # no active LoRA here (or merged into the weight): the plain linear
        return type(self).forward(self, input_states)
    name, report = report_of(self)
    reason, lora = _lora_reason(self, setup)
    if reason is None and self.fan_in_fan_out:
        reason = "fan_in_fan_out"
    if reason is not None:
        report.fall_back(name, reason)
        return type(self).forward(self, input_states)
    report.fused()
    dropout = lora.lora_dropout
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return lora_linear(input_states, self.weight, lora.lora_A, lora.lora_B, lora.scaling, self.bias, dropout_p=p,
                       training=bool(p) and dropout.training)


# ---------------------------------------------------------------------------------------------
# Everything else: reported, and counted at call time while one of its adapters is active.

_UNSERVED = {
    "PrefixTuningLayer": "prefix tuning is not fused (the prefix is concatenated in the model's own attention code)",
    "InvertibleAdapterLayer": "invertible adapters are not fused",
    "ReftLayer": "ReFT is not fused",
    "PromptTuningLayer": "prompt tuning is not fused",
}


def _unserved_reason(layer) -> str:
    return _UNSERVED.get(type(layer).__name__, f"{type(layer).__name__} is not fused")


def _unserved_forward(self, *args, **kwargs):
    if self.get_active_setup() is not None:
        name, report = report_of(self)
        report.fall_back(name, _unserved_reason(self))
    return type(self).forward(self, *args, **kwargs)


def _coupling_forward(self, *args, **kwargs):
    """An invertible adapter's coupling block, which the library calls only while it is active."""
    name, report = report_of(self)
    report.fall_back(name, _UNSERVED["InvertibleAdapterLayer"])
    return type(self).forward(self, *args, **kwargs)


def _left_alone(report: PatchReport, name: str, why: str) -> None:
    report.skipped.append((name, f"{why}; its calls run the library's forward"))


def _adapter_count(layer) -> int:
    try:
        return len(layer.adapter_modules)
    except (AttributeError, TypeError):
        return 0


class _AdapterHubPatcher:
    name = "adapters"
    library = "adapters"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        try:
            from adapters.methods.adapter_layer_base import AdapterLayerBase
            from adapters.methods.bottleneck import BottleneckLayer
            from adapters.methods.lora import LoRALinearTorch
            from adapters.methods.modeling import Adapter, GLOWCouplingBlock, NICECouplingBlock, ParallelAdapter
        except Exception as exc:  # not installed, or not importable next to this transformers
            if any(type(m).__module__.startswith("adapters.") for m in model.modules()):
                report.skipped.append(("adapters", f"adapters not installed or not importable ({type(exc).__name__}: {exc})"))
            return
        for name, module in model.named_modules(prefix=prefix):
            if type(module) in (Adapter, ParallelAdapter):
                if is_bound(module, _MARK):
                    report.skipped.append((name, "already patched"))
                elif reasons := _static_reasons(module):
                    report.skipped.append((name, "; ".join(reasons)))
                else:
                    _bind_adapter(module, name, report)
            if type(module) in (NICECouplingBlock, GLOWCouplingBlock) and _LAYER_MARK not in module.__dict__:
                # Invertible adapters in a model class's own ModuleDict (BERT's mixin), not in an adapter layer.
                setattr(module, _LAYER_MARK, True)
                attach(module, name, report)
                bind(module, "forward", _coupling_forward)
                _left_alone(report, name, _UNSERVED["InvertibleAdapterLayer"])
            if not isinstance(module, AdapterLayerBase) or _LAYER_MARK in module.__dict__:
                continue
            # Every adapter layer, with adapters or not yet: one added later is then served or counted.
            setattr(module, _LAYER_MARK, True)
            attach(module, name, report)
            if isinstance(module, BottleneckLayer):
                bind(module, "compose_single", _compose_single)
                bind(module, "compose_fuse", _compose_fuse)
            elif isinstance(module, LoRALinearTorch):
                bind(module, "forward", _lora_forward)
                if _adapter_count(module):
                    served = [n for n in module.loras if _lora_reason(module, n)[0] is None]
                    if served and not module.fan_in_fan_out:
                        mark_patched(module, _LORA_MARK, name=name, report=report, fallbacks=_LORA_FALLBACKS,
                                     what=f"adapters LoRA {sorted(served)} -> fastadapt::lora_linear")
                    else:
                        report.skipped.append((name, "LoRA: " + "; ".join(sorted(
                            {_lora_reason(module, n)[0] or "fan_in_fan_out" for n in module.loras}))))
            else:
                bind(module, "forward", _unserved_forward)
                if _adapter_count(module):
                    _left_alone(report, name, _unserved_reason(module))

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                report.patched.append((name, "restored adapters' forward"))
            if module.__dict__.pop(_LAYER_MARK, False):
                for attr in ("compose_single", "compose_fuse", "forward"):
                    module.__dict__.pop(attr, None)
                if is_bound(module, _LORA_MARK):
                    unmark(module, _LORA_MARK)
                    report.patched.append((name, "restored adapters' LoRA forward"))
                attach(module, None, None)


PATCHER = _AdapterHubPatcher()
