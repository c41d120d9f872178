"""fastadapt.patch on real PEFT LoRA models: same outputs and gradients as PEFT's own forward."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import harness
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
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(r=4, **kw)


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


def test_report_says_what_was_left_alone_and_why_and_what_falls_back():
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(target_modules=["q_proj", "embed_tokens"],
                                                            modules_to_save=["lm_head"]))
    model.add_adapter("mica", _lora_config(target_modules=["q_proj"], init_lora_weights="mica"))
    report = fastadapt.patch(model)
    assert any("embedding" in why for _, why in report.skipped), str(report)
    assert any("modules_to_save" in why for _, why in report.skipped), str(report)
    # The report names the call-time conditions that will still run PEFT's forward, per layer.
    assert len(report.fallbacks) == 2 and all("LoRA variant adapter ['mica']" in c for _, c in report.fallbacks)
    assert "still run the library's forward when" in str(report)
    assert any(why == "already patched" for _, why in fastadapt.patch(model).skipped)
    ids = torch.randint(0, 64, (1, 5))
    model(input_ids=ids)
    assert report.calls == {"fused": 2}
    # The MiCA adapter (a LoRA variant) runs PEFT's own forward, still matches it, warns once and is counted.
    reference = copy.deepcopy(model)
    fastadapt.unpatch(reference)
    for m in (model, reference):
        m.set_adapter("mica")
    with pytest.warns(UserWarning, match=r"q_proj runs the library's own forward.*LoRA variant"):
        out = model(input_ids=ids).logits
    assert rel_err(out, reference(input_ids=ids).logits) < 1e-6
    assert report.calls["fallback: LoRA variant adapter(s) ['mica'] (other than DoRA) active"] == 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # once per report: no second warning


def test_the_report_names_every_condition_the_forward_checks():
    # One rule states each condition in the report and checks it at call time: a DoRA adapter with
    # lora_bias (PEFT's config refuses the pair, its layer takes it) runs PEFT's forward, as its
    # layer's report entry says.
    from peft.tuners.lora import layer
    config = peft.LoraConfig(r=4, use_dora=True, init_lora_weights=False)
    config.lora_bias = True
    lora = layer.Linear(torch.nn.Linear(16, 8), "default", config=config, r=4)
    theirs = copy.deepcopy(lora)
    report = fastadapt.patch(torch.nn.Sequential(lora))
    assert "lora_bias on a DoRA adapter ['default']" in report.fallbacks[0][1], str(report)
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match="lora_bias on a DoRA adapter"):
        assert torch.equal(lora(x), theirs(x))
    assert report.calls == {"fallback: lora_bias on a DoRA adapter": 1}


def test_strict_patch_raises_on_a_fallback():
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(target_modules=["q_proj"]))
    model.add_adapter("mica", _lora_config(target_modules=["q_proj"], init_lora_weights="mica"))
    fastadapt.patch(model, strict=True)
    ids = torch.randint(0, 64, (1, 5))
    model(input_ids=ids)  # the plain adapter is fused
    model.set_adapter("mica")
    with pytest.raises(fastadapt.FallbackError, match="q_proj.*LoRA variant adapter"):
        model(input_ids=ids)


def test_adapters_added_after_patch_are_served():
    # New target modules get new LoRA layers, which join the patched model: patched on the spot,
    # in the report, fused (strict), also in a copy of the model (then in the copy's report).
    ours, theirs = _pair(target_modules=["q_proj"])
    report = fastadapt.patch(ours, strict=True)
    copied = copy.deepcopy(ours)
    for model in (ours, theirs, copied):
        torch.manual_seed(1)
        model.add_adapter("later", _lora_config(target_modules=["q_proj", "v_proj", "down_proj"]))
        model.set_adapter("later")
    assert len(report.patched) == 6 and any(name.endswith("layers.1.mlp.down_proj") for name, _ in report.patched)
    ids = torch.randint(0, 64, (2, 7))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 6}
    assert rel_err(copied(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    assert report.calls == {"fused": 6}  # the copy counts in its own report
    fastadapt.unpatch(ours)
    ours.add_adapter("after_unpatch", _lora_config(target_modules=["k_proj"]))
    from peft.tuners.lora import layer
    assert all("forward" not in vars(m) for m in ours.modules() if isinstance(m, layer.LoraLayer))


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


# --- Real training setups take the fused path (autocast, mixed dtypes, Conv1D, several adapters) ---


def _lora_grads_vs_truth(ours, theirs, truth, ids, autocast=None):
    """Logits and every LoRA grad of ``ours`` (patched) and ``theirs`` (PEFT), both against a float64
    copy. The logits, and all LoRA grads taken together, keep the harness's rule: within 2x PEFT's
    own error plus a quarter of the dtype bound. One grad tensor carries every upstream layer's
    rounding, amplified by its own conditioning (seen in fp32: both models' gy at a layer 1e-5 off,
    a gA then 2e-6 off in PEFT and 1.2e-5 in ours, where the op fed the same x and gy is 2e-7 off in
    both), so per tensor the floor is the whole dtype bound: a wrong adapter is off by O(1)."""
    results = []
    for model in (ours, theirs):
        with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
            results.append(_step(model, ids))
    (lo, go), (lt, gt), (le, ge) = *results, _step(truth, ids)
    limit = harness.bound(autocast or lo.dtype, "cpu")
    assert lo.dtype == lt.dtype
    assert rel_err(lo, le) <= 2 * rel_err(lt, le) + limit / 4, (rel_err(lo, le), rel_err(lt, le))
    assert go.keys() == gt.keys() == ge.keys() and go
    for name in go:
        assert go[name].dtype == gt[name].dtype, name
        assert rel_err(go[name], ge[name]) <= 2 * rel_err(gt[name], ge[name]) + limit, name

    def flat(grads):
        return torch.cat([grads[n].double().flatten() for n in sorted(grads)])

    assert rel_err(flat(go), flat(ge)) <= 2 * rel_err(flat(gt), flat(ge)) + limit / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_fused_and_matches_peft(dtype):
    # The HF Trainer's bf16=True / fp16=True: a float32 model under torch.autocast.
    ours, theirs = _pair()
    truth = copy.deepcopy(theirs).double()
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 9))
    _lora_grads_vs_truth(ours, theirs, truth, ids, autocast=dtype)
    assert report.calls == {"fused": 14}


def test_float32_adapters_on_bfloat16_base_grads():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_tiny_llama().to(torch.bfloat16), _lora_config())
    ours, truth = copy.deepcopy(theirs), copy.deepcopy(theirs).double()
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    _lora_grads_vs_truth(ours, theirs, truth, ids)
    with torch.autocast("cpu", torch.bfloat16):  # and the same under autocast
        _lora_grads_vs_truth(ours, theirs, truth, ids)
    assert report.calls == {"fused": 28}


def _tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"]))
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours, strict=True)
    assert len(report.patched) == 8 and all("Conv1D" in what for _, what in report.patched), str(report)
    ids = torch.randint(0, 64, (2, 9))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 8}


def test_several_active_adapters_of_different_ranks_in_one_fused_call():
    # PEFT sums the active adapters; ranks, scalings (rsLoRA), lora_bias and dtypes differ.
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_tiny_llama(), _lora_config())
    theirs.add_adapter("second", peft.LoraConfig(r=7, lora_alpha=16, use_rslora=True, lora_bias=True,
                                                 init_lora_weights=False, target_modules=["q_proj", "down_proj"]))
    theirs.add_adapter("third", _lora_config(lora_alpha=3, target_modules=["q_proj"]))
    for module in theirs.modules():  # a trained lora_bias is not zero
        if hasattr(module, "lora_B") and "second" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["second"].bias)
    theirs.base_model.set_adapter(["default", "second", "third"])
    ours, truth = copy.deepcopy(theirs), copy.deepcopy(theirs).double()
    report = fastadapt.patch(ours, strict=True)
    calls = []
    for module in ours.modules():
        if fastadapt.integrations.is_bound(module, "_fastadapt_lora_patched"):
            module.register_forward_hook(lambda m, i, o: calls.append(1))
    ids = torch.randint(0, 64, (2, 9))
    # Against float64: the sum of three adapters' grads is summed in another order than PEFT's.
    _lora_grads_vs_truth(ours, theirs, truth, ids)
    grads = _step(ours, ids)[1]
    assert any(".second." in n for n in grads) and any("lora_B.second.bias" in n for n in grads)
    assert report.calls == {"fused": len(calls)} and len(calls) == 2 * 14


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_several_adapters_with_dropout_in_training_are_one_fused_call(backend, monkeypatch):
    # Each active adapter draws its own mask, of its own probability (one adapter has none): the
    # op's masks put into PEFT's dropout modules give PEFT's logits and every grad.
    if backend not in harness.backends_for("lora_linear", "cpu"):
        pytest.skip(f"{backend} backend unavailable")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_tiny_llama(), _lora_config(lora_dropout=0.1))
    theirs.add_adapter("second", peft.LoraConfig(r=7, lora_alpha=16, lora_dropout=0.3, use_rslora=True,
                                                 init_lora_weights=False, target_modules=["q_proj", "down_proj"]))
    theirs.add_adapter("third", _lora_config(target_modules=["q_proj"]))  # no dropout
    theirs.base_model.set_adapter(["default", "second", "third"])
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours, strict=True)
    assert not any("dropout" in c for _, c in report.fallbacks), str(report)
    seed = 1234567
    monkeypatch.setattr(fastadapt.ops.lora, "_draw_seed", lambda: torch.tensor(seed))
    from peft.tuners.lora.layer import LoraLayer
    for module in theirs.modules():
        if isinstance(module, LoraLayer):
            active = [a for a in module.active_adapters if a in module.lora_A]
            for k, name in enumerate(active):
                p = module.lora_dropout[name].p if isinstance(module.lora_dropout[name], torch.nn.Dropout) else 0.0
                if p > 0:
                    module.lora_dropout[name] = harness.OpMask(backend, seed, k, p)
    ids = torch.randint(0, 64, (2, 9))
    with fastadapt.dispatch.use_backend(backend):
        mine = _step(ours, ids)
    _assert_same(mine, _step(theirs, ids))
    assert report.calls == {"fused": 14}
    assert any(".second." in n and g.abs().sum() > 0 for n, g in mine[1].items())


def test_several_adapters_with_dropout_draw_independent_masks():
    # Unforced (automatic dispatch), two identical adapters with dropout: their grads differ, as
    # their masks do; in eval they are equal up to rounding (the same GEMM computes both adapters'
    # rows: a backend need not round every row alike, the Triton interpreter's numpy does not).
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(lora_dropout=0.5, target_modules=["q_proj"]))
    model.add_adapter("twin", _lora_config(lora_dropout=0.5, target_modules=["q_proj"]))
    for module in model.modules():
        if hasattr(module, "lora_A") and "twin" in module.lora_A:
            module.lora_A["twin"].load_state_dict(module.lora_A["default"].state_dict())
            module.lora_B["twin"].load_state_dict(module.lora_B["default"].state_dict())
    model.base_model.set_adapter(["default", "twin"])
    report = fastadapt.patch(model, strict=True)
    ids = torch.randint(0, 64, (2, 9))
    for training in (True, False):
        model.train(training)
        grads = _step(model, ids)[1]
        errors = [rel_err(g, grads[n.replace(".default.", ".twin.")]) for n, g in grads.items() if ".default." in n]
        assert errors
        if training:
            assert min(errors) > 0.1, errors
        else:
            assert max(errors) < 1e-6, errors
    assert report.calls == {"fused": 4}


@pytest.mark.parametrize("init", ["gaussian", "pissa_niter_2", "olora", "orthogonal"])
def test_init_lora_weights_variants(init):
    # PiSSA / OLoRA rewrite the base weight at init: whatever they leave is what the op reads.
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj", "v_proj", "up_proj"]))
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 6}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    ours, theirs = _pair()
    report = fastadapt.patch(ours, strict=True)
    for model in (ours, theirs):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        model.train()
    ids = torch.randint(0, 64, (2, 9))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 28}  # 14 layers, each run again in the backward's recomputation

    # With dropout, the recomputation must draw the forward's masks again (the seed comes from the
    # CPU generator, whose state checkpointing restores): same grads as without checkpointing.
    dropped, _ = _pair(lora_dropout=0.3)
    fastadapt.patch(dropped)
    plain = copy.deepcopy(dropped)
    dropped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    dropped.enable_input_require_grads()
    for model in (dropped, plain):
        model.train()
    torch.manual_seed(1)
    a = _step(dropped, ids)
    torch.manual_seed(1)
    _assert_same(a, _step(plain, ids), tol=1e-6)


def test_compiled_model_has_no_graph_break_from_our_layers():
    ours, theirs = _pair()
    fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 9))
    ours.eval()
    theirs.eval()
    explained = torch._dynamo.explain(ours)(input_ids=ids)
    baseline = torch._dynamo.explain(theirs)(input_ids=ids)
    # Whatever breaks the unpatched model's graph is transformers' own; we add none.
    assert explained.graph_break_count == baseline.graph_break_count, explained.break_reasons
    assert not any("fastadapt" in str(reason) for reason in explained.break_reasons)
    compiled = torch.compile(ours, backend="aot_eager")
    assert rel_err(compiled(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5


def test_generation_in_inference_mode():
    ours, theirs = _pair()
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 5))
    outs = []
    for model in (ours, theirs):
        model.eval()
        with torch.inference_mode():
            outs.append(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])
    assert report.calls["fused"] == 14 * 6 and len(report.calls) == 1


@pytest.mark.parametrize("inner, lora_first", [("loha", False), ("loha", True), ("adalora", False),
                                              ("adalora", True)])  # AdaLoRA adds to LoRA's output in place
def test_lora_stacked_on_another_tuner_in_a_mixed_model(inner, lora_first):
    # A PeftMixedModel stacks the tuners of one layer: LoRA added over a LoHa / AdaLoRA layer adds
    # its update to that layer's output, which computing on the frozen weight would drop (left to
    # PEFT, and said why); LoRA under the other tuner is served (the outer one calls it).
    torch.manual_seed(0)
    other = {"loha": peft.LoHaConfig(target_modules=["0"], init_weights=False),
             "adalora": peft.AdaLoraConfig(target_modules=["0"], init_lora_weights=False, total_step=10)}[inner]
    configs = [("other", other), ("lora", _lora_config(target_modules=["0", "2"]))]
    if lora_first:
        configs.reverse()
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = peft.PeftMixedModel(base, configs[0][1], configs[0][0])
    model.add_adapter(*configs[1])
    model.set_adapter(["other", "lora"])
    theirs = copy.deepcopy(model)
    report = fastadapt.patch(model, strict=True)
    stacked = [why for name, why in report.skipped if name == "base_model.model.0"]
    if lora_first:
        assert [n for n, _ in report.patched] == ["base_model.model.0.base_layer", "base_model.model.2"], str(report)
    else:
        assert [n for n, _ in report.patched] == ["base_model.model.2"], str(report)
        assert len(stacked) == 1 and "another tuner's layer over the Linear" in stacked[0], str(report)
    x = torch.randn(3, 16)
    assert rel_err(model(x), theirs(x)) < 1e-6
    assert report.calls == {"fused": len(report.patched)}


# --- DoRA (use_dora=True) runs fastadapt::dora_linear ---


def _dora_pair(model=None, **kw):
    """(patched later, PEFT) copies of a DoRA model whose magnitudes are moved off their initial
    value, the weight norm (where g = m / n = 1 would hide a wrong norm)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(model if model is not None else _tiny_llama(), _lora_config(use_dora=True, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model, copy.deepcopy(model)


def test_dora_model_matches_peft_logits_and_grads():
    ours, theirs = _dora_pair()
    report = fastadapt.patch(ours, strict=True)
    assert len(report.patched) == 14 and all("fastadapt::dora_linear" in what for _, what in report.patched)
    ids = torch.randint(0, 64, (2, 9))
    a, b = _step(ours, ids), _step(theirs, ids)
    assert sum("lora_magnitude_vector" in name for name in a[1]) == 14
    _assert_same(a, b)
    assert report.calls == {"fused": 14}
    merged = ours.merge_and_unload()
    assert rel_err(merged(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("backend", harness.backends_for("lora_linear", "cpu"))
def test_lora_at_initialisation_gives_the_base_layer_bit_for_bit(backend):
    # B = 0: every backend adds an exact zero to the base layer's own product (README, "Patched
    # models").
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(123, 48))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1))
    report = fastadapt.patch(model, strict=True)
    model.train()
    x = torch.randn(2, 21, 123)
    with fastadapt.use_backend(backend):
        assert torch.equal(model(x), base(x))
    assert report.calls == {"fused": 1}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_at_initialisation_gives_the_base_layer_bit_for_bit_on_the_reference_backend(dropout):
    # PEFT's DoRA layer at initialisation (B = 0, m = ||W||) returns its base layer's output exactly
    # (PEFT's tests assert atol=0). The reference backend composes the output as PEFT does, with the
    # norm computed as the magnitude was initialised, so it does too; the cpp and Triton kernels
    # round otherwise (README, "Patched models").
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(777, 129))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["0"], use_dora=True,
                                                                      lora_dropout=dropout))
    report = fastadapt.patch(model, strict=True)
    model.train()  # dropout on: PEFT then recomputes D(x) W^T, and so does the op
    x = torch.randn(2, 150, 777)
    with fastadapt.use_backend("reference"):
        assert torch.equal(model(x), base(x))
    assert report.calls == {"fused": 1}


