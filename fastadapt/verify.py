"""Checks of the fused ops and of a patched PEFT model against float64, on the machine at hand:
what ``fastadapt demo`` and ``fastadapt bench`` verify before they time anything. The bounds and
the error measure are those of the test suite (:mod:`fastadapt.testing`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from fastadapt.testing import bound, rel_err


@dataclass
class OpCase:
    """One op at one shape (each op's are in its module of :mod:`fastadapt.bench.cases`): ``make()``
    gives fresh float32 CPU tensors, ``fused`` and ``exact`` (the float64 reference) take them as
    positional arguments; inputs whose index is in ``frozen`` get no gradient (a frozen base weight)."""

    op: str
    shape: str
    make: Callable[[], list[torch.Tensor]]
    fused: Callable
    exact: Callable
    frozen: tuple[int, ...] = ()


@dataclass
class OpCheck:
    """The fused op against float64: relative errors of the output and the worst gradient, the
    bound they must meet, and ``step``: one more forward + backward on the same inputs under the
    same backend (for timing; the passes accumulate into ``.grad``)."""

    out_err: float
    grad_err: float
    bound: float
    step: Callable[[], None]

    @property
    def passed(self) -> bool:
        return self.out_err <= self.bound and self.grad_err <= self.bound


def check_op(case: OpCase, device, dtype: torch.dtype, backend: str | None) -> OpCheck:
    """Run ``case`` fused (forced onto ``backend``, in ``dtype``, on ``device``) and in float64 on
    the same random inputs, forward and backward. Raises
    :class:`fastadapt.BackendUnavailableError` if ``backend`` cannot serve these inputs."""
    import fastadapt

    torch.manual_seed(0)
    base = case.make()

    def leaves(cast):
        return [t.to(device, cast, copy=True).requires_grad_(i not in case.frozen) for i, t in enumerate(base)]

    ours, ref = leaves(dtype), leaves(torch.float64)
    with fastadapt.use_backend(backend):
        out = case.fused(*ours)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    out64 = case.exact(*ref)
    out64.backward(grad_out.double())
    grad_err = max(rel_err(a.grad, b.grad) for a, b in zip(ours, ref) if a.requires_grad)

    def step():
        with fastadapt.use_backend(backend):
            case.fused(*ours).backward(grad_out)

    return OpCheck(rel_err(out, out64), grad_err, bound(dtype, device), step)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(device, dtype, size: dict, rank: int = 8):
    """A random ``LlamaForCausalLM`` of ``size`` (hidden, ffn, layers, heads, vocab, seq) with PEFT
    LoRA (random A and B, so that the adapters change the output) on all seven projections."""
    import peft
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["ffn"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["heads"] // 2, vocab_size=size["vocab"],
        max_position_embeddings=size["seq"])
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=LLAMA_TARGETS)
    return peft.get_peft_model(base, lora)


def _logits_and_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": logits.detach(), **grads}


@dataclass
class ModelCheck:
    """Patched vs unpatched PEFT against a float64 copy: logits errors of both, and the tensors
    (logits, LoRA grads) where ours exceeds twice PEFT's own error."""

    ours: float
    peft: float
    tensors: int
    bad: list[str]

    @property
    def passed(self) -> bool:
        return not self.bad


def check_patched(peft_model, patched, ids, dtype: torch.dtype) -> ModelCheck:
    """Both models are computations of the float64 truth in the same dtype: ours must stay within
    2x PEFT's error (plus one ulp of ``dtype``), on the logits and on every LoRA gradient."""
    truth = copy.deepcopy(peft_model).double()
    exact = _logits_and_grads(truth, ids)
    del truth
    theirs, mine = _logits_and_grads(peft_model, ids), _logits_and_grads(patched, ids)
    eps = torch.finfo(dtype).eps
    bad = [n for n in exact if rel_err(mine[n], exact[n]) > 2 * rel_err(theirs[n], exact[n]) + eps]
    return ModelCheck(rel_err(mine["logits"], exact["logits"]), rel_err(theirs["logits"], exact["logits"]),
                      len(exact), bad)
