"""The whole model: a random Llama with PEFT LoRA on all seven projections, patched by fastadapt, its
training step timed against unpatched PEFT and the frozen model; the demo's training step; and the
one table of the Llamas' sizes. Not an op: ``fastadapt bench --op model``."""

from __future__ import annotations

import copy

import torch

from fastadapt.bench.cases import AUTOMATIC, Built, Case, Env, automatic, fused
from fastadapt.bench.timing import forward_backward

# The random PEFT LoRA Llamas (fastadapt.verify.peft_llama, with an LM head) that the patched-vs-
# unpatched check runs, per scale (odd sequence lengths; a float64 copy is made too), and that the
# demo checks and trains, on a GPU a few hundred MB so that its step times mean something (on a CPU
# the check's). The timed cases below give their own sizes: DESIGN.md's on a GPU.
LLAMA = {
    "smoke": dict(hidden=64, ffn=128, layers=1, heads=4, vocab=128, seq=13, batch=1),
    "cpu": dict(hidden=64, ffn=128, layers=2, heads=4, vocab=128, seq=37, batch=2),
    "cuda": dict(hidden=256, ffn=688, layers=2, heads=8, vocab=512, seq=129, batch=2),
    "cuda demo": dict(hidden=1024, ffn=2816, layers=4, heads=16, vocab=8192, seq=512, batch=4),
}


def llama_config(hidden: int, ffn: int, layers: int, heads: int, seq: int, vocab: int):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                    max_position_embeddings=seq, attn_implementation="sdpa")


def trainable(*models) -> list[torch.Tensor]:
    return [p for mdl in models for p in mdl.parameters() if p.requires_grad]


def model_step(B: int, S: int, hidden: int, ffn: int, layers: int, heads: int, r: int, tier: str,
               trainer: bool = False) -> Case:
    """A Llama (random weights from a config, no LM head) with LoRA r on all seven projections:
    forward + backward of PEFT, of PEFT patched by fastadapt, and of the frozen model (the floor).

    ``trainer``: as the HF Trainer runs a model loaded in bf16 with ``bf16=True``: a bf16 base
    (whatever ``--dtype``), PEFT's default float32 adapters (``autocast_adapter_dtype``), and every
    step under ``torch.autocast(bf16)``."""

    def build(env: Env) -> Built:
        import peft
        from transformers import LlamaModel

        import fastadapt
        from fastadapt.verify import LLAMA_TARGETS

        dtype = torch.bfloat16 if trainer else env.dtype
        torch.manual_seed(0)
        with torch.device(env.device):  # 1B parameters: initialised on the GPU, not the host's CPU
            frozen = LlamaModel(llama_config(hidden, ffn, layers, heads, S, 32000)).to(dtype)
        frozen.requires_grad_(False)
        theirs = peft.get_peft_model(copy.deepcopy(frozen), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS), autocast_adapter_dtype=trainer)
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours, strict=True)  # a call that would fall back to PEFT fails the case
        ids = torch.randint(0, 32000, (B, S), device=env.device)
        # The frozen model needs an input that requires grad, or autograd has nothing to do.
        embeds = frozen.embed_tokens(ids).detach().requires_grad_()
        grad_out = torch.randn(B, S, hidden, device=env.device, dtype=dtype)
        leaves = [embeds, *trainable(theirs, ours)]

        def step(model):
            def forward():
                with torch.autocast(env.device, dtype, enabled=trainer):
                    return model(inputs_embeds=embeds).last_hidden_state
            return forward_backward(forward, leaves, grad_out)

        variants = fused(env, step(ours))
        variants[AUTOMATIC] = automatic(step(ours))
        variants["peft"] = step(theirs)
        variants["floor: frozen model"] = step(frozen)
        return Built(variants, "floor: frozen model", leaves=leaves)

    how = ", autocast, fp32 adapters (Trainer-like)" if trainer else ""
    return Case("model", f"Llama {layers} layers h={hidden} B={B} S={S} LoRA r={r} on 7 linears, fwd+bwd{how}",
                dict(kind="train", B=B, S=S, hidden=hidden, ffn=ffn, layers=layers, heads=heads, r=r,
                     trainer=trainer), tier, build, rep_ms=1000.0, warmup_ms=200.0)


def cases(scale: str) -> list[Case]:
    return {
        "cuda": [model_step(4, 2048, 4096, 11008, 4, 32, 16, "quick"),
                 model_step(4, 2048, 4096, 11008, 4, 32, 16, "quick", trainer=True)],
        "cpu": [model_step(2, 128, 256, 688, 2, 4, 16, "quick"),
                model_step(2, 128, 256, 688, 2, 4, 16, "quick", trainer=True)],
        "smoke": [model_step(1, 16, 64, 128, 1, 4, 8, "quick"),
                  model_step(1, 16, 64, 128, 1, 4, 8, "quick", trainer=True)],
    }[scale]


def training_step(size: dict, steps: int) -> Case:
    """The demo's: the PEFT LoRA Llama of ``size`` trained step by step (forward, backward, AdamW),
    unpatched, patched with automatic dispatch, and patched on each backend of the run forced;
    ``steps`` timed steps after an untimed one (which compiles and autotunes on a GPU)."""

    def build(env: Env) -> Built:
        import fastadapt
        from fastadapt.verify import peft_llama

        theirs = peft_llama(env.device, env.dtype, size)
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours)
        ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=env.device)

        def step(model):
            optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)

            def run():
                optimizer.zero_grad(set_to_none=True)
                model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
                optimizer.step()
            return run

        variants = {"peft (unpatched)": step(theirs), AUTOMATIC: automatic(step(ours))}
        variants.update(fused(env, step(ours), name=lambda backend: f"fastadapt {backend} (forced)"))
        return Built(variants, None)

    return Case("model", f"training step, PEFT LoRA r=8 on all 7 projections, {size['layers']} layers, "
                f"hidden {size['hidden']}, batch {size['batch']}x{size['seq']}", dict(kind="demo", **size), "quick",
                build, runs=steps)
