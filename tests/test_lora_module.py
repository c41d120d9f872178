"""fastadapt.nn.LoRALinear: PEFT-compatible state dict, merge/unmerge, torch.compile."""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

from fastadapt.nn import LoRALinear
from fastadapt.reference import lora as reference


def _module(in_features=48, out_features=32, **kw):
    kw.setdefault("lora_alpha", 8)
    m = LoRALinear(in_features, out_features, r=4, **kw)
    torch.nn.init.normal_(m.lora_B["default"].weight)  # PEFT's zero init would hide the LoRA path
    return m


def test_forward_matches_reference():
    m = _module()
    x = torch.randn(3, 5, 48)
    expected = reference.lora_linear(x.double(), m.weight.double(), m.lora_A["default"].weight.double(),
                                     m.lora_B["default"].weight.double(), 2.0, m.bias.double())
    assert rel_err(m(x), expected) < 1e-5
    assert not m.base_layer.weight.requires_grad and m.lora_A["default"].weight.requires_grad


def test_starts_as_base_layer():
    m = LoRALinear(48, 32, r=4)
    x = torch.randn(7, 48)
    assert torch.allclose(m(x), m.base_layer(x), atol=1e-6)


def test_rslora_scaling_and_repr():
    m = LoRALinear(48, 32, r=16, lora_alpha=8, use_rslora=True)
    assert m.scaling == pytest.approx(8 / 4)
    assert "r=16" in repr(m) and "backend=" in repr(m)


def test_state_dict_keys_match_peft_and_load_both_ways():
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(48, 32))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                           init_lora_weights=False))
    peft_layer = peft_model.base_model.model.proj
    ours = LoRALinear(48, 32, r=4, lora_alpha=8)
    assert set(ours.state_dict()) == set(peft_layer.state_dict())
    ours.load_state_dict(peft_layer.state_dict())
    x = torch.randn(6, 48)
    assert rel_err(ours(x), peft_layer(x)) < 1e-5
    torch.nn.init.normal_(ours.lora_A["default"].weight)
    peft_layer.load_state_dict(ours.state_dict())
    assert rel_err(ours(x), peft_layer(x)) < 1e-5


def test_from_linear_shares_the_base_weight():
    linear = torch.nn.Linear(48, 32, bias=False)
    m = LoRALinear.from_linear(linear, r=2, lora_alpha=4, lora_dropout=0.1)
    assert m.base_layer is linear and m.bias is None and m.scaling == 2.0
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_merge_unmerge_round_trip():
    m = _module()
    x = torch.randn(9, 48)
    before = m(x)
    w0 = m.weight.clone()
    m.merge()
    assert m.merged and "merged=True" in repr(m)
    assert rel_err(m(x), before) < 1e-5  # merged: the base matmul alone gives the same output
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert rel_err(m.weight, w0) < 1e-6 and rel_err(m(x), before) < 1e-5
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


@pytest.mark.parametrize("r,dropout", [(0, 0.0), (-1, 0.0), (4, 1.0)])
def test_bad_construction(r, dropout):
    with pytest.raises(ValueError):
        LoRALinear(8, 8, r=r, lora_dropout=dropout)


def test_dropout_only_in_training():
    m = _module(lora_dropout=0.5)
    x = torch.randn(16, 48)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_torch_compile_fullgraph_no_graph_break():
    m = _module(lora_dropout=0.1)
    x = torch.randn(2, 7, 48, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.eval()
    y = compiled(x)
    assert rel_err(y, m(x)) < 1e-6
    y.sum().backward()
    assert m.lora_A["default"].weight.grad is not None and x.grad is not None
    m.train()
    compiled(x).sum().backward()  # the dropout seed is drawn inside the graph


def test_torch_compile_fullgraph_with_two_scalings():
    # Two layers of different lora_alpha compiled apart: the second compile of LoRALinear.forward
    # sees another Python float and makes it symbolic (one graph for every value), which the
    # argument checks must let through (an eager call checks the same value).
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48)
    for alpha in (8, 3, 5):
        m = _module(lora_alpha=alpha, lora_dropout=0.1)
        m.eval()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        assert rel_err(y, m(x)) < 1e-6
        y.sum().backward()
        assert m.lora_B["default"].weight.grad is not None
