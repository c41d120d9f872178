"""fastadapt.nn.BottleneckAdapter against an eager copy of AdapterHub's ``Adapter`` (the library
itself is not installed here), and adapters placed into small random Hugging Face Llama and BERT
models: identity at init, training touches only adapters, switching, save/load, removal."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import assert_close, rel_err

import fastadapt
from fastadapt.inject.bottleneck import (add_adapter, list_adapters, load_adapter, remove_adapter, save_adapter,
                                         set_active_adapter)
from fastadapt.nn.bottleneck import (BnConfig, BottleneckAdapter, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig,
                                     resolve_config)
from fastadapt.reference.bottleneck import activation


def _adapterhub_forward(m: BottleneckAdapter, hidden_states, input_tensor, layer_norm, keep=None):
    """``adapters``' BottleneckLayer with one adapter: Adapter/ParallelAdapter .pre_forward,
    .forward and .post_forward, transcribed from adapters/methods/modeling.py with m's modules."""
    if m.is_parallel:
        x, residual = input_tensor, input_tensor
    else:
        residual = hidden_states if m.residual_before_ln is True else None
        x = hidden_states
        if m.original_ln_before:
            x = x + input_tensor
            if layer_norm is not None:
                if m.residual_before_ln == "post_add":
                    residual = x
                x = layer_norm(x)
        if not m.residual_before_ln:
            residual = x
    z = m.adapter_norm_before(x) if m.add_layer_norm_before else x
    down = activation(m.non_linearity_name, m.down(z))
    up = m.adapter_up(down) * m.scaling
    output = up if keep is None else up * keep / (1 - m.dropout.p)
    if m.use_gating:
        gate = torch.sigmoid(m.gate(x))
        output = output * torch.mean(gate, dim=1).unsqueeze(-1)
    if m.is_parallel:
        if m.add_layer_norm_after:
            output = m.adapter_norm_after(output)
        output = output + hidden_states
    else:
        if m.adapter_residual_before_ln:
            output = output + residual
        if m.add_layer_norm_after:
            output = m.adapter_norm_after(output)
        if not m.adapter_residual_before_ln:
            output = output + residual
    if m.original_ln_after:
        output = output + input_tensor
        if layer_norm is not None:
            output = layer_norm(output)
    return output


CONFIGS = {
    "pfeiffer": SeqBnConfig(reduction_factor=6),
    "houlsby": DoubleSeqBnConfig(reduction_factor=6, init_weights="houlsby"),
    "parallel": ParBnConfig(reduction_factor=6),
    "everything": BnConfig(reduction_factor=5, non_linearity="gelu_new", ln_before=True, ln_after=True,
                           adapter_residual_before_ln=True, scaling="learned", use_gating=True,
                           original_ln_before=True, residual_before_ln="post_add"),
    "channel_after": BnConfig(reduction_factor=3, non_linearity="tanh", ln_after=True, scaling="channel",
                              residual_before_ln=False, original_ln_before=True, use_gating=True),
    "parallel_ln": ParBnConfig(reduction_factor=4, ln_after=True, ln_before=True, scaling="channel",
                               non_linearity="leakyrelu"),
}


def _randomize(module):
    # Away from the (near-)identity inits, so that every parameter shapes the output.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def _module_vs_adapterhub(name, dtype):
    d = 48
    m = BottleneckAdapter(d, CONFIGS[name])
    _randomize(m)
    host_ln = torch.nn.LayerNorm(d)
    _randomize(host_ln)
    m, host_ln = m.to(dtype), host_ln.to(dtype)
    h = torch.randn(2, 7, d, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 7, d, dtype=dtype, requires_grad=True)
    out = m.layer_forward(h, x, host_ln)
    gout = torch.randn_like(out)
    out.backward(gout)

    m64, ln64 = copy.deepcopy(m).double(), copy.deepcopy(host_ln).double()
    for p in list(m64.parameters()) + list(ln64.parameters()):
        p.grad = None
    h64, x64 = h.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    ref = _adapterhub_forward(m64, h64, x64, ln64)
    ref.backward(gout.double())
    pairs = [("out", out, ref), ("grad h", h.grad, h64.grad), ("grad x", x.grad, x64.grad)]
    pairs += [(f"grad {n}", p.grad, p64.grad) for (n, p), p64 in zip(m.named_parameters(), m64.parameters())]
    return pairs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_matches_adapterhub_forward(name):
    # float64 runs on the reference backend: the module's plumbing (pre/post forward, gate, scale,
    # norms, parameter routing) against AdapterHub's forward. A plumbing mistake is O(1); float64
    # rounding amplified by the LayerNorm backwards stays under 1e-9 (measured <= 3e-10).
    for what, mine, ref in _module_vs_adapterhub(name, torch.float64):
        assert rel_err(mine, ref) < 1e-9, what


