"""MoE experts with per-expert LoRA as a ``torch.library`` custom op with autograd, and its backends.

``fastadapt::moe_lora_experts`` returns ``(out, g, u1, u2, d)``: the experts' output (T, H) and,
for the backward, in rows grouped by expert (the stable sort of the routing's (token, slot)
pairs): the gate/up projection before the activation ``g`` (S, 2I), the LoRA down-projections
``u1 = s1 D1(x) A1^T`` (S, r1) and ``u2 = s2 D2(h) A2^T`` (S, r2), and each pair's expert output
``d`` (S, H), whose dot product with the output gradient is the routing weight's gradient. Nothing
of an expert weight's size is allocated: ``W + s B A`` is never formed. Dropout masks are drawn
from a seed and regenerated in the backward. Math in ``fastadapt/reference/moe_lora.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastadapt import _checks, _native, dispatch, strategy
from fastadapt.backends import Capabilities
from fastadapt.ops import _autocast
from fastadapt.ops._declare import Arg, OpSpec, declare
from fastadapt.ops.lora import seed_int
from fastadapt.reference import moe_lora as reference

OP = "moe_lora_experts"
ACTIVATIONS = reference.ACTIVATIONS
INDEX_DTYPES = (torch.int32, torch.int64)
# transformers' GptOssConfig defaults (swiglu_alpha, swiglu_limit).
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


def _forward(impl, x, top_k_index, top_k_weights, gate_up_proj, gate_up_bias, down_proj, down_bias, gate_up_A,
             gate_up_B, gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit, dropout_p, seed):
    return impl.forward(x, top_k_index, top_k_weights, gate_up_proj, gate_up_bias, down_proj, down_bias, gate_up_A,
                        gate_up_B, gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit, dropout_p,
                        seed_int(seed))


def _backward(impl, needs, gout, _gg, _gu1, _gu2, _gd, x, top_k_index, top_k_weights, gate_up_proj, gate_up_bias,
              down_proj, down_bias, gate_up_A, gate_up_B, gate_up_scaling, down_A, down_B, down_scaling, activation,
              alpha, limit, dropout_p, seed, g, u1, u2, d):
    return impl.backward(gout, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_A,
                         gate_up_B, gate_up_scaling, down_A, down_B, down_scaling, activation, alpha, limit,
                         dropout_p, seed_int(seed), g, u1, u2, d, needs)


def _fake(x, top_k_index, gate_up_proj, gate_up_A, down_A, **_):
    S = top_k_index.numel()
    rank = (lambda A: 0 if A is None else A.shape[1])
    return (x.new_empty(x.shape), x.new_empty(S, gate_up_proj.shape[1]), x.new_empty(S, rank(gate_up_A)),
            x.new_empty(S, rank(down_A)), x.new_empty(S, x.shape[1]))


def _fuzz(draw):
    """A random call with its float64 truth, for the shared fuzz (tests/test_fuzz.py)."""
    from fastadapt.testing import FuzzCase

    T, E, k = draw.choice([0, 1, 5, 9]), draw.int(1, 4), draw.int(1, 3)
    H, I = draw.int(1, 12), draw.int(1, 8)
    r1, r2 = draw.choice([None, 1, 3]), draw.choice([None, 2, 4])
    kind = draw.choice(ACTIVATIONS)
    limit = 1.5  # gpt-oss: small enough that both clamps act on unit-variance values
    p, training = draw.choice([0.0, 0.1, 0.999]), draw.bool()
    s1, s2 = draw.choice([0.5, -2.0]), draw.choice([2.0, 0.25])
    biases = draw.bool()
    tensors = dict(x=torch.randn(T, H), top_k_index=torch.randint(0, E, (T, k)),
                   top_k_weights=torch.rand(T, k), gate_up_proj=torch.randn(E, 2 * I, H) / H**0.5,
                   down_proj=torch.randn(E, H, I) / I**0.5,
                   gate_up_bias=torch.randn(E, 2 * I) if biases else None,
                   down_bias=torch.randn(E, H) if biases else None,
                   gate_up_A=torch.randn(E, r1, H) / H**0.5 if r1 else None,
                   gate_up_B=torch.randn(E, 2 * I, r1) / r1**0.5 if r1 else None,
                   down_A=torch.randn(E, r2, I) / I**0.5 if r2 else None,
                   down_B=torch.randn(E, H, r2) / r2**0.5 if r2 else None)
    dropout = training and p > 0.0 and (r1 or r2) is not None

    def call(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, gate_up_A, gate_up_B,
             down_A, down_B, scaling=s1):
        return moe_lora_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias=gate_up_bias,
                                down_bias=down_bias, gate_up_A=gate_up_A, gate_up_B=gate_up_B, gate_up_scaling=scaling,
                                down_A=down_A, down_B=down_B, down_scaling=s2, activation=kind, limit=limit,
                                dropout_p=p, training=training)

    def exact(keep, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, gate_up_A,
              gate_up_B, down_A, down_B, scaling=s1):
        S = top_k_index.numel()
        keep1 = keep(0, (S, H), p) if dropout and r1 else None
        keep2 = keep(1, (S, I), p) if dropout and r2 else None
        return reference.experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                                 gate_up_A, gate_up_B, scaling, down_A, down_B, s2, kind, GPT_OSS_ALPHA, limit,
                                 keep1, keep2, p)[0]

    return FuzzCase(tensors, call, exact, grads=("x", "top_k_weights", "gate_up_A", "gate_up_B", "down_A", "down_B"),
                    dropout=dropout)


# ``fastadapt::moe_lora_experts`` returns ``(out, g, u1, u2, d)``; the routing weights keep their
# own dtype under autocast (transformers' routers return them in float32 or the model's dtype).
MOE_LORA_EXPERTS = declare(OpSpec(
    OP,
    args=(Arg("x", "Tensor", grad=True, select=True), Arg("top_k_index", "Tensor"),
          Arg("top_k_weights", "Tensor", grad=True, keep=True),
          Arg("gate_up_proj", "Tensor", select=True), Arg("gate_up_bias", "Tensor?", select=True),
          Arg("down_proj", "Tensor", select=True), Arg("down_bias", "Tensor?", select=True),
          Arg("gate_up_A", "Tensor?", grad=True, select=True), Arg("gate_up_B", "Tensor?", grad=True, select=True),
          Arg("gate_up_scaling", "float"),
          Arg("down_A", "Tensor?", grad=True, select=True), Arg("down_B", "Tensor?", grad=True, select=True),
          Arg("down_scaling", "float"), Arg("activation", "str"), Arg("alpha", "float"), Arg("limit", "float"),
          Arg("dropout_p", "float"), Arg("seed", "Tensor?")),
    outputs=("out", "g", "u1", "u2", "d"), saved=("g", "u1", "u2", "d"),
    grads=("x", "top_k_weights", "gate_up_A", "gate_up_B", "down_A", "down_B"),
    fake=_fake, forward=_forward, backward=_backward, fuzz=_fuzz))


def _lora_pair(prefix: str, A, B, n_experts: int, n_in: int, n_out: int):
    """Check one projection's LoRA factors (both or neither): A (E, r, in), B (E, out, r)."""
    if (A is None) != (B is None):
        raise ValueError(f"{prefix}_A and {prefix}_B must be given together (got only "
                         f"{prefix}_{'A' if B is None else 'B'})")
    if A is None:
        return
    _checks.tensor(f"{prefix}_A", A, ndim=3)
    _checks.tensor(f"{prefix}_B", B, ndim=3)
    rank = A.shape[1]
    if rank == 0:
        raise ValueError(f"{prefix}_A has rank 0: r must be at least 1")
    _checks.dim_equal(f"{prefix}_A.shape[0] (experts, gate_up_proj.shape[0])", A.shape[0], n_experts)
    _checks.dim_equal(f"{prefix}_A.shape[2] (in_features)", A.shape[2], n_in)
    _checks.dim_equal(f"{prefix}_B.shape[0] (experts, gate_up_proj.shape[0])", B.shape[0], n_experts)
    _checks.dim_equal(f"{prefix}_B.shape[1] (out_features)", B.shape[1], n_out)
    _checks.dim_equal(f"{prefix}_B.shape[2] (r, {prefix}_A.shape[1])", B.shape[2], rank)


