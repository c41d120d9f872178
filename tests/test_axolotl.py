"""The axolotl plugin (``fastadapt.integrations.axolotl.FastAdaptPlugin``) in axolotl's own config
validation and model loader, on a tiny random Llama saved to disk (no download).

axolotl pins its own transformers / peft / trl (0.19: transformers 5.16.1, peft 0.20.0) and pulls in a
few GB, so it is not in the test extra and these tests skip without it. Run them in a venv of their own:

    python3 -m venv .venv-axolotl && .venv-axolotl/bin/pip install torch==2.13.0 \\
      && .venv-axolotl/bin/pip install -e . axolotl pytest -c .ci/constraints-axolotl.txt \\
      && .venv-axolotl/bin/python -m pytest tests/test_axolotl.py
"""

from __future__ import annotations

import pytest
import torch

import fastadapt

pytest.importorskip("axolotl.integrations.base")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")
from axolotl.cli.config import load_cfg  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.loaders import ModelLoader, load_tokenizer  # noqa: E402

PLUGIN = "fastadapt.integrations.axolotl.FastAdaptPlugin"
KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64)).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(61)} | {"<unk>": 61, "<s>": 62, "</s>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                         pad_token="<unk>").save_pretrained(path)
    return str(path)


def _cfg(base_model, tmp_path, **extra):
    """An axolotl config file as a user writes it, loaded as ``axolotl train`` does (``load_cfg``)."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({
        "base_model": base_model, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "lora_target_linear": True, "sequence_len": 32, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "num_epochs": 1, "learning_rate": 1e-3, "output_dir": str(tmp_path), "datasets": [{"path": "unused",
                                                                                          "type": "completion"}],
        "plugins": [PLUGIN], "fastadapt": True, **extra}))
    return path


def _load(path):
    cfg = load_cfg(str(path))
    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    return cfg, model, PluginManager.get_instance().plugins[PLUGIN]


def test_plugin_patches_the_loaded_peft_model_and_switches_axolotls_kernels_off(base_model, tmp_path):
    cfg, model, plugin = _load(_cfg(base_model, tmp_path, fastadapt_strict=True))
    assert all(cfg[k] is False for k in KERNELS)
    report = plugin.report
    assert isinstance(model, peft.PeftModel) and report.strict
    assert len(report.patched) == 2 * 7 and not report.skipped, str(report)
    ids = torch.randint(0, 61, (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert report.calls == {"fused": 2 * 7}  # every LoRA layer ran the fused op: no axolotl kernel in the way
    with torch.no_grad():
        mine = model(input_ids=ids).logits
        fastadapt.unpatch(model)
        assert torch.allclose(mine, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra,match", [(dict(lora_mlp_kernel=True), "lora_mlp_kernel: true"),
                                         (dict(adapter=None), "adapter: None"),
                                         (dict(load_in_8bit=True), "load_in_8bit")])
def test_plugin_refuses_what_it_cannot_serve(base_model, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_cfg(str(_cfg(base_model, tmp_path, **extra)))


def test_without_the_plugin_axolotl_turns_its_kernels_on(base_model, tmp_path):
    """What the plugin prevents: the same config without it gets axolotl's LoRA kernels."""
    path = _cfg(base_model, tmp_path)
    config = yaml.safe_load(path.read_text())
    del config["plugins"], config["fastadapt"]
    path.write_text(yaml.safe_dump(config))
    cfg = load_cfg(str(path))
    assert all(cfg[k] is True for k in KERNELS)
