"""The ``fastadapt`` command: ``info`` and the default job, ``demo``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastadapt import cli

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(*args: str, **env) -> subprocess.CompletedProcess:
    # From the checkout's root, as a user runs `python -m pytest` or the CLI there: the root is on
    # sys.path (python -m / -c put the working directory first).
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})



def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cuda", "cpp", "reference", "lora_linear"):
        assert name in out
    assert "non-deterministic: cuda prefix_attention" in out
    assert "passes over cpp for lora_linear" in out
    assert "strategy: triton dora_linear runs separate" in out and "strategy: triton qlora_linear runs once" in out


def test_demo_verifies_and_times():
    # Run from the checkout's root as a user does: its output is fastadapt's own, with nothing
    # from the libraries it imports (their deprecations, optional-kernel notices) on stderr.
    proc = _run_from_root("-m", "fastadapt", "demo", "--device", "cpu", "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "FAIL" not in out
    for op in ("lora_linear", "bottleneck_adapter", "prefix_attention"):
        assert op in out
    assert "each within 2x PEFT's own error" in out
    assert "peft (unpatched)" in out and "fastadapt reference (forced)" in out and "automatic dispatch" in out
    assert [line for line in proc.stderr.splitlines() if not line.startswith("fastadapt")] == [], proc.stderr

def test_the_checkout_kernels_folder_is_not_the_kernels_package(tmp_path):
    # `kernels` is Hugging Face's kernel hub package (transformers, bitsandbytes import it); the
    # checkout's kernels/ folder is fastadapt.kernels. python -m pytest and pytest-xdist put the
    # root on sys.path (and PYTHONPATH): the suite takes it off, as the CLI does.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not Path(spec.origin or "").is_relative_to(ROOT), spec
    assert str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep)
    probe = ("import sys; from fastadapt import cli, _env; _env.hide_checkout_root(); "
             "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)")
    proc = _run_from_root("-c", probe)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("def get_kernel(*args, **kwargs): return 'hub'\n")
    proc = _run_from_root("-c", probe.replace("print(s and s.origin)", "from kernels import get_kernel; "
                                              "print(get_kernel())"), PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "hub", proc
    # ... while fastadapt's own kernels import as fastadapt.kernels
    assert importlib.import_module("fastadapt.kernels.common").__name__ == "fastadapt.kernels.common"
