"""PEFT's LoRA ``Linear`` layers on the fused op.

Patching replaces the instance's ``forward`` only: PEFT keeps its parameters, adapters,
``set_adapter``, ``disable_adapter``, ``merge_and_unload`` and ``save_pretrained``. Whatever the
fused op does not serve at call time (several active adapters, DoRA or other variants, a LoRA bias,
mixed-batch ``adapter_names``, autocast, a base/input dtype mismatch) runs PEFT's own forward, so a
patched model computes what the unpatched one does.
"""

from __future__ import annotations


import torch
from torch import nn

from fastadapt.integrations import PatchReport, bind_forward, is_bound, unbind_forward
from fastadapt.ops.lora import lora_linear

_MARK = "_fastadapt_lora_patched"


def _static_reasons(module, lora_layer) -> list[str]:
    """Why a PEFT LoRA layer can never take the fused path (checked once, at patch time)."""
    if type(module) is not lora_layer.Linear:
        return [f"{type(module).__module__}.{type(module).__name__} is not a plain LoRA Linear"]
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return [f"base layer is {type(base).__name__}, not nn.Linear (quantized or custom)"]
    if module.fan_in_fan_out:
        return ["fan_in_fan_out weights (GPT-2 Conv1D) are not supported"]
    return []


def _call_reason(module, x, args, kwargs) -> str | None:
    """Why this call must run PEFT's own forward (None: the fused op serves it)."""
    if args or kwargs:
        return "extra forward arguments"
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return "not exactly one active adapter"
    name = active[0]
    if name in module.lora_variant:
        return "LoRA variant (DoRA, ...)"
    if module.lora_B[name].bias is not None:
        return "lora_bias"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    if x.dtype != module.get_base_layer().weight.dtype:
        return "input dtype differs from the base weight's"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if _call_reason(self, x, args, kwargs) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return lora_linear(x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], base.bias, dropout_p=p, training=dropout.training)


class _PeftLoraPatcher:
    name = "peft-lora"

    def patch(self, model: nn.Module, report: PatchReport) -> None:
        try:
            from peft.tuners.lora import layer as lora_layer
        except ImportError:
            return  # without peft there are no PEFT LoRA layers to patch
        for name, module in model.named_modules():
            if not isinstance(module, lora_layer.LoraLayer):
                continue
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            reasons = _static_reasons(module, lora_layer)
            if reasons:
                report.skipped.append((name, "; ".join(reasons)))
                continue
            bind_forward(module, _fused_forward, _MARK)
            variants = sorted(module.lora_variant)
            note = f" (PEFT's forward for variant adapters {variants})" if variants else ""
            report.patched.append((name, f"peft LoRA Linear -> fastadapt::lora_linear{note}"))

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                report.patched.append((name, "restored PEFT's forward"))


PATCHER = _PeftLoraPatcher()
