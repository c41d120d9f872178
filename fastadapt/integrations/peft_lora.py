"""PEFT's LoRA ``Linear`` layers on the fused op.

Patching replaces the instance's ``forward`` only: PEFT keeps its parameters, adapters,
``set_adapter``, ``disable_adapter``, ``merge_and_unload`` and ``save_pretrained``. The fused op
serves what real training setups run: autocast (the HF Trainer's ``bf16=True`` / ``fp16=True``),
float32 adapters on a half-precision base (PEFT's ``autocast_adapter_dtype``), GPT-2 / GPT-J
``Conv1D`` bases (``fan_in_fan_out``), several active adapters (summed, as PEFT sums them),
``lora_bias`` and rsLoRA; and DoRA (``use_dora=True``) on ``fastadapt::dora_linear`` when its
adapter is the only active one. QLoRA layers (bitsandbytes NF4 bases,
:mod:`fastadapt.integrations.peft_qlora`) run ``fastadapt::qlora_linear`` (plain LoRA adapters only).

Mixed batches (``model(..., adapter_names=[one name per sequence])``, ``"__base__"`` for the base
model) run ``fastadapt::multi_lora_linear``: one call per layer for every adapter of the batch,
in inference and, unlike PEFT, in training too: patching lets the ``LoraModel`` accept
``adapter_names`` in training mode, so several adapters train at once on one batch, each on its
own sequences, with its own dropout. Several active adapters on every row are one
``fastadapt::lora_linear`` call on their concatenated ranks, each adapter with its own dropout mask
in training, as PEFT's dropout module per adapter gives.

What it does not serve runs PEFT's own forward, which the patch report lists per layer, the first
such call warns about, and ``patch(model, strict=True)`` refuses: LoRA variants other than DoRA,
a DoRA adapter active together with others (PEFT applies each DoRA adapter to the output of the
ones before it), ``adapter_names`` naming a LoRA variant or ``lora_bias`` adapter, and an input
whose dtype differs from the base weight's outside autocast (PEFT's own forward raises there).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastadapt.integrations import PatchReport, bind_forward, is_bound, peft_qlora, report_of, unbind_forward
from fastadapt.nn.multi_lora import mixed_batch
from fastadapt.ops._autocast import autocast_dtype
from fastadapt.ops.dora import dora_linear
from fastadapt.ops.lora import lora_linear

_MARK = "_fastadapt_lora_patched"
_MODEL_MARK = "_fastadapt_lora_mixed_training"

# The call-time conditions every patched layer shares (the report adds each layer's own).
_ALWAYS = ("extra forward arguments other than adapter_names; adapter_names naming a LoRA variant or "
           "lora_bias adapter; an input dtype other than the base weight's outside autocast")


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
    if peft_qlora.is_qlora(module):
        return peft_qlora.static_reasons(module)
    if type(module) is not lora_layer.Linear:
        return [f"{type(module).__module__}.{type(module).__name__} is not a plain LoRA Linear"]
    base = module.get_base_layer()
    if type(base) is not nn.Linear and type(base) is not _conv1d_class():
        return [f"base layer is {type(base).__name__}, not nn.Linear or Conv1D (quantized or custom)"]
    return []


def _dora_adapters(module) -> list[str]:
    """The adapters of ``module`` that are DoRA (PEFT's ``DoraLinearVariant``, nothing derived)."""
    from peft.tuners.lora.variants import DoraLinearVariant
    return sorted(a for a, v in module.lora_variant.items() if type(v) is DoraLinearVariant)


def _dropout_p(module, name: str) -> float:
    dropout = module.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _layer_fallbacks(module) -> str:
    """The call-time conditions under which this patched layer still runs PEFT's forward."""
    if peft_qlora.is_qlora(module):
        conditions = [peft_qlora.ALWAYS]
        if module.lora_variant:
            conditions.append(f"a LoRA variant adapter {sorted(module.lora_variant)} (DoRA included) is active")
        return "; ".join(conditions)
    conditions = [_ALWAYS]
    dora = _dora_adapters(module)
    others = sorted(set(module.lora_variant) - set(dora))
    if others:
        conditions.append(f"a LoRA variant adapter {others} is active")
    if dora and len(module.lora_A) > 1:
        conditions.append(f"a DoRA adapter {dora} is active together with other adapters")
    return "; ".join(conditions)


def _dtype_reason(x, weight, compute_dtype) -> str | None:
    if compute_dtype is None and x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype} outside autocast"
    return None


