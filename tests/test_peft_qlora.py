"""fastadapt.patch on PEFT QLoRA models (bitsandbytes NF4 bases): same outputs and gradients as
PEFT's and bitsandbytes' own forward, the quantized weight read in place."""

from __future__ import annotations

import copy

import pytest
import harness
import torch
from harness import assert_close, rel_err

import fastadapt
from fastadapt.reference import lora as lora_reference
from fastadapt.reference import qlora as reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
peft_bnb = pytest.importorskip("peft.tuners.lora.bnb")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def quantized_llama_dir(tmp_path_factory):
    # Widths that are multiples of the 64-blocks: bnb 0.50.2's CPU dequantization is wrong
    # otherwise (fastadapt/reference/qlora.py), and it is the oracle here.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _qlora_model(path, compute_dtype=torch.float32, double_quant=True):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                       init_lora_weights=False))
    # from_pretrained leaves the model in eval mode, where bnb runs frozen inputs through its CPU
    # inference kernel (repacked weight, measured 5e-4 from its own dequantized fp32 product).
    return model.train()


def _step(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "absmax"])
def test_patched_qlora_llama_matches_peft(quantized_llama_dir, double_quant):
    ours = _qlora_model(quantized_llama_dir, double_quant=double_quant)
    theirs = copy.deepcopy(ours)
    weight = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state.nested == double_quant
    report = fastadapt.patch(ours, strict=True)
    assert len(report.patched) == 14 and not report.skipped, str(report)
    assert all("qlora_linear" in what for _, what in report.patched)
    data_before = weight.data.clone()
    ids = torch.randint(0, 64, (2, 9))
    (lo, go), (lt, gt) = _step(ours, ids), _step(theirs, ids)
    assert report.calls == {"fused": 14}
    assert rel_err(lo, lt) < 1e-5
    assert go.keys() == gt.keys() and len(go) == 28
    for name in go:
        assert rel_err(go[name], gt[name]) < 1e-5, name
    assert torch.equal(weight.data, data_before)  # read in place, never re-quantized
    fastadapt.unpatch(ours)
    assert rel_err(_step(ours, ids)[0], lt) < 1e-5


def _peft_layer(compute_dtype, n_in=128, n_out=64, dropout=0.0):
    torch.manual_seed(2)
    base = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=compute_dtype, quant_type="nf4",
                             compress_statistics=True)
    base.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) / n_in**0.5, requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    base = base.to("cpu")
    base.bias.data = torch.randn(n_out).to(compute_dtype)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False)
    return peft_bnb.Linear4bit(base, "default", config=config, r=8, lora_alpha=16,
                                           lora_dropout=dropout, init_lora_weights=False)


def test_bf16_layer_with_float32_adapters_matches_the_truth():
    # QLoRA as trained: bf16 compute, PEFT's float32 adapters. PEFT runs the adapters in fp32, the
    # fused op in bf16 with fp32 accumulation: both against the float64 truth on bnb's bf16 weight.
    layer = _peft_layer(torch.bfloat16)
    theirs = copy.deepcopy(layer)
    report = fastadapt.patch(torch.nn.Sequential(layer), strict=True)
    assert len(report.patched) == 1
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    gy = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    outs = []
    for module in (layer, theirs):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(gy)
        outs.append((y, xi.grad, module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad))
    q = fastadapt.nf4_from_bnb(layer.base_layer.weight)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A["default"].weight,
                                                               layer.lora_B["default"].weight)]
    y64 = lora_reference.lora_linear(leaves[0], reference.dequantize(q, torch.bfloat16).double(), leaves[1],
                                     leaves[2], layer.scaling["default"], layer.base_layer.bias.double())
    y64.backward(gy.double())
    assert report.calls == {"fused": 1}
    for name, mine, peft_out, truth in zip(["y", "grad x", "grad lora_A", "grad lora_B"], outs[0], outs[1],
                                           [y64, *(t.grad for t in leaves)]):
        assert mine.dtype == peft_out.dtype, name
        assert_close(name, mine, truth, torch.bfloat16, "cpu", peft_out)


def test_call_time_fallbacks():
    layer = _peft_layer(torch.bfloat16)
    report = fastadapt.patch(torch.nn.Sequential(layer))
    with pytest.warns(UserWarning, match="compute_dtype"):
        layer(torch.randn(2, 128))  # fp32 input, bf16 compute dtype: bnb casts, PEFT's forward runs
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.float16):
        layer(x)
    layer(x)
    with torch.autocast("cpu", torch.bfloat16):  # the region's dtype is bnb's compute dtype: served
        assert layer(x).dtype == torch.bfloat16
    assert report.calls["fused"] == 2 and sum(report.calls.values()) == 4, report.calls
    assert any("autocast to torch.float16" in k for k in report.calls)
    with pytest.raises(fastadapt.FallbackError, match="compute_dtype"):
        fastadapt.unpatch(torch.nn.Sequential(layer))
        fastadapt.patch(torch.nn.Sequential(layer), strict=True)
        layer(torch.randn(2, 128))


