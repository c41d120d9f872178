"""LLaMA-Adapter on real Hugging Face models (tiny, random, built from a config): the fused path
against the two-pass path (the model's own SDPA + an eager prefix pass, as PEFT computes it),
save/load of the adapter, greedy generation, and PEFT's own AdaptionPrompt model as an oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import rel_err

import fastadapt
from fastadapt.inject import llama_adapter

transformers = pytest.importorskip("transformers")


def _model(kind="llama", kv_heads=2, attn_implementation="sdpa"):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=64)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**common, attn_implementation=attn_implementation))
    return model.eval()


def _randomize_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.randn_like(p))


@pytest.fixture(autouse=True)
def _count_two_pass(monkeypatch):
    """Records every two-pass (fallback) call, so that a test can check the fused path really ran."""
    original = llama_adapter._two_pass

    def counted(*args, **kwargs):
        _TWO_PASS_CALLS.append(args[0].layer_idx)
        return original(*args, **kwargs)

    monkeypatch.setattr(llama_adapter, "_two_pass", counted)
    _TWO_PASS_CALLS[:] = []
    yield
    _TWO_PASS_CALLS[:] = []


_TWO_PASS_CALLS: list[int] = []


def _logits_and_grads(model, ids, mask=None, fused=True):
    llama_adapter.set_fused(model, fused)
    model.zero_grad()
    before = len(_TWO_PASS_CALLS)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert (len(_TWO_PASS_CALLS) == before) == fused, "the fused path fell back to the two-pass computation"
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    valid = mask[..., None] if mask is not None else 1.0
    (logits * w * valid).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fused_matches_two_pass(kind):
    model = _model(kind)
    ids = torch.randint(0, 64, (2, 11))
    base = model(input_ids=ids).logits.detach()
    fastadapt.add_adaption_prompt(model, adapter_len=5, adapter_layers=2, gate="per_head", gate_tanh=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adaption.adaption_" in n for n in trainable)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, base) <= 1e-5  # zero-init gates: the base model
    _randomize_gates(model)
    fused, g_fused = _logits_and_grads(model, ids)
    ref, g_ref = _logits_and_grads(model, ids, fused=False)
    assert rel_err(fused, ref) <= 1e-5 and rel_err(fused, base) > 1e-3
    assert g_fused.keys() == g_ref.keys()
    for name in g_ref:
        assert rel_err(g_fused[name], g_ref[name]) <= 1e-5, name


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])  # bool masks / additive float masks
def test_padded_batch_and_greedy_generation(attn_implementation):
    model = _model("llama", attn_implementation=attn_implementation)
    fastadapt.add_adaption_prompt(model, adapter_len=4, adapter_layers=1, gate="scalar")
    _randomize_gates(model)
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    fused, g_fused = _logits_and_grads(model, ids, mask)
    ref, g_ref = _logits_and_grads(model, ids, mask, fused=False)
    keep = mask.bool()
    assert rel_err(fused[keep], ref[keep]) <= 1e-5
    for name in g_ref:
        assert rel_err(g_fused[name], g_ref[name]) <= 1e-5, name
    outs = []
    for fused_path in (True, False):
        llama_adapter.set_fused(model, fused_path)
        _TWO_PASS_CALLS.clear()
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0))
        assert bool(_TWO_PASS_CALLS) != fused_path  # prefill and every decode step ran fused
    assert torch.equal(outs[0], outs[1])


def test_save_load_roundtrip(tmp_path):
    model = _model("qwen2")
    fastadapt.add_adaption_prompt(model, adapter_len=3, adapter_layers=1, gate="per_head")
    _randomize_gates(model)
    llama_adapter.save_adaption_prompt(model, str(tmp_path))
    fresh = _model("qwen2")
    llama_adapter.load_adaption_prompt(fresh, str(tmp_path))
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    llama_adapter.remove_adaption_prompt(fresh)
    assert not any("adaption" in n for n, _ in fresh.named_parameters())


def test_add_adaption_prompt_bad_input():
    model = _model("llama")
    with pytest.raises(ValueError, match="adapter_layers"):
        fastadapt.add_adaption_prompt(model, adapter_len=3, adapter_layers=3)
    with pytest.raises(ValueError, match="gate must be one of"):
        fastadapt.add_adaption_prompt(model, adapter_len=3, adapter_layers=1, gate="vector")
    fastadapt.add_adaption_prompt(model, adapter_len=3, adapter_layers=1)
    with pytest.raises(ValueError, match="already has adaption prompts"):
        fastadapt.add_adaption_prompt(model, adapter_len=3, adapter_layers=1)
    with pytest.raises(ValueError, match="supports model types"):
        fastadapt.add_adaption_prompt(torch.nn.Linear(2, 2), adapter_len=3, adapter_layers=1)


# ---------------------------------------------------------------------------------------------
# PEFT's AdaptionPrompt as the oracle


def _peft_pair(kv_heads=2):
    peft = pytest.importorskip("peft")
    model = _model("llama", kv_heads=kv_heads)
    config = peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(model, config)
    _randomize_gates(theirs)
    return theirs, copy.deepcopy(theirs)


def _step(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)))
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_peft_adaption_prompt_patched_matches_peft(kv_heads):
    theirs, ours = _peft_pair(kv_heads)
    report = fastadapt.patch(ours)
    patched = [n for n, what in report.patched if "prefix_attention" in what]
    assert len(patched) == 2, str(report)
    keys = set(ours.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    ref_logits, ref_grads = _step(theirs, ids)
    _TWO_PASS_CALLS.clear()
    logits, grads = _step(ours, ids)
    assert not _TWO_PASS_CALLS
    assert rel_err(logits, ref_logits) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 4  # prompt and gate of 2 layers
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    assert set(ours.state_dict()) == keys  # PEFT's state dict is untouched
    with torch.no_grad():
        a = theirs.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = ours.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    fastadapt.unpatch(ours)
    logits_unpatched, _ = _step(ours, ids)
    assert torch.equal(logits_unpatched, ref_logits)


def test_peft_adaption_prompts_added_or_inactive_at_patch_time_are_fused():
    # PEFT keeps each adapter's wrappers aside while another is active and swaps them in with
    # set_adapter; the ones inactive at patch() and those of an adapter added after it (here with
    # other prompt lengths and layer counts) run the fused op too, and unpatch() restores them all.
    peft = pytest.importorskip("peft")
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    def config(adapter_len, adapter_layers):
        return peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM")

    theirs = peft.get_peft_model(_model("llama"), config(5, 2))
    theirs.add_adapter("inactive", config(3, 1))
    theirs.set_adapter("inactive")
    _randomize_gates(theirs)
    theirs.set_adapter("default")
    _randomize_gates(theirs)
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours, strict=True)  # a call that runs PEFT's forward raises
    assert len(report.patched) == 3, str(report)
    for model in (ours, theirs):
        torch.manual_seed(1)
        model.add_adapter("later", config(7, 2))
        model.set_adapter("later")
        _randomize_gates(model)
    assert len(report.patched) == 5, str(report)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        for name in ("inactive", "later", "default"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5, name
    assert report.calls == {"fused": 1 + 2 + 2} and not _TWO_PASS_CALLS and len(report.patched) == 5
    fastadapt.unpatch(ours)
    wrappers = [m for m in ours.modules() if isinstance(m, AdaptedAttention)]
    wrappers += [w for cached in ours.base_model._cached_adapters.values() for w in cached]
    assert len(wrappers) == 5 and all("forward" not in vars(w) for w in wrappers)
