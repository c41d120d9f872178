"""``fastadapt.patch`` against the real AdapterHub ``adapters`` library (1.3, which pins transformers
~=4.57, so these run in a venv of their own: ``.ci/run`` makes it from .ci/constraints-adapterhub.txt).
Tiny random BERT / RoBERTa / Llama; the patched model against an unpatched float64 copy of itself
(the library's own forward): outputs and every adapter gradient."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from harness import BOUND, assert_close, rel_err

import fastadapt

adapters = pytest.importorskip("adapters")
transformers = pytest.importorskip("transformers")
from adapters.composition import Fuse, Parallel, Stack  # noqa: E402

VOCAB = 97


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=40))


def _llama():
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40))


ARCHS = {"bert": _bert, "roberta": _roberta, "llama": _llama}

EVERYTHING = dict(mh_adapter=True, output_adapter=True, reduction_factor=6, non_linearity="gelu_new", ln_before=True,
                  ln_after=True, adapter_residual_before_ln=True, scaling="learned", use_gating=True,
                  original_ln_before=True, original_ln_after=True, residual_before_ln="post_add")


def _config(name):
    return {"seq_bn": lambda: adapters.SeqBnConfig(reduction_factor=6),
            "double_seq_bn": lambda: adapters.DoubleSeqBnConfig(reduction_factor=6),
            "par_bn": lambda: adapters.ParBnConfig(reduction_factor=6, scaling="channel"),
            "everything": lambda: adapters.BnConfig(**EVERYTHING),
            "ln_after_channel": lambda: adapters.BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4,
                                                          ln_after=True, scaling="channel", non_linearity="swish",
                                                          original_ln_before=True, original_ln_after=True,
                                                          residual_before_ln=False),  # a float32 residual
            "lora": lambda: adapters.LoRAConfig(r=4, alpha=8),
            "seq_bn_inv": lambda: adapters.SeqBnInvConfig(reduction_factor=6),
            "mam": lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(bottleneck_size=16),
                                              adapters.ParBnConfig(reduction_factor=6)),
            "unipelt": lambda: adapters.UniPELTConfig(adapters.PrefixTuningConfig(bottleneck_size=16),
                                                      adapters.SeqBnConfig(reduction_factor=6),
                                                      adapters.LoRAConfig(r=4, use_gating=True))}[name]()


def _randomize(model):
    # Away from the (near-)identity inits, so that every adapter parameter shapes the output.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


def _model(arch, configs, active=None):
    """A tiny model with AdapterHub adapters {name: config}, trained (``train_adapter``) or active."""
    torch.manual_seed(0)
    model = ARCHS[arch]()
    adapters.init(model)
    for name, config in configs.items():
        model.add_adapter(name, config=_config(config) if isinstance(config, str) else config)
    model.train_adapter(active if active is not None else list(configs)[0])
    _randomize(model)
    return model.eval()  # dropout off, adapters still require grad


def _run(model, ids):
    out = model(input_ids=ids).last_hidden_state
    # A fixed random cotangent (a sum would be constant through the final LayerNorm: zero gradients).
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out.backward(gout.to(out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _check_against_library(model, report, ids, fallback_ok=(), fused=True):
    ref = copy.deepcopy(model).double()
    fastadapt.unpatch(ref)  # the copy's patched methods go; the library's run
    out, grads = _run(model, ids)
    ref_out, ref_grads = _run(ref, ids)
    assert_close("out", out, ref_out, torch.float32, "cpu")
    assert grads.keys() == ref_grads.keys() and grads
    for n, g in grads.items():
        ref_g = ref_grads[n]
        if ref_g is None or ref_g.norm() < 1e-12:  # not on the output's path, or zero (a fusion key's bias)
            assert g is None or g.norm() < 1e-6, n
        else:
            assert_close(f"grad {n}", g, ref_g, torch.float32, "cpu")
    assert (report.calls["fused"] > 0) == fused, str(report)
    assert all(any(ok in key for ok in fallback_ok) for key in report.calls if key != "fused"), report.calls


CASES = [("bert", "seq_bn"), ("bert", "double_seq_bn"), ("bert", "par_bn"), ("bert", "everything"),
         ("bert", "ln_after_channel"), ("bert", "lora"), ("roberta", "seq_bn"), ("llama", "seq_bn"),
         ("llama", "par_bn"), ("llama", "lora")]


@pytest.mark.parametrize("arch,config", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_patched_matches_library(arch, config):
    model = _model(arch, {"a": config})
    report = fastadapt.patch(model, strict=True)
    assert report.patched and not report.skipped, str(report)
    _check_against_library(model, report, torch.randint(0, VOCAB, (2, 7)))


def test_compositions_stack_parallel():
    model = _model("bert", {"a": "seq_bn", "b": "double_seq_bn", "c": "par_bn", "d": "seq_bn"},
                   active=Stack("a", "b", "c"))
    report = fastadapt.patch(model, strict=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    _check_against_library(model, report, ids)
    model.zero_grad()
    # (adapters 1.3's Parallel needs its first adapter in every layer, and fails with a ParBn: "a", "d")
    model.set_active_adapters(Parallel("a", "d"))
    with torch.no_grad():
        mine = model(input_ids=ids).last_hidden_state
        ref = copy.deepcopy(model).double()
        fastadapt.unpatch(ref)
        assert mine.shape[0] == 2 * ids.shape[0]  # Parallel replicates the batch
        assert_close("parallel", mine, ref(input_ids=ids).last_hidden_state, torch.float32, "cpu")


def test_fusion_runs_the_library_and_only_inside_fuse_then_survives_deepcopy():
    model = _model("bert", {"a": "seq_bn", "b": "seq_bn", "c": "seq_bn"})
    model.add_adapter_fusion(Fuse("b", "c"))
    model.train_adapter_fusion(Fuse("b", "c"))
    report = fastadapt.patch(model)
    ids = torch.randint(0, VOCAB, (2, 7))
    _check_against_library(model, report, ids, fallback_ok=("AdapterFusion",), fused=False)
    assert report.calls["fallback: AdapterFusion needs the up-projection output"] == 2 * 2
    with pytest.raises(fastadapt.FallbackError, match="AdapterFusion"):
        report.strict = True
        model(input_ids=ids)
    # "a" alone next to the leftover fusion layer of "b", "c": fused.
    model.set_active_adapters("a")
    report.calls.clear()
    model(input_ids=ids)
    assert report.calls == {"fused": 2}
    # A deep copy is patched on its own: the original dropped, the copy's Fuse runs (the library's forward).
    report.strict = False
    model.set_active_adapters(Fuse("b", "c"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    del model
    gc.collect()
    with torch.no_grad():
        assert rel_err(twin(input_ids=ids).last_hidden_state, expected) < 1e-6


def test_adapter_added_or_loaded_after_patch_is_served(tmp_path):
    model = _model("bert", {"a": "seq_bn"})
    report = fastadapt.patch(model, strict=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.add_adapter("late", config=_config("double_seq_bn"))
    model.save_adapter(str(tmp_path / "late"), "late")
    model.delete_adapter("late")
    model.load_adapter(str(tmp_path / "late"))
    model.set_active_adapters("late")
    with torch.no_grad():
        model(input_ids=ids)
    # Patched as they were registered in the patched model: when added, and again when loaded after
    # the deletion (the report lists each patching).
    late = [n for n, _ in report.patched if n.endswith(".adapters.late")]
    assert len(late) == 8 and len(set(late)) == 4 and report.calls == {"fused": 4}, str(report)
    # One that the op cannot serve (PHM projections), added late: a fallback, refused under strict.
    model.add_adapter("phm", config=adapters.SeqBnConfig(reduction_factor=6, phm_layer=True, phm_dim=2))
    model.set_active_adapters("phm")
    with pytest.raises(fastadapt.FallbackError, match="PHM"):
        model(input_ids=ids)


def test_save_load_and_set_active_adapters(tmp_path):
    model = _model("bert", {"a": "seq_bn", "b": "par_bn"})
    fastadapt.patch(model, strict=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.save_adapter(str(tmp_path / "a"), "a")
    with torch.no_grad():
        mine = model(input_ids=ids).last_hidden_state
        model.set_active_adapters("b")
        assert rel_err(model(input_ids=ids).last_hidden_state, mine) > 1e-3  # switched
    fresh = ARCHS["bert"]()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters" not in k}, strict=False)
    adapters.init(fresh)
    fresh.load_adapter(str(tmp_path / "a"))
    fresh.set_active_adapters("a")
    with torch.no_grad():
        assert rel_err(fresh.eval()(input_ids=ids).last_hidden_state, mine) < 1e-5


@pytest.mark.parametrize("config,unserved,reason", [("mam", 2, "prefix tuning"), ("unipelt", 2 + 4, "gated LoRA"),
                                                    ("seq_bn_inv", 1, "invertible adapters")])
def test_unserved_parts_are_reported_and_counted(config, unserved, reason):
    """MAM = prefix tuning + parallel adapter; UniPELT = prefix tuning + bottleneck + gated LoRA;
    SeqBnInv = bottleneck + an invertible adapter on the embeddings. The bottleneck parts run the
    fused op; the rest is listed as left alone, its calls counted as fallbacks, refused under strict."""
    model = _model("bert", {"a": config})
    report = fastadapt.patch(model)
    assert len(report.skipped) == unserved, str(report)
    ids = torch.randint(0, VOCAB, (2, 7))
    _check_against_library(model, report, ids, fallback_ok=("prefix tuning", "gated LoRA", "invertible"))
    assert any(reason in key for key in report.calls), report.calls
    with pytest.raises(fastadapt.FallbackError, match=reason):
        report.strict = True
        model(input_ids=ids)


@pytest.mark.parametrize("arch,config", [("bert", "seq_bn"), ("bert", "double_seq_bn"), ("bert", "par_bn"),
                                         ("bert", "everything"), ("bert", "ln_after_channel"), ("llama", "seq_bn")])
def test_autocast_bf16_is_fused_and_matches_library(arch, config):
    """Under torch.autocast(bf16) every bottleneck call runs the fused op (strict), with the library's
    output dtypes, and is no further from float64 than twice the library's own autocast run."""
    model = _model(arch, {"a": config})
    library = copy.deepcopy(model)
    truth = copy.deepcopy(model).double()
    report = fastadapt.patch(model, strict=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    dtypes = {}

    def record(key):
        return lambda module, args, out: dtypes.setdefault(key, []).append(out[0].dtype)

    for key, m in (("ours", model), ("library", library)):
        for module in m.modules():
            if type(module).__name__ in ("Adapter", "ParallelAdapter"):
                module.register_forward_hook(record(key))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(model, ids)
        lib_out, lib_grads = _run(library, ids)
    ref_out, ref_grads = _run(truth, ids)
    assert dtypes["ours"] == dtypes["library"] and report.calls["fused"] == len(dtypes["ours"])
    assert out.dtype == lib_out.dtype

    def no_worse(name, mine, theirs, ref):
        # A one-element gradient (scaling="learned") is one sum with cancellation: the library adds its
        # terms from a float32 incoming gradient (its learned scale promotes the output to float32), the
        # fused op from the same rounded to bf16 (measured: 1.2% off against the library's 0.4%).
        allowed = 3e-2 if ref.numel() == 1 else 2 * rel_err(theirs, ref) + BOUND[torch.bfloat16] / 4
        assert rel_err(mine, ref) <= allowed, (name, rel_err(mine, ref), rel_err(theirs, ref))

    no_worse("out", out, lib_out, ref_out)
    for n in ref_grads:
        no_worse(f"grad {n}", grads[n], lib_grads[n], ref_grads[n])


def test_unpatch_restores_the_library():
    model = _model("bert", {"a": "seq_bn", "l": "lora"}, active=Stack("a", "l"))
    fastadapt.patch(model)
    restored = fastadapt.unpatch(model)
    assert len(restored.patched) == 2 + 4, str(restored)  # the output adapters; LoRA on query and value
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "compose_single", "compose_fuse"))
    report = fastadapt.patch(model)
    assert len(report.patched) == 6, str(report)


def test_patched_model_copies_and_pickles_as_the_library_allows():
    # A deep copy of a patched AdapterHub model gives the same output, still fused. Pickling (and
    # torch.save of the whole model) fails as it does unpatched: adapters.init gives the model a
    # class made at run time, which pickle cannot look up; patching adds no failure of its own.
    import copy
    import pickle

    model = _model("bert", {"a": "seq_bn"})
    with pytest.raises(pickle.PicklingError) as unpatched:
        pickle.dumps(model)
    report = fastadapt.patch(model, strict=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        assert torch.equal(copy.deepcopy(model)(input_ids=ids).last_hidden_state, expected)
    assert set(report.calls) == {"fused"}
    with pytest.raises(pickle.PicklingError) as patched:
        pickle.dumps(model)
    assert str(patched.value) == str(unpatched.value)
