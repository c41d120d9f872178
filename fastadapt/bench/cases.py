"""The one list of timed cases of ``fastadapt bench``: each fused op at DESIGN.md's shapes (on CUDA)
or small ones (CPU, ``--smoke``), against the baselines a user would otherwise run and the floor.

A case builds its tensors only when it runs (:meth:`Case.build`), so that one case at a time
holds device memory. Every variant of a case is a closure that the runner times; the fused ones
are named ``fastadapt[<backend>]``, the floor ``floor: ...``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastadapt.bench.report import FUSED_PREFIX
from fastadapt.bench.timing import forward_backward, forward_only

TIERS = ("quick", "default", "full")  # --quick runs the first, a plain run the first two, --full all


@dataclass
class Env:
    """What a case is built for: the device, the timing dtype, the fused backends to time, whether
    torch.compile baselines run, and the measured copy bandwidth (bytes per ms) for HBM floors."""

    device: str
    dtype: torch.dtype
    backends: list[str]
    compile: bool
    bandwidth: float | None = None


@dataclass
class Built:
    """A case's variants (name -> closure) and its floor: the name of the variant that is the floor,
    or a time computed from the compulsory memory traffic (``floor_ms``). ``leaves``: tensors whose
    gradients are dropped before a memory measurement."""

    variants: dict[str, Callable[[], None]]
    floor: str
    floor_ms: float | None = None
    leaves: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Case:
    op: str                      # lora | dora | multi_lora | moe_lora | qlora | bottleneck | prefix | model
    name: str
    params: dict
    tier: str
    build: Callable[[Env], Built]
    rep_ms: float = 100.0        # do_bench's rep on CUDA; the CPU timer's budget
    warmup_ms: float = 25.0


def fused_name(backend: str) -> str:
    return f"{FUSED_PREFIX}{backend}]"


def _fused(env: Env, step: Callable[[], None], op: str | None = None) -> dict[str, Callable[[], None]]:
    """One variant per fused backend (of those ``op`` has, if given): ``step`` forced onto that backend."""
    from fastadapt import dispatch, use_backend

    def under(backend):
        def run():
            with use_backend(backend):
                step()
        return run

    backends = [b for b in env.backends if op is None or b in dispatch._REGISTRY.get(op, {})]
    return {fused_name(b): under(b) for b in backends or ["reference"]}


AUTOMATIC = "fastadapt, automatic dispatch"


def _automatic(env: Env, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with each call on the backend automatic dispatch picks among the timed ones and the
    reference (what ``fastadapt.patch`` gives a user: below a backend's declared crossover the
    plain PyTorch composite runs), leaving out the Triton interpreter the bench turns on on a CPU."""
    from fastadapt import dispatch

    def run():
        with dispatch.only_backends(*env.backends, "reference"):
            step()
    return run


def _on_first_fused(env: Env, step: Callable[[], None], op: str) -> Callable[[], None]:
    """``step`` forced onto the first backend :func:`_fused` times (triton on a GPU, cpp on a CPU,
    where automatic dispatch would pick the Triton interpreter the bench turns on): for a variant
    that another fastadapt call is compared with."""
    return next(iter(_fused(env, step, op).values()))


def _compiled(env: Env, fn):
    # dynamic=False: each case's shapes get their own graph, as a user compiling one model would.
    return torch.compile(fn, dynamic=False) if env.compile else None


# ---------------------------------------------------------------------------------------------
# LoRA


