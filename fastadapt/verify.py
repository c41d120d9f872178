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
    """One op at one shape: ``make()`` gives fresh float32 CPU tensors, ``fused`` and ``exact``
    (the float64 reference) take them as positional arguments; inputs whose index is in
    ``frozen`` get no gradient (a frozen base weight)."""

    op: str
    shape: str
    make: Callable[[], list[torch.Tensor]]
    fused: Callable
    exact: Callable
    frozen: tuple[int, ...] = ()


def _lora_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import lora as reference

    def case(lead, k, n, r):
        def make():
            return [torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(r, k) / k**0.5,
                    torch.randn(n, r) / r**0.5, torch.randn(n)]
        return OpCase("lora_linear", f"x {tuple(lead)}x{k}, W {n}x{k}, r={r}, bias", make,
                      lambda *t: fastadapt.lora_linear(*t[:4], 0.5, t[4]),
                      lambda *t: reference.lora_linear(*t[:4], 0.5, t[4]), (1,))

    return [case((4, 33), 96, 80, 8), case((129,), 123, 65, 1)]


def _dora_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import dora as reference

    def case(lead, k, n, r):
        def make():
            return [torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(r, k) / k**0.5,
                    torch.randn(n, r) / r**0.5, torch.rand(n) + 0.5, torch.randn(n)]
        return OpCase("dora_linear", f"x {tuple(lead)}x{k}, W {n}x{k}, r={r}, magnitude, bias", make,
                      lambda *t: fastadapt.dora_linear(*t[:5], 0.5, t[5]),
                      lambda *t: reference.dora_linear(*t[:5], 0.5, t[5]), (1,))

    return [case((4, 33), 96, 80, 8), case((129,), 123, 65, 1)]


def _multi_lora_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import multi_lora as reference

    def case(lead, k, n, ranks, ids):
        r_max = max(ranks)
        scalings = [0.5 + i for i in range(len(ranks))]

        def make():
            return [torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(len(ranks), r_max, k) / k**0.5,
                    torch.randn(len(ranks), n, r_max) / r_max**0.5, torch.randn(n)]

        def fused(x, w, A, B, b):
            return fastadapt.multi_lora_linear(x, w, A, B, scalings, torch.tensor(ids, device=x.device), b,
                                               ranks=ranks)

        def exact(x, w, A, B, b):
            rows = torch.tensor(ids, device=x.device).view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
            y = reference.multi_lora_linear(x.reshape(-1, k), w, A, B, torch.tensor(scalings, dtype=x.dtype,
                                            device=x.device), torch.tensor(ranks, device=x.device), rows.reshape(-1), b)
            return y.view(*x.shape[:-1], n)

        return OpCase("multi_lora_linear", f"x {tuple(lead)}x{k}, W {n}x{k}, ranks {ranks}, ids {ids}, bias", make,
                      fused, exact, (1,))

    return [case((4, 33), 96, 80, [8, 4, 8], [2, -1, 0, 2]),
            case((129,), 123, 65, [1, 7], [i % 3 - 1 for i in range(129)])]


def _moe_lora_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import moe_lora as reference

    # gpt-oss's clamp acts on a few of these unit-variance values, rarely within a half-precision
    # rounding of the limit: there the gradient jumps (1.5 failed PyTorch's own float16 reference).
    LIMIT = 3.0

    def case(T, H, I, E, k, r1, r2, activation):
        # A fixed routing (an index tensor is no differentiable input): expert 0 gets no token.
        idx = [[1 + (3 * t + j) % (E - 1) for j in range(k)] for t in range(T)]

        def make():
            return [torch.randn(T, H), torch.rand(T, k), torch.randn(E, 2 * I, H) / H**0.5,
                    torch.randn(E, H, I) / I**0.5, torch.randn(E, r1, H) / H**0.5, torch.randn(E, 2 * I, r1) / r1**0.5,
                    torch.randn(E, r2, I) / I**0.5, torch.randn(E, H, r2) / r2**0.5]

        def fused(x, w, W1, W2, A1, B1, A2, B2):
            return fastadapt.moe_lora_experts(x, torch.tensor(idx, device=x.device), w, W1, W2, gate_up_A=A1,
                                              gate_up_B=B1, gate_up_scaling=0.5, down_A=A2, down_B=B2,
                                              down_scaling=2.0, activation=activation, limit=LIMIT)

        def exact(x, w, W1, W2, A1, B1, A2, B2):
            return reference.experts(x, torch.tensor(idx, device=x.device), w, W1, W2, None, None, A1, B1, 0.5, A2,
                                     B2, 2.0, activation, 1.702, LIMIT)[0]

        return OpCase("moe_lora_experts", f"x {T}x{H}, {E} experts top-{k}, intermediate {I}, ranks {r1}/{r2}, "
                      f"{activation}", make, fused, exact, (2, 3))

    return [case(9, 32, 16, 5, 2, 4, 2, "silu"), case(33, 40, 12, 4, 3, 1, 3, "gpt_oss")]