def _call_reason(module, x, active, args, kwargs, weight, compute_dtype) -> str | None:
    """Why this call must run PEFT's own forward (None: the fused op serves it)."""
    qlora = peft_qlora.is_qlora(module)
    if args or kwargs:
        return "mixed-batch adapter_names on a QLoRA layer" if qlora and "adapter_names" in kwargs \
            else "extra forward arguments"
    if qlora and any(a in module.lora_variant for a in active):
        return f"LoRA variant adapter(s) {[a for a in active if a in module.lora_variant]} (DoRA, ...) on a QLoRA layer"
    dora = [a for a in active if a in _dora_adapters(module)] if module.lora_variant else []
    variants = [a for a in active if a in module.lora_variant and a not in dora]
    if variants:
        return f"LoRA variant adapter(s) {variants} (other than DoRA) active"
    if dora and len(active) > 1:
        return f"DoRA adapter(s) {dora} active together with other adapters (PEFT applies each to the sum before it)"
    if dora and module.lora_B[dora[0]].bias is not None:
        return "lora_bias on a DoRA adapter"
    if qlora:
        return peft_qlora.call_reason(module.get_base_layer(), x, compute_dtype)
    return _dtype_reason(x, weight, compute_dtype)


def _mixed_batch_reason(module, x, present, weight, compute_dtype) -> str | None:
    """Why this mixed-batch call must run PEFT's own forward (None: the fused op serves it)."""
    variants = [a for a in present if a in module.lora_variant]
    if variants:
        return f"adapter_names names LoRA variant adapter(s) {variants} (DoRA, ...)"
    biased = [a for a in present if module.lora_B[a].bias is not None]
    if biased:
        return f"adapter_names names lora_bias adapter(s) {biased} (a bias per adapter's rows)"
    return _dtype_reason(x, weight, compute_dtype)


