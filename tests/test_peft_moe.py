"""PEFT's LoRA on MoE experts (``target_parameters``) patched onto ``fastadapt::moe_lora_experts``, on
tiny random models of each transformers MoE family with 3-D expert parameters (Qwen3-MoE, Mixtral,
gpt-oss, DeepSeek-V3, OLMoE): logits, loss, every LoRA gradient and the routers' gradients (through
the routing weights) against unpatched PEFT and a float64 copy; PEFT's methods around it; the
``"fastadapt"`` experts implementation of transformers; ``fastadapt.nn.LoRAExperts``."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import assert_close, backends_for, rel_err

import fastadapt
from fastadapt import dispatch
from fastadapt.integrations import transformers_experts
from fastadapt.reference import moe_lora as reference
from fastadapt.testing import dropout_mask

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
BACKENDS = backends_for("moe_lora_experts", "cpu")
# Where a test is not about the backends: the C++ one when built (the Triton interpreter is slow).
FAST = "cpp" if "cpp" in BACKENDS else "reference"


def _config(family: str):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=16, head_dim=8, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralForCausalLM, transformers.MixtralConfig(
            **common, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":  # a small swiglu_limit: the clamps act on these activations
        return transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **common, intermediate_size=16, head_dim=8, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5,
            attn_implementation="eager", layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    if family == "deepseek_v3":
        return transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, rope_scaling=None)
    if family == "olmoe":
        return transformers.OlmoeForCausalLM, transformers.OlmoeConfig(
            **common, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "olmoe"]


def _base(family: str, dtype=torch.float32):
    cls, config = _config(family)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # gpt-oss's expert biases start at zero: give them values the test can see
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                p.normal_(0, 0.1)
    return model.to(dtype)


def _peft(family: str, r: int = 4, targets=TARGETS, trainable_routers: bool = True, dtype=torch.float32):
    model = peft.get_peft_model(_base(family, dtype), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                                      target_parameters=targets,
                                                                      init_lora_weights=False))
    if trainable_routers:  # their gradients come through the routing weights' (top_k_weights)
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")):
                p.requires_grad_(True)
    return model


def _eager_copy(model, dtype):
    """A copy in ``dtype`` running transformers' eager experts (grouped_mm takes no float64)."""
    other = copy.deepcopy(model).to(dtype)
    other.get_base_model().set_experts_implementation("eager")
    return other


def _run(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


def _ids(seed=0):
    return torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _assert_like_peft(mine: dict, theirs: dict, truth: dict, dtype=torch.float32):
    """Ours within the dtype's bound of the float64 truth and no worse than twice PEFT's own error
    (plus one ulp), on the logits, the loss and every gradient."""
    assert mine.keys() == truth.keys()
    eps = torch.finfo(dtype).eps
    for name in truth:
        err, peft_err = rel_err(mine[name], truth[name]), rel_err(theirs[name], truth[name])
        assert err <= 2 * peft_err + eps, f"{name}: error {err:.2e} against PEFT's {peft_err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_peft(family):
    # Every backend on each kind of experts (SwiGLU: Qwen3-MoE; gpt-oss's clamped SwiGLU with biases
    # and transposed storage), the C++ one on the other families.
    model = _peft(family)
    ids = _ids()
    truth, theirs = _run(_eager_copy(model, torch.float64), ids), _run(model, ids)
    report = fastadapt.patch(model, strict=True)
    assert len(report.patched) == 2 and not report.skipped, str(report)
    backends = BACKENDS if family in ("qwen3_moe", "gpt_oss") else [FAST]
    for backend in backends:
        with dispatch.use_backend(backend):
            _assert_like_peft(_run(model, ids), theirs, truth)
    assert report.calls == {"fused": 2 * len(backends)}


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]], ids=["gate_up", "down"])
def test_one_projection(targets):
    model = _peft("gpt_oss", targets=targets)
    ids = _ids(1)
    truth, theirs = _run(_eager_copy(model, torch.float64), ids), _run(model, ids)
    fastadapt.patch(model, strict=True)
    with dispatch.use_backend(FAST):
        _assert_like_peft(_run(model, ids), theirs, truth)


