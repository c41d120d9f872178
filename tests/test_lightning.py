"""Lightning: the README's ``configure_model()`` recipe, run by a real ``lightning.Trainer`` on the CPU
with bf16 autocast (``precision="bf16-mixed"``): every PEFT LoRA call runs the fused op."""

from __future__ import annotations

import pytest
import torch

import fastadapt

L = pytest.importorskip("lightning")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class LoRAModule(L.LightningModule):
    """The README's recipe: build the adapters and patch them in ``configure_model``, which Lightning
    calls once the strategy is set up (under FSDP: inside its init context), before the optimizer."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.model = None
        self.report = None

    def configure_model(self):
        if self.model is not None:  # Lightning may call it more than once (fit, then test)
            return
        self.model = peft.get_peft_model(self.base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        self.report = fastadapt.patch(self.model, strict=True)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_lightning_configure_model_recipe(tmp_path):
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32))
    module = LoRAModule(base)
    calls = []

    class Count(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # after configure_model
            for m in pl_module.modules():
                if isinstance(m, peft.tuners.lora.LoraLayer):
                    m.register_forward_pre_hook(lambda *_: calls.append(torch.is_autocast_enabled("cpu")))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[Count()])
    trainer.fit(module, torch.utils.data.DataLoader(torch.randint(0, 64, (4, 8)), batch_size=2))
    assert trainer.global_step == 2
    assert len(module.report.patched) == 4, str(module.report)
    assert calls and set(calls) == {True}  # bf16-mixed ran autocast
    assert module.report.calls == {"fused": len(calls)}
