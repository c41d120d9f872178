"""fastadapt.nn.MultiLoRALinear: each sequence through its own adapter, as LoRALinear would run it
on that sequence alone; PEFT-compatible state dict; torch.compile."""

from __future__ import annotations

import pytest
import torch
from harness import backends_for, rel_err

from fastadapt import dispatch
from fastadapt.nn import LoRALinear, MultiLoRALinear

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=2, lora_alpha=16, use_rslora=True),
            "c": dict(r=8, lora_alpha=8)}
NAMES = ["b", "__base__", "a", "b"]  # "c" absent


def _module(**kw):
    m = MultiLoRALinear(48, 32)
    for name, cfg in ADAPTERS.items():
        m.add_adapter(name, **cfg, **kw)
        torch.nn.init.normal_(m.lora_B[name].weight)  # PEFT's zero init would hide the LoRA path
    return m


def test_each_sequence_as_lora_linear_on_its_own():
    m = _module()
    x = torch.randn(len(NAMES), 5, 48, requires_grad=True)
    y = m(x, NAMES)
    gy = torch.randn_like(y)
    y.backward(gy)
    for i, name in enumerate(NAMES):
        if name == "__base__":
            assert rel_err(y[i], m.base_layer(x[i])) < 1e-6
            continue
        single = LoRALinear.from_linear(m.base_layer, adapter_name=name, **ADAPTERS[name])
        single.load_state_dict({k: v for k, v in m.state_dict().items()
                                if k.startswith("base_layer") or f".{name}." in k})
        xi = x[i].detach().requires_grad_()
        yi = single(xi)
        assert rel_err(y[i], yi) < 1e-5
    # Grads: the two "b" sequences sum; "c" is absent and gets none, as in PEFT.
    assert m.lora_A["c"].weight.grad is None and m.lora_B["c"].weight.grad is None
    rows = [i for i, n in enumerate(NAMES) if n == "b"]
    single = LoRALinear.from_linear(torch.nn.Linear(48, 32), adapter_name="b", **ADAPTERS["b"])
    single.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("base_layer") or ".b." in k})
    single(x.detach()[rows]).backward(gy[rows])
    assert rel_err(m.lora_A["b"].weight.grad, single.lora_A["b"].weight.grad) < 1e-5
    assert rel_err(m.lora_B["b"].weight.grad, single.lora_B["b"].weight.grad) < 1e-5


@pytest.mark.parametrize("backend", backends_for("multi_lora_linear", "cpu"))
def test_a_batch_of_one_sequence(backend):
    # One name for one sequence: its id, expanded over the sequence's rows, reaches the op as a
    # stride-0 view (the cpp kernel read it with stride 1, past its one-element storage: SIGSEGV).
    m = _module()
    x = torch.randn(1, 5, 48)
    with dispatch.use_backend(backend):
        y = m(x, ["a"])
    single = LoRALinear.from_linear(m.base_layer, adapter_name="a", **ADAPTERS["a"])
    single.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("base_layer") or ".a." in k})
    assert rel_err(y, single(x)) < 1e-5


def test_state_dict_keys_are_peft_s():
    keys = set(_module().state_dict())
    assert {"base_layer.weight", "base_layer.bias", "lora_A.a.weight", "lora_B.c.weight"} <= keys
    assert "r=2" in repr(_module())


def test_bad_names_and_adapters():
    m = _module()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['z'\]"):
        m(torch.randn(2, 48), ["a", "z"])
    with pytest.raises(ValueError, match="2 names for a batch of 3"):
        m(torch.randn(3, 48), ["a", "b"])
    with pytest.raises(TypeError, match="sequence of names, one per sequence, got the string 'a'"):
        m(torch.randn(1, 48), "a")  # would have been ["a"]
    with pytest.raises(ValueError, match="adapter name"):
        m.add_adapter("a")
    with pytest.raises(ValueError, match="r must be"):
        m.add_adapter("d", r=0)


def test_dropout_only_in_training():
    m = _module(lora_dropout=0.3)
    x = torch.randn(4, 6, 48)
    m.eval()
    assert torch.equal(m(x, NAMES), m(x, NAMES))
    m.train()
    assert not torch.equal(m(x, NAMES), m(x, NAMES))


def test_torch_compile_fullgraph_no_graph_break():
    m = _module(lora_dropout=0.1)
    x = torch.randn(4, 7, 48, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.eval()
    y = compiled(x, NAMES)
    assert rel_err(y, m(x, NAMES)) < 1e-6
    y.sum().backward()
    assert m.lora_A["a"].weight.grad is not None and x.grad is not None
    m.train()
    compiled(x, NAMES).sum().backward()
