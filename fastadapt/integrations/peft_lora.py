"""PEFT's LoRA ``Linear`` layers on the fused op.

Patching replaces the instance's ``forward`` only: PEFT keeps its parameters, adapters,
``set_adapter``, ``disable_adapter``, ``merge_and_unload`` and ``save_pretrained``. The fused op
serves what real training setups run: autocast (the HF Trainer's ``bf16=True`` / ``fp16=True``),
float32 adapters on a half-precision base (PEFT's ``autocast_adapter_dtype``), GPT-2 / GPT-J
``Conv1D`` bases (``fan_in_fan_out``), several active adapters (summed, as PEFT sums them),
``lora_bias`` and rsLoRA. What it does not serve runs PEFT's own forward, which the patch report
lists per layer, the first such call warns about, and ``patch(model, strict=True)`` refuses:
LoRA variants (DoRA, ...), mixed-batch ``adapter_names``, several active adapters with dropout in
training (each adapter draws its own mask), and an input whose dtype differs from the base
weight's outside autocast (PEFT's own forward raises there).
"""

from __future__ import annotations

import torch
from torch import nn

from fastadapt.integrations import PatchReport, bind_forward, is_bound, report_of, unbind_forward
from fastadapt.ops._autocast import autocast_dtype
from fastadapt.ops.lora import lora_linear

_MARK = "_fastadapt_lora_patched"

# The call-time conditions every patched layer shares (the report adds each layer's own).
_ALWAYS = ("mixed-batch adapter_names (or other extra forward arguments); "
           "an input dtype other than the base weight's outside autocast")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # PEFT without transformers: no Conv1D bases either
        return None
    return Conv1D


def _static_reasons(module, lora_layer) -> list[str]:
    """Why a PEFT LoRA layer can never take the fused path (checked once, at patch time)."""
    if isinstance(module, lora_layer.Embedding):
        return ["LoRA on an embedding runs PEFT's forward (a gather plus a rank-r lookup: no GEMM to fuse into)"]
    if type(module) is not lora_layer.Linear:
        return [f"{type(module).__module__}.{type(module).__name__} is not a plain LoRA Linear"]
    base = module.get_base_layer()
    if type(base) is not nn.Linear and type(base) is not _conv1d_class():
        return [f"base layer is {type(base).__name__}, not nn.Linear or Conv1D (quantized or custom)"]
    return []


def _dropout_p(module, name: str) -> float:
    dropout = module.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _layer_fallbacks(module) -> str:
    """The call-time conditions under which this patched layer still runs PEFT's forward."""
    conditions = [_ALWAYS]
    if module.lora_variant:
        conditions.append(f"a LoRA variant adapter {sorted(module.lora_variant)} is active")
    if len(module.lora_A) > 1 and any(isinstance(d, nn.Dropout) and d.p > 0 for d in module.lora_dropout.values()):
        conditions.append("several adapters are active together with dropout in training")
    return "; ".join(conditions)


def _call_reason(module, x, active, args, kwargs, weight, compute_dtype) -> str | None:
    """Why this call must run PEFT's own forward (None: the fused op serves it)."""
    if args or kwargs:
        return "mixed-batch adapter_names" if "adapter_names" in kwargs else "extra forward arguments"
    variants = [a for a in active if a in module.lora_variant]
    if variants:
        return f"LoRA variant adapter(s) {variants} (DoRA, ...) active"
    if len(active) > 1 and any(_dropout_p(module, a) > 0 for a in active):
        return "several active adapters with dropout in training (each adapter draws its own mask)"
    if compute_dtype is None and x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype} outside autocast"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or not active:
        return type(self).forward(self, x, *args, **kwargs)  # the base layer alone: nothing to fuse
    name, report = report_of(self)
    base = self.get_base_layer()
    weight = base.weight
    compute_dtype = autocast_dtype(x)
    reason = _call_reason(self, x, active, args, kwargs, weight, compute_dtype)
    if reason is not None:
        report.fall_back(name, reason)
        return type(self).forward(self, x, *args, **kwargs)
    report.fused()
    if type(base) is not nn.Linear:  # Conv1D keeps (in, out): the op takes the transposed view, no copy
        weight = weight.t()
    dtype = compute_dtype or x.dtype
    lora_B = [self.lora_B[a] for a in active]
    if len(active) == 1:
        lora_A, scaling = self.lora_A[active[0]].weight, self.scaling[active[0]]
        up = lora_B[0].weight
    else:
        # PEFT sums the adapters' updates: one rank-(r1 + r2 + ...) update, each adapter's scaling
        # folded into its columns of B (in the adapter's dtype, then rounded once to the compute dtype).
        lora_A = torch.cat([self.lora_A[a].weight.to(dtype) for a in active])
        up = torch.cat([(b.weight * self.scaling[a]).to(dtype) for a, b in zip(active, lora_B)], dim=1)
        scaling = 1.0
    bias = base.bias
    lora_bias = [(b.bias, self.scaling[a]) for a, b in zip(active, lora_B) if b.bias is not None]
    if lora_bias:  # lora_bias: lora_B's bias, scaled like the rest of lora_B's output
        extra = sum(b * s for b, s in lora_bias)
        bias = (extra if bias is None else bias + extra).to(dtype)
    # One dropout per call: several adapters reach here only without active dropout.
    return lora_linear(x, weight, lora_A, up, scaling, bias, dropout_p=_dropout_p(self, active[0]),
                       training=self.training)


def _modules_to_save_class():
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return ModulesToSaveWrapper


class _PeftLoraPatcher:
    name = "peft-lora"

    def patch(self, model: nn.Module, report: PatchReport) -> None:
        try:
            from peft.tuners.lora import layer as lora_layer
        except ImportError:
            return  # without peft there are no PEFT LoRA layers to patch
        to_save = _modules_to_save_class()
        for name, module in model.named_modules():
            if to_save is not None and isinstance(module, to_save):
                report.skipped.append((name, "modules_to_save: a trainable copy of the whole module, run as it is "
                                             "(no adapter to fuse)"))
                continue
            if not isinstance(module, lora_layer.LoraLayer):
                continue
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            reasons = _static_reasons(module, lora_layer)
            if reasons:
                report.skipped.append((name, "; ".join(reasons)))
                continue
            base = type(module.get_base_layer()).__name__
            bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                         what=f"peft LoRA {base} -> fastadapt::lora_linear", fallbacks=_layer_fallbacks(module))

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                report.patched.append((name, "restored PEFT's forward"))


PATCHER = _PeftLoraPatcher()
