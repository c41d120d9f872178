"""The whole model: a random Llama with PEFT LoRA on all seven projections, patched by fastadapt, its
training step timed against unpatched PEFT and the frozen model. Not an op: ``fastadapt bench --op
model``."""

from __future__ import annotations

import copy

import torch

from fastadapt.bench.cases import AUTOMATIC, Built, Case, Env, automatic, fused
from fastadapt.bench.timing import forward_backward


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
        variants[AUTOMATIC] = automatic(env, step(ours))
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
