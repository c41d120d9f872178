"""``fastadapt bench``: verify every op on every backend that can serve on this machine against
float64 (and a patched PEFT Llama against unpatched PEFT), then time every case of
:mod:`fastadapt.bench.cases` against its baselines and its floor, and write RESULTS.md, a JSON of
the raw numbers and plots.

Each check and each case is isolated: an exception (CUDA out-of-memory included) is recorded
against it, the run goes on, and the exit status is 1. So is a failed check. A run cut short
(``--budget``, or killed) keeps what it measured: the reports are rewritten after every case.
"""

from __future__ import annotations

import datetime
import gc
import os
import pathlib
import platform
import shlex
import time

import torch
from rich.markup import escape

from fastadapt.bench import cases as bench_cases
from fastadapt.bench import report, timing

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPS = {"lora": "lora_linear", "dora": "dora_linear", "multi_lora": "multi_lora_linear",
       "moe_lora": "moe_lora_experts", "qlora": "qlora_linear",
       "bottleneck": "bottleneck_adapter", "prefix": "prefix_attention"}

# The Llama that the patched-vs-unpatched check runs (odd sequence length; float64 copy included).
VERIFY_LLAMA = {
    "cpu": dict(hidden=64, ffn=128, layers=2, heads=4, vocab=128, seq=37, batch=2),
    "cuda": dict(hidden=256, ffn=688, layers=2, heads=8, vocab=512, seq=129, batch=2),
    "smoke": dict(hidden=64, ffn=128, layers=1, heads=4, vocab=128, seq=13, batch=1),
}
SMOKE_REP_MS = 5.0  # a smoke run's timings only show that each variant runs


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _meta(args, device: str, dtype: torch.dtype, notes: list[str]) -> dict:
    from fastadapt.cli import _versions

    if device == "cuda":
        name = torch.cuda.get_device_name()
        timer = "triton.testing.do_bench (CUDA events, L2 flushed between runs): median, p20, p80"
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        timer = (f"wall clock (time.perf_counter) over repeated calls, {torch.get_num_threads()} torch threads: "
                 "median, p20, p80")
    return {"device": device, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "versions": {**_versions(), "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "fastadapt " + shlex.join(args.argv), "timer": timer, "notes": notes}


# ---------------------------------------------------------------------------------------------
# Verification


def _verify_plan(device: str, ops: list[str], smoke: bool) -> list[tuple]:
    """(label, thunk) per check: every op case x backend that serves ``device`` x dtype, then the
    patched PEFT Llama per dtype. A smoke run checks the first case of each op in float32 only."""
    from fastadapt import dispatch, verify
    from fastadapt.backends import device_reasons

    dtypes = {"float32": torch.float32} if smoke else DTYPES
    plan = []
    for key, op in OPS.items():
        if key not in ops:
            continue
        cases = verify.op_cases()[op]
        for case in cases[:1] if smoke else cases:
            for backend in dispatch.BACKENDS:
                if backend not in dispatch._REGISTRY.get(op, {}) or device_reasons(backend, device):
                    continue
                for dname, dtype in dtypes.items():
                    plan.append((f"{op} {backend} {dname}",
                                 lambda c=case, b=backend, dn=dname, dt=dtype: _check_op(c, device, b, dn, dt)))
    if "model" in ops:
        size = VERIFY_LLAMA["smoke" if smoke else device]
        for dname, dtype in dtypes.items():
            plan.append((f"PEFT Llama {dname}", lambda dn=dname, dt=dtype: _check_model(device, size, dn, dt)))
    return plan


def _check_op(case, device: str, backend: str, dname: str, dtype: torch.dtype) -> dict:
    from fastadapt import BackendUnavailableError, verify

    row = {"check": case.op, "shape": case.shape, "backend": backend, "dtype": dname}
    try:
        check = verify.check_op(case, device, dtype, backend)
    except BackendUnavailableError as exc:
        return {**row, "bound": "-", "status": "n/a", "detail": str(exc)}
    return {**row, "output_err": check.out_err, "grad_err": check.grad_err, "bound": f"{check.bound:.0e}",
            "status": "ok" if check.passed else "FAIL"}


def _check_model(device: str, size: dict, dname: str, dtype: torch.dtype) -> dict:
    import copy

    import fastadapt
    from fastadapt import verify

    theirs = verify.peft_llama(device, dtype, size)
    ours = copy.deepcopy(theirs)
    patched = len(fastadapt.patch(ours).patched)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    check = verify.check_patched(theirs, ours, ids, dtype)
    shape = f"Llama h{size['hidden']} {size['layers']} layers, B{size['batch']} S{size['seq']}, {patched} LoRA layers"
    detail = f"PEFT's own logits error {check.peft:.1e}; {check.tensors - 1} LoRA grads checked"
    if check.bad:
        detail += "; over 2x PEFT's error: " + ", ".join(check.bad)
    return {"check": "PEFT LoRA Llama, patched vs unpatched", "shape": shape, "backend": "auto", "dtype": dname,
            "output_err": check.ours, "grad_err": None, "bound": "2x PEFT's error",
            "status": "ok" if check.passed else "FAIL", "detail": detail}


def _verify_line(row: dict) -> str:
    colour = {"ok": "green", "n/a": "yellow"}.get(row["status"], "red")
    errs = ""
    if row.get("output_err") is not None:
        errs = f"out {row['output_err']:.1e}"
        if row.get("grad_err") is not None:
            errs += f"  grad {row['grad_err']:.1e}"
        errs += f"  (bound {row['bound']})"
    detail = f"  {row['detail']}" if row.get("detail") and row["status"] != "ok" else ""
    return (f"[{colour}]{row['status']:>5}[/]  " + escape(f"{row['check']:<20} {row['backend']:<9} {row['dtype']:<8} "
                                                        f"{errs}  ") + f"[dim]{escape(row['shape'])}[/]{escape(detail)}")


# ---------------------------------------------------------------------------------------------
# Timing


def _time_case(case: bench_cases.Case, env: bench_cases.Env, deadline: float | None, smoke: bool) -> dict:
    from fastadapt import BackendUnavailableError

    row = {"op": case.op, "name": case.name, "params": case.params, "floor": None, "floor_ms": None,
           "variants": {}, "status": "ok"}
    try:
        built = case.build(env)
    except Exception as exc:  # noqa: BLE001 (one case's failure must not end the run)
        row.update(status="error", error="building the case: " + _short(exc))
        return row
    row["floor"], row["floor_ms"] = built.floor, built.floor_ms
    for name, fn in built.variants.items():
        if deadline is not None and time.monotonic() > deadline:
            row["variants"][name] = {"skipped": "time budget spent"}
            continue
        try:
            rep_ms, warmup_ms = (SMOKE_REP_MS, 0.0) if smoke else (case.rep_ms, case.warmup_ms)
            result = timing.measure(fn, env.device, rep_ms, warmup_ms)
            result["peak_mib"] = timing.peak_mib(fn, env.device, built.leaves)
        except BackendUnavailableError as exc:
            result = {"skipped": "n/a: " + _short(exc)}
        except Exception as exc:  # noqa: BLE001 (CUDA out-of-memory included)
            result = {"error": _short(exc)}
            row.update(status="error", error=f"{name}: {result['error']}")
        row["variants"][name] = result
        _free(env.device)
    del built
    return row


def _fused_backends(device: str) -> tuple[list[str], list[str]]:
    """The backends whose speed the run times on ``device``, and notes on the others."""
    from fastadapt.backends import device_reasons

    if device == "cuda":
        backends = [b for b in ("triton", "cuda") if not device_reasons(b, device)]
        return backends or ["reference"], []
    notes = ["On the CPU the Triton kernels are verified through Triton's interpreter, which runs them one "
             "program at a time in numpy: its times are not speed and are not shown."]
    if device_reasons("cpp", device):
        notes.append("The cpp backend is unavailable (" + "; ".join(device_reasons("cpp", device))
                     + "): fastadapt is timed on its reference backend.")
        return ["reference"], notes
    return ["cpp"], notes


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastadapt bench: --device cuda, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    tier = "quick" if args.quick else "full" if args.full else "default"
    ops = args.op or [*OPS, "model"]
    out = pathlib.Path(args.out)
    deadline = time.monotonic() + args.budget if args.budget else None
    console = Console(width=max(Console().width, 120))  # tables stay readable when piped (80 cols)

    backends, notes = _fused_backends(device)
    compile_ok = not args.smoke
    if args.smoke:
        notes.append("--smoke: tiny shapes, verification in float32 only, no torch.compile baselines (the test "
                     "suite checks every dtype; compiling takes longer than the smoke run); the times say that "
                     "the command works, nothing about speed.")
    results = {"meta": _meta(args, device, dtype, notes), "verify": [], "cases": []}
    meta = results["meta"]
    console.print("[bold]fastadapt bench[/] " + escape(
        f"on {meta['device_name']}, timing in {meta['dtype']}, cases: {tier}{' (smoke)' if args.smoke else ''}; "
        + "  ".join(f"{k} {v}" for k, v in meta["versions"].items())))
    for note in notes:
        console.print(f"[dim]{escape(note)}[/]")
    plan = _verify_plan(device, ops, args.smoke)
    selected = bench_cases.select("smoke" if args.smoke else device, tier, ops)
    ok = True

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("verify", total=len(plan) + len(selected))
        console.rule("verification against float64 (bounds of fastadapt.testing)")
        for label, check in plan:
            progress.update(task, description=f"verify {label}")
            try:
                row = check()
            except Exception as exc:  # noqa: BLE001 (one check's failure must not end the run)
                row = {"check": label, "shape": "", "backend": "", "dtype": "", "bound": "-", "status": "error",
                       "detail": _short(exc)}
            ok &= row["status"] in ("ok", "n/a")
            results["verify"].append(row)
            console.print(_verify_line(row))
            _free(device)
            progress.advance(task)
        report.write(results, out)

        console.rule(f"timing ({meta['timer']})")
        env = bench_cases.Env(device, dtype, backends, compile_ok)
        if any(c.op == "bottleneck" for c in selected):
            progress.update(task, description="copy bandwidth")
            # 1 GiB on a GPU (well past L2), 64 MiB on a CPU (past its caches); 8 MiB in a smoke run.
            nbytes = 2**23 if args.smoke else 2**30 if device == "cuda" else 2**26
            env.bandwidth = timing.copy_bandwidth(device, nbytes)
            meta["bandwidth_GBps"] = env.bandwidth / 1e6
            console.print(f"copy bandwidth {meta['bandwidth_GBps']:.0f} GB/s")
        for case in selected:
            progress.update(task, description=f"{case.op}: {case.name}")
            if deadline is not None and time.monotonic() > deadline:
                row = {"op": case.op, "name": case.name, "params": case.params, "floor": None, "floor_ms": None,
                       "variants": {}, "status": "skipped", "error": f"time budget of {args.budget} s spent"}
            else:
                row = _time_case(case, env, deadline, args.smoke)
            ok &= row["status"] != "error"
            results["cases"].append(row)
            if row["variants"]:
                console.print(report.case_table(row))
            if row["status"] != "ok":
                console.print(f"[red]{row['status']}[/] " + escape(f"{case.op}: {case.name}: {row.get('error', '')}"))
            torch._dynamo.reset()  # drop this case's compiled graphs (and their memory)
            _free(device)
            report.write(results, out)
            progress.advance(task)

    try:
        plots = report.plot(results, out)
    except ImportError:
        console.print("matplotlib is not installed (pip install 'fastadapt[bench]'): no plots", markup=False)
        plots = []
    files = ["RESULTS.md", "results.json", *plots]
    console.print(f"wrote {', '.join(str(out / f) for f in files)}", markup=False)
    failed = [r for r in results["verify"] if r["status"] not in ("ok", "n/a")]
    errors = [c for c in results["cases"] if c["status"] == "error"]
    console.print(("[green]all checks passed[/]" if not failed else f"[red]{len(failed)} check(s) failed[/]")
                  + (f", [red]{len(errors)} case(s) with errors[/]" if errors else ""))
    return 0 if ok else 1
