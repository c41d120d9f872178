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
Each such condition is one :class:`~fastadapt.integrations.Rule` (``_LORA_RULES`` and its
neighbours), from which both the report's text and the forward's check come. The forward is
chosen per layer kind at patch time (:func:`_lora_forward`, :func:`_qlora_forward`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from fastadapt.integrations import (PatchReport, Rule, bind, bind_forward, conditions, first_reason, is_bound,
                                    peft_qlora, report_of, unbind_forward)
from fastadapt.nn.multi_lora import mixed_batch
from fastadapt.ops._autocast import autocast_dtype
from fastadapt.ops.dora import dora_linear
from fastadapt.ops.lora import lora_linear

_MARK = "_fastadapt_lora_patched"
_MODEL_MARK = "_fastadapt_lora_mixed_training"


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
    qlora = peft_qlora.is_qlora(module)
    if not qlora and type(module) is not lora_layer.Linear:
        return [f"{type(module).__module__}.{type(module).__name__} is not a plain LoRA Linear"]
    inner, base = module.base_layer, module.get_base_layer()
    if inner is not base:
        # PEFT's mixed models stack tuners on one layer (LoRA on LoHa, LoKr, AdaLoRA...): PEFT adds
        # LoRA's update to what base_layer returns, the inner tuner's output, while the fused ops
        # compute the frozen product from the innermost weight and would drop the inner adapters.
        return [f"base_layer is {type(inner).__module__}.{type(inner).__name__}, another tuner's layer over the "
                f"{type(base).__name__} (a mixed model): the fused ops would drop its output"]
    if qlora:
        return peft_qlora.static_reasons(module)
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


class _Call(NamedTuple):
    """One call of a patched layer, as the rules read it."""

    module: nn.Module
    base: nn.Module  # the frozen layer
    x: torch.Tensor
    adapters: list[str]  # the active adapters of the layer; in a mixed batch, those adapter_names names
    extra: bool  # forward arguments besides x (a mixed batch's adapter_names excepted)
    kwargs: dict
    compute_dtype: torch.dtype | None  # autocast's


# --- The conditions under which a patched layer runs PEFT's forward. Each states itself in the patch
# report (for the adapters the layer has at patch time) and checks the calls, so the two agree.


def _other_variants(module, names) -> list[str]:
    if not module.lora_variant:  # asked at every call: most layers have no variant
        return []
    dora = _dora_adapters(module)
    return [a for a in names if a in module.lora_variant and a not in dora]


def _dora(call) -> list[str]:
    return [a for a in call.adapters if a in _dora_adapters(call.module)] if call.module.lora_variant else []


def _dora_with_bias(module) -> list[str]:
    return [a for a in _dora_adapters(module) if module.lora_B[a].bias is not None]


def _dtype_reason(call) -> str | None:
    weight = call.base.weight
    if call.compute_dtype is None and call.x.dtype != weight.dtype:
        return f"input dtype {call.x.dtype} differs from the base weight's {weight.dtype} outside autocast"
    return None


_EXTRA = Rule("extra forward arguments other than adapter_names",
              lambda call: "extra forward arguments" if call.extra else None)
_VARIANT = Rule(lambda m: f"a LoRA variant adapter {others} is active"
                if (others := _other_variants(m, sorted(m.lora_variant))) else None,
                lambda call: f"LoRA variant adapter(s) {variants} (other than DoRA) active"
                if (variants := _other_variants(call.module, call.adapters)) else None)
_DORA_WITH_OTHERS = Rule(
    lambda m: f"a DoRA adapter {dora} is active together with other adapters"
    if (dora := _dora_adapters(m)) and len(m.lora_A) > 1 else None,
    lambda call: f"DoRA adapter(s) {dora} active together with other adapters (PEFT applies each to the sum before it)"
    if (dora := _dora(call)) and len(call.adapters) > 1 else None)
_DORA_BIAS = Rule(lambda m: f"lora_bias on a DoRA adapter {biased}" if (biased := _dora_with_bias(m)) else None,
                  lambda call: "lora_bias on a DoRA adapter"
                  if (dora := _dora(call)) and call.module.lora_B[dora[0]].bias is not None else None)
_DTYPE = Rule("an input dtype other than the base weight's outside autocast", _dtype_reason)
_NAMED_VARIANT = Rule("adapter_names naming a LoRA variant adapter",
                      lambda call: f"adapter_names names LoRA variant adapter(s) {variants} (DoRA, ...)"
                      if (variants := [a for a in call.adapters if a in call.module.lora_variant]) else None)
_NAMED_BIAS = Rule("adapter_names naming a lora_bias adapter",
                   lambda call: f"adapter_names names lora_bias adapter(s) {biased} (a bias per adapter's rows)"
                   if (biased := [a for a in call.adapters if call.module.lora_B[a].bias is not None]) else None)
_QLORA_EXTRA = Rule("mixed-batch adapter_names (or other extra forward arguments)",
                    lambda call: None if not call.extra else "mixed-batch adapter_names on a QLoRA layer"
                    if "adapter_names" in call.kwargs else "extra forward arguments")
_QLORA_VARIANT = Rule(
    lambda m: f"a LoRA variant adapter {sorted(m.lora_variant)} (DoRA included) is active" if m.lora_variant else None,
    lambda call: f"LoRA variant adapter(s) {variants} (DoRA, ...) on a QLoRA layer"
    if (variants := [a for a in call.adapters if a in call.module.lora_variant]) else None)

_LORA_RULES = (_EXTRA, _VARIANT, _DORA_WITH_OTHERS, _DORA_BIAS, _DTYPE)
_MIXED_BATCH_RULES = (_NAMED_VARIANT, _NAMED_BIAS, _DTYPE)
_QLORA_RULES = (_QLORA_EXTRA, _QLORA_VARIANT, *peft_qlora.RULES)


def _mixed_batch_forward(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's mixed-batch forward (one adapter name per sequence, ``"__base__"`` for none) as one
    ``fastadapt::multi_lora_linear`` call, in inference or training."""
    self._check_forward_args(x, adapter_names=adapter_names)  # PEFT's own checks and errors
    named = set(adapter_names)
    # Adapters this layer does not have run the base layer alone, as in PEFT.
    present = [a for a in self.lora_A if a in named]
    if not present:
        return type(self).forward(self, x, adapter_names=adapter_names)
    base = self.get_base_layer()
    if not _served(self, _MIXED_BATCH_RULES, _Call(self, base, x, present, False, {}, autocast_dtype(x))):
        return type(self).forward(self, x, adapter_names=adapter_names)
    weight = base.weight
    if type(base) is not nn.Linear:  # Conv1D keeps (in, out): the op takes the transposed view, no copy
        weight = weight.t()
    adapters = {a: (self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], _dropout_p(self, a))
                for a in present}
    return mixed_batch(x, weight, base.bias, adapters, adapter_names, self.training)


def _served(self, rules, call: _Call) -> bool:
    """Whether the fused op serves ``call``; if not, it is reported as a fallback (or refused: strict)."""
    name, report = report_of(self)
    reason = first_reason(rules, call)
    if reason is not None:
        report.fall_back(name, reason)
        return False
    report.fused()
    return True


def _single_call(self, x, args, kwargs, rules):
    """(the call, or None where PEFT's forward runs it) for a call of the layer's active adapters."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or not active:
        return None  # the base layer alone: nothing to fuse
    call = _Call(self, self.get_base_layer(), x, active, bool(args or kwargs), kwargs, autocast_dtype(x))
    return call if _served(self, rules, call) else None


def _summed_adapters(self, active, dtype):
    """(lora_A, lora_B, scaling, dropout_p, ranks, bias): the active adapters as one fused call's
    arguments, the base bias plus their lora_bias."""
    lora_B = [self.lora_B[a] for a in active]
    if len(active) == 1:
        lora_A, up, scaling = self.lora_A[active[0]].weight, lora_B[0].weight, self.scaling[active[0]]
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
    bias = self.get_base_layer().bias
    lora_bias = [(b.bias, self.scaling[a]) for a, b in zip(active, lora_B) if b.bias is not None]
    if lora_bias:  # lora_bias: lora_B's bias, scaled like the rest of lora_B's output
        extra = sum(b * s for b, s in lora_bias)
        bias = (extra if bias is None else bias + extra).to(dtype)
    return lora_A, up, scaling, dropout_p, ranks, bias


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer on an nn.Linear or Conv1D: fastadapt::lora_linear, dora_linear (a DoRA adapter
    alone) or, with adapter_names, multi_lora_linear."""
    if not self.disable_adapters and not args and kwargs.keys() == {"adapter_names"} \
            and kwargs["adapter_names"] is not None:
        return _mixed_batch_forward(self, x, kwargs["adapter_names"])
    call = _single_call(self, x, args, kwargs, _LORA_RULES)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    weight, active = call.base.weight, call.adapters
    if type(call.base) is not nn.Linear:  # Conv1D keeps (in, out): the op takes the transposed view
        weight = weight.t()
    if active[0] in self.lora_variant:  # DoRA, the only active adapter (_LORA_RULES)
        adapter = active[0]
        return dora_linear(x, weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, self.scaling[adapter], call.base.bias,
                           dropout_p=_dropout_p(self, adapter), training=self.training)
    lora_A, up, scaling, dropout_p, ranks, bias = _summed_adapters(self, active, call.compute_dtype or x.dtype)
    return lora_linear(x, weight, lora_A, up, scaling, bias, dropout_p=dropout_p, training=self.training, ranks=ranks)


def _qlora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer on a bitsandbytes NF4 Linear4bit: fastadapt::qlora_linear."""
    call = _single_call(self, x, args, kwargs, _QLORA_RULES)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, up, scaling, dropout_p, ranks, bias = _summed_adapters(self, call.adapters, call.compute_dtype or x.dtype)
    return peft_qlora.fused(call.base, x, lora_A, up, scaling, bias, dropout_p, self.training, ranks)


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
    library = "peft"

    def patch(self, model: nn.Module, report: PatchReport, prefix: str = "") -> None:
        try:
            from peft.tuners.lora import layer as lora_layer
        except ImportError:
            return  # without peft there are no PEFT LoRA layers to patch
        to_save = _modules_to_save_class()
        for name, module in model.named_modules(prefix=prefix):
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
            if peft_qlora.is_qlora(module):
                forward, rules, ops = _qlora_forward, _QLORA_RULES, ["fastadapt::qlora_linear (NF4 read in place)"]
            else:
                dora = _dora_adapters(module)
                forward, rules = _lora_forward, _LORA_RULES + _MIXED_BATCH_RULES
                ops = [] if len(dora) == len(module.lora_A) else \
                    ["fastadapt::lora_linear (adapter_names: multi_lora_linear)"]
                if dora:
                    ops.append(f"fastadapt::dora_linear (DoRA adapter(s) {dora})")
            bind_forward(module, forward, _MARK, name=name, report=report,
                         what=f"peft LoRA {base} -> {', '.join(ops)}", fallbacks=conditions(rules, module))
        lora_model = _lora_model_class()
        for module in model.modules():
            # The LoraModel's own __dict__: a PeftModel forwards attribute reads to it.
            if lora_model is not None and isinstance(module, lora_model) and _MODEL_MARK not in module.__dict__:
                bind(module, "_enable_peft_forward_hooks", _forward_hooks_in_training)
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