@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_fused_float32(name):
    # float32 runs the fused kernels. The gate's and a "learned" scale's gradients are sums of
    # few numbers through LN_after, whose fp32 error swings with the draw for PyTorch too; the op
    # tests check them per row / per channel (test_bottleneck.py).
    scalar_like = {"grad gate.weight", "grad gate.bias", "grad scaling"} if CONFIGS[name].ln_after else set()
    for what, mine, ref in _module_vs_adapterhub(name, torch.float32):
        if what in scalar_like and not (what == "grad scaling" and mine.numel() > 1):
            continue
        assert_close(what, mine, ref, torch.float32, "cpu")


def test_module_dropout_and_eval():
    m = BottleneckAdapter(48, SeqBnConfig(reduction_factor=6, dropout=0.4))
    _randomize(m)
    z, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    m.eval()
    ref = _adapterhub_forward(copy.deepcopy(m).double(), r.double(), z.double(), None)
    assert rel_err(m.layer_forward(r, z), ref) < 1e-5
    m.train()
    a, b = m(z, r), m(z, r)
    assert not torch.equal(a, b)  # a fresh mask per call


def test_init_schemes():
    bert = BottleneckAdapter(256, BnConfig(reduction_factor=4, init_weights="bert"))
    assert abs(bert.down.weight.std().item() - 0.02) < 0.004 and bert.adapter_up.bias.abs().sum() == 0
    mam = BottleneckAdapter(256, ParBnConfig())
    assert mam.adapter_up.weight.abs().sum() == 0 and mam.down.weight.abs().max() > 0
    houlsby = BottleneckAdapter(256, DoubleSeqBnConfig(init_weights="houlsby"))
    assert houlsby.down.weight.abs().max() <= 2e-2 and houlsby.adapter_up.weight.abs().max() <= 2e-2
    # The mam init is an exact identity of the host layer: o = 0.
    z, r = torch.randn(3, 256), torch.randn(3, 256)
    assert torch.equal(mam(z, r), torch.zeros_like(z))


def test_state_dict_keys_follow_adapterhub():
    m = BottleneckAdapter(48, CONFIGS["everything"])
    keys = set(m.state_dict())
    assert {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_down.1.weight", "adapter_down.1.bias",
            "adapter_up.weight", "adapter_up.bias", "scaling", "adapter_norm_before.weight",
            "adapter_norm_after.weight", "gate.weight", "gate.bias"} <= keys
    assert m.down_sample == 48 // 5
    assert "backend=" in repr(m)


def test_torch_compile_fullgraph_no_graph_break():
    m = BottleneckAdapter(48, CONFIGS["everything"], dropout=0.1)
    _randomize(m)
    z, r = torch.randn(2, 7, 48, requires_grad=True), torch.randn(2, 7, 48)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.eval()
    out = compiled(z, r)
    assert rel_err(out, m(z, r)) < 1e-6
    out.sum().backward()
    assert z.grad is not None and m.adapter_up.weight.grad is not None and m.scaling.grad is not None
    m.train()
    compiled(z, r).sum().backward()  # the dropout seed is drawn inside the graph


