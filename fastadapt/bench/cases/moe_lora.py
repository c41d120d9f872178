"""A MoE block's experts with per-expert LoRA (``fastadapt.moe_lora_experts``, PEFT
``target_parameters``): its float64 checks, its timed cases against PEFT's path around transformers'
eager and ``grouped_mm`` experts with the frozen grouped GEMM as the floor, and its Triton launches
for the compile check."""

from __future__ import annotations

import copy

import torch

from fastadapt.bench.cases import Built, Case, Env, fused
from fastadapt.bench.timing import forward_backward
from fastadapt.verify import OpCase

OP = "moe_lora_experts"


def verify() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import moe_lora as reference

    # gpt-oss's clamp acts on a few of these unit-variance values, rarely within a half-precision
    # rounding of the limit: there the gradient jumps (1.5 failed PyTorch's own float16 reference).
    limit = 3.0

    def case(T, H, I, E, k, r1, r2, activation):
        # A fixed routing (an index tensor is no differentiable input): expert 0 gets no token.
        idx = [[1 + (3 * t + j) % (E - 1) for j in range(k)] for t in range(T)]

        def make():
            return [torch.randn(T, H), torch.rand(T, k), torch.randn(E, 2 * I, H) / H**0.5,
                    torch.randn(E, H, I) / I**0.5, torch.randn(E, r1, H) / H**0.5, torch.randn(E, 2 * I, r1) / r1**0.5,
                    torch.randn(E, r2, I) / I**0.5, torch.randn(E, H, r2) / r2**0.5]

        def ours(x, w, W1, W2, A1, B1, A2, B2):
            return fastadapt.moe_lora_experts(x, torch.tensor(idx, device=x.device), w, W1, W2, gate_up_A=A1,
                                              gate_up_B=B1, gate_up_scaling=0.5, down_A=A2, down_B=B2,
                                              down_scaling=2.0, activation=activation, limit=limit)

        def exact(x, w, W1, W2, A1, B1, A2, B2):
            return reference.experts(x, torch.tensor(idx, device=x.device), w, W1, W2, None, None, A1, B1, 0.5, A2,
                                     B2, 2.0, activation, 1.702, limit)[0]

        return OpCase(OP, f"x {T}x{H}, {E} experts top-{k}, intermediate {I}, ranks {r1}/{r2}, {activation}", make,
                      ours, exact, (2, 3))

    return [case(9, 32, 16, 5, 2, 4, 2, "silu"), case(33, 40, 12, 4, 3, 1, 3, "gpt_oss")]


def _moe_experts(env: Env, family: str, T: int, H: int, I: int, E: int, k: int):
    """A transformers experts module of ``family`` (frozen, random) in a container whose child is
    ``experts``, and a routing: k distinct experts per token, softmax weights (trainable)."""
    import transformers

    if family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=k)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=k)
    config._experts_implementation = "eager"
    container = torch.nn.Module()
    container.experts = Experts(config).to(env.device, env.dtype)
    with torch.no_grad():
        for p in container.experts.parameters():
            p.normal_(0, 0.02 if p.dim() == 3 else 0.1).requires_grad_(False)
    logits = torch.randn(T, E, device=env.device)
    top, idx = logits.topk(k, dim=-1)
    weights = top.softmax(-1).to(env.dtype).requires_grad_()
    return container, idx, weights


def moe_lora_train(family: str, T: int, H: int, I: int, E: int, k: int, r: int, tier: str) -> Case:
    """Forward + backward of one MoE block's experts with PEFT ``target_parameters`` LoRA (r on both
    projections), T tokens, top-k routing: patched onto the fused op, against PEFT's path as
    installed (its parametrization of ``W + s B A`` around transformers' eager experts and around
    its ``grouped_mm`` experts). The floor: the frozen experts alone, transformers' ``grouped_mm``."""

    def build(env: Env) -> Built:
        import peft

        import fastadapt

        container, idx, weights = _moe_experts(env, family, T, H, I, E, k)
        x = torch.randn(T, H, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(T, H, device=env.device, dtype=env.dtype)
        floor = copy.deepcopy(container).experts
        floor.config._experts_implementation = "grouped_mm"
        peft_model = peft.get_peft_model(container, peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            init_lora_weights=False), autocast_adapter_dtype=False)
        grouped = copy.deepcopy(peft_model)
        grouped.base_model.model.experts.base_layer.base_layer.config._experts_implementation = "grouped_mm"
        patched = copy.deepcopy(peft_model)
        fastadapt.patch(patched, strict=True)
        models = (peft_model, grouped, patched)
        leaves = [x, weights, *(q for m in models for q in m.parameters() if q.requires_grad)]

        def step(model):
            layer = model.base_model.model.experts
            return forward_backward(lambda: layer(x, idx, weights), leaves, grad_y)

        variants = fused(env, step(patched), OP)
        variants["peft target_parameters, eager experts"] = step(peft_model)
        variants["peft target_parameters, grouped_mm experts"] = step(grouped)
        variants["floor: frozen experts, grouped_mm"] = forward_backward(lambda: floor(x, idx, weights), leaves,
                                                                          grad_y)
        return Built(variants, "floor: frozen experts, grouped_mm", leaves=leaves)

    return Case("moe_lora", f"fwd+bwd {family} T={T} H={H} I={I} E={E} top-{k} r={r}",
                dict(kind="train", family=family, T=T, H=H, I=I, E=E, k=k, r=r), tier, build)


