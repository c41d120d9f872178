"""Bottleneck adapter (``fastadapt.bottleneck_adapter``): its float64 checks, its timed cases against
eager PyTorch, torch.compile and the HBM floor, and its Triton launches for the compile check."""

from __future__ import annotations

import torch

from fastadapt.bench.cases import Built, Case, Env, compiled, fused
from fastadapt.bench.timing import forward_backward, forward_only
from fastadapt.verify import OpCase

OP = "bottleneck_adapter"


def verify() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import bottleneck as reference

    def pfeiffer():  # z, residual, down (16 x 96), up (96 x 16): a Pfeiffer adapter with gelu
        return [torch.randn(4, 33, 96), torch.randn(4, 33, 96), torch.randn(16, 96) / 96**0.5, torch.randn(16),
                torch.randn(96, 16) / 4, torch.randn(96)]

    def pfeiffer_fused(z, r, dw, db, uw, ub):
        return fastadapt.bottleneck_adapter(z, dw, db, uw, ub, r, activation="gelu", scaling=0.5)

    def pfeiffer_exact(z, r, dw, db, uw, ub):
        return reference.bottleneck_adapter(z, dw, db, uw, ub, r, scaling=0.5, activation_name="gelu")[0]

    def houlsby():  # + LN before and after (residual inside), a per-channel scale, swish; d=80, m=7
        d, m = 80, 7
        return [torch.randn(129, d), torch.randn(129, d), torch.randn(m, d) / d**0.5, torch.randn(m),
                torch.randn(d, m) / m**0.5, torch.randn(d), 1 + torch.randn(d) / 10, 1 + torch.randn(d) / 10,
                torch.randn(d) / 10, 1 + torch.randn(d) / 10, torch.randn(d) / 10]

    def houlsby_fused(z, r, dw, db, uw, ub, sc, lbw, lbb, law, lab):
        return fastadapt.bottleneck_adapter(z, dw, db, uw, ub, r, activation="swish", scale=sc,
                                            ln_before=(lbw, lbb), ln_after=(law, lab),
                                            adapter_residual_before_ln=True)

    def houlsby_exact(z, r, dw, db, uw, ub, sc, lbw, lbb, law, lab):
        return reference.bottleneck_adapter(z, dw, db, uw, ub, r, scale=sc, ln_before=(lbw, lbb),
                                            ln_after=(law, lab), residual_before_ln=True,
                                            activation_name="swish")[0]

    return [OpCase(OP, "z (4, 33, 96), m=16, gelu, residual", pfeiffer, pfeiffer_fused,
                   pfeiffer_exact),
            OpCase(OP, "z (129, 80), m=7, swish, LN before+after, channel scale", houlsby,
                   houlsby_fused, houlsby_exact)]


BOTTLENECK_CONFIGS = {
    # Pfeiffer's core as AdapterHub runs it: relu, residual after, scaling 1.0.
    "seq_bn": dict(activation="relu"),
    # Every stage: LN before and after (residual inside), per-channel scale, swish, gate, dropout 0.1.
    "full": dict(activation="swish", ln_before=True, ln_after=True, residual_before_ln=True, scale=True,
                 gate=True, dropout=0.1),
}


def _eager_bottleneck(z, wd, bd, wu, bu, r, scale, lnb, lna, residual_before_ln, activation, gate, p):
    """The eager reference, its dropout mask drawn per call."""
    from fastadapt.reference import bottleneck as reference

    keep = torch.rand_like(z) >= p if p > 0 else None
    return reference.bottleneck_adapter(z, wd, bd, wu, bu, r, scale=scale, ln_before=lnb, ln_after=lna,
                                        residual_before_ln=residual_before_ln,
                                        gate=None if gate is None else gate[:, None], keep=keep, dropout_p=p,
                                        activation_name=activation)[0]