def _frozen(**tensors) -> None:
    """The expert weights and biases get no gradient: refuse one that asks for it, rather than leave it None."""
    if not torch.is_grad_enabled():
        return
    wanting = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if wanting:
        raise ValueError(f"{', '.join(wanting)} require(s) grad: moe_lora_experts trains the LoRA factors, x and the "
                         "routing weights; the expert weights and biases must be frozen (requires_grad=False)")


def moe_lora_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                     *, gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                     gate_up_A: Optional[Tensor] = None, gate_up_B: Optional[Tensor] = None,
                     gate_up_scaling: float = 1.0, down_A: Optional[Tensor] = None, down_B: Optional[Tensor] = None,
                     down_scaling: float = 1.0, activation: str = "silu", alpha: float = GPT_OSS_ALPHA,
                     limit: float = GPT_OSS_LIMIT, dropout_p: float = 0.0, training: bool = True) -> Tensor:
    """A mixture-of-experts block's experts, each with its own LoRA on both projections, fused:
    what transformers' experts functions compute (``experts_implementation``), plus PEFT's
    ``target_parameters`` LoRA, without ever forming ``W + s B A``.

    Args:
        x: (T, H) tokens, float16 / bfloat16 / float32 (float64 runs on the reference).
        top_k_index: (T, k) int32 / int64 expert of each token's k slots, in [0, E) (checked on the
            device with ``torch._assert_async``: an out-of-range index raises at the next
            synchronisation on CUDA, at once on the CPU); any strides.
        top_k_weights: (T, k) routing weights, any floating dtype (kept under autocast); its
            gradient is the eager experts' (``<gy_t, expert output>``).
        gate_up_proj: (E, 2I, H) frozen; ``gate_up_proj[e]`` maps H to the gate and up halves. A
            layout stored (E, H, 2I) (gpt-oss) is passed as its ``transpose(1, 2)`` view: any strides.
        down_proj: (E, H, I) frozen (gpt-oss: the ``transpose(1, 2)`` view of its (E, I, H)).
        gate_up_bias, down_bias: (E, 2I), (E, H) or None (gpt-oss has both).
        gate_up_A, gate_up_B: (E, r1, H), (E, 2I, r1): expert e's LoRA on gate_up_proj, or None.
            PEFT's ``ParamWrapper`` keeps them as ``lora_A.weight`` (r1 E, H) and ``lora_B.weight``
            (2I, r1 E): pass ``A.view(E, r1, H)`` and ``B.view(2I, r1, E).permute(2, 0, 1)``, no copy
            (:func:`fastadapt.integrations.peft_moe.lora_factors`).
        gate_up_scaling: its ``lora_alpha / r1`` (rsLoRA: ``/ sqrt(r1)``).
        down_A, down_B, down_scaling: the same for down_proj: (E, r2, I), (E, H, r2).
        activation: ``"silu"``: ``silu(gate) * up`` with ``gate, up = g.chunk(2)`` (Qwen-MoE,
            Mixtral, DeepSeek, OLMoE, GLM); ``"gpt_oss"``: gpt-oss's clamped SwiGLU on interleaved
            gate/up columns, with ``alpha`` and ``limit`` (its config's ``swiglu_alpha`` / ``swiglu_limit``).
        dropout_p: dropout on each LoRA's input in training, one mask per (token, expert) pair as
            PEFT's per-expert ``nn.Linear`` LoRA layers draw them; regenerated from a seed in the
            backward, never stored.

    Returns:
        (T, H) in the compute dtype (x's, or the autocast region's). Gradients flow to x,
        top_k_weights and the LoRA factors (exactly zero for an expert that got no token).

    Equivalent PyTorch::

        out = zeros_like(x)
        for e in range(E):
            t, j = (top_k_index == e).nonzero(as_tuple=True)
            g = x[t] @ gate_up_proj[e].T + gate_up_bias[e] + s1 * (drop(x[t]) @ gate_up_A[e].T) @ gate_up_B[e].T
            h = act(g)
            d = h @ down_proj[e].T + down_bias[e] + s2 * (drop(h) @ down_A[e].T) @ down_B[e].T
            out.index_add_(0, t, d * top_k_weights[t, j, None])
    """
    _checks.tensor("x", x, ndim=2)
    if not isinstance(top_k_index, Tensor):
        raise TypeError(f"top_k_index must be a torch.Tensor, got {type(top_k_index).__name__}")
    if top_k_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"top_k_index must be an int32 or int64 tensor, got {top_k_index.dtype}")
    _checks.tensor("top_k_weights", top_k_weights, ndim=2)
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3)
    _checks.tensor("down_proj", down_proj, ndim=3)
    for name, bias in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
        if bias is not None:
            _checks.tensor(name, bias, ndim=2)
    _checks.same_device(x=x, top_k_index=top_k_index, top_k_weights=top_k_weights, gate_up_proj=gate_up_proj,
                        down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias, gate_up_A=gate_up_A,
                        gate_up_B=gate_up_B, down_A=down_A, down_B=down_B)
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or top_k_index.shape[1] == 0:
        raise ValueError(f"top_k_index must have shape (T, k) = ({T}, k >= 1) (one row per token of x), "
                         f"got {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
                         f"got {tuple(top_k_weights.shape)}")
    if E == 0 or H == 0 or two_i == 0:
        raise ValueError(f"gate_up_proj has an empty dimension: shape {tuple(gate_up_proj.shape)}")
    if two_i % 2:
        raise ValueError(f"gate_up_proj.shape[1] (2 x intermediate) must be even (gate and up), got {two_i}")
    n_mid = two_i // 2
    _checks.dim_equal("gate_up_proj.shape[2] (hidden, x.shape[1])", gate_up_proj.shape[2], H)
    _checks.dim_equal("down_proj.shape[0] (experts)", down_proj.shape[0], E)
    _checks.dim_equal("down_proj.shape[1] (hidden)", down_proj.shape[1], H)
    _checks.dim_equal("down_proj.shape[2] (intermediate, gate_up_proj.shape[1] / 2)", down_proj.shape[2], n_mid)
    if gate_up_bias is not None:
        _checks.dim_equal("gate_up_bias.shape[0] (experts)", gate_up_bias.shape[0], E)
        _checks.dim_equal("gate_up_bias.shape[1] (2 x intermediate)", gate_up_bias.shape[1], two_i)
    if down_bias is not None:
        _checks.dim_equal("down_bias.shape[0] (experts)", down_bias.shape[0], E)
        _checks.dim_equal("down_bias.shape[1] (hidden)", down_bias.shape[1], H)
    _lora_pair("gate_up", gate_up_A, gate_up_B, E, H, two_i)
    _lora_pair("down", down_A, down_B, E, n_mid, H)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    gate_up_scaling = _checks.finite_float("gate_up_scaling", gate_up_scaling)
    down_scaling = _checks.finite_float("down_scaling", down_scaling)
    alpha = _checks.finite_float("alpha", alpha)
    limit = _checks.finite_float("limit", limit)
    p = _checks.probability("dropout_p", dropout_p) if training else 0.0
    _frozen(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias)
    dtype = _autocast.autocast_dtype(x)
    if dtype is None:
        _checks.same_dtype(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias,
                           down_bias=down_bias)
        dtype = x.dtype
    torch._assert_async(((top_k_index >= 0) & (top_k_index < E)).all(),
                        f"top_k_index must be in [0, {E}) (E = gate_up_proj.shape[0] experts)")
    lora = gate_up_A is not None or down_A is not None
    # Drawn on the CPU generator: no device sync, and torch.compile traces it.
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0.0 and lora else None

    def cast(t):
        return None if t is None else t.to(dtype)

    return MOE_LORA_EXPERTS(x, top_k_index.to(torch.int64), top_k_weights, gate_up_proj, gate_up_bias, down_proj,
                            down_bias, cast(gate_up_A), cast(gate_up_B), gate_up_scaling, cast(down_A), cast(down_B),
                            down_scaling, activation, alpha, limit, p if seed is not None else 0.0, seed)[0]


# ---------------------------------------------------------------------------------------------
# Backends

CAPABILITIES = Capabilities("x", ("x", "gate_up_proj", "gate_up_bias", "down_proj", "down_bias", "gate_up_A",
                                  "gate_up_B", "down_A", "down_B"))
_KERNELS = "fastadapt.kernels.moe_lora"
dispatch.register(OP, "triton", capabilities=CAPABILITIES, forward=dispatch.lazy(_KERNELS, "forward"),
                  backward=dispatch.lazy(_KERNELS, "backward"), strategy=strategy.MOE_GEMM)


def _native_forward(*args):
    return _native.ops().moe_lora_forward(*args)


def _native_backward(*args):
    needs = [bool(n) for n in args[-1]]
    grads = _native.ops().moe_lora_backward(*args[:-1], needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# csrc/moe_lora.cpp; no CUDA kernel: Triton serves CUDA.
dispatch.register(OP, "cpp", capabilities=CAPABILITIES, forward=_native_forward, backward=_native_backward)
dispatch.register(OP, "reference", forward=reference.forward, backward=None, composite=reference.composite)
