"""Many LoRA adapters in one batch (``fastadapt.multi_lora_linear``): its float64 checks, its timed
cases (training and serving) against PEFT's mixed batch, gather + bmm and one adapter alone, and
its Triton launches for the compile check."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadapt.bench.cases import Built, Case, Env, fused, on_first_fused
from fastadapt.bench.cases.lora import adapter_names, peft_lora_layer
from fastadapt.bench.timing import forward_backward, forward_only
from fastadapt.verify import OpCase

OP = "multi_lora_linear"


def verify() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import multi_lora as reference

    def case(lead, k, n, ranks, ids):
        r_max = max(ranks)
        scalings = [0.5 + i for i in range(len(ranks))]

        def make():
            return [torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(len(ranks), r_max, k) / k**0.5,
                    torch.randn(len(ranks), n, r_max) / r_max**0.5, torch.randn(n)]

        def ours(x, w, A, B, b):
            return fastadapt.multi_lora_linear(x, w, A, B, scalings, torch.tensor(ids, device=x.device), b,
                                               ranks=ranks)

        def exact(x, w, A, B, b):
            rows = torch.tensor(ids, device=x.device).view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
            y = reference.multi_lora_linear(x.reshape(-1, k), w, A, B, torch.tensor(scalings, dtype=x.dtype,
                                            device=x.device), torch.tensor(ranks, device=x.device), rows.reshape(-1), b)
            return y.view(*x.shape[:-1], n)

        return OpCase(OP, f"x {tuple(lead)}x{k}, W {n}x{k}, ranks {ranks}, ids {ids}, bias", make,
                      ours, exact, (1,))

    return [case((4, 33), 96, 80, [8, 4, 8], [2, -1, 0, 2]),
            case((129,), 123, 65, [1, 7], [i % 3 - 1 for i in range(129)])]


def _multi_tensors(env: Env, M: int, K: int, N: int, n: int, r: int):
    kw = dict(device=env.device, dtype=env.dtype)
    weight = torch.randn(N, K, **kw) / K**0.5
    A = (torch.randn(n, r, K, **kw) / K**0.5).requires_grad_()
    B = (torch.randn(n, N, r, **kw) / r**0.5).requires_grad_()
    ids = torch.randint(0, n, (M,), device=env.device)  # rows in no order
    scalings = torch.full((n,), 2.0, device=env.device)
    return weight, A, B, ids, scalings


def multi_lora_train(M: int, K: int, N: int, n: int, r: int, tier: str) -> Case:
    """Forward + backward of n adapters trained at once, each row its own (random) adapter: fused,
    against PEFT's mixed-batch forward (a loop over the adapters, each on its own rows) and against
    one adapter alone on all M rows (what the fused op aims to cost). The floor: the frozen matmul."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt

        weight, A, B, ids, scalings = _multi_tensors(env, M, K, N, n, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        layer = peft_lora_layer(weight, r, scaling, 0.0, adapters=n)
        names = adapter_names(ids.tolist())
        single_A, single_B = (A[0].detach().clone().requires_grad_(), B[0].detach().clone().requires_grad_())
        leaves = [x, A, B, single_A, single_B, *(q for q in layer.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = fused(env, step(lambda: fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids)))
        variants["peft mixed batch (loop over adapters)"] = step(lambda: layer(x, adapter_names=names))
        variants["one adapter alone (fastadapt lora_linear)"] = on_first_fused(env, step(
            lambda: fastadapt.lora_linear(x, weight, single_A, single_B, scaling)), "lora_linear")
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    return Case("multi_lora", f"fwd+bwd M={M} {K}x{N} {n} adapters r={r}",
                dict(kind="train", M=M, K=K, N=N, n=n, r=r), tier, build)


def _gather_bmm(x, weight, A, B, scalings, ids):
    """Per-row adapters by gathering each row's weights and batched matmuls (Punica's baseline)."""
    u = torch.bmm(x[:, None, :], A[ids].transpose(1, 2))
    return F.linear(x, weight) + torch.bmm(u, B[ids].transpose(1, 2))[:, 0] * scalings[ids][:, None]


def multi_lora_decode(M: int, K: int, N: int, n: int, r: int, tier: str) -> Case:
    """Serving: M rows, one adapter each (``i % n``), forward only: fused, against gathering each
    row's adapter weights + bmm, and PEFT's mixed-batch forward. The floor: the base layer alone."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt

        weight, A, B, _, scalings = _multi_tensors(env, M, K, N, n, r)
        ids = torch.arange(M, device=env.device) % n
        x = torch.randn(M, K, device=env.device, dtype=env.dtype)
        layer = peft_lora_layer(weight, r, scaling, 0.0, adapters=n)
        names = adapter_names(ids.tolist())
        variants = fused(env, forward_only(lambda: fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids)))
        variants["gather + bmm"] = forward_only(lambda: _gather_bmm(x, weight, A, B, scalings, ids))
        variants["peft mixed batch (loop over adapters)"] = forward_only(lambda: layer(x, adapter_names=names))
        variants["floor: base layer alone"] = forward_only(lambda: F.linear(x, weight))
        return Built(variants, "floor: base layer alone")

    return Case("multi_lora", f"inference M={M} {K}x{N} {n} adapters r={r}, one per row",
                dict(kind="decode", M=M, K=K, N=N, n=n, r=r), tier, build)


def cases(scale: str) -> list[Case]:
    return {
        "cuda": [
            multi_lora_train(8192, 4096, 4096, 4, 16, "quick"),
            multi_lora_train(8192, 4096, 4096, 16, 16, "quick"),
            *(multi_lora_decode(M, 4096, 4096, 16, 16, tier)
              for M, tier in {1: "quick", 16: "quick", 64: "quick", 4: "default"}.items()),
        ],
        "cpu": [multi_lora_train(2048, 1024, 1024, 4, 16, "quick"), multi_lora_decode(16, 1024, 1024, 16, 16, "quick")],
        "smoke": [multi_lora_train(64, 96, 80, 4, 8, "quick"), multi_lora_decode(4, 96, 80, 4, 8, "quick")],
    }[scale]


def compile_grid(grid):
    from fastadapt.kernels import multi_lora as ml
    setting, meta = grid.setting, grid.meta
    # (M, K, N, n, r_max): decode M=1 with many adapters, odd sizes, aligned sizes, r past 64.
    shapes = ((1, 4096, 4096, 16, 16), (129, 80, 123, 3, 7), (8192, 4096, 4096, 4, 16), (7, 123, 80, 2, 128))
    for dname in grid.dtypes:
        for M, K, N, n, R in shapes:
            for bias in (False, True):
                for dropout in (False, True):
                    with setting(f"multi_lora M={M} K={K} N={N} n={n} r={R} bias={bias} dropout={dropout}",
                                 dname) as dt:
                        x = meta(M, K, dtype=dt)
                        W, A, B = meta(N, K, dtype=dt), meta(n, R, K, dtype=dt), meta(n, N, R, dtype=dt)
                        b = meta(N, dtype=dt) if bias else None
                        scalings, ranks = meta(n, dtype=torch.float32), meta(n, dtype=torch.int32)
                        p = meta(n, dtype=torch.float64) if dropout else None
                        ids = meta(M, dtype=torch.int64)
                        y, u = ml.forward(x, W, A, B, scalings, ranks, ids, b, p, 1)
                        ml.backward(y, x, W, A, B, u, scalings, ranks, ids, p, 1, (True,) * 5)
                        # Split chunks of each adapter's rows (atomics) are chosen from the SM count of a CUDA device.
                        ml.multi_reduce(u, x, ml.Batch(ids, scalings, ranks, p), meta(n, R, K, dtype=torch.float32),
                                        dropout=True, seed=1, splits=3)
        with setting("multi_lora non-contiguous x", dname) as dt:
            x = meta(300, 96, dtype=dt).t()
            n, ids = 3, meta(96, dtype=torch.int64)
            W, A, B = meta(64, 300, dtype=dt), meta(n, 16, 300, dtype=dt), meta(n, 64, 16, dtype=dt)
            scalings, ranks = meta(n, dtype=torch.float32), meta(n, dtype=torch.int32)
            y, u = ml.forward(x, W, A, B, scalings, ranks, ids, None, scalings, 1)
            ml.backward(y, x, W, A, B, u, scalings, ranks, ids, scalings, 1, (True,) * 5)
