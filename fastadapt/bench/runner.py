"""``fastadapt bench`` and ``fastadapt demo``, one runner: verify every op on every backend that can
serve on this machine against float64 (and a patched PEFT Llama against unpatched PEFT), then time
cases of :mod:`fastadapt.bench.cases` against their baselines and floors. A :class:`Preset` says
what a run checks and times: :func:`bench` builds one from the bench's options (it writes
RESULTS.md, a JSON of the raw numbers and plots), :func:`demo` is the main job's (each op's first
check, timed too, and the PEFT Llama's training step, shown as two tables).

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
from dataclasses import dataclass, field

import torch
from rich.markup import escape

from fastadapt.bench import cases as bench_cases
from fastadapt.bench import report, timing
from fastadapt.bench.cases.model import LLAMA, training_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOKE_REP_MS = 5.0  # a smoke run's timings only show that each variant runs


@dataclass
class Preset:
    """What one run checks and times, and how it shows it.

    ``ops``: the names of :func:`fastadapt.bench.cases.modules` it covers; ``first_check``: only
    each op's first check; ``dtypes``: those the checks run in; ``llama``: the size of the patched
    PEFT Llama it checks; ``time_checks``: each op check is timed too, forward + backward, over this
    many runs; ``cases``: what it times, for ``env``; ``out``: where the reports go, None for the
    demo's two tables instead."""

    command: str
    heading: str
    env: bench_cases.Env
    ops: list[str]
    dtypes: dict[str, torch.dtype]
    llama: dict
    cases: list[bench_cases.Case]
    first_check: bool = False
    time_checks: int | None = None
    smoke: bool = False
    out: pathlib.Path | None = None
    budget: float | None = None  # seconds, after which no timed variant starts
    meta: dict = field(default_factory=dict)  # what the reports say of the run: device, versions, notes


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _meta(args, device: str, dtype: torch.dtype, notes: list[str]) -> dict:
    from fastadapt._env import versions

    if device == "cuda":
        name = torch.cuda.get_device_name()
        timer = "triton.testing.do_bench (CUDA events, L2 flushed between runs): median, p20, p80"
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        timer = (f"wall clock (time.perf_counter) over repeated calls, {torch.get_num_threads()} torch threads: "
                 "median, p20, p80")
    return {"device": device, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "versions": {**versions(), "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "fastadapt " + shlex.join(args.argv), "timer": timer, "notes": notes}


# ---------------------------------------------------------------------------------------------
# The presets


def _fused_backends(device: str) -> tuple[list[str], list[str]]:
    """The backends whose speed the bench times on ``device``, and notes on the others."""
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


def bench(args) -> Preset:
    """``fastadapt bench``: every check of the chosen ops in every dtype (a smoke run: the first, in
    float32), then their timed cases of the chosen tier, on the fused backends that mean speed here."""
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastadapt bench: --device cuda, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    tier = "quick" if args.quick else "full" if args.full else "default"
    scale = "smoke" if args.smoke else device
    ops = args.op or bench_cases.names()
    backends, notes = _fused_backends(device)
    if args.smoke:
        notes.append("--smoke: tiny shapes, verification in float32 only, no torch.compile baselines (the test "
                     "suite checks every dtype; compiling takes longer than the smoke run); the times say that "
                     "the command works, nothing about speed.")
    meta = _meta(args, device, dtype, notes)
    heading = (f"on {meta['device_name']}, timing in {meta['dtype']}, cases: {tier}{' (smoke)' if args.smoke else ''}; "
               + "  ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    return Preset("bench", heading, bench_cases.Env(device, dtype, backends, compile=not args.smoke), ops,
                  {"float32": torch.float32} if args.smoke else DTYPES, LLAMA[scale],
                  bench_cases.select(scale, tier, ops), first_check=args.smoke, smoke=args.smoke,
                  out=pathlib.Path(args.out), budget=args.budget, meta=meta)


def demo(args) -> Preset:
    """``fastadapt`` (``fastadapt demo``): each op's first check in the device's dtype on every backend
    that serves here, each timed too, then the PEFT Llama checked and its training step timed per
    backend (the Triton interpreter's included on a CPU: that the real kernel code runs)."""
    from fastadapt import dispatch
    from fastadapt.backends import device_reasons

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = [b for b in dispatch.BACKENDS if not device_reasons(b, device)]
    meta = _meta(args, device, dtype, [])
    heading = (f"on {device} ({meta['device_name'] if device == 'cuda' else 'CPU'}), {dtype}; "
               + "  ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "python"))
    llama = LLAMA["cuda demo" if device == "cuda" else "cpu"]
    return Preset("demo", heading, bench_cases.Env(device, dtype, backends, compile=False), bench_cases.names(),
                  {str(dtype).replace("torch.", ""): dtype}, llama, [training_step(llama, args.steps)],
                  first_check=True, time_checks=args.steps, meta=meta)


# ---------------------------------------------------------------------------------------------
# Verification


def _verify_plan(preset: Preset) -> list[tuple]:
    """(label, thunk) per check: every op case x backend that serves the device x dtype, then the
    patched PEFT Llama per dtype."""
    from fastadapt import dispatch
    from fastadapt.backends import device_reasons

    device = preset.env.device
    plan = []
    for name, module in bench_cases.modules().items():
        if name not in preset.ops or not hasattr(module, "verify"):
            continue
        checks = module.verify()
        for case in checks[:1] if preset.first_check else checks:
            for backend in dispatch.BACKENDS:
                if backend not in dispatch._REGISTRY.get(module.OP, {}) or device_reasons(backend, device):
                    continue
                for dname, dtype in preset.dtypes.items():
                    plan.append((f"{module.OP} {backend} {dname}",
                                 lambda c=case, b=backend, dn=dname, dt=dtype: _check_op(c, device, b, dn, dt,
                                                                                         preset.time_checks)))
    if "model" in preset.ops:
        for dname, dtype in preset.dtypes.items():
            plan.append((f"PEFT Llama {dname}", lambda dn=dname, dt=dtype: _check_model(device, preset.llama, dn, dt)))
    return plan


def _check_op(case, device: str, backend: str, dname: str, dtype: torch.dtype, runs: int | None) -> dict:
    from fastadapt import BackendUnavailableError, verify

    row = {"check": case.op, "shape": case.shape, "backend": backend, "dtype": dname}
    try:
        check = verify.check_op(case, device, dtype, backend)
    except BackendUnavailableError as exc:
        return {**row, "bound": "-", "status": "n/a", "detail": str(exc)}
    row.update(output_err=check.out_err, grad_err=check.grad_err, bound=f"{check.bound:.0e}",
               status="ok" if check.passed else "FAIL")
    if runs:  # the check has just run the call: nothing left to compile or tune
        row["ms"] = timing.measure(check.step, device, runs=runs, untimed=0)["p50"]
    return row


def _check_model(device: str, size: dict, dname: str, dtype: torch.dtype) -> dict:
    import copy

    import fastadapt
    from fastadapt import verify

    theirs = verify.peft_llama(device, dtype, size)
    ours = copy.deepcopy(theirs)
    patch = fastadapt.patch(ours)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    check = verify.check_patched(theirs, ours, ids, dtype)
    patched = len(patch.patched)
    shape = f"Llama h{size['hidden']} {size['layers']} layers, B{size['batch']} S{size['seq']}, {patched} LoRA layers"
    detail = f"PEFT's own logits error {check.peft:.1e}; {check.tensors - 1} LoRA grads checked"
    if check.bad:
        detail += "; over 2x PEFT's error: " + ", ".join(check.bad)
    return {"check": "PEFT LoRA Llama, patched vs unpatched", "shape": shape, "backend": "auto", "dtype": dname,
            "output_err": check.ours, "grad_err": None, "bound": "2x PEFT's error",
            "status": "ok" if check.passed else "FAIL", "detail": detail, "model": True, "patched": patched,
            "left_alone": len(patch.skipped), "peft_err": check.peft, "grads": check.tensors - 1, "bad": check.bad}


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
            result = timing.measure(fn, env.device, rep_ms, warmup_ms, runs=case.runs)
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


# ---------------------------------------------------------------------------------------------
# What a run shows: the bench a line per check and a table per case as they come, and the reports;
# the demo two tables


class _BenchView:
    width = 120

    def __init__(self, console, preset: Preset):
        self.console, self.preset = console, preset

    def checks_start(self) -> None:
        self.console.rule("verification against float64 (bounds of fastadapt.testing)")

    def check(self, row: dict) -> None:
        self.console.print(_verify_line(row))

    def checks_done(self, results: dict) -> None:
        report.write(results, self.preset.out)
        self.console.rule(f"timing ({self.preset.meta['timer']})")

    def case(self, row: dict, results: dict) -> None:
        if row["variants"]:
            self.console.print(report.case_table(row))
        if row["status"] != "ok":
            self.console.print(f"[red]{row['status']}[/] "
                               + escape(f"{row['op']}: {row['name']}: {row.get('error', '')}"))
        report.write(results, self.preset.out)

    def done(self, results: dict) -> None:
        out = self.preset.out
        try:
            plots = report.plot(results, out)
        except ImportError:
            self.console.print("matplotlib is not installed (pip install 'fastadapt[bench]'): no plots",
                               markup=False)
            plots = []
        files = ["RESULTS.md", "results.json", *plots]
        self.console.print(f"wrote {', '.join(str(out / f) for f in files)}", markup=False)
        failed = [r for r in results["verify"] if r["status"] not in ("ok", "n/a")]
        errors = [c for c in results["cases"] if c["status"] == "error"]
        self.console.print(("[green]all checks passed[/]" if not failed else f"[red]{len(failed)} check(s) failed[/]")
                           + (f", [red]{len(errors)} case(s) with errors[/]" if errors else ""))


class _DemoView:
    width = 110

    def __init__(self, console, preset: Preset):
        self.console, self.preset = console, preset

    def checks_start(self) -> None:
        pass

    def check(self, row: dict) -> None:
        pass

    def checks_done(self, results: dict) -> None:
        from rich.table import Table

        table = Table(title="fused ops vs float64 reference (relative error)")
        for col in ("op", "backend", "output", "worst grad", "bound", "verdict", "fwd+bwd ms"):
            table.add_column(col, no_wrap=True)
        verdicts = {"ok": "[green]ok[/]", "n/a": "[yellow]n/a[/]", "FAIL": "[red]FAIL[/]"}
        ops = [r for r in results["verify"] if not r.get("model") and r["status"] in verdicts]
        for row in ops:
            errors = [f"{row[k]:.1e}" if row.get(k) is not None else "-" for k in ("output_err", "grad_err")]
            table.add_row(row["check"], row["backend"], *errors, row["bound"], verdicts[row["status"]],
                          f"{row['ms']:.2f}" if "ms" in row else "-")
        self.console.print(table)
        for row in results["verify"]:
            if row.get("model"):
                self.console.print(f"patched {row['patched']} PEFT LoRA layers, left {row['left_alone']} alone")
                self.console.print(
                    f"patched vs unpatched PEFT, against a float64 copy: logits error {row['output_err']:.1e} "
                    f"(PEFT {row['peft_err']:.1e}), {row['grads']} LoRA grads: "
                    + ("[green]ok[/] (each within 2x PEFT's own error)" if row["status"] == "ok"
                       else f"[red]FAIL[/] {escape(str(row['bad']))}"))
            elif row not in ops:  # it raised
                self.console.print(f"[red]{row['status']}[/] " + escape(f"{row['check']}: {row['detail']}"))

    def case(self, row: dict, results: dict) -> None:
        from rich.table import Table

        if row["status"] != "ok":
            self.console.print(f"[red]{row['status']}[/] " + escape(f"{row['name']}: {row.get('error', '')}"))
        measured = {name: v["p50"] for name, v in row["variants"].items() if "p50" in v}
        if measured:
            table = Table(title=row["name"])
            for col in ("variant", "ms / step", "time vs PEFT (< 1: faster)"):
                table.add_column(col)
            base = next(iter(measured.values()))
            for name, ms in measured.items():
                table.add_row(name, f"{ms:.1f}", f"{ms / base:.2f}x")
            self.console.print(table)

    def done(self, results: dict) -> None:
        from fastadapt import dispatch

        for (op, name), rule in dispatch.crossovers().items():
            self.console.print(f"automatic dispatch passes over {name} for {op} {rule}", markup=False)
        if self.preset.env.device == "cpu":
            self.console.print("On the CPU the Triton kernels run in Triton's interpreter (numpy, one program at a "
                               "time): its timing shows that the real kernel code runs, not GPU speed.")


# ---------------------------------------------------------------------------------------------
# The run


def run(preset: Preset) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    env = preset.env
    view_type = _DemoView if preset.out is None else _BenchView
    console = Console(width=max(Console().width, view_type.width))  # tables stay readable when piped (80 cols)
    view = view_type(console, preset)
    console.print(f"[bold]fastadapt {preset.command}[/] " + escape(preset.heading))
    for note in preset.meta["notes"]:
        console.print(f"[dim]{escape(note)}[/]")
    deadline = time.monotonic() + preset.budget if preset.budget else None
    results = {"meta": preset.meta, "verify": [], "cases": []}
    plan = _verify_plan(preset)
    ok = True

    columns = (TextColumn("{task.description}", markup=False), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=view_type is _DemoView) as progress:
        task = progress.add_task("verify", total=len(plan) + len(preset.cases))
        view.checks_start()
        for label, check in plan:
            progress.update(task, description=f"verify {label}")
            try:
                row = check()
            except Exception as exc:  # noqa: BLE001 (one check's failure must not end the run)
                row = {"check": label, "shape": "", "backend": "", "dtype": "", "bound": "-", "status": "error",
                       "detail": _short(exc)}
            ok &= row["status"] in ("ok", "n/a")
            results["verify"].append(row)
            view.check(row)
            _free(env.device)
            progress.advance(task)
        view.checks_done(results)

        if any(c.hbm_floor for c in preset.cases):
            progress.update(task, description="copy bandwidth")
            # 1 GiB on a GPU (well past L2), 64 MiB on a CPU (past its caches); 8 MiB in a smoke run.
            nbytes = 2**23 if preset.smoke else 2**30 if env.device == "cuda" else 2**26
            env.bandwidth = timing.copy_bandwidth(env.device, nbytes)
            preset.meta["bandwidth_GBps"] = env.bandwidth / 1e6
            console.print(f"copy bandwidth {preset.meta['bandwidth_GBps']:.0f} GB/s")
        for case in preset.cases:
            progress.update(task, description=f"{case.op}: {case.name}")
            if deadline is not None and time.monotonic() > deadline:
                row = {"op": case.op, "name": case.name, "params": case.params, "floor": None, "floor_ms": None,
                       "variants": {}, "status": "skipped", "error": f"time budget of {preset.budget} s spent"}
            else:
                row = _time_case(case, env, deadline, preset.smoke)
            ok &= row["status"] != "error"
            results["cases"].append(row)
            view.case(row, results)
            torch._dynamo.reset()  # drop this case's compiled graphs (and their memory)
            _free(env.device)
            progress.advance(task)
    view.done(results)
    return 0 if ok else 1
