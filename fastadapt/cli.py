"""The ``fastadapt`` command: ``info`` (backends and why), ``demo`` (the default: every op checked
against float64 and timed on every backend, then a small random Llama with PEFT LoRA, patched,
checked against unpatched PEFT and its training step timed on every backend), ``bench`` (every op
verified here, then timed against PEFT, eager, torch.compile and the floor). Demo and bench are one
runner (:mod:`fastadapt.bench.runner`)."""

from __future__ import annotations

import argparse
import os
import sys


def _prepare_triton(device: str) -> None:
    # Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
    # triton is first imported.
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cmd_info(args) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fastadapt import _env, _native, dispatch
    from fastadapt.backends import device_reasons, native_status, triton_status

    console = Console(width=max(Console().width, 110))  # tables stay readable when piped (80 cols)
    # markup=False / escape: rich would take bracketed text in these (an OSError's "[Errno 2]") for markup.
    console.print("  ".join(f"{k} {v}" for k, v in _env.versions().items()), markup=False)
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


def cmd_demo(args) -> int:
    from fastadapt.bench import runner

    return runner.run(runner.demo(args))


def cmd_bench(args) -> int:
    from fastadapt.bench import runner

    return runner.run(runner.bench(args))


def main(argv=None) -> int:
    from fastadapt import _env
    _env.hide_checkout_root()
    _env.quiet_third_party()
    from fastadapt.bench import cases  # the ops to choose from: importing fastadapt imports no Triton
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="versions, devices, and which backends can serve (and why not)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="verify and time every op on every backend, then patch a small random "
                                       "PEFT LoRA Llama, verify it and time its training step (a preset of bench)")
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
    bench.add_argument("--op", action="append", choices=cases.names(),
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
