"""``fastadapt.nn.BottleneckAdapter``: AdapterHub's bottleneck adapter on the fused op.

The configuration names, the submodule layout and so the state-dict keys are those of the
``adapters`` library's ``Adapter`` (``adapter_down.0`` = Linear or, with ``ln_before``,
``adapter_down.0`` = LayerNorm and ``adapter_down.1`` = Linear; ``adapter_up``; ``scaling`` when
learned; ``adapter_norm_before/after``; ``gate``), so adapter weights move between the two as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import nn

from fastadapt import _distributed, dispatch
from fastadapt.ops.bottleneck import OP, bottleneck_adapter
from fastadapt.reference.bottleneck import canonical_activation

INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")


@dataclass
class BnConfig:
    """The bottleneck-adapter options of ``adapters.BnConfig`` (same names, same meaning).

    Placement: ``mh_adapter`` (after the attention block), ``output_adapter`` (after the FFN),
    ``is_parallel`` (beside the sublayer instead of after it), ``leave_out`` (layer indices).
    Core: ``reduction_factor`` (bottleneck = hidden // reduction_factor; a mapping may give
    per-layer values, keys ``"<layer>"`` and ``"default"``), ``non_linearity``, ``ln_before``,
    ``ln_after``, ``adapter_residual_before_ln``, ``scaling`` (float | "learned" | "channel"),
    ``use_gating``, ``dropout``, ``init_weights`` ("bert" | "mam_adapter" | "houlsby").
    Around the host layer: ``original_ln_before``, ``original_ln_after``, ``residual_before_ln``
    (True | False | "post_add").
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: Union[float, Mapping] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    use_gating: bool = False
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    dropout: float = 0.0
    leave_out: list = field(default_factory=list)

    def __post_init__(self):
        canonical_activation(self.non_linearity)  # raises on an unknown name
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"unknown init_weights {self.init_weights!r}; expected one of {INIT_SCHEMES}")
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(f"unknown scaling {self.scaling!r}; expected a float, 'learned' or 'channel'")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite float, 'learned' or 'channel', got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "BnConfig":
        """From a dict (or an ``adapters`` config's ``to_dict()``): unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def bottleneck_size(self, hidden_size: int, layer: Optional[int] = None) -> int:
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            key = str(layer) if layer is not None and str(layer) in rf else "default"
            if key not in rf:
                raise KeyError(f"reduction_factor has no entry for layer {layer} and no 'default'")
            rf = rf[key]
        if rf <= 0:
            raise ValueError(f"reduction_factor must be positive, got {rf}")
        return max(1, int(hidden_size // rf))


def SeqBnConfig(**overrides) -> BnConfig:
    """Pfeiffer et al. (2020): one adapter after the FFN, inside the host's residual/LayerNorm."""
    kw = dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
              adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=False,
              output_adapter=True, non_linearity="relu", reduction_factor=16)
    return BnConfig(**{**kw, **overrides})


def DoubleSeqBnConfig(**overrides) -> BnConfig:
    """Houlsby et al. (2019): adapters after the attention block and after the FFN, swish."""
    kw = dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
              adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=True,
              output_adapter=True, non_linearity="swish", reduction_factor=16)
    return BnConfig(**{**kw, **overrides})


def ParBnConfig(**overrides) -> BnConfig:
    """He et al. (2021): a parallel adapter beside the FFN, scaled by 4, MAM init (zero up)."""
    kw = dict(original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False,
              mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2,
              init_weights="mam_adapter", is_parallel=True, scaling=4.0)
    return BnConfig(**{**kw, **overrides})


PRESETS = {"seq_bn": SeqBnConfig, "pfeiffer": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig,
           "houlsby": DoubleSeqBnConfig, "par_bn": ParBnConfig, "parallel": ParBnConfig}