def _peft_lora_layer(weight: torch.Tensor, r: int, scaling: float, dropout: float, adapters: int = 1,
                     dora: bool = False):
    """A real PEFT ``lora.Linear`` around a frozen copy of ``weight`` (adapters in the weight's dtype).
    ``adapters`` > 1: adapters ``default``, ``a1``, ... (see :func:`_adapter_names`), all trainable;
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
    for name in _adapter_names(range(1, adapters)):
        peft_model.add_adapter(name, config(), autocast_adapter_dtype=False)
    layer = peft_model.base_model.model.proj
    for name, q in layer.named_parameters():
        q.requires_grad_("lora_" in name)  # add_adapter leaves the new adapters frozen
    return layer


def _adapter_names(ids) -> list[str]:
    """PEFT adapter names of adapter indices: ``default`` for 0 (the first adapter's name), ``a<i>``."""
    return ["default" if i == 0 else f"a{i}" for i in ids]


def _eager_lora(x, weight, lora_A, lora_B, scaling: float, p: float):
    """The eager reference with its dropout mask drawn per call (PEFT's ``nn.Dropout`` does the same)."""
    from fastadapt.reference import lora as reference

    keep = torch.rand_like(x) >= p if p > 0 else None
    return reference.lora_linear(x, weight, lora_A, lora_B, scaling, keep=keep, dropout_p=p)


def _lora_tensors(env: Env, M: int, K: int, N: int, r: int):
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

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        layer = _peft_lora_layer(weight, r, scaling, p)
        leaves = [x, lora_A, lora_B, *(q for q in layer.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = _fused(env, step(lambda: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, dropout_p=p)))
        variants["peft"] = step(lambda: layer(x))
        if baselines:
            variants["eager"] = step(lambda: _eager_lora(x, weight, lora_A, lora_B, scaling, p))
            compiled = _compiled(env, _eager_lora)
            if compiled is not None:
                variants["torch.compile"] = step(lambda: compiled(x, weight, lora_A, lora_B, scaling, p))
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

        weight, single_A, single_B = _lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        theirs = _peft_lora_layer(weight, r, scaling, p, adapters=n)
        theirs.set_adapter(_adapter_names(range(n)))
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours, strict=True)  # a call that would fall back to PEFT fails the case
        leaves = [x, single_A, single_B, *(q for m in (theirs, ours) for q in m.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = _fused(env, step(lambda: ours(x)), "lora_linear")
        variants["peft (loop over adapters)"] = step(lambda: theirs(x))
        variants["one adapter alone (fastadapt lora_linear)"] = _on_first_fused(env, step(
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

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
        x = torch.randn(M, K, device=env.device, dtype=env.dtype)
        merged = weight + scaling * (lora_B @ lora_A).detach()
        layer = _peft_lora_layer(weight, r, scaling, 0.0)
        variants = _fused(env, forward_only(lambda: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling)))
        variants["peft"] = forward_only(lambda: layer(x))
        variants["eager"] = forward_only(lambda: _eager_lora(x, weight, lora_A, lora_B, scaling, 0.0))
        variants["floor: merged matmul"] = forward_only(lambda: F.linear(x, merged))
        return Built(variants, "floor: merged matmul")

    return Case("lora", f"inference M={M} {K}x{N} r={r} unmerged", dict(kind="decode", M=M, K=K, N=N, r=r),
                tier, build)


def dora_train(M: int, K: int, N: int, r: int, p: float, tier: str) -> Case:
    """DoRA forward + backward (grads of x, A, B and the magnitude; W frozen) against PEFT's DoRA
    layer and our own plain LoRA at the same shape (the issue's target: DoRA within 1.2x of it).
    The floor: the frozen ``x W^T`` and its ``dx = dy W``."""
    scaling = 2.0

    def build(env: Env) -> Built:
        import fastadapt

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
        # PEFT initialises the magnitude to the weight norm; a trained one is not.
        magnitude = (torch.rand(N, device=env.device) + 0.5).requires_grad_()
        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        layer = _peft_lora_layer(weight, r, scaling, p, dora=True)
        leaves = [x, lora_A, lora_B, magnitude, *(q for q in layer.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = _fused(env, step(lambda: fastadapt.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling,
                                                                  dropout_p=p)), op="dora_linear")
        variants["peft DoRA"] = step(lambda: layer(x))
        variants["fastadapt LoRA (no DoRA)"] = _on_first_fused(env, step(
            lambda: fastadapt.lora_linear(x, weight, lora_A, lora_B, scaling, dropout_p=p)), "lora_linear")
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    drop = f", dropout {p}" if p else ""
    return Case("dora", f"fwd+bwd M={M} {K}x{N} r={r}{drop}", dict(kind="train", M=M, K=K, N=N, r=r, p=p),
                tier, build)


# ---------------------------------------------------------------------------------------------
# Many LoRA adapters in one batch


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
        layer = _peft_lora_layer(weight, r, scaling, 0.0, adapters=n)
        names = _adapter_names(ids.tolist())
        single_A, single_B = (A[0].detach().clone().requires_grad_(), B[0].detach().clone().requires_grad_())
        leaves = [x, A, B, single_A, single_B, *(q for q in layer.parameters() if q.requires_grad)]

        def step(f):
            return forward_backward(f, leaves, grad_y)

        variants = _fused(env, step(lambda: fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids)))
        variants["peft mixed batch (loop over adapters)"] = step(lambda: layer(x, adapter_names=names))
        variants["one adapter alone (fastadapt lora_linear)"] = _on_first_fused(env, step(
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
        layer = _peft_lora_layer(weight, r, scaling, 0.0, adapters=n)
        names = _adapter_names(ids.tolist())
        variants = _fused(env, forward_only(lambda: fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids)))
        variants["gather + bmm"] = forward_only(lambda: _gather_bmm(x, weight, A, B, scalings, ids))
        variants["peft mixed batch (loop over adapters)"] = forward_only(lambda: layer(x, adapter_names=names))
        variants["floor: base layer alone"] = forward_only(lambda: F.linear(x, weight))
        return Built(variants, "floor: base layer alone")

    return Case("multi_lora", f"inference M={M} {K}x{N} {n} adapters r={r}, one per row",
                dict(kind="decode", M=M, K=K, N=N, n=n, r=r), tier, build)


# ---------------------------------------------------------------------------------------------
# MoE experts with per-expert LoRA (PEFT target_parameters)


def _moe_experts(env: Env, family: str, T: int, H: int, I: int, E: int, k: int):
    """A transformers experts module of ``family`` (frozen, random) in a container whose child is
    ``experts``, and a routing: k distinct experts per token, softmax weights (trainable)."""
    import transformers

    if family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=k)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=k)
    config._experts_implementation = "eager"
    container = torch.nn.Module()
    container.experts = Experts(config).to(env.device, env.dtype)
    with torch.no_grad():
        for p in container.experts.parameters():
            p.normal_(0, 0.02 if p.dim() == 3 else 0.1).requires_grad_(False)
    logits = torch.randn(T, E, device=env.device)
    top, idx = logits.topk(k, dim=-1)
    weights = top.softmax(-1).to(env.dtype).requires_grad_()
    return container, idx, weights


def moe_lora_train(family: str, T: int, H: int, I: int, E: int, k: int, r: int, tier: str) -> Case:
    """Forward + backward of one MoE block's experts with PEFT ``target_parameters`` LoRA (r on both
    projections), T tokens, top-k routing: patched onto the fused op, against PEFT's path as
    installed (its parametrization of ``W + s B A`` around transformers' eager experts and around
    its ``grouped_mm`` experts). The floor: the frozen experts alone, transformers' ``grouped_mm``."""

    def build(env: Env) -> Built:
        import peft

        import fastadapt

        container, idx, weights = _moe_experts(env, family, T, H, I, E, k)
        x = torch.randn(T, H, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_y = torch.randn(T, H, device=env.device, dtype=env.dtype)
        floor = copy.deepcopy(container).experts
        floor.config._experts_implementation = "grouped_mm"
        peft_model = peft.get_peft_model(container, peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            init_lora_weights=False), autocast_adapter_dtype=False)
        grouped = copy.deepcopy(peft_model)
        grouped.base_model.model.experts.base_layer.base_layer.config._experts_implementation = "grouped_mm"
        patched = copy.deepcopy(peft_model)
        fastadapt.patch(patched, strict=True)
        models = (peft_model, grouped, patched)
        leaves = [x, weights, *(q for m in models for q in m.parameters() if q.requires_grad)]

        def step(model):
            layer = model.base_model.model.experts
            return forward_backward(lambda: layer(x, idx, weights), leaves, grad_y)

        variants = _fused(env, step(patched), "moe_lora_experts")
        variants["peft target_parameters, eager experts"] = step(peft_model)
        variants["peft target_parameters, grouped_mm experts"] = step(grouped)
        variants["floor: frozen experts, grouped_mm"] = forward_backward(lambda: floor(x, idx, weights), leaves,
                                                                          grad_y)
        return Built(variants, "floor: frozen experts, grouped_mm", leaves=leaves)

    return Case("moe_lora", f"fwd+bwd {family} T={T} H={H} I={I} E={E} top-{k} r={r}",
                dict(kind="train", family=family, T=T, H=H, I=I, E=E, k=k, r=r), tier, build)


# ---------------------------------------------------------------------------------------------
# QLoRA (LoRA on an NF4 base)


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
        from fastadapt import dispatch
        from fastadapt.reference import qlora as qref

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
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

        served = dataclasses.replace(env, backends=[b for b in env.backends if b in dispatch._REGISTRY["qlora_linear"]]
                                     or ["reference"])
        variants = _fused(served, step(lambda: fastadapt.qlora_linear(x, q, lora_A, lora_B, scaling)))
        if layer is not None:
            variants["peft + bitsandbytes"] = step(lambda: layer(x))
        variants["dequantize + torch matmul (unsloth-style)"] = step(
            lambda: _DequantizeThenMatmul.apply(x, dequantize, lora_A, lora_B, scaling))
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, weight))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    return Case("qlora", f"NF4 fwd+bwd M={M} {K}x{N} r={r}", dict(kind="train", M=M, K=K, N=N, r=r), tier, build)


# ---------------------------------------------------------------------------------------------
# Where the Triton backend runs DoRA's and QLoRA's frozen products (fastadapt/strategy.py), side by side

STRATEGY_ROWS = (1, 16, 256, 2048, 8192)  # around the rules' crossovers (512 rows, an estimate)
DECODE_ROWS = 16  # up to here a call is decoding or a rollout: timed forward only; above, fwd+bwd


@contextlib.contextmanager
def _environ(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _strategies(op: str, rule, label: str, M: int, K: int, N: int, r: int, tier: str, make) -> Case:
    """Each strategy of ``rule`` forced on the Triton backend at M rows, the one the rule picks
    first (the headline: the others' "faster by" says whether the rule is right there), and the
    floor, the frozen matmul. ``make(env, x)`` gives the op's call on x (M, K), the adapter tensors
    it trains and the dense (N, K) weight of the floor. The environment variable is set around the
    whole step, so that the backward (on autograd's thread) runs the same strategy."""
    train = M > DECODE_ROWS
    which = "fwd+bwd" if train else "fwd"
    default = rule.automatic(M)

    def build(env: Env) -> Built:
        from fastadapt import use_backend

        x = torch.randn(M, K, device=env.device, dtype=env.dtype, requires_grad=train)
        call, trained, dense = make(env, x)
        leaves = [x, *trained]
        grad_y = torch.randn(M, N, device=env.device, dtype=env.dtype)
        step = (lambda f: forward_backward(f, leaves, grad_y)) if train else forward_only

        def under(choice):
            run = step(call)

            def forced():
                with use_backend("triton"), _environ(rule.env, choice):
                    run()
            return forced

        variants = {f"{fused_name('triton')} {rule.env}={c}{' (the rule here)' if c == default else ''}": under(c)
                    for c in sorted((rule.fused, rule.split), key=lambda c: c != default)}
        variants["floor: frozen matmul"] = step(lambda: F.linear(x, dense))
        return Built(variants, "floor: frozen matmul", leaves=leaves)

    return Case(op, f"{label} strategies {which} M={M} {K}x{N} r={r}",
                dict(kind=f"strategies {which}", M=M, K=K, N=N, r=r), tier, build)


def dora_strategies(M: int, K: int, N: int, r: int, tier: str) -> Case:
    """DoRA's norm in our GEMM's K loop against the norm kernel beside cuBLAS (grads of x, A, B and
    the magnitude when trained)."""
    from fastadapt.strategy import DORA_NORM

    def make(env, x):
        import fastadapt

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
        magnitude = (torch.rand(N, device=env.device) + 0.5).requires_grad_()
        return (lambda: fastadapt.dora_linear(x, weight, lora_A, lora_B, magnitude, 2.0)), \
            [lora_A, lora_B, magnitude], weight

    return _strategies("dora", DORA_NORM, "norm", M, K, N, r, tier, make)


def qlora_strategies(M: int, K: int, N: int, r: int, fmt: str, tier: str) -> Case:
    """QLoRA / FP8 (``fmt`` of ``fastadapt.reference.qlora.random_weight``): dequantizing in our GEMM's
    K loop against dequantizing once into a buffer for cuBLAS (grads of x, A, B when trained)."""
    from fastadapt.strategy import QLORA_DEQUANT

    def make(env, x):
        import fastadapt
        from fastadapt.reference import qlora as qref

        weight, lora_A, lora_B = _lora_tensors(env, M, K, N, r)
        q = qref.random_weight(fmt, N, K, env.device)
        return (lambda: fastadapt.qlora_linear(x, q, lora_A, lora_B, 2.0)), [lora_A, lora_B], weight

    return _strategies("qlora", QLORA_DEQUANT, f"{fmt} dequant", M, K, N, r, tier, make)


def _strategy_sweeps(K: int, N: int, tier: str) -> list[Case]:
    """The rows nearest the crossovers first, so that a run cut short has bracketed them."""
    import math

    from fastadapt.strategy import DORA_NORM, QLORA_DEQUANT

    crossovers = (DORA_NORM.min_rows, QLORA_DEQUANT.min_rows)
    rows = sorted(STRATEGY_ROWS, key=lambda m: min(abs(math.log2(m / c)) for c in crossovers))
    return [case for M in rows for case in (
        dora_strategies(M, K, N, 16, tier), qlora_strategies(M, K, N, 16, "nf4-nested", tier),
        qlora_strategies(M, K, N, 16, "fp8-channel", tier))]


# ---------------------------------------------------------------------------------------------
# Bottleneck adapter

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
                                        residual_before_ln_after=residual_before_ln,
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
        res_before = cfg.get("residual_before_ln", False)
        act = cfg["activation"]
        leaves = [t for t in (z, r, wd, bd, wu, bu, scale, gate, *(lnb or ()), *(lna or ())) if t is not None]
        grad_out = torch.randn(M, d, **kw)
        step = (lambda f: forward_backward(f, leaves, grad_out)) if backward else forward_only

        def fused():
            return fastadapt.bottleneck_adapter(z, wd, bd, wu, bu, r, activation=act, scale=scale, ln_before=lnb,
                                                ln_after=lna, adapter_residual_before_ln=res_before, gate=gate,
                                                dropout_p=p)

        args = (z, wd, bd, wu, bu, r, scale, lnb, lna, res_before, act, gate, p)
        variants = _fused(env, step(fused))
        variants["eager"] = step(lambda: _eager_bottleneck(*args))
        compiled = _compiled(env, _eager_bottleneck)
        if compiled is not None:
            variants["torch.compile"] = step(lambda: compiled(*args))
        elements = (6 if backward else 3) * M * d
        floor_ms = elements * torch.finfo(env.dtype).bits // 8 / env.bandwidth
        return Built(variants, f"floor: HBM traffic ({elements // (M * d)} x M x d elements at copy bandwidth)",
                     floor_ms=floor_ms, leaves=leaves)

    which = "fwd+bwd" if backward else "fwd"
    return Case("bottleneck", f"{which} M={M} d={d} m={m} {config}",
                dict(kind=which, M=M, d=d, m=m, config=config), tier, build)


# ---------------------------------------------------------------------------------------------
# Gated prefix attention


def two_pass(q, k, v, kp, vp, gate):
    """PEFT's AdaptionPrompt (and litgpt's) computation: the model's SDPA over the tokens, then an
    eager softmax over the prompt, gated."""
    group = q.shape[1] // k.shape[1]
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    kp, vp = kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)
    scores = torch.softmax((q @ kp.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
    return base + gate.to(q.dtype).view(1, -1, 1, 1) * (scores.to(q.dtype) @ vp)


def prefix(B: int, H: int, Hkv: int, S: int, D: int, L: int, backward: bool, tier: str) -> Case:
    """The op against the two-pass computation (eager and compiled); the floor: SDPA over the tokens
    alone (flash attention, no prefix)."""

    def build(env: Env) -> Built:
        import fastadapt

        kw = dict(device=env.device, dtype=env.dtype)

        def t(*shape):
            return torch.randn(*shape, **kw).requires_grad_()

        q, k, v = t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D)
        kp, vp = t(1, Hkv, L, D), t(1, Hkv, L, D)
        gate = torch.randn(H, device=env.device, requires_grad=True)
        leaves = [q, k, v, kp, vp, gate]
        grad_out = torch.randn(B, H, S, D, **kw)
        step = (lambda f: forward_backward(f, leaves, grad_out)) if backward else forward_only
        group = H // Hkv

        def expanded():
            return q, k, v, kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1), gate

        variants = _fused(env, step(lambda: fastadapt.prefix_attention(q, k, v, kp, vp, gate)))
        variants["eager two-pass (PEFT's math)"] = step(lambda: two_pass(*expanded()))
        compiled = _compiled(env, two_pass)
        if compiled is not None:
            variants["torch.compile two-pass"] = step(lambda: compiled(*expanded()))
        variants["floor: SDPA alone"] = step(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1))
        return Built(variants, "floor: SDPA alone", leaves=leaves)

    which = "fwd+bwd" if backward else "fwd"
    heads = f"H={H}" if H == Hkv else f"H={H}/{Hkv}"
    return Case("prefix", f"{which} B={B} {heads} S={S} D={D} L={L}",
                dict(kind=which, B=B, H=H, Hkv=Hkv, S=S, D=D, L=L), tier, build)


