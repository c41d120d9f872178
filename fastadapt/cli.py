"""The ``fastadapt`` command: ``info`` (backends and why), ``demo`` (the default: a small random
Llama with PEFT LoRA, patched, checked against unpatched PEFT and timed on every backend), ``bench``
(every op verified here, then timed against PEFT, eager, torch.compile and the floor)."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def _prepare_triton(device: str) -> None:
    # Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
    # triton is first imported.
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("fastadapt", "torch", "triton", "peft", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cmd_info(args) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fastadapt import _native, dispatch
    from fastadapt.backends import device_reasons, native_status, triton_status

    console = Console(width=max(Console().width, 110))  # tables stay readable when piped (80 cols)
    # markup=False / escape: rich would take bracketed text in these (an OSError's "[Errno 2]") for markup.
    console.print("  ".join(f"{k} {v}" for k, v in _versions().items()), markup=False)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    console.print(f"CUDA device: {gpu}", markup=False)
    native = native_status()
    cuda_why = _native.cuda_reason()
    status = {"triton": triton_status(), "cuda": (not cuda_why, cuda_why or native[1]), "cpp": native,
              "reference": (True, "plain PyTorch, always available")}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = Table(title="backends, in dispatch order")
    table.add_column("backend")
    table.add_column("available")
    for d in devices:
        table.add_column(f"serves {d} tensors")
    table.add_column("ops")
    table.add_column("detail")
    for name in dispatch.BACKENDS:
        ok, detail = status[name]
        ops = ", ".join(op for op, impls in dispatch._REGISTRY.items() if name in impls) or "-"
        cells = []
        for d in devices:
            reasons = device_reasons(name, d)
            cells.append("yes" if not reasons else "no: " + "; ".join(reasons))
        table.add_row(name, "yes" if ok else "no", *map(escape, cells), ops, escape(detail))
    console.print(table)
    for (op, name), why in dispatch.nondeterministic().items():
        console.print(f"non-deterministic: {name} {op} ({why}); dispatch skips it under "
                      "torch.use_deterministic_algorithms(True)", markup=False)
    for (op, name), rule in dispatch.crossovers().items():
        console.print(f"crossover: automatic dispatch passes over {name} for {op} {rule}", markup=False)
    for (op, name), rule in dispatch.strategies().items():
        console.print(f"strategy: {name} {op} runs {rule}", markup=False)
    console.print(f"{dispatch.ENV_VAR}={os.environ.get(dispatch.ENV_VAR, '')!r} "
                  "(set it to force one backend; dispatch errors name the reasons if it cannot serve)", markup=False)
    return 0


def _time_steps(model, ids, steps, backend, progress, task):
    import torch

    from fastadapt import dispatch
    from fastadapt.backends import triton_interpret

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    times = []
    # Automatic dispatch as a user's process has it: without the Triton interpreter the demo turned on.
    candidates = [b for b in dispatch.BACKENDS if not (b == "triton" and triton_interpret())]
    with dispatch.use_backend(backend), dispatch.only_backends(*candidates):
        for i in range(steps + 1):  # one warm-up step (compiles / autotunes on the GPU)
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
            opt.step()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
            progress.advance(task)
    times.sort()
    return times[len(times) // 2]


def _median_seconds(fn, reps, cuda):
    sync = __import__("torch").cuda.synchronize if cuda else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# The demo model per device: tiny on the CPU (Triton runs in its interpreter there), a few
# hundred MB on a GPU so that the timings mean something.
DEMO_SIZES = {
    "cpu": dict(hidden=64, ffn=128, layers=2, heads=4, vocab=128, seq=32, batch=2),
    "cuda": dict(hidden=1024, ffn=2816, layers=4, heads=16, vocab=8192, seq=512, batch=4),
}


def cmd_demo(args) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    import fastadapt
    from fastadapt import dispatch, verify
    from fastadapt.backends import device_reasons

    console = Console(width=max(Console().width, 110))  # tables stay readable when piped (80 cols)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = DEMO_SIZES[device]
    console.print("[bold]fastadapt demo[/] " + escape(
        f"on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), {dtype}; "
        + "  ".join(f"{k} {v}" for k, v in _versions().items())))
    backends = [b for b in dispatch.BACKENDS if not device_reasons(b, device)]
    ok = True

    # 1. Each fused op against its float64 reference, on every backend that can serve it here.
    table = Table(title="fused ops vs float64 reference (relative error)")
    for col in ("op", "backend", "output", "worst grad", "bound", "verdict", "fwd+bwd ms"):
        table.add_column(col, no_wrap=True)
    for op, cases in verify.op_cases().items():
        for backend in backends:
            if backend not in dispatch._REGISTRY.get(op, {}):
                continue
            check = verify.check_op(cases[0], device, dtype, backend)
            seconds = _median_seconds(check.step, args.steps, device == "cuda")
            ok &= check.passed
            table.add_row(op, backend, f"{check.out_err:.1e}", f"{check.grad_err:.1e}", f"{check.bound:.0e}",
                          "[green]ok[/]" if check.passed else "[red]FAIL[/]", f"{seconds * 1e3:.2f}")
    console.print(table)

    # 2. A PEFT LoRA Llama, patched, against the same model unpatched.
    peft_model = verify.peft_llama(device, dtype, size)
    ours = copy.deepcopy(peft_model)
    report = fastadapt.patch(ours)
    console.print(f"patched {len(report.patched)} PEFT LoRA layers, left {len(report.skipped)} alone")
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    check = verify.check_patched(peft_model, ours, ids, dtype)
    ok &= check.passed
    console.print(f"patched vs unpatched PEFT, against a float64 copy: logits error {check.ours:.1e} "
                  f"(PEFT {check.peft:.1e}), {check.tensors - 1} LoRA grads: "
                  + ("[green]ok[/] (each within 2x PEFT's own error)" if check.passed
                     else f"[red]FAIL[/] {escape(str(check.bad))}"))

    # 3. Training steps (fwd + bwd + AdamW): unpatched PEFT, fastadapt as patch() leaves it (automatic
    # dispatch, which passes over a backend below its crossover), and each backend forced.
    runs = [("peft (unpatched)", peft_model, None), ("fastadapt, automatic dispatch", ours, None)]
    runs += [(f"fastadapt {b} (forced)", ours, b) for b in backends]
    timings = {}
    with Progress(console=console, transient=True) as progress:
        for label, model, backend in runs:
            task = progress.add_task(f"timing {label}", total=args.steps + 1)
            timings[label] = _time_steps(model, ids, args.steps, backend, progress, task)
    table = Table(title=f"training step, median of {args.steps} (LoRA r=8 on all 7 projections, "
                        f"{size['layers']} layers, hidden {size['hidden']}, batch {size['batch']}x{size['seq']})")
    for col in ("variant", "ms / step", "time vs PEFT (< 1: faster)"):
        table.add_column(col)
    base = timings["peft (unpatched)"]
    for label, t in timings.items():
        table.add_row(label, f"{t * 1e3:.1f}", f"{t / base:.2f}x")
    console.print(table)
    for (op, name), rule in dispatch.crossovers().items():
        console.print(f"automatic dispatch passes over {name} for {op} {rule}", markup=False)
    if device == "cpu":
        console.print("On the CPU the Triton kernels run in Triton's interpreter (numpy, one program at a "
                      "time): its timing shows that the real kernel code runs, not GPU speed.")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from fastadapt.bench.runner import run

    return run(args)


def main(argv=None) -> int:
    from fastadapt import _env
    _env.hide_checkout_root()
    _env.quiet_third_party()
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="versions, devices, and which backends can serve (and why not)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="patch a small random PEFT LoRA Llama, verify it, time every backend")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda if available, else cpu (Triton through its interpreter)")
    demo.add_argument("--steps", type=int, default=3, help="timed training steps per backend")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="verify every op here against float64, then time each against PEFT, "
                                         "eager, torch.compile and the floor; write RESULTS.md, JSON, plots")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="default: cuda if available, else cpu (small shapes, cpp and reference timed)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the headline cases only (one 10-minute GPU call)")
    size.add_argument("--full", action="store_true", help="every case, more shapes than DESIGN.md's")
    bench.add_argument("--smoke", action="store_true", help="tiny shapes (CI on a CPU): checks the command, not speed")
    bench.add_argument("--op", action="append",
                       choices=["lora", "dora", "multi_lora", "moe_lora", "qlora", "bottleneck", "prefix", "model"],
                       help="only these ops (repeatable); model: the PEFT Llama check and training step")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                       help="timing dtype (default: bfloat16 on cuda, float32 on cpu); verification runs all three")
    bench.add_argument("--out", default="bench-results", help="folder for RESULTS.md, results.json and plots")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch's intra-op threads (default: all cores); 1 is steadier on a shared CPU")
    bench.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                       help="stop starting timed variants after this long, so that the reports are written "
                            "before an outer time limit")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: the demo with its defaults
        args = parser.parse_args(["demo", *(argv or [])])
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "device", None) is None and args.command in ("demo", "bench"):
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _prepare_triton(getattr(args, "device", None) or ("cuda" if _has_cuda() else "cpu"))
    return args.func(args)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