@pytest.mark.parametrize("setup", ["autocast_bf16", "bf16_base_fp32_adapters"])
def test_dora_half_precision_setups_match_peft(setup):
    torch.manual_seed(0)
    base = _tiny_llama().to(torch.bfloat16) if setup == "bf16_base_fp32_adapters" else None
    ours, theirs = _dora_pair(base)
    truth = copy.deepcopy(theirs).double()
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    _lora_grads_vs_truth(ours, theirs, truth, ids, autocast=torch.bfloat16 if setup == "autocast_bf16" else None)
    assert report.calls == {"fused": 14}


def test_dora_gpt2_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    ours, theirs = _dora_pair(_tiny_gpt2(), fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])
    report = fastadapt.patch(ours, strict=True)
    assert len(report.patched) == 8 and all("Conv1D" in what for _, what in report.patched), str(report)
    ids = torch.randint(0, 64, (2, 9))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 8}


def test_dora_dropout_trains_and_eval_matches():
    ours, theirs = _dora_pair(lora_dropout=0.1)
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    ours.train()
    a, b = ours(input_ids=ids).logits, ours(input_ids=ids).logits
    assert not torch.equal(a, b)  # a fresh mask per call
    ours.eval()
    theirs.eval()
    assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    assert report.calls == {"fused": 42}