def _llama_config(hidden: int, ffn: int, layers: int, heads: int, seq: int, vocab: int):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                    max_position_embeddings=seq, attn_implementation="sdpa")


def _trainable(*models) -> list[torch.Tensor]:
    return [p for mdl in models for p in mdl.parameters() if p.requires_grad]


def prefix_peft_layer(B: int, S: int, hidden: int, heads: int, L: int, tier: str) -> Case:
    """PEFT's own module: one Llama attention layer wrapped by PEFT's ``AdaptionPrompt``, unpatched
    vs patched by ``fastadapt.patch``, forward + backward through a one-layer model whose MLP is
    tiny (16 wide) so that the attention dominates. The floor: the same layer without the prompt."""

    def build(env: Env) -> Built:
        import peft
        from transformers import LlamaForCausalLM

        import fastadapt

        torch.manual_seed(0)
        with torch.device(env.device):  # initialised where it runs: no copy through host memory
            plain = LlamaForCausalLM(_llama_config(hidden, 16, 1, heads, S, 32)).to(env.dtype)
        plain.requires_grad_(False)
        theirs = peft.get_peft_model(copy.deepcopy(plain), peft.AdaptionPromptConfig(
            adapter_len=L, adapter_layers=1, task_type="CAUSAL_LM"))
        with torch.no_grad():  # PEFT zero-initialises the gate; a trained one is not zero
            for name, p in theirs.named_parameters():
                if name.endswith("adaption_gate"):
                    p.fill_(0.5)
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours)
        embeds = torch.randn(B, S, hidden, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_out = torch.randn(B, S, hidden, device=env.device, dtype=env.dtype)
        leaves = [embeds, *_trainable(theirs, ours)]

        def step(model):
            inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
            return forward_backward(lambda: inner(inputs_embeds=embeds).last_hidden_state, leaves, grad_out)

        variants = _fused(env, step(ours))
        variants["peft AdaptionPrompt"] = step(theirs)
        variants["floor: layer without prompt"] = step(plain)
        return Built(variants, "floor: layer without prompt", leaves=leaves)

    return Case("prefix", f"PEFT AdaptionPrompt layer fwd+bwd B={B} S={S} hidden={hidden} H={heads} L={L}",
                dict(kind="peft_layer", B=B, S=S, hidden=hidden, H=heads, L=L), tier, build)


# ---------------------------------------------------------------------------------------------
# A whole training step


def model_step(B: int, S: int, hidden: int, ffn: int, layers: int, heads: int, r: int, tier: str,
               trainer: bool = False) -> Case:
    """A Llama (random weights from a config, no LM head) with LoRA r on all seven projections:
    forward + backward of PEFT, of PEFT patched by fastadapt, and of the frozen model (the floor).

    ``trainer``: as the HF Trainer runs a model loaded in bf16 with ``bf16=True``: a bf16 base
    (whatever ``--dtype``), PEFT's default float32 adapters (``autocast_adapter_dtype``), and every
    step under ``torch.autocast(bf16)``."""

    def build(env: Env) -> Built:
        import peft
        from transformers import LlamaModel

        import fastadapt
        from fastadapt.verify import LLAMA_TARGETS

        dtype = torch.bfloat16 if trainer else env.dtype
        torch.manual_seed(0)
        with torch.device(env.device):  # 1B parameters: initialised on the GPU, not the host's CPU
            frozen = LlamaModel(_llama_config(hidden, ffn, layers, heads, S, 32000)).to(dtype)
        frozen.requires_grad_(False)
        theirs = peft.get_peft_model(copy.deepcopy(frozen), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS), autocast_adapter_dtype=trainer)
        ours = copy.deepcopy(theirs)
        fastadapt.patch(ours, strict=True)  # a call that would fall back to PEFT fails the case
        ids = torch.randint(0, 32000, (B, S), device=env.device)
        # The frozen model needs an input that requires grad, or autograd has nothing to do.
        embeds = frozen.embed_tokens(ids).detach().requires_grad_()
        grad_out = torch.randn(B, S, hidden, device=env.device, dtype=dtype)
        leaves = [embeds, *_trainable(theirs, ours)]

        def step(model):
            def forward():
                with torch.autocast(env.device, dtype, enabled=trainer):
                    return model(inputs_embeds=embeds).last_hidden_state
            return forward_backward(forward, leaves, grad_out)

        variants = _fused(env, step(ours))
        variants[AUTOMATIC] = _automatic(env, step(ours))
        variants["peft"] = step(theirs)
        variants["floor: frozen model"] = step(frozen)
        return Built(variants, "floor: frozen model", leaves=leaves)

    how = ", autocast, fp32 adapters (Trainer-like)" if trainer else ""
    return Case("model", f"Llama {layers} layers h={hidden} B={B} S={S} LoRA r={r} on 7 linears, fwd+bwd{how}",
                dict(kind="train", B=B, S=S, hidden=hidden, ffn=ffn, layers=layers, heads=heads, r=r,
                     trainer=trainer), tier, build, rep_ms=1000.0, warmup_ms=200.0)


