"""fastadapt.patch on real PEFT LoRA models: same outputs and gradients as PEFT's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import rel_err

import fastadapt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _lora_config(**kw):
    kw.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    kw.setdefault("lora_alpha", 8)
    return peft.LoraConfig(r=4, init_lora_weights=False, **kw)


def _pair(second_adapter=False, **kw):
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(**kw))
    if second_adapter:
        model.add_adapter("second", _lora_config(lora_alpha=16))
    return model, copy.deepcopy(model)


def _step(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_same(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert rel_err(la, lb) < tol
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert rel_err(ga[name], gb[name]) < tol, name


def test_patched_model_matches_peft_logits_and_grads():
    ours, theirs = _pair()
    report = fastadapt.patch(ours)
    assert len(report.patched) == 14 and not report.skipped, str(report)
    ids = torch.randint(0, 64, (2, 9))
    _assert_same(_step(ours, ids), _step(theirs, ids))


def test_two_adapters_set_adapter_disable_and_merge():
    ours, theirs = _pair(second_adapter=True)
    fastadapt.patch(ours)
    ids = torch.randint(0, 64, (2, 7))
    for name in ("second", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        _assert_same(_step(ours, ids), _step(theirs, ids))
    with ours.disable_adapter(), theirs.disable_adapter():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-6
    merged = ours.merge_and_unload()
    assert rel_err(merged(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5


def test_unpatch_restores_peft_forward():
    ours, _ = _pair()
    fastadapt.patch(ours)
    report = fastadapt.unpatch(ours)
    assert len(report.patched) == 14
    from peft.tuners.lora import layer
    assert all("forward" not in vars(m) for m in ours.modules() if isinstance(m, layer.LoraLayer))


def test_report_says_what_was_left_alone_and_why():
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(target_modules=["q_proj", "embed_tokens"]))
    model.add_adapter("dora", _lora_config(target_modules=["q_proj"], use_dora=True))
    report = fastadapt.patch(model)
    assert any("Embedding" in why for _, why in report.skipped), str(report)
    assert any("variant adapters ['dora']" in what for _, what in report.patched), str(report)
    assert any(why == "already patched" for _, why in fastadapt.patch(model).skipped)
    # The DoRA adapter runs PEFT's own forward and still matches it.
    reference = copy.deepcopy(model)
    fastadapt.unpatch(reference)
    ids = torch.randint(0, 64, (1, 5))
    for m in (model, reference):
        m.set_adapter("dora")
    assert rel_err(model(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-6


def test_save_and_load_pretrained_round_trip(tmp_path):
    ours, _ = _pair()
    fastadapt.patch(ours)
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = _tiny_llama()  # same seed as _pair: the same base weights
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    fastadapt.patch(loaded)
    ids = torch.randint(0, 64, (2, 5))
    assert rel_err(loaded(input_ids=ids).logits, ours(input_ids=ids).logits) < 1e-6


def test_dropout_trains_and_eval_is_deterministic():
    ours, theirs = _pair(lora_dropout=0.1)
    fastadapt.patch(ours)
    ids = torch.randint(0, 64, (2, 7))
    ours.train()
    a, b = ours(input_ids=ids).logits, ours(input_ids=ids).logits
    assert not torch.equal(a, b)  # a fresh mask per call
    ours.eval()
    theirs.eval()
    assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5


def test_float32_adapters_on_bfloat16_base():
    # PEFT's default autocast_adapter_dtype keeps the adapters in float32 over a bf16 base.
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama().to(torch.bfloat16), _lora_config())
    a = next(m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert a.lora_A["default"].weight.dtype == torch.float32
    reference = copy.deepcopy(model)
    truth = copy.deepcopy(model).double()
    fastadapt.patch(model)
    ids = torch.randint(0, 64, (2, 7))
    out, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert out.dtype == ref.dtype == torch.bfloat16
    # Both are bf16 computations of a float64 truth; ours rounds the adapters to bf16 (with fp32
    # accumulation) where PEFT upcasts the input, and must stay within 2x PEFT's own error.
    exact = truth(input_ids=ids).logits
    assert rel_err(out, exact) <= 2 * rel_err(ref, exact), (rel_err(out, exact), rel_err(ref, exact))
