"""fastadapt.patch on PEFT prefix tuning (PrefixTuningConfig): the joint mode of prefix_attention,
with the same logits, grads and generated tokens as PEFT's own path."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import bound, rel_err

import fastadapt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _pair(attention_dropout=0.0, **kw):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                      attention_dropout=attention_dropout)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **kw))
    return copy.deepcopy(theirs), theirs


def _batch():
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as a generation batch has
    return ids, mask


def _step(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft(projection):
    ours, theirs = _pair(prefix_projection=projection, encoder_hidden_size=16)
    report = fastadapt.patch(ours, strict=True)
    assert [what for _, what in report.patched] == [
        "peft prefix tuning (2 attention layers) -> fastadapt::prefix_attention (joint)"]
    ids, mask = _batch()
    (lo, go), (lt, gt) = _step(ours, ids, mask), _step(theirs, ids, mask)
    assert rel_err(lo[mask.bool()], lt[mask.bool()]) < 1e-5
    assert go.keys() == gt.keys() and go
    for name in go:
        assert rel_err(go[name], gt[name]) < 1e-5, name
    assert report.calls == {"fused": 2}


def test_prefix_tuning_under_autocast_against_float64():
    ours, theirs = _pair()
    truth = copy.deepcopy(theirs).double()
    report = fastadapt.patch(ours, strict=True)
    ids, mask = _batch()
    with torch.autocast("cpu", torch.bfloat16):
        (lo, go), (lt, gt) = _step(ours, ids, mask), _step(theirs, ids, mask)
    le, ge = _step(truth, ids, mask)
    keep = mask.bool()
    limit = bound(torch.bfloat16, "cpu")
    assert rel_err(lo[keep], le[keep]) <= 2 * rel_err(lt[keep], le[keep]) + limit / 4
    for name in go:
        assert rel_err(go[name], ge[name]) <= 2 * rel_err(gt[name], ge[name]) + limit / 4, name
    assert report.calls == {"fused": 2}


def test_generation_and_unpatch():
    ours, theirs = _pair()
    report = fastadapt.patch(ours, strict=True)
    ids, mask = _batch()
    outs = []
    for model in (ours, theirs):
        model.eval()
        with torch.inference_mode():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                       pad_token_id=0))
    assert torch.equal(outs[0], outs[1])
    assert report.calls == {"fused": 2 * 5}  # every decode step's attention, prefix + cache in one pass
    # (Gradient checkpointing is not tested here: transformers turns the cache off under it, which
    # drops PEFT's prefix: PEFT's own prefix tuning fails then, and so does the patched model.)
    fastadapt.unpatch(ours)
    attns = [m for m in ours.modules() if hasattr(m, "q_proj")]
    assert all(a.config._attn_implementation != "fastadapt_prefix_tuning" for a in attns)
    assert "generate" not in vars(ours) and "forward" not in vars(ours)


def test_unserved_call_falls_back_and_says_why():
    ours, theirs = _pair(attention_dropout=0.1)
    report = fastadapt.patch(ours)
    assert "attention dropout" in str(report)
    ids, mask = _batch()
    ours.train()
    with pytest.warns(UserWarning, match="attention dropout"):
        ours(input_ids=ids, attention_mask=mask)
    assert report.calls == {"fallback: attention dropout": 2}
    ours.eval()  # no dropout in eval: fused
    theirs.eval()
    keep = mask.bool()
    assert rel_err(ours(input_ids=ids, attention_mask=mask).logits[keep],
                   theirs(input_ids=ids, attention_mask=mask).logits[keep]) < 1e-5
    strict, _ = _pair(attention_dropout=0.1)
    fastadapt.patch(strict, strict=True)
    with pytest.raises(fastadapt.FallbackError, match="attention dropout"):
        strict(input_ids=ids, attention_mask=mask)