# ---------------------------------------------------------------------------------------------
# The list


def _lora_sweep(K: int, N: int, r: int, ms: dict[int, str]) -> list[Case]:
    return [lora_train(M, K, N, r, 0.0, tier, baselines=False) for M, tier in ms.items()]


def all_cases(scale: str) -> list[Case]:
    """Every case at ``scale`` ("cuda": DESIGN.md's shapes; "cpu": small; "smoke": tiny, for CI), in
    the order they run: each op's headline case first, so that a run cut short has measured them."""
    if scale == "cuda":
        return [
            lora_train(8192, 4096, 4096, 16, 0.0, "quick"),
            qlora_train(8192, 4096, 4096, 16, "quick"),
            model_step(4, 2048, 4096, 11008, 4, 32, 16, "quick"),
            multi_lora_train(8192, 4096, 4096, 4, 16, "quick"),
            multi_lora_train(8192, 4096, 4096, 16, 16, "quick"),
            multi_lora_decode(1, 4096, 4096, 16, 16, "quick"),
            multi_lora_decode(16, 4096, 4096, 16, 16, "quick"),
            multi_lora_decode(64, 4096, 4096, 16, 16, "quick"),
            multi_lora_decode(4, 4096, 4096, 16, 16, "default"),
            # Qwen3-30B-A3B's and gpt-oss-20b's experts (issue 23's shapes).
            moe_lora_train("qwen3_moe", 4096, 2048, 768, 128, 8, 16, "quick"),
            moe_lora_train("gpt_oss", 4096, 2880, 2880, 32, 4, 16, "quick"),
            bottleneck(8192, 4096, 64, "seq_bn", True, "quick"),
            model_step(4, 2048, 4096, 11008, 4, 32, 16, "quick", trainer=True),
            prefix(4, 32, 32, 2048, 128, 10, True, "quick"),
            bottleneck(8192, 4096, 64, "seq_bn", False, "quick"),
            prefix(8, 32, 32, 512, 128, 30, True, "quick"),
            prefix_peft_layer(4, 2048, 4096, 32, 10, "quick"),
            lora_train(8192, 4096, 4096, 16, 0.05, "quick"),
            lora_several_train(8192, 4096, 4096, 2, 16, 0.05, "default"),
            dora_train(8192, 4096, 4096, 16, 0.0, "quick"),
            lora_train(8192, 4096, 11008, 16, 0.0, "quick"),
            dora_train(8192, 4096, 11008, 16, 0.0, "default"),
            dora_train(8192, 4096, 4096, 16, 0.05, "default"),
            lora_train(8192, 4096, 11008, 16, 0.05, "default"),
            qlora_train(8192, 4096, 11008, 16, "default"),
            lora_train(2048, 4096, 4096, 16, 0.0, "quick"),
            lora_decode(1, 4096, 4096, 16, "quick"),
            lora_decode(16, 4096, 4096, 16, "quick"),
            lora_decode(4, 4096, 4096, 16, "default"),
            *_lora_sweep(4096, 4096, 16, {1: "quick", 16: "quick", 256: "quick", 16384: "quick", 4: "default",
                                          64: "default", 1024: "default", 4096: "default"}),
            prefix(4, 32, 32, 2048, 128, 10, False, "default"),
            bottleneck(8192, 4096, 64, "full", True, "default"),
            lora_train(8192, 11008, 4096, 16, 0.0, "full"),
            lora_train(8192, 4096, 4096, 64, 0.0, "full"),
            bottleneck(8192, 768, 48, "seq_bn", True, "full"),
            bottleneck(65536, 1024, 64, "seq_bn", True, "full"),
            prefix(4, 32, 8, 2048, 128, 10, True, "full"),
            prefix(1, 32, 32, 8192, 128, 10, True, "full"),
            prefix(8, 32, 8, 512, 128, 30, True, "full"),
            # Last of each tier: their own call (--op dora --op qlora) when a run is short of time.
            *_strategy_sweeps(4096, 4096, "quick"),
            *_strategy_sweeps(4096, 11008, "default"),
        ]
    if scale == "cpu":
        return [
            lora_train(2048, 1024, 1024, 16, 0.0, "quick"),
            lora_train(2048, 1024, 1024, 16, 0.1, "quick"),
            lora_train(2048, 1024, 2816, 16, 0.0, "default"),
            lora_several_train(2048, 1024, 1024, 2, 16, 0.1, "quick"),
            dora_train(2048, 1024, 1024, 16, 0.0, "quick"),
            multi_lora_train(2048, 1024, 1024, 4, 16, "quick"),
            qlora_train(2048, 1024, 1024, 16, "quick"),
            multi_lora_decode(16, 1024, 1024, 16, 16, "quick"),
            moe_lora_train("qwen3_moe", 512, 256, 128, 16, 4, 16, "quick"),
            moe_lora_train("gpt_oss", 512, 256, 256, 8, 2, 16, "default"),
            model_step(2, 128, 256, 688, 2, 4, 16, "quick"),
            model_step(2, 128, 256, 688, 2, 4, 16, "quick", trainer=True),
            bottleneck(2048, 1024, 64, "seq_bn", False, "quick"),
            bottleneck(2048, 1024, 64, "seq_bn", True, "quick"),
            bottleneck(2048, 1024, 64, "full", True, "default"),
            prefix(2, 8, 8, 256, 64, 10, True, "quick"),
            prefix(2, 8, 2, 256, 64, 10, True, "default"),
            prefix_peft_layer(2, 128, 256, 4, 10, "quick"),
            lora_decode(1, 1024, 1024, 16, "quick"),
            lora_decode(16, 1024, 1024, 16, "default"),
            *_lora_sweep(1024, 1024, 16, {1: "quick", 64: "quick", 512: "default", 8192: "default", 16: "full"}),
        ]
    if scale == "smoke":
        return [
            lora_train(64, 96, 80, 8, 0.0, "quick"),
            lora_train(64, 96, 80, 8, 0.1, "default"),
            lora_several_train(64, 96, 80, 2, 8, 0.1, "quick"),
            dora_train(64, 96, 80, 8, 0.0, "quick"),
            multi_lora_train(64, 96, 80, 4, 8, "quick"),
            qlora_train(64, 128, 80, 8, "quick"),
            multi_lora_decode(4, 96, 80, 4, 8, "quick"),
            moe_lora_train("qwen3_moe", 32, 64, 32, 4, 2, 4, "quick"),
            model_step(1, 16, 64, 128, 1, 4, 8, "quick"),
            model_step(1, 16, 64, 128, 1, 4, 8, "quick", trainer=True),
            bottleneck(64, 96, 16, "seq_bn", False, "quick"),
            bottleneck(64, 96, 16, "full", True, "quick"),
            prefix(1, 4, 2, 32, 16, 4, True, "quick"),
            prefix_peft_layer(1, 16, 64, 4, 4, "quick"),
            lora_decode(1, 96, 80, 8, "quick"),
            *_lora_sweep(96, 80, 8, {1: "quick", 256: "default"}),
        ]
    raise ValueError(f"unknown scale {scale!r}; expected cuda, cpu or smoke")


def select(scale: str, tier: str, ops=None) -> list[Case]:
    """The cases of ``scale`` up to ``tier`` (quick < default < full), of ``ops`` (None: all)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    upto = TIERS[: TIERS.index(tier) + 1]
    return [c for c in all_cases(scale) if c.tier in upto and (not ops or c.op in ops)]
