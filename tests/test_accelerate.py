"""accelerate without the Trainer (the README's "Use with accelerate"): a patched PEFT LoRA model
prepared by ``Accelerator(mixed_precision="bf16")`` on the CPU runs every LoRA call on the fused op,
under the autocast accelerate wraps the forward in."""

from __future__ import annotations

import pytest
import torch

import fastadapt

accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_accelerate_prepare_bf16_two_steps():
    model = peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = fastadapt.patch(model, strict=True)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    calls = []
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.register_forward_pre_hook(lambda *_: calls.append(torch.is_autocast_enabled("cpu")))
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8))
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    assert calls and set(calls) == {True}  # accelerate's bf16 autocast
    assert report.calls == {"fused": len(calls)}