def test_dora_with_another_active_adapter_falls_back_and_says_so():
    # PEFT applies a DoRA adapter to the output of the adapters before it: not one fused call.
    ours, _ = _dora_pair(target_modules=["q_proj"])
    ours.add_adapter("plain", _lora_config(target_modules=["q_proj"]))
    theirs = copy.deepcopy(ours)
    report = fastadapt.patch(ours)
    assert all("fastadapt::lora_linear (adapter_names: multi_lora_linear), fastadapt::dora_linear (DoRA adapter(s) ['default'])" in what
               for _, what in report.patched), str(report)
    assert all("DoRA adapter ['default'] is active together" in c for _, c in report.fallbacks), str(report)
    ids = torch.randint(0, 64, (1, 5))
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "plain"])
    with pytest.warns(UserWarning, match="DoRA adapter"):
        out = ours(input_ids=ids).logits
    assert rel_err(out, theirs(input_ids=ids).logits) < 1e-6
    assert report.calls == {"fallback: DoRA adapter(s) ['default'] active together with other adapters "
                            "(PEFT applies each to the sum before it)": 2}
    for name in ("plain", "default"):  # each alone is fused
        ours.set_adapter(name)
        theirs.set_adapter(name)
        _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls["fused"] == 4


def _mixed_adapters(**kw):
    """A tiny Llama with four adapters of different ranks and alphas (rsLoRA on one), all trainable."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny_llama(), _lora_config(**kw))
    model.add_adapter("wide", peft.LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "v_proj", "down_proj"], **kw))
    model.add_adapter("narrow", peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], **kw))
    model.add_adapter("absent", _lora_config(**kw))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


NAMES = ["wide", "default", "__base__", "wide", "narrow"]


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_mixed_batch_trains_every_adapter_at_once_like_peft_per_adapter():
    # PEFT refuses adapter_names in training; patched, one batch trains three adapters (each on its
    # own sequences), with the logits and grads of PEFT run once per adapter on its own rows.
    theirs = _mixed_adapters()
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (len(NAMES), 7))
    with pytest.raises(ValueError, match="training mode"):
        theirs(input_ids=ids, adapter_names=NAMES)

    ours.train()
    logits = ours(input_ids=ids, adapter_names=NAMES).logits
    logits.float().pow(2).mean().backward()
    # 14 LoRA layers, one fused call each, whichever adapters the layer has.
    assert report.calls == {"fused": 14}, report.calls

    expected = torch.empty_like(logits)
    for name in dict.fromkeys(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        with contextlib.ExitStack() as stack:
            if name == "__base__":
                stack.enter_context(theirs.disable_adapter())
            else:
                theirs.set_adapter(name)
                for n, p in theirs.named_parameters():  # set_adapter froze the others
                    p.requires_grad_("lora_" in n)
            out = theirs(input_ids=ids[rows]).logits
        expected[rows] = out.detach()
        if name != "__base__":  # the base model's rows reach no adapter
            (out.float().pow(2).sum() / logits.numel()).backward()
    assert rel_err(logits, expected) < 1e-5
    ours_g, theirs_g = _lora_grads(ours), _lora_grads(theirs)
    assert ours_g.keys() == theirs_g.keys()
    for name, g in theirs_g.items():
        if g is None:  # adapters absent from the batch ("absent") get no gradient, as in PEFT
            assert ours_g[name] is None and ".absent." in name, name
        else:
            assert rel_err(ours_g[name], g) < 1e-5, name
    assert sum(g is not None for g in ours_g.values()) == 2 * (14 + 2 * 3 + 2 * 4)  # A and B, 2 layers


def test_mixed_batch_inference_takes_the_fused_path():
    theirs = _mixed_adapters()
    ours = copy.deepcopy(theirs)
    report = fastadapt.patch(ours)
    ours.eval()
    theirs.eval()
    ids = torch.randint(0, 64, (len(NAMES), 6))
    with torch.no_grad():
        out = ours(input_ids=ids, adapter_names=NAMES).logits
        ref = theirs(input_ids=ids, adapter_names=NAMES).logits
    assert rel_err(out, ref) < 1e-5
    assert report.calls == {"fused": 14}
    fastadapt.unpatch(ours)
    ours.train()
    with pytest.raises(ValueError, match="training mode"):  # unpatched: PEFT's refusal is back
        ours(input_ids=ids, adapter_names=NAMES)


@pytest.mark.parametrize("backend", harness.backends_for("multi_lora_linear", "cpu"))
def test_mixed_batch_of_one_sequence(backend):
    # One name: its id reaches multi_lora_linear expanded over the sequence's rows, a stride-0 view
    # (the cpp kernel read it past its one-element storage and killed the process).
    theirs = _mixed_adapters()
    ours = copy.deepcopy(theirs)
    fastadapt.patch(ours, strict=True)
    ours.eval()
    theirs.eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        with fastadapt.dispatch.use_backend(backend):
            out = ours(input_ids=ids, adapter_names=["wide"]).logits
        ref = theirs(input_ids=ids, adapter_names=["wide"]).logits
    assert rel_err(out, ref) < 1e-5


def test_mixed_batch_training_with_dropout_per_adapter():
    model = _mixed_adapters(lora_dropout=0.2)
    report = fastadapt.patch(model, strict=True)
    model.train()
    ids = torch.randint(0, 64, (len(NAMES), 5))
    model(input_ids=ids, adapter_names=NAMES).logits.float().pow(2).mean().backward()
    assert report.calls == {"fused": 14}
    grads = _lora_grads(model)
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.narrow.weight"].abs().sum() > 0


def test_mixed_batch_training_refuses_gradient_checkpointing():
    # The recomputation in the backward would run without adapter_names: refused, not silently wrong.
    model = _mixed_adapters()
    fastadapt.patch(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (len(NAMES), 5))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, adapter_names=NAMES)
    model.eval()
    with torch.no_grad():  # inference recomputes nothing
        model(input_ids=ids, adapter_names=NAMES)


def test_mixed_batch_ids_made_in_inference_mode_serve_training_later():
    from fastadapt.nn import multi_lora
    multi_lora._cached.cache_clear()  # the ids and metadata are first made under inference mode
    model = _mixed_adapters()
    report = fastadapt.patch(model)
    ids = torch.randint(0, 64, (len(NAMES), 5))
    model.eval()
    with torch.inference_mode():
        model(input_ids=ids, adapter_names=NAMES)
    model.train()
    model(input_ids=ids, adapter_names=NAMES).logits.float().pow(2).mean().backward()
    assert report.calls == {"fused": 28}


@pytest.mark.parametrize("use_dora", [False, True])
def test_compiled_hotswap_tensor_scalings(use_dora):
    # prepare_model_for_compiled_hotswap turns every scaling[adapter] into a 0-d tensor, which a
    # hotswap then overwrites in place: the patched forward takes it without a host read.
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap
    ours, theirs = _pair(use_dora=use_dora)
    for model in (ours, theirs):
        prepare_model_for_compiled_hotswap(model)
    report = fastadapt.patch(ours, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    _assert_same(_step(ours, ids), _step(theirs, ids))
    for model in (ours, theirs):
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                for value in module.scaling.values():
                    value.fill_(0.25)
    _assert_same(_step(ours, ids), _step(theirs, ids))
    assert report.calls == {"fused": 28}