def _mixed_batch_forward(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's mixed-batch forward (one adapter name per sequence, ``"__base__"`` for none) as one
    ``fastadapt::multi_lora_linear`` call, in inference or training."""
    self._check_forward_args(x, adapter_names=adapter_names)  # PEFT's own checks and errors
    named = set(adapter_names)
    # Adapters this layer does not have run the base layer alone, as in PEFT.
    present = [a for a in self.lora_A if a in named]
    name, report = report_of(self)
    base = self.get_base_layer()
    weight = base.weight
    compute_dtype = autocast_dtype(x)
    reason = _mixed_batch_reason(self, x, present, weight, compute_dtype)
    if not present or reason is not None:
        if reason is not None:
            report.fall_back(name, reason)
        return type(self).forward(self, x, adapter_names=adapter_names)
    report.fused()
    if type(base) is not nn.Linear:  # Conv1D keeps (in, out): the op takes the transposed view, no copy
        weight = weight.t()
    adapters = {a: (self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], _dropout_p(self, a))
                for a in present}
    return mixed_batch(x, weight, base.bias, adapters, adapter_names, self.training)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    qlora = peft_qlora.is_qlora(self)
    if not self.disable_adapters and not args and kwargs.keys() == {"adapter_names"} \
            and kwargs["adapter_names"] is not None and not qlora:
        return _mixed_batch_forward(self, x, kwargs["adapter_names"])
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
    if type(base) is not nn.Linear and not qlora:  # Conv1D keeps (in, out): the op takes the transposed view
        weight = weight.t()
    if active[0] in self.lora_variant:  # DoRA, the only active adapter (_call_reason)
        adapter = active[0]
        return dora_linear(x, weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, self.scaling[adapter], base.bias,
                           dropout_p=_dropout_p(self, adapter), training=self.training)
    dtype = compute_dtype or x.dtype
    lora_B = [self.lora_B[a] for a in active]
    if len(active) == 1:
        lora_A, scaling = self.lora_A[active[0]].weight, self.scaling[active[0]]
        up = lora_B[0].weight
        dropout_p, ranks = _dropout_p(self, active[0]), None
    else:
        # PEFT sums the adapters' updates: one rank-(r1 + r2 + ...) update, each adapter's scaling
        # folded into its columns of B (in the adapter's dtype, then rounded once to the compute
        # dtype), each adapter's dropout drawing its own mask over x (its rank segment's).
        lora_A = torch.cat([self.lora_A[a].weight.to(dtype) for a in active])
        up = torch.cat([(b.weight * self.scaling[a]).to(dtype) for a, b in zip(active, lora_B)], dim=1)
        scaling = 1.0
        dropout_p = [_dropout_p(self, a) for a in active]
        ranks = [self.lora_A[a].weight.shape[0] for a in active]
    bias = base.bias
    lora_bias = [(b.bias, self.scaling[a]) for a, b in zip(active, lora_B) if b.bias is not None]
    if lora_bias:  # lora_bias: lora_B's bias, scaled like the rest of lora_B's output
        extra = sum(b * s for b, s in lora_bias)
        bias = (extra if bias is None else bias + extra).to(dtype)
    if qlora:
        return peft_qlora.fused(base, x, lora_A, up, scaling, bias, dropout_p, self.training, ranks)
    return lora_linear(x, weight, lora_A, up, scaling, bias, dropout_p=dropout_p, training=self.training, ranks=ranks)


def _modules_to_save_class():
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return ModulesToSaveWrapper


@contextlib.contextmanager
def _forward_hooks_in_training(self, *args, **kwargs):
    """``LoraModel._enable_peft_forward_hooks``, which hands ``adapter_names`` to every LoRA layer,
    without its refusal in training mode: PEFT refuses because its mixed-batch loop was written for
    inference; the patched layers train every adapter of the batch (fused). Only this object's own
    ``training`` flag is lowered, while PEFT checks it; its submodules keep theirs.

    Refused with gradient checkpointing: PEFT hands ``adapter_names`` to the layers only inside
    this context, and a checkpointed layer's recomputation in the backward runs after it, with no
    adapter_names, so it would recompute other activations than the forward's (silently)."""
    if kwargs.get("adapter_names") is not None and self.training and torch.is_grad_enabled() \
            and any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
        raise ValueError("adapter_names in training with gradient checkpointing is not supported: the backward's "
                         "recomputation of a checkpointed layer would run without adapter_names. Disable gradient "
                         "checkpointing (model.gradient_checkpointing_disable()) for mixed-adapter training.")
    with contextlib.ExitStack() as stack:
        training = self.training
        self.training = False
        try:
            stack.enter_context(type(self)._enable_peft_forward_hooks(self, *args, **kwargs))
        finally:
            self.training = training
        yield


def _lora_model_class():
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return None
    return LoraModel


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
            param_wrapper = getattr(lora_layer, "ParamWrapper", ())  # target_parameters: fastadapt's peft_moe
            if not isinstance(module, lora_layer.LoraLayer) or isinstance(module, param_wrapper):
                continue
            if is_bound(module, _MARK):
                report.skipped.append((name, "already patched"))
                continue
            reasons = _static_reasons(module, lora_layer)
            if reasons:
                report.skipped.append((name, "; ".join(reasons)))
                continue
            base = type(module.get_base_layer()).__name__
            dora = _dora_adapters(module)
            ops = [] if len(dora) == len(module.lora_A) else ["fastadapt::lora_linear (adapter_names: multi_lora_linear)"]
            if dora:
                ops.append(f"fastadapt::dora_linear (DoRA adapter(s) {dora})")
            if peft_qlora.is_qlora(module):
                ops = ["fastadapt::qlora_linear (NF4 read in place)"]
            bind_forward(module, _fused_forward, _MARK, name=name, report=report,
                         what=f"peft LoRA {base} -> {', '.join(ops)}", fallbacks=_layer_fallbacks(module))
        lora_model = _lora_model_class()
        for module in model.modules():
            # The LoraModel's own __dict__: a PeftModel forwards attribute reads to it.
            if lora_model is not None and isinstance(module, lora_model) and _MODEL_MARK not in module.__dict__:
                module._enable_peft_forward_hooks = _forward_hooks_in_training.__get__(module)
                setattr(module, _MODEL_MARK, True)

    def unpatch(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in model.named_modules():
            if is_bound(module, _MARK):
                unbind_forward(module, _MARK)
                report.patched.append((name, "restored PEFT's forward"))
            if _MODEL_MARK in module.__dict__:
                del module._enable_peft_forward_hooks
                delattr(module, _MODEL_MARK)


PATCHER = _PeftLoraPatcher()