def bottleneck(M: int, d: int, m: int, config: str, backward: bool, tier: str) -> Case:
    """The adapter forward alone or forward + backward (grads of z, the residual and every
    parameter). The floor: the compulsory HBM traffic at the measured copy bandwidth: the forward
    reads z and r and writes out (3 M d elements), the backward adds reading the output's gradient
    and z and writing z's gradient (6 M d in all); the weights, a few MB, are left out."""
    cfg = BOTTLENECK_CONFIGS[config]

    def build(env: Env) -> Built:
        import fastadapt

        kw = dict(device=env.device, dtype=env.dtype)

        def leaf(*shape, std=1.0, mean=0.0):
            return (torch.randn(*shape, **kw) * std + mean).requires_grad_()

        z, r = leaf(M, d), leaf(M, d)
        wd, bd, wu, bu = leaf(m, d, std=d**-0.5), leaf(m, std=0.1), leaf(d, m, std=m**-0.5), leaf(d, std=0.1)
        scale = leaf(d, mean=1.0, std=0.1) if cfg.get("scale") else None
        lnb = (leaf(d, mean=1.0, std=0.1), leaf(d, std=0.1)) if cfg.get("ln_before") else None
        lna = (leaf(d, mean=1.0, std=0.1), leaf(d, std=0.1)) if cfg.get("ln_after") else None
        gate = torch.rand(M, **kw).requires_grad_() if cfg.get("gate") else None
        p = cfg.get("dropout", 0.0)
        residual_before_ln = cfg.get("residual_before_ln", False)
        act = cfg["activation"]
        leaves = [t for t in (z, r, wd, bd, wu, bu, scale, gate, *(lnb or ()), *(lna or ())) if t is not None]
        grad_out = torch.randn(M, d, **kw)
        step = (lambda f: forward_backward(f, leaves, grad_out)) if backward else forward_only

        def ours():
            return fastadapt.bottleneck_adapter(z, wd, bd, wu, bu, r, activation=act, scale=scale, ln_before=lnb,
                                                ln_after=lna, adapter_residual_before_ln=residual_before_ln, gate=gate,
                                                dropout_p=p)

        args = (z, wd, bd, wu, bu, r, scale, lnb, lna, residual_before_ln, act, gate, p)
        variants = fused(env, step(ours))
        variants["eager"] = step(lambda: _eager_bottleneck(*args))
        compiled_bottleneck = compiled(env, _eager_bottleneck)
        if compiled_bottleneck is not None:
            variants["torch.compile"] = step(lambda: compiled_bottleneck(*args))
        elements = (6 if backward else 3) * M * d
        floor_ms = elements * torch.finfo(env.dtype).bits // 8 / env.bandwidth
        return Built(variants, f"floor: HBM traffic ({elements // (M * d)} x M x d elements at copy bandwidth)",
                     floor_ms=floor_ms, leaves=leaves)

    which = "fwd+bwd" if backward else "fwd"
    return Case("bottleneck", f"{which} M={M} d={d} m={m} {config}",
                dict(kind=which, M=M, d=d, m=m, config=config), tier, build, hbm_floor=True)


def cases(scale: str) -> list[Case]:
    return {
        "cuda": [
            bottleneck(8192, 4096, 64, "seq_bn", True, "quick"),
            bottleneck(8192, 4096, 64, "seq_bn", False, "quick"),
            bottleneck(8192, 4096, 64, "full", True, "default"),
            bottleneck(8192, 768, 48, "seq_bn", True, "full"),
            bottleneck(65536, 1024, 64, "seq_bn", True, "full"),
        ],
        "cpu": [
            bottleneck(2048, 1024, 64, "seq_bn", False, "quick"),
            bottleneck(2048, 1024, 64, "seq_bn", True, "quick"),
            bottleneck(2048, 1024, 64, "full", True, "default"),
        ],
        "smoke": [bottleneck(64, 96, 16, "seq_bn", False, "quick"), bottleneck(64, 96, 16, "full", True, "quick")],
    }[scale]


def compile_grid(grid):
    from fastadapt.kernels import bottleneck as bn
    setting, meta = grid.setting, grid.meta
    d = 4096
    # Every combination of the flags that steer the kernels' control flow, at one width and
    # activation; then each activation and each bottleneck width (BLOCK_B 16..1024) with every
    # flag on and with every flag off.
    flags = [dict(res=res, lnb=lnb, lna=lna, residual_before_ln=rb, gate=gate, scale=sc, p=p, bias=True, act="relu",
                  m=64)
             for res in (False, True) for lnb in (False, True) for lna in (False, True) for rb in (False, True)
             for gate in (False, True) for sc in (None, "scalar", "channel") for p in (0.0, 0.1)]
    base = dict(res=True, lnb=True, lna=True, residual_before_ln=True, gate=True, scale="channel", p=0.1, bias=True)
    off = dict(res=False, lnb=False, lna=False, residual_before_ln=False, gate=False, scale=None, p=0.0, bias=True)
    flags += [dict(flags_, act=act, m=64) for act in bn.ACT_CODES for flags_ in (base, off)]
    flags += [dict(flags_, act="gelu", m=m, bias=False) for m in (1, 48, 200, 1024) for flags_ in (base, off)]
    for dname in grid.dtypes:
        for f in flags:
            with setting("bottleneck " + " ".join(f"{k}={v}" for k, v in f.items()), dname) as dt:
                M, m = 129, f["m"]
                z = meta(M, d, dtype=dt)
                vec = (lambda n: meta(n, dtype=dt))
                r = meta(M, d, dtype=dt) if f["res"] else None
                scale = {None: None, "scalar": vec(1), "channel": vec(d)}[f["scale"]]
                lnb = (vec(d), vec(d)) if f["lnb"] else (None, None)
                lna = (vec(d), vec(d)) if f["lna"] else (None, None)
                gate = meta(M, 1, dtype=dt)[:, 0] if f["gate"] else None
                wd, bd, wu, bu = meta(m, d, dtype=dt), vec(m) if f["bias"] else None, meta(d, m, dtype=dt), \
                    vec(d) if f["bias"] else None
                args = (z, r, wd, bd, wu, bu, scale, *lnb, *lna, gate, 1.5, f["act"], 1e-5, f["residual_before_ln"],
                        f["p"], 1)
                out, h, stats = bn.forward(*args)
                bwd = (out, z, r, wd, bd, wu, bu, h, stats, scale, *lnb, *lna, gate, 1.5, f["act"], 1e-5,
                       f["residual_before_ln"], f["p"], 1)
                bn.backward(*bwd, [True] * 12, splits=1)
                bn.backward(*bwd, [True] * 12, splits=3)  # atomics: chosen from the SM count on CUDA
                bn.backward(*bwd, [False, True] + [False] * 10, splits=1)  # no g_z: NEED_Z off
