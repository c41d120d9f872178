"""Gated prefix attention (``fastadapt.prefix_attention``): its float64 checks, its timed cases against
PEFT's two-pass computation (eager and compiled), PEFT's own AdaptionPrompt layer and SDPA alone,
and its Triton launches for the compile check."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fastadapt.bench.cases import Built, Case, Env, compiled, fused
from fastadapt.bench.cases.model import llama_config, trainable
from fastadapt.bench.timing import forward_backward, forward_only
from fastadapt.verify import OpCase

OP = "prefix_attention"


def verify() -> list[OpCase]:
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

    ours = lambda *t: fastadapt.prefix_attention(*t)  # noqa: E731
    return [OpCase(OP, "q (2, 4, 37, 32), kv heads 2, L=10, per-head gate", gqa, ours, gqa_exact),
            OpCase(OP, "q (1, 2, 65, 80), L=3, one gate", wide, ours, wide_exact)]


def two_pass(q, k, v, kp, vp, gate):
    """PEFT's AdaptionPrompt (and litgpt's) computation: the model's SDPA over the tokens, then an
    eager softmax over the prompt, gated."""
    group = q.shape[1] // k.shape[1]
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    kp, vp = kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)
    scores = torch.softmax((q @ kp.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
    return base + gate.to(q.dtype).view(1, -1, 1, 1) * (scores.to(q.dtype) @ vp)


def prefix(B: int, H: int, Hkv: int, S: int, D: int, L: int, backward: bool, tier: str) -> Case:
    """The op against the two-pass computation (eager and compiled); the floor: SDPA over the tokens
    alone (flash attention, no prefix)."""

    def build(env: Env) -> Built:
        import fastadapt

        kw = dict(device=env.device, dtype=env.dtype)

        def t(*shape):
            return torch.randn(*shape, **kw).requires_grad_()

        q, k, v = t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D)
        kp, vp = t(1, Hkv, L, D), t(1, Hkv, L, D)
        gate = torch.randn(H, device=env.device, requires_grad=True)
        leaves = [q, k, v, kp, vp, gate]
        grad_out = torch.randn(B, H, S, D, **kw)
        step = (lambda f: forward_backward(f, leaves, grad_out)) if backward else forward_only
        group = H // Hkv

        def expanded():
            return q, k, v, kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1), gate

        variants = fused(env, step(lambda: fastadapt.prefix_attention(q, k, v, kp, vp, gate)))
        variants["eager two-pass (PEFT's math)"] = step(lambda: two_pass(*expanded()))
        compiled_two_pass = compiled(env, two_pass)
        if compiled_two_pass is not None:
            variants["torch.compile two-pass"] = step(lambda: compiled_two_pass(*expanded()))
        variants["floor: SDPA alone"] = step(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1))
        return Built(variants, "floor: SDPA alone", leaves=leaves)

    which = "fwd+bwd" if backward else "fwd"
    heads = f"H={H}" if H == Hkv else f"H={H}/{Hkv}"
    return Case("prefix_attention", f"{which} B={B} {heads} S={S} D={D} L={L}",
                dict(kind=which, B=B, H=H, Hkv=Hkv, S=S, D=D, L=L), tier, build)


def prefix_peft_layer(B: int, S: int, hidden: int, heads: int, L: int, tier: str) -> Case:
    """PEFT's own module: one Llama attention layer wrapped by PEFT's ``AdaptionPrompt``, unpatched
    vs patched by ``fastadapt.patch``, forward + backward through a one-layer model whose MLP is
    tiny (16 wide) so that the attention dominates. The floor: the same layer without the prompt."""

    def build(env: Env) -> Built:
        import peft
        from transformers import LlamaForCausalLM

        import fastadapt

        torch.manual_seed(0)
        with torch.device(env.device):  # initialised where it runs: no copy through host memory
            plain = LlamaForCausalLM(llama_config(hidden, 16, 1, heads, S, 32)).to(env.dtype)
        plain.requires_grad_(False)
        theirs = peft.get_peft_model(copy.deepcopy(plain), peft.AdaptionPromptConfig(
            adapter_len=L, adapter_layers=1, task_type="CAUSAL_LM"))
        with torch.no_grad():  # PEFT zero-initialises the gate; a trained one is not zero
            for name, p in theirs.named_parameters():
                if name.endswith("adaption_gate"):
                    p.fill_(0.5)
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours)
        embeds = torch.randn(B, S, hidden, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_out = torch.randn(B, S, hidden, device=env.device, dtype=env.dtype)
        leaves = [embeds, *trainable(theirs, ours)]

        def step(model):
            inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
            return forward_backward(lambda: inner(inputs_embeds=embeds).last_hidden_state, leaves, grad_out)

        variants = fused(env, step(ours))
        variants["peft AdaptionPrompt"] = step(theirs)
        variants["floor: layer without prompt"] = step(plain)
        return Built(variants, "floor: layer without prompt", leaves=leaves)

    return Case("prefix_attention",
                f"PEFT AdaptionPrompt layer fwd+bwd B={B} S={S} hidden={hidden} H={heads} L={L}",
                dict(kind="peft_layer", B=B, S=S, hidden=hidden, H=heads, L=L), tier, build)


def cases(scale: str) -> list[Case]:
    return {
        "cuda": [
            prefix(4, 32, 32, 2048, 128, 10, True, "quick"),
            prefix(8, 32, 32, 512, 128, 30, True, "quick"),
            prefix_peft_layer(4, 2048, 4096, 32, 10, "quick"),
            prefix(4, 32, 32, 2048, 128, 10, False, "default"),
            prefix(4, 32, 8, 2048, 128, 10, True, "full"),
            prefix(1, 32, 32, 8192, 128, 10, True, "full"),
            prefix(8, 32, 8, 512, 128, 30, True, "full"),
        ],
        "cpu": [
            prefix(2, 8, 8, 256, 64, 10, True, "quick"),
            prefix(2, 8, 2, 256, 64, 10, True, "default"),
            prefix_peft_layer(2, 128, 256, 4, 10, "quick"),
        ],
        "smoke": [prefix(1, 4, 2, 32, 16, 4, True, "quick"), prefix_peft_layer(1, 16, 64, 4, 4, "quick")],
    }[scale]


def compile_grid(grid):
    from fastadapt.kernels import prefix_attention as pa
    setting, meta = grid.setting, grid.meta
    # (B, H, Hkv, Sq, Sk, L, D): training (GQA, odd lengths, D=80 padded to 128), decode Sq=1, D=64.
    shapes = ((2, 8, 2, 129, 129, 10, 80), (1, 4, 4, 1, 300, 3, 64), (2, 32, 8, 512, 512, 30, 128))
    for dname in grid.dtypes:
        for B, H, Hkv, Sq, Sk, L, D in shapes:
            for joint in (False, True):
                for causal in (False, True):
                    for kpm in (False, True):
                        with setting(f"prefix B={B} H={H}/{Hkv} S={Sq}/{Sk} L={L} D={D} joint={joint} "
                                     f"causal={causal} kpm={kpm}", dname) as dt:
                            q = meta(B, Sq, H, D, dtype=dt).transpose(1, 2)  # (B, S, H, D) read in place
                            k, v = meta(B, Hkv, Sk, D, dtype=dt), meta(B, Hkv, Sk, D, dtype=dt)
                            kp = meta(1, Hkv, L, D, dtype=dt).expand(B, -1, -1, -1)
                            vp = meta(1, Hkv, L, D, dtype=dt).expand(B, -1, -1, -1)
                            gate = None if joint else meta(H, dtype=torch.float32)
                            mask = meta(B, Sk, dtype=torch.bool) if kpm else None
                            out, st, stp = pa.forward(q, k, v, kp, vp, gate, mask, D ** -0.5, causal, joint)
                            needs = (True, True, True, True, True, not joint)
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        needs)
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        (False, False, False, True, True, False))  # frozen tokens: prefix only
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        (True, True, True, False, False, False))  # tokens only
