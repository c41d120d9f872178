"""``fastadapt bench``: the smoke run end to end on the CPU, the isolation of a failing case, and
the pieces with logic (case selection, timing quantiles, ratios, the reports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from harness import backends_for

from fastadapt import cli
from fastadapt.bench import cases, report, runner, timing

pytest.importorskip("peft")


def test_smoke_run_end_to_end(tmp_path):
    assert cli.main(["bench", "--quick", "--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["command"] == f"fastadapt bench --quick --smoke --device cpu --out {tmp_path}"
    checked = {(r["check"], r["backend"]) for r in results["verify"]}
    for op in ("lora_linear", "dora_linear", "multi_lora_linear", "moe_lora_experts", "qlora_linear",
               "bottleneck_adapter", "prefix_attention"):
        assert {(op, b) for b in ("triton", "cpp", "reference")} <= checked
    assert any(r["check"].startswith("PEFT LoRA Llama") for r in results["verify"])
    assert all(r["status"] == "ok" for r in results["verify"])
    assert {c["op"] for c in results["cases"]} == {"lora", "dora", "multi_lora", "moe_lora", "qlora", "bottleneck",
                                                   "prefix", "model"}
    for case in results["cases"]:
        assert case["status"] == "ok", case
        # Triton's interpreter is never timed: the CPU's fused variant is the C++ backend.
        assert report.fused_variant(case) == "fastadapt[cpp]"
        assert report.floor_ms(case) > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert results["meta"]["device_name"] in md and "## Verification against float64" in md
    assert "lora: fwd+bwd M=64 96x80 r=8" in md and "dora: fwd+bwd M=64 96x80 r=8" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "ratio_to_floor.png").stat().st_size > 0
    assert (tmp_path / "lora_vs_m.png").stat().st_size > 0


def _case(name, build):
    return cases.Case("lora", name, {"kind": "train", "M": 1, "K": 8, "N": 8, "r": 1, "p": 0.0}, "quick", build,
                      rep_ms=1, warmup_ms=0)


def _fine(env):
    x = torch.randn(8, 8)
    return cases.Built({"fastadapt[reference]": lambda: x @ x, "floor: nothing": lambda: x + 1}, "floor: nothing")


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken_build(env):
        raise RuntimeError("no such shape [2, 3]")

    def out_of_memory(env):
        def oom():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        built = _fine(env)
        built.variants["peft"] = oom
        return built

    selected = [_case("broken", broken_build), _case("oom", out_of_memory), _case("fine", _fine)]
    monkeypatch.setattr(cases, "select", lambda *a, **k: selected)
    status = cli.main(["bench", "--smoke", "--device", "cpu", "--op", "lora", "--out", str(tmp_path)])
    assert status == 1
    rows = {c["name"]: c for c in json.loads((tmp_path / "results.json").read_text())["cases"]}
    assert rows["broken"]["status"] == "error" and "no such shape" in rows["broken"]["error"]
    assert "no such shape [2, 3]" in capsys.readouterr().out  # not taken for rich markup
    assert rows["oom"]["status"] == "error" and "out of memory" in rows["oom"]["variants"]["peft"]["error"]
    assert "p50" in rows["oom"]["variants"]["fastadapt[reference]"]  # the other variants still ran
    assert rows["fine"]["status"] == "ok"
    md = (tmp_path / "RESULTS.md").read_text()
    assert "no such shape" in md and "out of memory" in md


def test_time_budget_skips_the_rest_without_failing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "select", lambda *a, **k: [_case("late", _fine)])

    def no_matplotlib(*args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "plot", no_matplotlib)
    assert cli.main(["bench", "--smoke", "--device", "cpu", "--op", "lora", "--budget", "1e-9",
                     "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert row["status"] == "skipped" and "time budget" in row["error"]
    assert "pip install 'fastadapt[bench]'" in capsys.readouterr().out  # the extra's name survives rich


def test_case_selection_by_tier_and_op():
    for scale in ("cuda", "cpu", "smoke"):
        quick, default, full = (cases.select(scale, t) for t in cases.TIERS)
        names = [(c.op, c.name) for c in full]
        assert len(names) == len(set(names)), f"{scale}: duplicate case names"
        assert [c.name for c in quick] == [c.name for c in default if c.tier == "quick"]
        assert len(quick) < len(default) <= len(full)
        assert {c.op for c in quick} == {"lora", "dora", "multi_lora", "moe_lora", "qlora", "bottleneck", "prefix",
                                          "model"}
    assert {c.op for c in cases.select("cuda", "full", ["prefix"])} == {"prefix"}
    with pytest.raises(ValueError, match="tier"):
        cases.select("cuda", "slow")


def test_strategy_cases_time_both_strategies_around_the_crossover(monkeypatch):
    # On the GPU: DoRA's norm and QLoRA/FP8's dequantization, in the GEMM or apart + cuBLAS, at the
    # rows that bracket the rules' crossovers, for DESIGN.md's two layer shapes.
    from fastadapt.strategy import DORA_NORM, QLORA_DEQUANT, FrozenProductRule

    timed = {(c.op, c.name) for c in cases.select("cuda", "default", ["dora", "qlora"])}
    for M in (1, 16, 256, 2048, 8192):
        which = "fwd+bwd" if M > 16 else "fwd"
        for shape in ("4096x4096", "4096x11008"):
            assert ("dora", f"norm strategies {which} M={M} {shape} r=16") in timed
            for fmt in ("nf4-nested", "fp8-channel"):
                assert ("qlora", f"{fmt} dequant strategies {which} M={M} {shape} r=16") in timed
    # Built small on the CPU (the Triton interpreter): the rule's strategy first, each variant runs
    # its own in the forward and the backward, and the environment is left as it was.
    if "triton" not in backends_for("dora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    ran = []
    choose = FrozenProductRule.choose
    monkeypatch.setattr(FrozenProductRule, "choose", lambda self, rows: ran.append(choose(self, rows)) or ran[-1])
    env = cases.Env("cpu", torch.float32, ["triton"], False)
    for case, rule in ((cases.dora_strategies(600, 32, 48, 4, "quick"), DORA_NORM),
                       (cases.qlora_strategies(16, 64, 48, 4, "fp8-channel", "quick"), QLORA_DEQUANT)):
        built = case.build(env)
        first = rule.automatic(case.params["M"])
        second = rule.split if first == rule.fused else rule.fused
        assert list(built.variants) == [f"fastadapt[triton] {rule.env}={first} (the rule here)",
                                        f"fastadapt[triton] {rule.env}={second}", "floor: frozen matmul"]
        for choice, run in zip((first, second), built.variants.values()):
            ran.clear()
            run()
            assert ran and set(ran) == {choice}
            assert rule.env not in os.environ


def test_quantiles_and_cpu_timer():
    q = timing.quantiles([5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert q == {"p50": 6.0, "p20": 3.0, "p80": 9.0}
    calls = []
    result = timing.measure(lambda: calls.append(1), "cpu", rep_ms=1, warmup_ms=0)
    assert result["p20"] <= result["p50"] <= result["p80"] and len(calls) >= 7  # 2 untimed + at least 5
    assert timing.peak_mib(lambda: None, "cpu") is None


def _measured(p50):
    return {"p50": p50, "p20": p50 * 0.9, "p80": p50 * 1.1, "peak_mib": None}


def _results(cases_):
    meta = {"device": "cpu", "device_name": "Test CPU", "dtype": "float32", "versions": {"torch": "x"},
            "date": "2026-01-01T00:00:00+00:00", "command": "fastadapt bench --quick", "timer": "wall clock"}
    return {"meta": meta, "verify": [], "cases": cases_}


def test_ratios_against_the_floor_and_the_fused_variant():
    case = {"op": "lora", "name": "c", "params": {}, "status": "ok", "floor": "floor: matmul", "floor_ms": None,
            "variants": {"fastadapt[triton]": _measured(2.0), "fastadapt[cuda]": _measured(3.0),
                         "peft": _measured(5.0), "eager": {"error": "boom"}, "floor: matmul": _measured(1.0)}}
    assert report.fused_variant(case) == "fastadapt[triton]"
    r = report.ratios(case)
    assert "eager" not in r
    assert r["fastadapt[triton]"] == {"x_floor": 2.0, "speedup": 1.0}
    assert r["peft"] == {"x_floor": 5.0, "speedup": 2.5}
    assert r["floor: matmul"]["speedup"] == 0.5
    # A computed floor (HBM traffic) wins over the variants; no fused variant: no speedups.
    computed = {**case, "floor": "floor: HBM", "floor_ms": 0.5,
                "variants": {"fastadapt[triton]": {"error": "x"}, "peft": _measured(5.0)}}
    assert report.ratios(computed) == {"peft": {"x_floor": 10.0, "speedup": None}}
    assert report.summary_cells(case)[1:3] == ["2", "2.00x"]
    assert "peft 2.50x" in report.summary_cells(case)[3]


def test_markdown_and_json(tmp_path):
    ok = {"op": "bottleneck", "name": "fwd M=8", "params": {}, "status": "ok", "floor": "floor: HBM",
          "floor_ms": 0.25, "variants": {"fastadapt[cpp]": _measured(0.5), "eager": _measured(1.5)}}
    bad = {"op": "model", "name": "step", "params": {}, "status": "error", "floor": None, "floor_ms": None,
           "error": "building the case: ImportError: no peft", "variants": {}}
    results = _results([ok, bad])
    results["verify"] = [{"check": "lora_linear", "shape": "x (7, 9)", "backend": "cpp", "dtype": "float16",
                          "output_err": 2e-3, "grad_err": 3e-2, "bound": "1e-02", "status": "FAIL"}]
    report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "RESULTS.md").read_text()
    for text in ("Test CPU", "`fastadapt bench --quick`", "2026-01-01", "| lora_linear | x (7, 9) | cpp | float16 | "
                 "2.0e-03 | 3.0e-02 | 1e-02 | FAIL |", "| bottleneck: fwd M=8 | 0.5 | 2.00x | eager 3.00x |",
                 "| eager | 1.5 (1.35 / 1.65) | 6.00x | 3.00x | - |", "error: building the case: ImportError: no peft"):
        assert text in md, text


def test_lora_sweep_points_take_the_most_measured_shape():
    def lora(M, K, p=0.0, status="ok"):
        return {"op": "lora", "name": f"{M} {K}", "status": status, "floor": "floor: frozen matmul",
                "floor_ms": None, "params": {"kind": "train", "M": M, "K": K, "N": K, "r": 16, "p": p},
                "variants": {"fastadapt[triton]": _measured(M / 100), "peft": _measured(M / 50),
                             "floor: frozen matmul": _measured(M / 200)}}

    results = _results([lora(64, 4096), lora(1, 4096), lora(8, 1024), lora(16, 4096, p=0.1),
                        lora(256, 4096, status="error")])
    title, series = report.lora_sweep_points(results)
    assert title == "LoRA fwd+bwd, 4096x4096, r=16"
    assert series["fastadapt"] == [(1, 0.01), (64, 0.64)]
    assert set(series) == {"fastadapt", "PEFT", "floor: frozen matmul"}
    assert report.lora_sweep_points(_results([lora(8, 1024)])) is None


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--quick", "--full", "--smoke", "--op", "--device", "--dtype", "--out"):
        assert option in out
