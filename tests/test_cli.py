"""The ``fastadapt`` command: ``info`` and the default job, ``demo``."""

from __future__ import annotations

import pytest

from fastadapt import cli

pytest.importorskip("peft")


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cuda", "cpp", "reference", "lora_linear"):
        assert name in out
    assert "non-deterministic: cuda prefix_attention" in out
    assert "passes over cpp for lora_linear" in out
    assert "strategy: triton dora_linear runs separate" in out and "strategy: triton qlora_linear runs once" in out


def test_demo_verifies_and_times(capsys):
    assert cli.main(["demo", "--device", "cpu", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    for op in ("lora_linear", "bottleneck_adapter", "prefix_attention"):
        assert op in out
    assert "each within 2x PEFT's own error" in out
    assert "peft (unpatched)" in out and "fastadapt reference (forced)" in out and "automatic dispatch" in out