def cases(scale: str) -> list[Case]:
    return {
        # Qwen3-30B-A3B's and gpt-oss-20b's experts (issue 23's shapes).
        "cuda": [moe_lora_train("qwen3_moe", 4096, 2048, 768, 128, 8, 16, "quick"),
                 moe_lora_train("gpt_oss", 4096, 2880, 2880, 32, 4, 16, "quick")],
        "cpu": [moe_lora_train("qwen3_moe", 512, 256, 128, 16, 4, 16, "quick"),
                moe_lora_train("gpt_oss", 512, 256, 256, 8, 2, 16, "default")],
        "smoke": [moe_lora_train("qwen3_moe", 32, 64, 32, 4, 2, 4, "quick")],
    }[scale]


def compile_grid(grid):
    from fastadapt.kernels import moe_lora as moe
    setting, meta = grid.setting, grid.meta
    # (T, H, I, E, k, r): decode T=1, odd sizes, Qwen3-30B-A3B's and gpt-oss-20b's experts (the
    # benchmark's shapes). On meta tensors torch._grouped_mm never serves: each product runs the
    # Triton grouped GEMM, whose launches are what is recorded here.
    shapes = ((1, 2048, 768, 128, 8, 16), (7, 123, 37, 5, 2, 3), (4096, 2048, 768, 128, 8, 16),
              (4096, 2880, 2880, 32, 4, 16))
    for dname in grid.dtypes:
        for T, H, I, E, k, R in shapes:
            for activation, bias in (("silu", False), ("gpt_oss", True)):
                for p in (0.0, 0.1):
                    with setting(f"moe_lora T={T} H={H} I={I} E={E} k={k} r={R} {activation} p={p}", dname) as dt:
                        x, idx, w = meta(T, H, dtype=dt), meta(T, k, dtype=torch.int64), meta(T, k, dtype=dt)
                        W1, W2 = meta(E, 2 * I, H, dtype=dt), meta(E, H, I, dtype=dt)
                        b1, b2 = (meta(E, 2 * I, dtype=dt), meta(E, H, dtype=dt)) if bias else (None, None)
                        lora = (meta(E, R, H, dtype=dt), meta(E, 2 * I, R, dtype=dt), 0.5,
                                meta(E, R, I, dtype=dt), meta(E, H, R, dtype=dt), 2.0)
                        out = moe.forward(x, idx, w, W1, b1, W2, b2, *lora, activation, 1.702, 7.0, p, 1)
                        moe.backward(out[0], x, idx, w, W1, W2, *lora, activation, 1.702, 7.0, p, 1, *out[1:],
                                     (True,) * 6)
        with setting("moe_lora transposed weights (gpt-oss's storage), float32 routing", dname) as dt:
            T, H, I, E, k = 9, 64, 32, 4, 2
            x, idx, w = meta(T, H, dtype=dt), meta(T, k, dtype=torch.int64), meta(T, k, dtype=torch.float32)
            W1, W2 = meta(E, H, 2 * I, dtype=dt).transpose(1, 2), meta(E, I, H, dtype=dt).transpose(1, 2)
            lora = (None, None, 1.0, meta(E, 4, I, dtype=dt), meta(E, H, 4, dtype=dt), 2.0)
            out = moe.forward(x, idx, w, W1, None, W2, None, *lora, "silu", 1.702, 7.0, 0.0, 1)
            moe.backward(out[0], x, idx, w, W1, W2, *lora, "silu", 1.702, 7.0, 0.0, 1, *out[1:], (True,) * 6)
