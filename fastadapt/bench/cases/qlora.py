"""QLoRA / FP8 linear (``fastadapt.qlora_linear``): its float64 checks, its timed cases against PEFT +
bitsandbytes and dequantize-then-matmul, the two strategies of its frozen products side by side,
and its Triton launches for the compile check."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from fastadapt.bench.cases import Built, Case, Env, fused, strategies, strategy_rows
from fastadapt.bench.cases.lora import lora_tensors
from fastadapt.bench.timing import forward_backward
from fastadapt.strategy import QLORA_DEQUANT
from fastadapt.verify import OpCase

OP = "qlora_linear"


def verify() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import lora, qlora

    def case(fmt, lead, k, n, r):
        # The quantized weight is drawn once, on the CPU, and moved to the inputs' device; the exact
        # side runs on its float64 dequantization (bnb's fp32 product, not rounded to the dtype).
        weight = qlora.random_weight(fmt, n, k)

        def on(device):
            return weight._replace(**{f: getattr(weight, f).to(device) for f in ("data", "code", "absmax", "absmax2",
                                                                                   "code2", "offset")
                                      if getattr(weight, f) is not None})

        def make():
            return [torch.randn(*lead, k), torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5, torch.randn(n)]

        return OpCase(OP, f"x {tuple(lead)}x{k}, {fmt} W {n}x{k}, r={r}, bias", make,
                      lambda x, a, b, bias: fastadapt.qlora_linear(x, on(x.device), a, b, 0.5, bias),
                      lambda x, a, b, bias: lora.lora_linear(x, qlora.dequantize(on(x.device), x.dtype), a, b, 0.5,
                                                             bias))

    return [case("nf4-nested", (4, 33), 128, 80, 8), case("fp8-channel", (129,), 80, 65, 1)]


class _DequantizeThenMatmul(torch.autograd.Function):
    """Unsloth's QLoRA autograd: the frozen weight dequantized in the forward and again in the
    backward (never kept), the products in torch (cuBLAS on a GPU), the rank-r update added by addmm_."""

    @staticmethod
    def forward(ctx, x, dequantize, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()
        y = x @ dequantize().t()
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.dequantize, ctx.scaling = dequantize, scaling
        return y

    @staticmethod
    def backward(ctx, gy):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        gu = gy @ lora_B
        gx = gy @ ctx.dequantize()
        gx.addmm_(gu, lora_A, alpha=ctx.scaling)
        return gx, None, (gu.t() @ x) * ctx.scaling, (gy.t() @ xa) * ctx.scaling, None


def _peft_qlora_layer(dense: torch.Tensor, r: int, scaling: float):
    """PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``) on bitsandbytes' NF4 quantization of
    ``dense`` (double-quantized absmax, compute dtype and adapters in dense's dtype); None without
    bitsandbytes."""
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    import peft

    n, k = dense.shape
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dense.dtype, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(dense.detach().cpu(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    base = base.to(dense.device)  # quantizes
    cfg = peft.LoraConfig(r=r, lora_alpha=scaling * r, init_lora_weights=False)
    layer = peft_bnb.Linear4bit(base, "default", config=cfg, r=r, lora_alpha=scaling * r, init_lora_weights=False)
    layer.lora_A.to(dense.device, dense.dtype)  # in place; the 4-bit base stays as it is
    layer.lora_B.to(dense.device, dense.dtype)
    return layer


def qlora_train(M: int, K: int, N: int, r: int, tier: str) -> Case:
    """Forward + backward (grads of x, A, B) of LoRA on an NF4 base (bitsandbytes' layout, double-
    quantized absmax) against PEFT + bitsandbytes and against dequantize-then-matmul (unsloth's
    recipe); the floor: the frozen matmul fwd+bwd on the dense weight in the timing dtype."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt
        from fastadapt.reference import qlora as qref

        weight, lora_A, lora_B = lora_tensors(env, M, K, N, r)
        layer = _peft_qlora_layer(weight, r, scaling)
        if layer is not None:
            import bitsandbytes.functional as bnbf
            packed, state = layer.base_layer.weight.data, layer.base_layer.weight.quant_state
            q = fastadapt.nf4_from_bnb(layer.base_layer.weight)

            def dequantize():
                return bnbf.dequantize_4bit(packed, state).to(env.dtype)
        else:  # no bitsandbytes: a random NF4 weight, dequantized by the reference
            q = qref.random_weight("nf4-nested", N, K, env.device)

            def dequantize():
                return qref.dequantize(q, env.dtype)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        leaves = [x, lora_A, lora_B, *(p for p in (layer.parameters() if layer else ()) if p.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = fused(env, step(lambda: fastadapt.qlora_linear(x, q, lora_A, lora_B, scaling)), OP)
        if layer is not None:
            variants["peft + bitsandbytes"] = step(lambda: layer(x))
        variants["dequantize + torch matmul (unsloth-style)"] = step(
            lambda: _DequantizeThenMatmul.apply(x, dequantize, lora_A, lora_B, scaling))
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    return Case("qlora", f"NF4 fwd+bwd M={M} {K}x{N} r={r}", dict(kind="train", M=M, K=K, N=N, r=r), tier, build)


def qlora_strategies(M: int, K: int, N: int, r: int, fmt: str, tier: str) -> Case:
    """QLoRA / FP8 (``fmt`` of ``fastadapt.reference.qlora.random_weight``): dequantizing in our GEMM's
    K loop against dequantizing once into a buffer for cuBLAS (grads of x, A, B when trained)."""
    def make(env, x):
        import fastadapt
        from fastadapt.reference import qlora as qref

        weight, lora_A, lora_B = lora_tensors(env, M, K, N, r)
        q = qref.random_weight(fmt, N, K, env.device)
        return (lambda: fastadapt.qlora_linear(x, q, lora_A, lora_B, 2.0)), [lora_A, lora_B], weight

    return strategies("qlora", QLORA_DEQUANT, f"{fmt} dequant", M, K, N, r, tier, make)


def cases(scale: str) -> list[Case]:
    def sweep(K, N, tier):
        return [qlora_strategies(M, K, N, 16, fmt, tier) for M in strategy_rows(QLORA_DEQUANT)
                for fmt in ("nf4-nested", "fp8-channel")]

    return {
        "cuda": [qlora_train(8192, 4096, 4096, 16, "quick"), qlora_train(8192, 4096, 11008, 16, "default"),
                 *sweep(4096, 4096, "quick"), *sweep(4096, 11008, "default")],
        "cpu": [qlora_train(2048, 1024, 1024, 16, "quick")],
        "smoke": [qlora_train(64, 128, 80, 8, "quick")],
    }[scale]


def compile_grid(grid):
    from fastadapt.kernels import qlora
    from fastadapt.reference.qlora import QuantizedWeight
    setting, meta = grid.setting, grid.meta
    # (M, K, N, R): decode M=1, odd sizes (blocks spanning rows), aligned sizes; each under both
    # strategies (dequantized in the GEMM, or once into a buffer for LoRA's path).
    shapes = ((1, 4096, 4096, 16), (129, 80, 123, 7), (2048, 4096, 11008, 64))
    for dname in grid.dtypes:
        for (M, K, N, R), dequant in itertools.product(shapes, (QLORA_DEQUANT.fused, QLORA_DEQUANT.split)):
            for bits, nested in ((4, False), (4, True), (8, False)):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    with setting(f"qlora M={M} K={K} N={N} r={R} bits={bits} nested={nested} bias={bias} p={p}",
                                 dname, {QLORA_DEQUANT.env: dequant}) as dt:
                        blocksize = 64 if bits == 4 else K
                        blocks = -(-N * K // blocksize)
                        f32 = (lambda *s: meta(*s, dtype=torch.float32))
                        q = QuantizedWeight(meta((N * K * bits + 7) // 8, dtype=torch.uint8), f32(2 ** bits),
                                            meta(blocks, dtype=torch.uint8) if nested else f32(blocks),
                                            f32(-(-blocks // 256)) if nested else None, f32(256) if nested else None,
                                            f32(1) if nested else None, blocksize, 256, bits, (N, K))
                        x, A, B = meta(M, K, dtype=dt), meta(R, K, dtype=dt), meta(N, R, dtype=dt)
                        y, u = qlora.forward(x, q, A, B, 0.5, meta(N, dtype=dt) if bias else None, p, 1)
                        qlora.backward(y, x, q, A, B, u, 0.5, p, 1, (True,) * 4)
