"""The ``fastadapt`` command: ``info`` (backends and why), ``demo`` (the default: a small random
Llama with PEFT LoRA, patched, checked against unpatched PEFT and timed on every backend)."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings


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
    from rich.table import Table

    from fastadapt import _native, dispatch
    from fastadapt.backends import device_reasons, native_status, triton_status

    console = Console(width=max(Console().width, 110))  # tables stay readable when piped (80 cols)
    console.print("  ".join(f"{k} {v}" for k, v in _versions().items()))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    console.print(f"CUDA device: {gpu}")
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
        table.add_row(name, "yes" if ok else "no", *cells, ops, detail)
    console.print(table)
    console.print(f"{dispatch.ENV_VAR}={os.environ.get(dispatch.ENV_VAR, '')!r} "
                  "(set it to force one backend; dispatch errors name the reasons if it cannot serve)")
    return 0


def _demo_model(device, dtype, size):
    import peft
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["ffn"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["heads"] // 2, vocab_size=size["vocab"],
        max_position_embeddings=size["seq"])
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    return peft.get_peft_model(base, lora)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _time_steps(model, ids, steps, backend, progress, task):
    import torch

    from fastadapt import dispatch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    times = []
    with dispatch.use_backend(backend):
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


def _verify(device, dtype, backend, reps, make, fused, exact, frozen=()):
    """Run ``fused`` (under ``backend``, in ``dtype``) and ``exact`` (float64) on the same random
    tensors from ``make()``, forward and backward; return (output error, worst gradient error,
    median seconds of ``reps`` more fused forward + backward passes).
    Tensors whose index is in ``frozen`` get no gradient (a frozen base weight)."""
    import torch

    import fastadapt
    from fastadapt.testing import rel_err

    torch.manual_seed(0)
    base = make()

    def leaves(cast):
        return [t.to(device, cast, copy=True).requires_grad_(i not in frozen) for i, t in enumerate(base)]

    ours, ref = leaves(dtype), leaves(torch.float64)
    with fastadapt.use_backend(backend):
        out = fused(*ours)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    out64 = exact(*ref)
    out64.backward(grad_out.double())
    errors = rel_err(out, out64), max(rel_err(a.grad, b.grad) for a, b in zip(ours, ref) if a.requires_grad)
    with fastadapt.use_backend(backend):  # timed after the check: these passes accumulate into .grad
        seconds = _median_seconds(lambda: fused(*ours).backward(grad_out), reps, out.is_cuda)
    return *errors, seconds


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


def _lora_case():
    import torch

    import fastadapt
    from fastadapt.reference import lora as reference

    def make():
        return [torch.randn(4, 33, 96), torch.randn(80, 96) / 96**0.5, torch.randn(8, 96) / 96**0.5,
                torch.randn(80, 8) / 8**0.5, torch.randn(80)]

    return make, (lambda *t: fastadapt.lora_linear(*t[:4], 0.5, t[4])), \
        (lambda *t: reference.lora_linear(*t[:4], 0.5, t[4])), (1,)


def _bottleneck_case():
    import torch

    import fastadapt
    from fastadapt.reference import bottleneck as reference

    def make():  # z, residual, down (16 x 96), up (96 x 16): a Pfeiffer adapter with gelu
        return [torch.randn(4, 33, 96), torch.randn(4, 33, 96), torch.randn(16, 96) / 96**0.5, torch.randn(16),
                torch.randn(96, 16) / 4, torch.randn(96)]

    def fused(z, r, dw, db, uw, ub):
        return fastadapt.bottleneck_adapter(z, dw, db, uw, ub, r, activation="gelu", scaling=0.5)

    def exact(z, r, dw, db, uw, ub):
        return reference.bottleneck_adapter(z, dw, db, uw, ub, r, scaling=0.5, activation_name="gelu")[0]

    return make, fused, exact, ()


def _prefix_attention_case():
    import torch

    import fastadapt
    from fastadapt.reference import prefix_attention as reference

    def make():  # q (B2, H4, S37, D32), GQA k/v with 2 heads, a 10-token prefix, per-head gate
        return [torch.randn(2, 4, 37, 32), torch.randn(2, 2, 37, 32), torch.randn(2, 2, 37, 32),
                torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32), torch.randn(4) / 2]

    def exact(q, k, v, kp, vp, g):
        return reference.prefix_attention(q, k, v, kp.expand(2, -1, -1, -1), vp.expand(2, -1, -1, -1), g)

    return make, (lambda *t: fastadapt.prefix_attention(*t)), exact, ()


# The ops ``fastadapt demo`` verifies on every backend that can serve them: (op, case) where a
# case returns (make inputs, fused call, float64 reference call, indices of frozen inputs).
OP_CASES = [("lora_linear", _lora_case), ("bottleneck_adapter", _bottleneck_case),
            ("prefix_attention", _prefix_attention_case)]

# The demo model per device: tiny on the CPU (Triton runs in its interpreter there), a few
# hundred MB on a GPU so that the timings mean something.
DEMO_SIZES = {
    "cpu": dict(hidden=64, ffn=128, layers=2, heads=4, vocab=128, seq=32, batch=2),
    "cuda": dict(hidden=1024, ffn=2816, layers=4, heads=16, vocab=8192, seq=512, batch=4),
}


def cmd_demo(args) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import fastadapt
    from fastadapt import dispatch
    from fastadapt.backends import device_reasons
    from fastadapt.testing import bound, rel_err

    # transformers' own deprecation notices say nothing about fastadapt.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    console = Console(width=max(Console().width, 110))  # tables stay readable when piped (80 cols)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = DEMO_SIZES[device]
    console.print(f"[bold]fastadapt demo[/] on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
                  f"{dtype}; " + "  ".join(f"{k} {v}" for k, v in _versions().items()))
    backends = [b for b in dispatch.BACKENDS if not device_reasons(b, device)]
    ok = True

    # 1. Each fused op against its float64 reference, on every backend that can serve it here.
    table = Table(title="fused ops vs float64 reference (relative error)")
    for col in ("op", "backend", "output", "worst grad", "bound", "verdict", "fwd+bwd ms"):
        table.add_column(col, no_wrap=True)
    limit = bound(dtype, device)
    for op, case in OP_CASES:
        for backend in backends:
            if backend not in dispatch._REGISTRY.get(op, {}):
                continue
            out_err, grad_err, seconds = _verify(device, dtype, backend, args.steps, *case())
            passed = out_err <= limit and grad_err <= limit
            ok &= passed
            table.add_row(op, backend, f"{out_err:.1e}", f"{grad_err:.1e}", f"{limit:.0e}",
                          "[green]ok[/]" if passed else "[red]FAIL[/]", f"{seconds * 1e3:.2f}")
    console.print(table)

    # 2. A PEFT LoRA Llama, patched, against the same model unpatched.
    peft_model = _demo_model(device, dtype, size)
    ours = copy.deepcopy(peft_model)
    report = fastadapt.patch(ours)
    console.print(f"patched {len(report.patched)} PEFT LoRA layers, left {len(report.skipped)} alone")
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    truth = copy.deepcopy(peft_model).double()
    exact = _loss_and_grads(truth, ids)
    del truth
    theirs, mine = _loss_and_grads(peft_model, ids), _loss_and_grads(ours, ids)

    def flat(result):
        logits, grads = result
        return {"logits": logits, **grads}

    exact, theirs, mine = flat(exact), flat(theirs), flat(mine)
    # Both are computations of the float64 truth in the same dtype: ours must stay within 2x PEFT's error.
    eps = torch.finfo(dtype).eps
    bad = [n for n in exact if rel_err(mine[n], exact[n]) > 2 * rel_err(theirs[n], exact[n]) + eps]
    ok &= not bad
    console.print(f"patched vs unpatched PEFT, against a float64 copy: logits error "
                  f"{rel_err(mine['logits'], exact['logits']):.1e} (PEFT {rel_err(theirs['logits'], exact['logits']):.1e}), "
                  f"{len(exact) - 1} LoRA grads: "
                  + ("[green]ok[/] (each within 2x PEFT's own error)" if not bad else f"[red]FAIL[/] {bad}"))

    # 3. Training steps (fwd + bwd + AdamW), unpatched PEFT and each fastadapt backend.
    runs = [("peft (unpatched)", peft_model, None)] + [(f"fastadapt {b}", ours, b) for b in backends]
    timings = {}
    with Progress(console=console, transient=True) as progress:
        for label, model, backend in runs:
            task = progress.add_task(f"timing {label}", total=args.steps + 1)
            timings[label] = _time_steps(model, ids, args.steps, backend, progress, task)
    table = Table(title=f"training step, median of {args.steps} (LoRA r=8 on all 7 projections, "
                        f"{size['layers']} layers, hidden {size['hidden']}, batch {size['batch']}x{size['seq']})")
    for col in ("variant", "ms / step", "vs PEFT"):
        table.add_column(col)
    base = timings["peft (unpatched)"]
    for label, t in timings.items():
        table.add_row(label, f"{t * 1e3:.1f}", f"{t / base:.2f}x")
    console.print(table)
    if device == "cpu":
        console.print("On the CPU the Triton kernels run in Triton's interpreter (numpy, one program at a "
                      "time): its timing shows that the real kernel code runs, not GPU speed.")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="versions, devices, and which backends can serve (and why not)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="patch a small random PEFT LoRA Llama, verify it, time every backend")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda if available, else cpu (Triton through its interpreter)")
    demo.add_argument("--steps", type=int, default=3, help="timed training steps per backend")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: the demo with its defaults
        args = parser.parse_args(["demo", *(argv or [])])
    if getattr(args, "device", None) is None and args.command == "demo":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _prepare_triton(getattr(args, "device", None) or ("cuda" if _has_cuda() else "cpu"))
    return args.func(args)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