def test_several_active_adapters_are_summed():
    model = _peft("qwen3_moe")
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=8, target_modules=[], target_parameters=TARGETS,
                                               init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    ids = _ids(2)
    truth, theirs = _run(_eager_copy(model, torch.float64), ids), _run(model, ids)
    report = fastadapt.patch(model, strict=True)
    with dispatch.use_backend(FAST):
        _assert_like_peft(_run(model, ids), theirs, truth)
    assert report.calls == {"fused": 2}


def test_trains_fused_under_strict():
    model = _peft("mixtral", trainable_routers=False)
    report = fastadapt.patch(model, strict=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids(3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with dispatch.use_backend(FAST):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert report.calls == {"fused": 8}


def test_mixed_batch_adapter_names_are_reported_and_refused_under_strict():
    x, idx, w = torch.randn(3, 32), torch.randint(0, 8, (3, 2)), torch.rand(3, 2)
    model = _peft("qwen3_moe")
    report = fastadapt.patch(model, strict=True)
    assert all("mixed-batch adapter_names" in conditions for _, conditions in report.fallbacks)
    experts = model.base_model.model.model.layers[0].mlp.experts
    with pytest.raises(fastadapt.FallbackError, match="mixed-batch adapter_names"):
        experts(x, idx, w, adapter_names=["default"] * 3)
    fastadapt.unpatch(model)
    fastadapt.patch(model)  # not strict: PEFT's own forward runs, which refuses them itself
    with pytest.warns(UserWarning, match="mixed-batch"), pytest.raises(ValueError, match="mixed adapter batches"):
        experts(x, idx, w, adapter_names=["default"] * 3)


def test_disable_merge_unmerge_and_unpatch():
    model = _peft("olmoe")
    ids = _ids(4)
    with torch.no_grad(), dispatch.use_backend(FAST):
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        report = fastadapt.patch(model, strict=True)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, plain)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        model.base_model.merge_adapter()  # merged adapters are in the weights: nothing left to add
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        assert report.calls == {"fused": 4}
        fastadapt.unpatch(model)
        assert not any(hasattr(m, "_fastadapt_moe_patched") for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_save_pretrained_unchanged(tmp_path):
    from safetensors.torch import load_file
    model = _peft("deepseek_v3", trainable_routers=False)
    model.save_pretrained(tmp_path / "before")
    fastadapt.patch(model)
    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reloaded = peft.PeftModel.from_pretrained(_base("deepseek_v3"), tmp_path / "after")
    fastadapt.patch(reloaded, strict=True)
    ids = _ids(5)
    with torch.no_grad(), dispatch.use_backend(FAST):
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_autocast_bf16():
    # The HF Trainer's bf16=True: the op runs in bf16 (PyTorch's matmul autocast rule, as the eager
    # experts' F.linear), the routing weights in the router's dtype. Against PEFT with transformers'
    # eager experts under the same autocast (grouped_mm ignores autocast: float32 experts).
    model = _peft("qwen3_moe")
    ids = _ids(6)
    truth = _run(_eager_copy(model, torch.float64), ids)
    eager = _eager_copy(model, torch.float32)
    fastadapt.patch(model, strict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = _run(eager, ids)
        with dispatch.use_backend(FAST):
            mine = _run(model, ids)
    _assert_like_peft(mine, theirs, truth, torch.bfloat16)


def test_compiles_without_graph_break():
    model = _peft("qwen3_moe")
    fastadapt.patch(model, strict=True)
    experts = model.base_model.model.model.layers[0].mlp.experts
    x, idx, w = torch.randn(5, 32), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx, w), experts(x, idx, w))


def _qwen_without_peft(implementation: str):
    transformers_experts.register()
    cls, config = _config("qwen3_moe")
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return cls(config)


def test_experts_implementation_fastadapt(monkeypatch):
    ours = _qwen_without_peft("fastadapt")
    eager = copy.deepcopy(ours)
    eager.set_experts_implementation("eager")
    ids = _ids(7)
    calls = []
    real = transformers_experts.run
    monkeypatch.setattr(transformers_experts, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    for model in (ours, eager):  # the experts frozen, gradients through them to the embeddings
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    with dispatch.use_backend(FAST):
        mine = _run(ours, ids)
    theirs = _run(eager, ids)
    assert len(calls) == 2
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_experts_implementation_fastadapt_reads_peft_factors(monkeypatch):
    # Under PEFT (not patched), the weights PEFT parametrizes for the call are read as the original
    # plus the LoRA factors: the op gets the factors, never W + s B A.
    model = peft.get_peft_model(_qwen_without_peft("fastadapt"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS, init_lora_weights=False))
    seen = []
    real = transformers_experts.run
    monkeypatch.setattr(transformers_experts, "run", lambda layout, x, i, w, frozen, lora, *a, **k:
                        seen.append(sorted(lora)) or real(layout, x, i, w, frozen, lora, *a, **k))
    ids = _ids(8)
    truth = _run(_eager_copy(model, torch.float64), ids)
    reference_peft = _eager_copy(model, torch.float32)
    theirs = _run(reference_peft, ids)
    with dispatch.use_backend(FAST):
        mine = _run(model, ids)
    assert seen == [["down_proj", "gate_up_proj"]] * 2
    _assert_like_peft(mine, theirs, truth)


def test_experts_implementation_falls_back_with_a_reason():
    model = _qwen_without_peft("fastadapt")  # full fine-tuning: the expert weights require grad
    with pytest.warns(UserWarning, match="require grad"):
        model(input_ids=_ids(9)).logits.sum().backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_experts_module_with_dropout(backend):
    base = _base("gpt_oss").model.layers[0].mlp.experts
    module = fastadapt.nn.LoRAExperts(base, r=3, lora_alpha=6, lora_dropout=0.25)
    with torch.no_grad():
        for p in module.lora_B.parameters():
            p.normal_()
    assert sorted(k for k in module.state_dict() if "lora" in k) == [
        "lora_A.down_proj.weight", "lora_A.gate_up_proj.weight", "lora_B.down_proj.weight",
        "lora_B.gate_up_proj.weight"]
    T, k = 6, 2
    x, idx, w = torch.randn(T, 32, requires_grad=True), torch.randint(0, 4, (T, k)), torch.rand(T, k)
    torch.manual_seed(11)
    with dispatch.use_backend(backend):
        out = module(x, idx, w)
        out.square().sum().backward()
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    S, I = T * k, 16
    keep1, keep2 = (dropout_mask(backend, seed, (S, 32), 0.25, "cpu"), dropout_mask(backend, seed + 1, (S, I), 0.25,
                                                                                     "cpu"))
    E = 4
    A1, B1 = transformers_experts.factors(module.lora_A["gate_up_proj"].weight, module.lora_B["gate_up_proj"].weight, E)
    A2, B2 = transformers_experts.factors(module.lora_A["down_proj"].weight, module.lora_B["down_proj"].weight, E)
    x64 = x.detach().double().requires_grad_()
    d = (lambda t: t.detach().double())
    y = reference.experts(x64, idx, w.double(), d(base.gate_up_proj).transpose(1, 2), d(base.down_proj).transpose(1, 2),
                          d(base.gate_up_proj_bias), d(base.down_proj_bias), d(A1), d(B1), 2.0, d(A2), d(B2), 2.0,
                          "gpt_oss", base.alpha, base.limit, keep1, keep2, 0.25)[0]
    y.square().sum().backward()
    assert_close("out", out, y, torch.float32, "cpu")
    assert_close("grad x", x.grad, x64.grad, torch.float32, "cpu")
    module.eval()  # no dropout in eval mode: as the reference without masks
    with torch.no_grad(), dispatch.use_backend(backend):
        y_eval = reference.experts(x64, idx, w.double(), d(base.gate_up_proj).transpose(1, 2),
                                   d(base.down_proj).transpose(1, 2), d(base.gate_up_proj_bias),
                                   d(base.down_proj_bias), d(A1), d(B1), 2.0, d(A2), d(B2), 2.0, "gpt_oss", base.alpha,
                                   base.limit)[0]
        assert_close("eval out", module(x, idx, w), y_eval, torch.float32, "cpu")


def test_add_experts_lora_and_compile():
    model = _base("qwen3_moe")
    model.requires_grad_(False)
    names = fastadapt.nn.add_experts_lora(model, r=2, lora_alpha=4, lora_dropout=0.1)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, fastadapt.nn.LoRAExperts)
    x, idx, w = torch.randn(5, 32), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(x, idx, w)
    out.sum().backward()
    # PEFT's initialisation: B = 0, so A's first gradient is zero and B's is not.
    assert experts.lora_B["gate_up_proj"].weight.grad.abs().sum() > 0
    assert not experts.lora_A["gate_up_proj"].weight.grad.any()
    assert experts.base_layer.gate_up_proj.grad is None
