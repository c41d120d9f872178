"""AdapterHub ``adapters``' bottleneck adapters (``Adapter``, ``ParallelAdapter``) on the fused op.

Patching replaces the instance's ``forward`` only: the library keeps its parameters, its
composition blocks, ``set_active_adapters``, ``save_adapter`` and so on. The patched forward
returns ``(output, None, None)``: the bottleneck activation and the up-projection, which the
library's own forward also returns, are never materialised. The only consumer of those in
``adapters`` is AdapterFusion (``compose_fuse`` stacks each adapter's up-projection), so a call
made while the adapter's layer holds a fusion layer, or one asking for gating scores, runs the
library's own forward.

Written against the module layout of adapters 1.3 (``adapters/methods/modeling.py``). That
release pins transformers ~=4.57 and does not import next to the transformers 5 this package is
tested with, so the patcher is tested on a transcription of that layout, not on the library.
"""

from __future__ import annotations

import torch
from torch import nn

from fastadapt.integrations import ModuleRef, PatchReport, bind_forward, is_bound, report_of, unbind_forward
from fastadapt.ops.bottleneck import bottleneck_adapter

_MARK = "_fastadapt_bottleneck_patched"
_PARENT = "_fastadapt_parent_layer"


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
_FALLBACKS = ("gating scores requested; AdapterFusion on the layer; autocast; gating on a 1-D input; "
              "adapter LayerNorms with different eps")


def _call_reason(module, x, residual_input, output_gating) -> str | None:
    if output_gating:
        return "gating scores requested"
    parent = getattr(module, _PARENT, None)
    parent = parent() if parent is not None else None
    if parent is not None and len(getattr(parent, "adapter_fusion_layer", ())) > 0:
        return "AdapterFusion needs the up-projection output"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    if module.use_gating and x.dim() < 2:
        return "gating on a 1-D input"
    if module.add_layer_norm_before and module.add_layer_norm_after \
            and module.adapter_norm_before.eps != module.adapter_norm_after.eps:
        return "adapter LayerNorms with different eps"
    return None


def _fused_forward(self, x, residual_input, output_gating=False):
    name, report = report_of(self)
    reason = _call_reason(self, x, residual_input, output_gating)
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
    gate = torch.sigmoid(self.gate(x)).mean(1) if self.use_gating else None
    out = bottleneck_adapter(
        x, down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias,
        None if parallel else residual_input, activation=_activation_name(layers[-1]),
        scaling=1.0 if learned else float(self.scaling), scale=self.scaling if learned else None,
        ln_before=lnb, ln_after=lna, adapter_residual_before_ln=bool(self.adapter_residual_before_ln) and not parallel,
        gate=gate, dropout_p=self.dropout.p, training=self.dropout.training, eps=eps)
    return out, None, None


def _adapter_classes():
    from adapters.methods.modeling import Adapter, ParallelAdapter
    return Adapter, ParallelAdapter


class _AdapterHubPatcher:
    name = "adapters"
    library = "adapters"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        try:
            classes = _adapter_classes()
        except Exception as exc:  # not installed, or not importable next to this transformers
            if any(type(m).__module__.startswith("adapters.") for m in model.modules()):
                report.skipped.append(("adapters", f"adapters not installed or not importable ({type(exc).__name__}: {exc})"))
            return
        parents = {}
        for name, module in model.named_modules():
            for child in module.children():
                parents[id(child)] = module
        for name, module in model.named_modules(prefix=prefix):
            if type(module) not in classes:
                continue
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            reasons = _static_reasons(module)
            if reasons:
                report.skipped.append((name, "; ".join(reasons)))
                continue
            # The adapter sits in BottleneckLayer.adapters (a ModuleDict): its grandparent.
            holder = parents.get(id(module))
            layer = parents.get(id(holder)) if holder is not None else None
            if layer is not None:
                object.__setattr__(module, _PARENT, ModuleRef(layer))
            elif prefix:
                report.skipped.append((name, "added after patch(): the adapters layer it joined, whose AdapterFusion "
                                             "would need the library's forward, is out of the patcher's sight"))
                continue
            bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                         what=f"adapters {type(module).__name__} -> fastadapt::bottleneck_adapter",
                         fallbacks=_FALLBACKS)

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                module.__dict__.pop(_PARENT, None)
                report.patched.append((name, "restored adapters' forward"))


PATCHER = _AdapterHubPatcher()
