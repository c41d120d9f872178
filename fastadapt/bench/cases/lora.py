"""LoRA linear (``fastadapt.lora_linear``): its float64 checks, its timed cases against PEFT's layer,
eager PyTorch, torch.compile and the frozen matmul, and its Triton launches for the compile check.
The PEFT layer and the tensors are shared with the other LoRA ops' cases."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastadapt.bench.cases import Built, Case, Env, compiled, fused, on_first_fused
from fastadapt.bench.timing import forward_backward, forward_only
from fastadapt.verify import OpCase

OP = "lora_linear"


def verify() -> list[OpCase]:
    import fastadapt
    from fastadapt.reference import lora as reference

    def case(lead, k, n, r):
        def make():
            return [torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(r, k) / k**0.5,
                    torch.randn(n, r) / r**0.5, torch.randn(n)]
        return OpCase(OP, f"x {tuple(lead)}x{k}, W {n}x{k}, r={r}, bias", make,
                      lambda *t: fastadapt.lora_linear(*t[:4], 0.5, t[4]),
                      lambda *t: reference.lora_linear(*t[:4], 0.5, t[4]), (1,))

    return [case((4, 33), 96, 80, 8), case((129,), 123, 65, 1)]


def peft_lora_layer(weight: torch.Tensor, r: int, scaling: float, dropout: float, adapters: int = 1,
                    dora: bool = False):
    """A real PEFT ``lora.Linear`` around a frozen copy of ``weight`` (adapters in the weight's dtype).
    ``adapters`` > 1: adapters ``default``, ``a1``, ... (see :func:`adapter_names`), all trainable;
    ``dora``: ``use_dora=True``, with its magnitude."""
    import peft

    n, k = weight.shape
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype))
    model.proj.weight.data.copy_(weight)

    def config():
        return peft.LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=dropout, target_modules=["proj"],
                               init_lora_weights=False, use_dora=dora)

    peft_model = peft.get_peft_model(model, config(), autocast_adapter_dtype=False)
    for name in adapter_names(range(1, adapters)):
        peft_model.add_adapter(name, config(), autocast_adapter_dtype=False)
    layer = peft_model.base_model.model.proj
    for name, q in layer.named_parameters():
        q.requires_grad_("lora_" in name)  # add_adapter leaves the new adapters frozen
    return layer


def adapter_names(ids) -> list[str]:
    """PEFT adapter names of adapter indices: ``default`` for 0 (the first adapter's name), ``a<i>``."""
    return ["default" if i == 0 else f"a{i}" for i in ids]


def _eager_lora(x, weight, lora_A, lora_B, scaling: float, p: float):
    """The eager reference with its dropout mask drawn per call (PEFT's ``nn.Dropout`` does the same)."""
    from fastadapt.reference import lora as reference

    keep = torch.rand_like(x) >= p if p > 0 else None
    return reference.lora_linear(x, weight, lora_A, lora_B, scaling, keep=keep, dropout_p=p)


def lora_tensors(env: Env, M: int, K: int, N: int, r: int):
    kw = dict(device=env.device, dtype=env.dtype)
    weight = torch.randn(N, K, **kw) / K**0.5
    lora_A = (torch.randn(r, K, **kw) / K**0.5).requires_grad_()
    lora_B = (torch.randn(N, r, **kw) / r**0.5).requires_grad_()
    return weight, lora_A, lora_B


def lora_train(M: int, K: int, N: int, r: int, p: float, tier: str, baselines: bool = True) -> Case:
    """Forward + backward (grads of x, A, B; W frozen). The floor: the frozen ``x W^T`` and its
    ``dx = dy W``. ``baselines=False`` (the M sweep) times only fastadapt, PEFT and the floor."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt

        weight, lora_A, lora_B = lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        layer = peft_lora_layer(weight, r, scaling, p)
        leaves = [x, lora_A, lora_B, *(q for q in layer.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = fused(env, step(lambda: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, dropout_p=p)))
        variants["peft"] = step(lambda: layer(x))
        if baselines:
            variants["eager"] = step(lambda: _eager_lora(x, weight, lora_A, lora_B, scaling, p))
            compiled_lora = compiled(env, _eager_lora)
            if compiled_lora is not None:
                variants["torch.compile"] = step(lambda: compiled_lora(x, weight, lora_A, lora_B, scaling, p))
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    drop = f", dropout {p}" if p else ""
    return Case("lora", f"fwd+bwd M={M} {K}x{N} r={r}{drop}", dict(kind="train", M=M, K=K, N=N, r=r, p=p),
                tier, build)


def lora_several_train(M: int, K: int, N: int, n: int, r: int, p: float, tier: str) -> Case:
    """Forward + backward of one layer with n active adapters (PEFT sums them), each with its own
    dropout p: the patched PEFT layer (one fused call, a mask per adapter) against PEFT's loop over
    the adapters, and against one adapter alone. The floor: the frozen matmul."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import copy

        import fastadapt

        weight, single_A, single_B = lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        theirs = peft_lora_layer(weight, r, scaling, p, adapters=n)
        theirs.set_adapter(adapter_names(range(n)))
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours, strict=True)  # a call that would fall back to PEFT fails the case
        leaves = [x, single_A, single_B, *(q for m in (theirs, ours) for q in m.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = fused(env, step(lambda: ours(x)), "lora_linear")
        variants["peft (loop over adapters)"] = step(lambda: theirs(x))
        variants["one adapter alone (fastadapt lora_linear)"] = on_first_fused(env, step(
            lambda: fastadapt.lora_linear(x, weight, single_A, single_B, scaling, dropout_p=p)), "lora_linear")
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    return Case("lora", f"fwd+bwd M={M} {K}x{N} {n} active adapters r={r}, dropout {p} each",
                dict(kind="train", M=M, K=K, N=N, n=n, r=r, p=p), tier, build)


def lora_decode(M: int, K: int, N: int, r: int, tier: str) -> Case:
    """Inference with the adapter unmerged (serving several adapters); the floor: the merged matmul."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt

        weight, lora_A, lora_B = lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype)
        merged = weight + scaling * (lora_B @ lora_A).detach()
        layer = peft_lora_layer(weight, r, scaling, 0.0)
        variants = fused(env, forward_only(lambda: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling)))
        variants["peft"] = forward_only(lambda: layer(x))
        variants["eager"] = forward_only(lambda: _eager_lora(x, weight, lora_A, lora_B, scaling, 0.0))
        variants["floor: merged matmul"] = forward_only(lambda: F.linear(x, merged))
        return Built(variants, "floor: merged matmul")

    return Case("lora", f"inference M={M} {K}x{N} r={r} unmerged", dict(kind="decode", M=M, K=K, N=N, r=r),
                tier, build)


def _lora_sweep(K: int, N: int, r: int, ms: dict[int, str]) -> list[Case]:
    return [lora_train(M, K, N, r, 0.0, tier, baselines=False) for M, tier in ms.items()]


def cases(scale: str) -> list[Case]:
    return {
        "cuda": [
            lora_train(8192, 4096, 4096, 16, 0.0, "quick"),
            lora_train(8192, 4096, 4096, 16, 0.05, "quick"),
            lora_several_train(8192, 4096, 4096, 2, 16, 0.05, "default"),
            lora_train(8192, 4096, 11008, 16, 0.0, "quick"),
            lora_train(8192, 4096, 11008, 16, 0.05, "default"),
            lora_train(2048, 4096, 4096, 16, 0.0, "quick"),
            lora_decode(1, 4096, 4096, 16, "quick"),
            lora_decode(16, 4096, 4096, 16, "quick"),
            lora_decode(4, 4096, 4096, 16, "default"),
            *_lora_sweep(4096, 4096, 16, {1: "quick", 16: "quick", 256: "quick", 16384: "quick", 4: "default",
                                          64: "default", 1024: "default", 4096: "default"}),
            lora_train(8192, 11008, 4096, 16, 0.0, "full"),
            lora_train(8192, 4096, 4096, 64, 0.0, "full"),
        ],
        "cpu": [
            lora_train(2048, 1024, 1024, 16, 0.0, "quick"),
            lora_train(2048, 1024, 1024, 16, 0.1, "quick"),
            lora_train(2048, 1024, 2816, 16, 0.0, "default"),
            lora_several_train(2048, 1024, 1024, 2, 16, 0.1, "quick"),
            lora_decode(1, 1024, 1024, 16, "quick"),
            lora_decode(16, 1024, 1024, 16, "default"),
            *_lora_sweep(1024, 1024, 16, {1: "quick", 64: "quick", 512: "default", 8192: "default", 16: "full"}),
        ],
        "smoke": [
            lora_train(64, 96, 80, 8, 0.0, "quick"),
            lora_train(64, 96, 80, 8, 0.1, "default"),
            lora_several_train(64, 96, 80, 2, 8, 0.1, "quick"),
            lora_decode(1, 96, 80, 8, "quick"),
            *_lora_sweep(96, 80, 8, {1: "quick", 256: "default"}),
        ],
    }[scale]


# (M, K, N, r) of the LoRA-shaped launches (LoRA's and DoRA's compile grids): decode M=1, odd sizes,
# aligned sizes (divisibility specialisations), r past 64.
GRID_SHAPES = ((1, 4096, 4096, 16), (129, 80, 123, 7), (2048, 4096, 11008, 64), (7, 123, 80, 128))


def grid_settings(grid, name: str, dname: str, env: str, choices):
    """The settings of one dtype that LoRA's and DoRA's compile grids launch in: each of
    :data:`GRID_SHAPES` under each of the ``choices`` of the environment variable ``env``, with and
    without a bias and dropout. Yields (dtype, x, W, A, B, bias, p), meta tensors, inside each."""
    for choice in choices:
        for M, K, N, R in GRID_SHAPES:
            for bias in (False, True):
                for p in (0.0, 0.1):
                    with grid.setting(f"{name} M={M} K={K} N={N} r={R} bias={bias} p={p}", dname, {env: choice}) as dt:
                        meta = functools.partial(grid.meta, dtype=dt)
                        yield dt, meta(M, K), meta(N, K), meta(R, K), meta(N, R), meta(N) if bias else None, p


def compile_grid(grid):
    from fastadapt.kernels import common, lora
    setting, meta = grid.setting, grid.meta
    for dname in grid.dtypes:
        for dt, x, W, A, B, b, p in grid_settings(grid, "lora", dname, lora.GEMM_ENV, ("torch", "triton")):
            y, u = lora.forward(x, W, A, B, 0.5, b, p, 1)
            lora.backward(y, x, W, A, B, u, 0.5, p, 1, (True,) * 5)
            # Split M reductions (atomics) are chosen from the SM count of a CUDA device.
            lora.lora_reduce(u, x, 1.0, meta(*A.shape, dtype=torch.float32), dropout_p=p, seed=1, splits=3)
        with setting("lora non-contiguous x", dname) as dt:
            x = meta(300, 96, dtype=dt).t()
            y, u = lora.forward(x, meta(64, 300, dtype=dt), meta(16, 300, dtype=dt), meta(64, 16, dtype=dt),
                                2.0, None, 0.1, 1)
            lora.backward(y, x, meta(64, 300, dtype=dt), meta(16, 300, dtype=dt), meta(64, 16, dtype=dt), u,
                          2.0, 0.1, 1, (True,) * 5)
    with setting("dropout_keep", "fp32"):
        common.dropout_keep(1, (129, 123), 0.1, "meta")