@pytest.mark.parametrize("kwargs,match", [
    (dict(non_linearity="softsign"), "unknown activation"),
    (dict(init_weights="xavier"), "unknown init_weights"),
    (dict(scaling="per_token"), "unknown scaling"),
    (dict(scaling=float("inf")), "finite"),
    (dict(dropout=1.0), "dropout"),
    (dict(residual_before_ln="pre_add"), "residual_before_ln"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BnConfig(**kwargs)


def test_resolve_config():
    assert resolve_config("houlsby").mh_adapter and resolve_config("parallel").is_parallel
    assert resolve_config({"reduction_factor": 8, "non_linearity": "swish", "architecture": "bottleneck"}) \
        .reduction_factor == 8
    with pytest.raises(ValueError, match="unknown adapter preset"):
        resolve_config("lora")
    assert BnConfig(reduction_factor={"1": 2, "default": 8}).bottleneck_size(64, 1) == 32
    assert BnConfig(reduction_factor={"1": 2, "default": 8}).bottleneck_size(64, 0) == 8


# ---------------------------------------------------------------------------------------------
# Placement into Hugging Face models (random weights from a small config; nothing downloaded)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


MODELS = {"llama": _llama, "bert": _bert}


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby", "parallel"])
def test_identity_at_init_and_one_step_trains_only_adapters(arch, preset):
    model = MODELS[arch]()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        base = _out(model, ids)
    # "mam_adapter" init: zero up-projection, so the adapted model starts as the base model.
    placed = add_adapter(model, "a", resolve_config(preset).__class__(
        **{**resolve_config(preset).to_dict(), "init_weights": "mam_adapter", "reduction_factor": 6}))
    assert len(placed) == (4 if preset == "houlsby" else 2)
    with torch.no_grad():
        assert torch.equal(_out(model, ids), base)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    _out(model, ids).square().mean().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.a." in k for k in changed), sorted(changed)[:5]
    assert any("adapter_up.weight" in k for k in changed)


@pytest.mark.parametrize("arch", list(MODELS))
def test_switch_save_load_remove(arch, tmp_path):
    model = MODELS[arch]()
    ids = torch.randint(0, 97, (2, 5))
    original_keys = set(model.state_dict())
    with torch.no_grad():
        base = _out(model, ids)
    add_adapter(model, "first", DoubleSeqBnConfig(reduction_factor=6, ln_after=True))
    add_adapter(model, "second", SeqBnConfig(reduction_factor=4, scaling="channel", use_gating=True))
    for n, p in model.named_parameters():
        if ".adapters." in n:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    assert list_adapters(model) == ["first", "second"]
    assert all(".adapters.second." in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        second = _out(model, ids)
        set_active_adapter(model, "first")
        first = _out(model, ids)
        set_active_adapter(model, None)
        assert torch.equal(_out(model, ids), base)
    assert rel_err(first, base) > 1e-4 and rel_err(second, base) > 1e-4 and rel_err(first, second) > 1e-4

    path = str(tmp_path / "first.safetensors")
    save_adapter(model, "first", path)
    fresh = MODELS[arch]()  # same seed: the same base weights
    assert load_adapter(fresh, path) == "first"
    with torch.no_grad():
        assert rel_err(_out(fresh, ids), first) < 1e-6
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(fresh, "first", "pfeiffer")

    remove_adapter(model, "first")
    remove_adapter(model, "second")
    assert list_adapters(model) == [] and set(model.state_dict()) == original_keys
    with torch.no_grad():
        assert torch.equal(_out(model, ids), base)


def test_add_adapter_errors():
    with pytest.raises(ValueError, match="no supported layer"):
        add_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), "a", "pfeiffer")
    model = _bert()
    with pytest.raises(KeyError, match="no adapter named"):
        set_active_adapter(model, "missing")
    with pytest.raises(ValueError, match="adapter name"):
        add_adapter(model, "a.b", "pfeiffer")
    leave = add_adapter(model, "a", SeqBnConfig(leave_out=[0]))
    assert leave == ["encoder.layer.1.output:output_adapter"]


# ---------------------------------------------------------------------------------------------
# fastadapt.patch on AdapterHub's own modules: tests/test_adapterhub.py, against the real library in a
# venv of its own (adapters 1.3 pins transformers ~=4.57). Here, next to transformers 5, only this:


def test_patch_reports_adapters_not_installed(monkeypatch):
    import sys

    from fastadapt.integrations import adapterhub

    monkeypatch.setitem(sys.modules, "adapters", None)  # import fails as if not installed
    stray = type("Adapter", (torch.nn.Module,), {"__module__": "adapters.methods.modeling"})()
    report = fastadapt.PatchReport()
    adapterhub.PATCHER.patch(torch.nn.Sequential(stray), report)
    assert any("adapters not installed" in why for _, why in report.skipped), str(report)
    quiet = fastadapt.PatchReport()
    adapterhub.PATCHER.patch(torch.nn.Sequential(torch.nn.Linear(2, 2)), quiet)  # nothing of adapters': silent
    assert not quiet.skipped and not quiet.patched
