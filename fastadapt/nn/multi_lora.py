"""``fastadapt.nn.MultiLoRALinear``: a frozen linear with several LoRA adapters, each sequence of a
batch through its own, on the fused op; and :func:`mixed_batch`, the call it and the PEFT
integration make."""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.ops._autocast import autocast_dtype
from fastadapt.ops.multi_lora import multi_lora_linear

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@functools.lru_cache(maxsize=256)
def _cached(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made outside inference mode, whatever the caller's: an inference tensor could not be saved
    # for a later training step's backward.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, kept: each layer of each step asks for the same ids and
    per-adapter metadata, and building them from Python costs a host-to-device copy each time (a
    synchronisation on CUDA). Never written to by the op. Under torch.compile, a constant of the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached(values, dtype, device)


def mixed_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor, float, float]],
                adapter_names: Sequence[str], training: bool) -> torch.Tensor:
    """``x`` (batch, ..., in) whose sequence i goes through adapter ``adapter_names[i]`` (``"__base__"``
    or a name not in ``adapters``: the base layer alone), as one ``fastadapt.multi_lora_linear`` call.

    ``adapters``: name -> (lora_A (r, in), lora_B (out, r), scaling, dropout p), in any dtype. Only
    the adapters named in the batch are stacked, so the others get no gradient (None, as in PEFT).
    """
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]}")
    names = tuple(adapter_names)
    named = set(names)
    present = [a for a in adapters if a in named]
    if not present:
        return F.linear(x, weight, bias)
    dtype = autocast_dtype(x) or x.dtype
    ranks = [adapters[a][0].shape[0] for a in present]
    r_max = max(ranks)
    # Padded stacks in the compute dtype; autograd takes each adapter's gradient back through them.
    A_stack = torch.stack([F.pad(adapters[a][0].to(dtype), (0, 0, 0, r_max - r)) for a, r in zip(present, ranks)])
    B_stack = torch.stack([F.pad(adapters[a][1].to(dtype), (0, r_max - r)) for a, r in zip(present, ranks)])
    index = {a: i for i, a in enumerate(present)}
    device = x.device
    ids = _on_device(tuple(index.get(n, -1) for n in names), torch.int64, device)
    # In the op's table dtypes, so that it converts nothing per call: the scalings in float32 (float64
    # for a float64 call), the probabilities in float64.
    scalings = _on_device(tuple(float(adapters[a][2]) for a in present), torch.promote_types(dtype, torch.float32),
                          device)
    dropout = tuple(float(adapters[a][3]) for a in present)
    return multi_lora_linear(x, weight, A_stack, B_stack, scalings, ids, bias,
                             dropout_p=_on_device(dropout, torch.float64, device) if any(dropout) else 0.0,
                             training=training, ranks=_on_device(tuple(ranks), torch.int32, device))


class MultiLoRALinear(nn.Module):
    """``base_layer(x)`` plus, for each sequence of the batch, the update of its own LoRA adapter:
    several adapters trained (or served) at once on one batch, in one fused op.

    Submodules and state-dict keys are PEFT's (``base_layer.weight``, ``lora_A.<name>.weight``,
    ``lora_B.<name>.weight``), so a PEFT LoRA layer with the same adapters loads here and back.
    Adapters may differ in rank, alpha and dropout; ``lora_A`` starts Kaiming-uniform and
    ``lora_B`` at zero, as in PEFT.

    Example::

        layer = MultiLoRALinear(4096, 4096)
        layer.add_adapter("math", r=16, lora_alpha=32)
        layer.add_adapter("code", r=8, lora_alpha=16, lora_dropout=0.05)
        y = layer(x, ["math", "code", "__base__", "math"])   # x: (4, seq, 4096)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._init_base(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype))

    def _init_base(self, base_layer: nn.Linear) -> None:
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "MultiLoRALinear":
        """Wrap an existing ``nn.Linear`` (shared, not copied) as the frozen base layer."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_base(linear)
        return module

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """A new adapter ``name`` (trainable): scaling ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
        if not isinstance(name, str) or not name or name == BASE or name in self.lora_A:
            raise ValueError(f"adapter name must be a new non-empty string other than {BASE!r}, got {name!r}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        w = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, lora_alpha, lora_dropout
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """x (batch, ..., in_features); ``adapter_names``: one name per sequence (``x.shape[0]``),
        ``"__base__"`` for the base layer alone."""
        unknown = sorted(set(adapter_names) - set(self.lora_A) - {BASE})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        adapters = {a: (self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], self.lora_dropout[a])
                    for a in self.lora_A}
        return mixed_batch(x, self.base_layer.weight, self.base_layer.bias, adapters, adapter_names, self.training)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: r={self.r[a]} scaling={self.scaling[a]:g} dropout={self.lora_dropout[a]}"
                             for a in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={{{adapters}}}"