def resolve_config(config) -> BnConfig:
    """A BnConfig from a BnConfig, a preset name ("pfeiffer", "houlsby", "parallel", "seq_bn",
    "double_seq_bn", "par_bn"), a dict, or an ``adapters`` config object (anything with to_dict)."""
    if config is None:
        return SeqBnConfig()
    if isinstance(config, BnConfig):
        return config
    if isinstance(config, str):
        if config.lower() not in PRESETS:
            raise ValueError(f"unknown adapter preset {config!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[config.lower()]()
    if isinstance(config, Mapping):
        return BnConfig.from_dict(config)
    if hasattr(config, "to_dict"):
        return BnConfig.from_dict(config.to_dict())
    raise TypeError(f"cannot build a bottleneck adapter config from {type(config).__name__}")


class Activation(nn.Module):
    """Parameter-free stand-in for ``adapters``' ``Activation_Function_Class`` (the fused op
    applies the activation itself; this keeps the ``adapter_down`` layout and the name)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = canonical_activation(name)

    def forward(self, x):
        from fastadapt.reference.bottleneck import activation
        return activation(self.name, x)

    def extra_repr(self) -> str:
        return self.name


class BottleneckAdapter(nn.Module):
    """``adapters``' bottleneck ``Adapter`` with the whole core (LN_before, down-projection,
    activation, up-projection, scaling, dropout, gate, residual, LN_after) in one fused op.

    ``forward(z, residual_input)`` is ``Adapter.forward`` (returning only the output: the
    bottleneck activation is never materialised). ``layer_forward(hidden_states, input_tensor,
    layer_norm)`` is the full placement of one adapter in a host layer: ``pre_forward``, the core,
    ``post_forward``, as ``adapters``' ``BottleneckLayer`` runs a single active adapter.

    Shapes: z and residual_input (..., input_size); parameters in float32 by default (the op
    computes in z's dtype with fp32 accumulation and returns grads in the parameters' dtype).
    """

    def __init__(self, input_size: int, config=None, down_sample: Optional[int] = None, *, device=None,
                 dtype=None, **overrides):
        super().__init__()
        config = resolve_config(config)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        self.config = config
        self.input_size = input_size
        self.down_sample = max(1, down_sample if down_sample is not None else config.bottleneck_size(input_size))
        self.is_parallel = config.is_parallel
        self.add_layer_norm_before = config.ln_before
        self.add_layer_norm_after = config.ln_after
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        self.use_gating = config.use_gating
        self.residual_before_ln = config.residual_before_ln
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.non_linearity_name = canonical_activation(config.non_linearity)
        kw = dict(device=device, dtype=dtype)

        seq = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(input_size, **kw)
            seq.append(self.adapter_norm_before)
        seq.append(nn.Linear(input_size, self.down_sample, **kw))
        self.non_linearity = Activation(config.non_linearity)
        seq.append(self.non_linearity)
        self.adapter_down = nn.Sequential(*seq)
        self.adapter_up = nn.Linear(self.down_sample, input_size, **kw)
        if isinstance(config.scaling, str):
            n = 1 if config.scaling == "learned" else input_size
            self.scaling = nn.Parameter(torch.ones(n, **kw))
        else:
            self.scaling = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(input_size, **kw)
        if config.use_gating:
            self.gate = nn.Linear(input_size, 1, **kw)
        self.dropout = nn.Dropout(p=config.dropout)
        self.reset_parameters()

    @property
    def down(self) -> nn.Linear:
        return self.adapter_down[1 if self.add_layer_norm_before else 0]

    def reset_parameters(self) -> None:
        """The ``init_weights`` scheme of ``adapters``: "bert" (normal std 0.02, zero biases),
        "mam_adapter" (Kaiming-uniform down, zero up: starts as the identity), "houlsby" (truncated
        normal std 1e-2 in +-2e-2, zero biases)."""
        scheme = self.config.init_weights
        with torch.no_grad():
            linears = [self.down, self.adapter_up] + ([self.gate] if self.use_gating else [])
            if scheme == "bert":
                for lin in linears:
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()
            elif scheme == "mam_adapter":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.down.bias.zero_()
                self.adapter_up.weight.zero_()
                self.adapter_up.bias.zero_()
                if self.use_gating:
                    self.gate.weight.normal_(0.0, 0.02)
                    self.gate.bias.zero_()
            else:  # houlsby
                for lin in (self.down, self.adapter_up):
                    nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    lin.bias.zero_()
                if self.use_gating:  # adapters leaves the gate at nn.Linear's default here
                    self.gate.reset_parameters()
            for ln in (getattr(self, "adapter_norm_before", None), getattr(self, "adapter_norm_after", None)):
                if ln is not None:
                    ln.reset_parameters()
            if isinstance(self.scaling, nn.Parameter):
                self.scaling.fill_(1.0)

    def forward(self, z: torch.Tensor, residual_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Adapter.forward(z, residual_input)[0]``: (..., input_size) -> (..., input_size).
        A parallel adapter takes no residual (``residual_input`` is ignored)."""
        gate = torch.sigmoid(self.gate(z)).mean(1) if self.use_gating else None
        learned = isinstance(self.scaling, nn.Parameter)
        lnb = (self.adapter_norm_before.weight, self.adapter_norm_before.bias) if self.add_layer_norm_before else None
        lna = (self.adapter_norm_after.weight, self.adapter_norm_after.bias) if self.add_layer_norm_after else None
        eps = self.adapter_norm_before.eps if lnb is not None else (self.adapter_norm_after.eps if lna is not None else 1e-5)
        return bottleneck_adapter(
            z, self.down.weight, self.down.bias, self.adapter_up.weight, self.adapter_up.bias,
            None if self.is_parallel else residual_input, activation=self.non_linearity_name,
            scaling=1.0 if learned else self.scaling, scale=self.scaling if learned else None,
            ln_before=lnb, ln_after=lna,
            adapter_residual_before_ln=self.adapter_residual_before_ln and not self.is_parallel,
            gate=gate, dropout_p=self.dropout.p, training=self.training, eps=eps)

    def pre_forward(self, hidden_states, input_tensor, layer_norm):
        """(adapter input, residual) from the sublayer output and the sublayer's residual input,
        as ``Adapter.pre_forward`` / ``ParallelAdapter.pre_forward``."""
        if self.is_parallel:
            return input_tensor, input_tensor
        residual = hidden_states if self.residual_before_ln is True else None
        if self.original_ln_before:
            hidden_states = hidden_states + input_tensor
            if layer_norm is not None:
                if self.residual_before_ln == "post_add":
                    residual = hidden_states
                hidden_states = layer_norm(hidden_states)
        if not self.residual_before_ln:
            residual = hidden_states
        if residual is None:  # "post_add" without the host LayerNorm: adapters keeps the sum
            residual = hidden_states
        return hidden_states, residual

    def post_forward(self, hidden_states, input_hidden_states, input_tensor, layer_norm):
        if self.is_parallel:
            hidden_states = hidden_states + input_hidden_states
        if self.original_ln_after:
            hidden_states = hidden_states + input_tensor
            if layer_norm is not None:
                hidden_states = layer_norm(hidden_states)
        return hidden_states

    def layer_forward(self, hidden_states, input_tensor, layer_norm=None):
        """The host layer's ``LN(h + x)`` (or ``h + x`` without ``layer_norm``) with this adapter
        in place; ``hidden_states`` = sublayer output h, ``input_tensor`` = its residual input x."""
        z, residual = self.pre_forward(hidden_states, input_tensor, layer_norm)
        out = self(z, residual)
        return self.post_forward(out, hidden_states, input_tensor, layer_norm)

    def extra_repr(self) -> str:
        if _distributed.sharded(self.down.weight, self.adapter_up.weight):
            backend = "chosen per call (parameters sharded)"
        else:
            z = torch.empty(1, self.input_size, device=self.down.weight.device, dtype=self.down.weight.dtype)
            try:
                backend = dispatch.select(OP, z=z, down_weight=self.down.weight,
                                          up_weight=self.adapter_up.weight).backend
            except Exception as exc:  # never let repr fail
                backend = f"none ({exc})"
        scaling = self.config.scaling if isinstance(self.config.scaling, str) else self.scaling
        return (f"input_size={self.input_size}, bottleneck={self.down_sample}, non_linearity={self.non_linearity_name}, "
                f"scaling={scaling}, parallel={self.is_parallel}, ln_before={self.add_layer_norm_before}, "
                f"ln_after={self.add_layer_norm_after}, gating={self.use_gating}, backend={backend}")