def _qlora_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import lora, qlora

    def case(fmt, lead, k, n, r):
        # The quantized weight is drawn once, on the CPU, and moved to the inputs' device; the exact
        # side runs on its float64 dequantization (bnb's fp32 product, not rounded to the dtype).
        weight = qlora.random_weight(fmt, n, k)

        def on(device):
            return weight._replace(**{f: getattr(weight, f).to(device) for f in ("data", "code", "absmax", "absmax2",
                                                                                   "code2", "offset")
                                      if getattr(weight, f) is not None})

        def make():
            return [torch.randn(*lead, k), torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5, torch.randn(n)]

        return OpCase("qlora_linear", f"x {tuple(lead)}x{k}, {fmt} W {n}x{k}, r={r}, bias", make,
                      lambda x, a, b, bias: fastadapt.qlora_linear(x, on(x.device), a, b, 0.5, bias),
                      lambda x, a, b, bias: lora.lora_linear(x, qlora.dequantize(on(x.device), x.dtype), a, b, 0.5,
                                                             bias))

    return [case("nf4-nested", (4, 33), 128, 80, 8), case("fp8-channel", (129,), 80, 65, 1)]


def _bottleneck_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import bottleneck as reference

    def pfeiffer():  # z, residual, down (16 x 96), up (96 x 16): a Pfeiffer adapter with gelu
        return [torch.randn(4, 33, 96), torch.randn(4, 33, 96), torch.randn(16, 96) / 96**0.5, torch.randn(16),
                torch.randn(96, 16) / 4, torch.randn(96)]

    def pfeiffer_fused(z, r, dw, db, uw, ub):
        return fastadapt.bottleneck_adapter(z, dw, db, uw, ub, r, activation="gelu", scaling=0.5)

    def pfeiffer_exact(z, r, dw, db, uw, ub):
        return reference.bottleneck_adapter(z, dw, db, uw, ub, r, scaling=0.5, activation_name="gelu")[0]

    def houlsby():  # + LN before and after (residual inside), a per-channel scale, swish; d=80, m=7
        d, m = 80, 7
        return [torch.randn(129, d), torch.randn(129, d), torch.randn(m, d) / d**0.5, torch.randn(m),
                torch.randn(d, m) / m**0.5, torch.randn(d), 1 + torch.randn(d) / 10, 1 + torch.randn(d) / 10,
                torch.randn(d) / 10, 1 + torch.randn(d) / 10, torch.randn(d) / 10]

    def houlsby_fused(z, r, dw, db, uw, ub, sc, lbw, lbb, law, lab):
        return fastadapt.bottleneck_adapter(z, dw, db, uw, ub, r, activation="swish", scale=sc,
                                            ln_before=(lbw, lbb), ln_after=(law, lab),
                                            adapter_residual_before_ln=True)

    def houlsby_exact(z, r, dw, db, uw, ub, sc, lbw, lbb, law, lab):
        return reference.bottleneck_adapter(z, dw, db, uw, ub, r, scale=sc, ln_before=(lbw, lbb),
                                            ln_after=(law, lab), residual_before_ln_after=True,
                                            activation_name="swish")[0]

    return [OpCase("bottleneck_adapter", "z (4, 33, 96), m=16, gelu, residual", pfeiffer, pfeiffer_fused,
                   pfeiffer_exact),
            OpCase("bottleneck_adapter", "z (129, 80), m=7, swish, LN before+after, channel scale", houlsby,
                   houlsby_fused, houlsby_exact)]


def _prefix_attention_cases() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import prefix_attention as reference

    def gqa():  # q (B2, H4, S37, D32), GQA k/v with 2 heads, a 10-token prefix, per-head gate
        return [torch.randn(2, 4, 37, 32), torch.randn(2, 2, 37, 32), torch.randn(2, 2, 37, 32),
                torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32), torch.randn(4) / 2]

    def gqa_exact(q, k, v, kp, vp, g):
        return reference.prefix_attention(q, k, v, kp.expand(2, -1, -1, -1), vp.expand(2, -1, -1, -1), g)

    def wide():  # one batch, 2 heads of 80, 65 tokens (not a block multiple), 3-token prefix, one gate
        return [torch.randn(1, 2, 65, 80), torch.randn(1, 2, 65, 80), torch.randn(1, 2, 65, 80),
                torch.randn(1, 2, 3, 80), torch.randn(1, 2, 3, 80), torch.randn(1) / 2]

    def wide_exact(q, k, v, kp, vp, g):
        return reference.prefix_attention(q, k, v, kp, vp, g.expand(2))

    fused = lambda *t: fastadapt.prefix_attention(*t)  # noqa: E731
    return [OpCase("prefix_attention", "q (2, 4, 37, 32), kv heads 2, L=10, per-head gate", gqa, fused, gqa_exact),
            OpCase("prefix_attention", "q (1, 2, 65, 80), L=3, one gate", wide, fused, wide_exact)]


def op_cases() -> dict[str, list[OpCase]]:
    """Each op's verification cases, odd shapes first-to-last (the first is the demo's)."""
    return {"lora_linear": _lora_cases(), "dora_linear": _dora_cases(), "multi_lora_linear": _multi_lora_cases(),
            "moe_lora_experts": _moe_lora_cases(), "qlora_linear": _qlora_cases(),
            "bottleneck_adapter": _bottleneck_cases(), "prefix_attention": _prefix_attention_cases()}


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
