"""A patched model pickles whole: ``torch.save`` / ``torch.load(weights_only=False)`` and pickle
round trips give the same outputs, still on the fused path, in this process and in a fresh one
(every patcher, and fastadapt's own injectors; AdapterHub's layout in test_bottleneck_models.py)."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import fastadapt
from fastadapt.inject import llama_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _randomize(model, suffix):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffix):
                p.copy_(torch.randn_like(p))
    return model


def _lora():
    lora = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(**lora))
    model.add_adapter("second", peft.LoraConfig(**lora))
    # In training with adapter_names: the patched LoraModel's hook (PEFT refuses it unpatched).
    return model.train(), dict(input_ids=IDS, adapter_names=["default", "second"])


def _qlora():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from test_peft_qlora import _peft_layer
    return torch.nn.Sequential(_peft_layer(torch.float32)), dict(input=torch.randn(3, 128))


def _adaption_prompt():
    config = peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM")
    return _randomize(peft.get_peft_model(_tiny_llama(), config), "adaption_gate"), dict(input_ids=IDS)


def _prefix_tuning():
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    return peft.get_peft_model(_tiny_llama(), config), dict(input_ids=IDS)


def _moe():
    # PEFT target_parameters LoRA on a tiny Qwen3-MoE's experts (fastadapt.integrations.peft_moe).
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, vocab_size=64,
                                         max_position_embeddings=64)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, target_modules=[], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return peft.get_peft_model(transformers.Qwen3MoeForCausalLM(config), lora), dict(input_ids=IDS)


def _fastadapt_adapter():
    model = _tiny_llama()
    fastadapt.add_adapter(model, "a", "houlsby")
    return _randomize(model, "weight"), dict(input_ids=IDS)


def _fastadapt_adaption_prompt():
    model = _tiny_llama()
    fastadapt.add_adaption_prompt(model, adapter_len=5, adapter_layers=2)
    return _randomize(model, "adaption_gate"), dict(input_ids=IDS)


PATCHED = {"peft_lora": _lora, "peft_qlora": _qlora, "peft_adaption_prompt": _adaption_prompt,
           "peft_prefix_tuning": _prefix_tuning, "peft_moe": _moe}
MODELS = {**PATCHED, "fastadapt_adapter": _fastadapt_adapter, "fastadapt_adaption_prompt": _fastadapt_adaption_prompt}


def _output(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _report(model):
    """The report a patched model's modules count their calls in (its copy, in a copied model)."""
    return next(m.__dict__["_fastadapt_report"] for m in model.modules() if "_fastadapt_report" in m.__dict__)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _build(kind):
    model, inputs = MODELS[kind]()
    if kind in PATCHED:
        fastadapt.patch(model, strict=True)  # a call that falls back raises
    return model, inputs


@pytest.fixture(autouse=True)
def _no_two_pass(monkeypatch):
    # fastadapt's LLaMA-Adapter has no report: its fused path is the one that skips _two_pass.
    def fail(*args, **kwargs):
        raise AssertionError("the adaption prompt ran its two-pass (unfused) path")
    monkeypatch.setattr(llama_adapter, "_two_pass", fail)


@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trips_give_the_same_outputs_on_the_fused_path(kind):
    model, inputs = _build(kind)
    expected = _output(model, inputs)
    for round_trip in (_torch_save_load, lambda m: pickle.loads(pickle.dumps(m))):
        loaded = round_trip(model)
        if kind in PATCHED:
            report = _report(loaded)
            assert report is not _report(model)
            fused = report.calls["fused"]
        assert torch.equal(_output(loaded, inputs), expected)
        if kind in PATCHED:
            assert report.calls["fused"] > fused and list(report.calls) == ["fused"], report.calls


def test_a_fresh_process_loads_and_runs_them(tmp_path):
    # transformers' AttentionInterface is per process: the routed attention modules register ours
    # again when they are unpickled; so is the hook that patches adapters added to a patched model.
    for kind in ("peft_adaption_prompt", "peft_prefix_tuning", "fastadapt_adaption_prompt"):
        model, inputs = _build(kind)
        torch.save((model, inputs, _output(model, inputs)), tmp_path / f"{kind}.pt")
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)  # as the tests run (conftest.py): the same GEMM rounding
        for path in sys.argv[1:]:
            model, inputs, expected = torch.load(path, weights_only=False)
            assert torch.equal(model(**inputs).logits, expected), path
            if path.endswith("peft_adaption_prompt.pt"):
                import peft
                model.add_adapter("later", peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
                assert "forward" in vars(model.base_model._cached_adapters["later"][0]), "not patched"
    """)
    paths = sorted(str(p) for p in tmp_path.glob("*.pt"))
    run = subprocess.run([sys.executable, "-c", script, *paths], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
