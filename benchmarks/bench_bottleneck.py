"""Bottleneck adapter on CUDA: fastadapt vs eager vs torch.compile vs the HBM floor, one run.

    python benchmarks/bench_bottleneck.py [--quick] [--dtype bfloat16|float16]

Times with ``triton.testing.do_bench`` (median, p20, p80 in ms), forward alone (no autograd) and
forward+backward (grads for z, the residual and every adapter parameter), at the issue's shapes
(M tokens, hidden d, bottleneck m). Two adapter configurations:

* ``seq_bn``: Pfeiffer's core as AdapterHub runs it (relu, residual after, scaling 1.0);
* ``full``: LN before and after (residual inside), channel scale, swish.

The floor is the op's compulsory HBM traffic at the bandwidth a device-to-device copy reaches on
this GPU: forward reads z and r and writes out (3 M d elements); forward+backward adds reading
gout and z and writing gz (6 M d elements in all; weights are a few MB and ignored). Targets
(issue 3): forward within 1.5x of the floor, forward+backward at least 2x faster than eager.
Writes ``benchmarks/results/bottleneck-<device>.json``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from harness import bench, forward_backward, forward_only

SHAPES = [(8192, 4096, 64), (8192, 768, 48), (65536, 1024, 64)]  # (M, d, m)
CONFIGS = {
    "seq_bn": dict(activation="relu"),
    "full": dict(activation="swish", ln_before=True, ln_after=True, adapter_residual_before_ln=True, scale="channel"),
}


def _copy_bandwidth(dtype) -> float:
    """Bytes per ms that a device-to-device copy of 1 GiB reaches (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(2**30 // torch.finfo(dtype).bits * 8, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() * src.element_size() / ms


def _cases(M, d, m, dtype, cfg, dev="cuda"):
    import fastadapt
    from fastadapt.reference import bottleneck as reference

    z = torch.randn(M, d, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(M, d, device=dev, dtype=dtype, requires_grad=True)
    wd = (torch.randn(m, d, device=dev, dtype=dtype) / d**0.5).requires_grad_()
    bd = torch.zeros(m, device=dev, dtype=dtype, requires_grad=True)
    wu = (torch.randn(d, m, device=dev, dtype=dtype) / m**0.5).requires_grad_()
    bu = torch.zeros(d, device=dev, dtype=dtype, requires_grad=True)
    scale = torch.ones(d, device=dev, dtype=dtype, requires_grad=True) if cfg.get("scale") else None
    ln = lambda: (torch.ones(d, device=dev, dtype=dtype, requires_grad=True),  # noqa: E731
                  torch.zeros(d, device=dev, dtype=dtype, requires_grad=True))
    lnb = ln() if cfg.get("ln_before") else None
    lna = ln() if cfg.get("ln_after") else None
    res_before = cfg.get("adapter_residual_before_ln", False)
    gout = torch.randn(M, d, device=dev, dtype=dtype)
    leaves = [t for t in (z, r, wd, bd, wu, bu, scale, *(lnb or ()), *(lna or ())) if t is not None]

    def ours():
        return fastadapt.bottleneck_adapter(z, wd, bd, wu, bu, r, activation=cfg["activation"], scale=scale,
                                            ln_before=lnb, ln_after=lna, adapter_residual_before_ln=res_before)

    def eager():
        return reference.bottleneck_adapter(z, wd, bd, wu, bu, r, scale=scale, ln_before=lnb, ln_after=lna,
                                            residual_before_ln_after=res_before,
                                            activation_name=cfg["activation"])[0]

    compiled_ref = torch.compile(reference.bottleneck_adapter)

    def compiled():
        return compiled_ref(z, wd, bd, wu, bu, r, scale=scale, ln_before=lnb, ln_after=lna,
                            residual_before_ln_after=res_before, activation_name=cfg["activation"])[0]

    fns = {"fastadapt": ours, "eager": eager, "compile": compiled}
    return {name: (forward_only(f), forward_backward(f, leaves, gout)) for name, f in fns.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_bottleneck.py needs a CUDA device (none found): nothing was measured. On the CPU the "
              "tests (tests/test_bottleneck.py) check the kernels against the reference through the Triton "
              "interpreter.")
        return 2
    from fastadapt import dispatch

    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    bw = _copy_bandwidth(dtype)
    esize = torch.finfo(dtype).bits // 8
    results = {"device": device, "torch": torch.__version__, "dtype": args.dtype,
               "copy_bandwidth_GBps": bw / 1e6, "cases": {}}
    print(f"{device}, {args.dtype}, torch {torch.__version__}, copy bandwidth {bw / 1e6:.0f} GB/s")
    probe = torch.empty(1, 16, device="cuda", dtype=dtype)
    print("backend:", dispatch.select("bottleneck_adapter", z=probe, down_weight=probe, up_weight=probe.t()).backend)
    print(f"{'case':30s} {'variant':10s} {'fwd p50':>9s} {'p20':>8s} {'p80':>8s} {'x floor':>8s} "
          f"{'f+b p50':>9s} {'p20':>8s} {'p80':>8s} {'x floor':>8s} {'eager/x':>8s}")
    shapes = SHAPES[:1] if args.quick else SHAPES
    for M, d, m in shapes:
        floor_fwd = 3 * M * d * esize / bw
        floor_fb = 6 * M * d * esize / bw
        for cname, cfg in CONFIGS.items():
            key = f"M{M} d{d} m{m} {cname}"
            cases = _cases(M, d, m, dtype, cfg)
            rows = {name: {"fwd": bench(f, args.quick), "fwd_bwd": bench(fb, args.quick)}
                    for name, (f, fb) in cases.items()}
            eager_fb = rows["eager"]["fwd_bwd"]["p50"]
            for name, row in rows.items():
                f, fb = row["fwd"], row["fwd_bwd"]
                print(f"{key:30s} {name:10s} {f['p50']:9.4f} {f['p20']:8.4f} {f['p80']:8.4f} {f['p50'] / floor_fwd:8.2f} "
                      f"{fb['p50']:9.4f} {fb['p20']:8.4f} {fb['p80']:8.4f} {fb['p50'] / floor_fb:8.2f} "
                      f"{eager_fb / fb['p50']:8.2f}")
            results["cases"][key] = {"floor_fwd_ms": floor_fwd, "floor_fwd_bwd_ms": floor_fb, **rows}
            del cases
            torch.cuda.empty_cache()
    out = pathlib.Path(__file__).parent / "results" / f"bottleneck-{device.replace(' ', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