def test_dropout_in_training_is_served():
    layer = _peft_layer(torch.float32, dropout=0.2)
    report = fastadapt.patch(torch.nn.Sequential(layer), strict=True)
    x = torch.randn(5, 128, requires_grad=True)
    layer(x).sum().backward()
    assert report.calls == {"fused": 1} and x.grad is not None
    layer.eval()
    with torch.no_grad():
        # Eval without grad is where bnb would repack the weight for its CPU kernel; served, it
        # stays in the NF4 layout, and the output is the exact one (no dropout in eval).
        y = layer(x)
    assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    w = reference.dequantize(fastadapt.nf4_from_bnb(layer.base_layer.weight), torch.float64)
    y64 = lora_reference.lora_linear(x.double(), w, layer.lora_A["default"].weight.double(),
                                     layer.lora_B["default"].weight.double(), layer.scaling["default"],
                                     layer.base_layer.bias.double())
    assert rel_err(y, y64) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_several_adapters_with_dropout_are_one_fused_call(backend, monkeypatch):
    # Each adapter's own mask (the op's, put into PEFT's dropout modules): PEFT's output and grads.
    if backend not in harness.backends_for("qlora_linear", "cpu"):
        pytest.skip(f"{backend} backend unavailable")
    layer = _peft_layer(torch.float32, dropout=0.2)
    config = peft.LoraConfig(r=5, lora_alpha=20, lora_dropout=0.4, init_lora_weights=False)
    layer.update_layer("second", 5, lora_alpha=20, config=config, lora_dropout=0.4, init_lora_weights=False)
    layer.set_adapter(["default", "second"])
    theirs = copy.deepcopy(layer)
    report = fastadapt.patch(torch.nn.Sequential(layer), strict=True)
    seed = 98765
    monkeypatch.setattr(fastadapt.ops.lora, "_draw_seed", lambda: torch.tensor(seed))
    monkeypatch.setattr(fastadapt.ops.qlora, "_draw_seed", lambda: torch.tensor(seed))
    for k, name in enumerate(["default", "second"]):
        theirs.lora_dropout[name] = harness.OpMask(backend, seed, k, theirs.lora_dropout[name].p)
    x = torch.randn(3, 7, 128)
    gy = torch.randn(3, 7, 64)
    outs = []
    for module in (layer, theirs):
        xi = x.clone().requires_grad_()
        with fastadapt.dispatch.use_backend(backend):
            y = module(xi)
            y.backward(gy)
        outs.append([y, xi.grad, *(module.lora_A[a].weight.grad for a in ("default", "second")),
                     *(module.lora_B[a].weight.grad for a in ("default", "second"))])
    assert report.calls == {"fused": 1}
    for mine, peft_out in zip(*outs):
        assert rel_err(mine, peft_out) < 1e-5


def test_fp4_base_is_left_to_peft():
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, quant_type="fp4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="fp4")
    layer = peft_bnb.Linear4bit(base.to("cpu"), "default", config=peft.LoraConfig(r=4), r=4)
    report = fastadapt.patch(torch.nn.Sequential(layer))
    assert not report.patched and "quant_type 'fp4'" in report.skipped[0][1]


def test_dora_on_a_qlora_layer_runs_peft():
    # DoRA on a 4-bit base is not fused (dora_linear takes a dense weight): PEFT's forward, reported.
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    config = peft.LoraConfig(r=4, use_dora=True, init_lora_weights=False)
    layer = peft_bnb.Linear4bit(base.to("cpu"), "default", config=config, r=4, use_dora=True, init_lora_weights=False)
    theirs = copy.deepcopy(layer)
    report = fastadapt.patch(torch.nn.Sequential(layer))
    assert len(report.patched) == 1 and "DoRA included" in report.fallbacks[0][1]
    x = torch.randn(3, 64)
    with pytest.warns(UserWarning, match="on a QLoRA layer"):
        y = layer(x)
    assert report.calls == {"fallback: LoRA variant adapter(s) ['default'] (DoRA, ...) on a QLoRA layer": 1}
    assert torch.equal(y, theirs(x))
