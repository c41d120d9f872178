"""fastadapt.multi_lora_linear (one LoRA adapter per row) against the float64 reference and against
the single-adapter LoRA reference run on each adapter's own rows: output and every gradient, on
every backend that can run here (the Triton kernels through the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from harness import (DEVICES, DTYPES, assert_backward_on_forward_backend, assert_close, backends_for, gpu, nan_like,
                     rel_err)

import fastadapt
from fastadapt import dispatch
from fastadapt.testing import dropout_mask
from fastadapt.reference import lora as lora_reference
from fastadapt.reference import multi_lora as reference
from fastadapt.ops.multi_lora import MULTI_LORA_LINEAR

BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for("multi_lora_linear", d)]
PATTERNS = ["one_adapter", "all_different", "unsorted", "some_base", "absent"]
RANKS = [7, 1, 16, 4]  # r_max 16; adapter 1 of rank 1


def _ids(pattern, rows, n, device, gen):
    if pattern == "one_adapter":
        ids = torch.full((rows,), 2)
    elif pattern == "all_different":
        ids = torch.randperm(rows, generator=gen) % n
    elif pattern == "unsorted":
        ids = torch.randint(0, n, (rows,), generator=gen)
    elif pattern == "some_base":
        ids = torch.randint(-1, n, (rows,), generator=gen)
    elif pattern == "absent":  # adapters 1 and 3 absent
        ids = torch.tensor([0, 2])[torch.randint(0, 2, (rows,), generator=gen)]
    else:
        raise ValueError(pattern)
    return ids.to(device)


def _inputs(lead, n_in, n_out, ranks, dtype, device, bias=True):
    n, r_max = len(ranks), max(ranks)
    x = torch.randn(*lead, n_in, dtype=dtype, device=device)
    weight = torch.randn(n_out, n_in, dtype=dtype, device=device) / n_in**0.5
    A = torch.randn(n, r_max, n_in, dtype=dtype, device=device) / n_in**0.5
    B = torch.randn(n, n_out, r_max, dtype=dtype, device=device) / r_max**0.5
    for a, r in enumerate(ranks):  # padding that would poison any read of it
        A[a, r:] = float("nan")
        B[a, :, r:] = float("nan")
    b = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    return [x, weight, A, B, b]


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _keep(backend, seed, shape, ps, ids, device):
    """The mask the backend drew: each row's from its adapter's probability (same draw for all p)."""
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    for a, p in enumerate(ps):
        if p > 0:
            rows = ids == a
            keep[rows] = dropout_mask(backend, seed, shape, p, device)[rows]
    return keep


def _check(backend, device, dtype, lead, n_in, n_out, ranks, ids, *, bias=True, dropout_p=0.0, scalings=None,
           train_weight=False, noncontig=False, ids_arg=None):
    raw = _inputs(lead, n_in, n_out, ranks, dtype, device, bias)
    if noncontig:  # x as a transposed view: its last dim has stride != 1
        raw[0] = raw[0].transpose(-1, -2).contiguous().transpose(-1, -2).detach()
    n = len(ranks)
    scalings = scalings or [0.5 + a for a in range(n)]
    ours = [_leaf(t) for t in raw]
    ours[1].requires_grad_(train_weight)
    torch.manual_seed(1234)  # the op draws its dropout seed from the default CPU generator
    with dispatch.use_backend(backend):
        y = fastadapt.multi_lora_linear(ours[0], ours[1], ours[2], ours[3], scalings,
                                        ids if ids_arg is None else ids_arg, ours[4], dropout_p=dropout_p,
                                        ranks=ranks)
        gy = torch.randn_like(y)
        y.backward(gy)

    M = raw[0].numel() // n_in
    ids2d = ids.reshape(-1)
    ps = dropout_p if isinstance(dropout_p, list) else [dropout_p] * n
    keep, p_t = None, None
    if any(ps):
        torch.manual_seed(1234)
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        keep = _keep(backend, seed, (M, n_in), ps, ids2d, device)
        p_t = torch.tensor(ps, dtype=torch.float64, device=device)  # the truth's: 1 / (1 - p) unrounded
    ranks_t = torch.tensor(ranks, device=device)

    def reference_run(cast):
        ts = [_leaf(t, cast) for t in raw]
        ts[1].requires_grad_(train_weight)
        out = reference.multi_lora_linear(ts[0].reshape(M, n_in), ts[1], ts[2], ts[3],
                                          torch.tensor(scalings, dtype=torch.float64, device=device), ranks_t, ids2d,
                                          ts[4], keep, p_t)
        out.backward(gy.reshape(M, n_out).to(cast))
        return out.view(y.shape), ts

    y64, ref64 = reference_run(torch.float64)
    y_pt, ref_pt = reference_run(dtype)  # PyTorch's own error in this dtype
    assert_close("y", y, y64, dtype, device, y_pt)
    present = set(ids2d.tolist())
    for name, mine, r64, rpt in zip(["x", "weight", "A_stack", "B_stack", "bias"], ours, ref64, ref_pt):
        if mine is None or not mine.requires_grad:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape
        if name in ("A_stack", "B_stack"):
            # Exactly zero for absent adapters and for the padding beyond each rank.
            for a, r in enumerate(ranks):
                g = mine.grad[a]
                pad = g[r:] if name == "A_stack" else g[:, r:]
                assert torch.equal(pad, torch.zeros_like(pad)), f"grad {name}[{a}] padding is not zero"
                if a not in present:
                    assert torch.equal(g, torch.zeros_like(g)), f"grad {name}[{a}] of an absent adapter is not zero"
            r64.grad.nan_to_num_(0.0)  # the reference's padding grads are zero too: where() masks them
        assert_close(f"grad {name}", mine.grad, r64.grad, dtype, device, rpt.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_id_patterns(backend, device, dtype, pattern):
    gen = torch.Generator().manual_seed(PATTERNS.index(pattern))
    ids = _ids(pattern, 37, len(RANKS), device, gen)
    _check(backend, device, dtype, (37,), 80, 48, RANKS, ids)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("lead,n_in,n_out,ranks", [
    ((1,), 80, 123, [1]),
    ((7,), 123, 80, [7, 3]),
    ((129,), 48, 40, [16, 16, 8]),
    ((2, 5, 7), 33, 17, [2, 5]),
    ((9,), 40, 24, [80, 3]),  # r_max past one rank block (64)
])
def test_shapes(backend, device, lead, n_in, n_out, ranks):
    gen = torch.Generator().manual_seed(0)
    M = torch.Size(lead).numel()
    ids = _ids("some_base", M, len(ranks), device, gen).view(lead)
    _check(backend, device, torch.float32, lead, n_in, n_out, ranks, ids)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("M", [1, 5])
def test_decode_one_adapter_per_row(backend, device, M):
    # Serving: a few rows, each its own adapter among many (most absent), in no order.
    ranks = [4, 8, 2, 8, 1, 8, 3, 5]
    ids = torch.randperm(len(ranks), generator=torch.Generator().manual_seed(M))[:M].to(device)
    _check(backend, device, torch.float32, (M,), 48, 40, ranks, ids)


@gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_no_host_synchronisation(backend):
    # Grouping rows by adapter happens on the device: the forward and backward never wait for it.
    if backend not in backends_for("multi_lora_linear", "cuda"):
        pytest.skip(f"{backend} not available on cuda")
    x, weight, A, B, b = _inputs((64,), 128, 96, [16, 8, 16], torch.float16, "cuda")
    A, B, x = _leaf(A.nan_to_num()), _leaf(B.nan_to_num()), _leaf(x)
    ids = torch.randint(-1, 3, (64,), device="cuda")
    scalings, ranks, p = (torch.tensor(v, device="cuda") for v in ([0.5, 1.0, 2.0], [16, 8, 16], [0.1, 0.0, 0.2]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with dispatch.use_backend(backend):
            y = fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids, b, dropout_p=p, ranks=ranks)
            y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(A.grad).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("variant", ["no_bias", "noncontiguous_x", "trainable_weight", "per_sequence_ids",
                                     "one_sequence", "int32_ids"])
def test_variants(backend, device, variant):
    gen = torch.Generator().manual_seed(1)
    lead = {"noncontiguous_x": (37,), "one_sequence": (1, 11)}.get(variant, (3, 11))
    rows = _ids("some_base", torch.Size(lead).numel(), len(RANKS), device, gen).view(lead)
    kwargs = {"no_bias": dict(bias=False), "noncontiguous_x": dict(noncontig=True),
              "trainable_weight": dict(train_weight=True), "per_sequence_ids": {}, "one_sequence": {},
              "int32_ids": {}}[variant]
    if variant in ("per_sequence_ids", "one_sequence"):  # one sequence: a stride-0 view of one id
        per_seq = torch.tensor([2, -1, 0][:lead[0]], device=device)
        rows = per_seq[:, None].expand(lead)
        kwargs["ids_arg"] = per_seq
    if variant == "int32_ids":
        kwargs["ids_arg"] = rows.int()
    _check(backend, device, torch.float32, lead, 80, 48, RANKS, rows, **kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_per_adapter_tensors_in_any_layout(backend, device, layout):
    # adapter_ids, scalings, ranks and dropout_p as views give the bits of their contiguous copies.
    # Read with stride 1 they gave another y (strided) or read past their storage (expanded, the
    # stride 0 of one value for all: what a batch of one sequence makes of its per-sequence id).
    M, n = 37, len(RANKS)

    def view(values, junk, dtype):
        if layout == "strided":  # every other element; the ones in between would be out of range
            return torch.tensor([v for x in values for v in (x, junk)], dtype=dtype, device=device)[::2]
        return torch.tensor(values[:1], dtype=dtype, device=device).expand(len(values))  # the first for all

    ranks = [7, 1, 16, 4] if layout == "strided" else [7] * n
    ids = _ids("some_base", M, n, "cpu", torch.Generator().manual_seed(5)).tolist()
    views = (view([0.5, 1.0, 1.5, 2.0], 1e4, torch.float32), view(ranks, 99, torch.int32),
             view([0.3, 0.0, 0.5, 0.2], 2.0, torch.float32), view(ids, n + 7, torch.int64))
    x, weight, A, B, b = _inputs((M,), 80, 48, ranks, torch.float32, device)
    gy = torch.randn(M, 48, device=device)

    def run(scalings, ranks_t, dropout_p, ids):
        leaves = [_leaf(t) for t in (x, A, B, b)]
        torch.manual_seed(1234)
        with dispatch.use_backend(backend):
            y = fastadapt.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], scalings, ids, leaves[3],
                                            dropout_p=dropout_p, ranks=ranks_t)
        y.backward(gy)
        return [y] + [t.grad for t in leaves]

    assert all(not v.is_contiguous() for v in views)
    for name, got, want in zip(["y", "grad x", "grad A_stack", "grad B_stack", "grad bias"], run(*views),
                               run(*(v.contiguous() for v in views))):
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_same_mask_forward_and_backward(backend, device, dtype):
    # One probability per adapter, adapter 1 without dropout; some rows base-only.
    gen = torch.Generator().manual_seed(3)
    ids = _ids("some_base", 37, len(RANKS), device, gen)
    _check(backend, device, dtype, (37,), 80, 48, RANKS, ids, dropout_p=[0.3, 0.0, 0.5, 0.1])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_dropout_near_one_scales_exactly(backend, device):
    # 1 / (1 - p) from p rounded to float32 is 1.3e-5 off at p = 0.999, past float32's bound: the
    # probabilities travel in float64 whatever the dtype.
    gen = torch.Generator().manual_seed(4)
    ids = _ids("some_base", 300, len(RANKS), device, gen)
    _check(backend, device, torch.float32, (300,), 40, 24, RANKS, ids, dropout_p=[0.999, 0.0, 0.99, 0.9999])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_dropout_drops_per_adapter(backend, device):
    # With x = 1, A = 1, B = 1 and scaling 1, each row's update is the count of kept inputs / (1 - p):
    # its expectation is K whatever p, and it varies with p as K p / (1 - p).
    M, K, N = 256, 64, 16
    n_ids = torch.arange(M, device=device) % 3
    x = torch.ones(M, K, device=device)
    w = torch.zeros(N, K, device=device)
    A, B = torch.ones(3, 1, K, device=device), torch.ones(3, N, 1, device=device)
    with dispatch.use_backend(backend):
        y = fastadapt.multi_lora_linear(x, w, A, B, 1.0, n_ids, dropout_p=[0.0, 0.25, 0.5])[:, 0]
    kept = [y[n_ids == a] * (1 - p) for a, p in enumerate([0.0, 0.25, 0.5])]
    assert torch.equal(kept[0], torch.full_like(kept[0], K))
    for k, p in zip(kept[1:], [0.25, 0.5]):  # about 85 rows x 64 Bernoulli(1 - p) draws: 5 sigma
        frac = k.mean().item() / K
        assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / k.numel() / K) ** 0.5
        assert k.std() > 0  # masks differ between rows


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_backward_runs_on_the_forward_backend(backend, device):
    # Each backend regenerates its own dropout masks: a backward under another forced backend must
    # still be the forward backend's.
    raw = _inputs((2, 9), 48, 32, [4, 2], torch.float32, device)
    raw[2], raw[3] = raw[2].nan_to_num(), raw[3].nan_to_num()
    ids = torch.tensor([1, 0], device=device)
    gy = torch.randn(2, 9, 32, device=device)
    assert_backward_on_forward_backend(
        "multi_lora_linear", backend, device,
        lambda x, w, A, B, b: fastadapt.multi_lora_linear(x, w, A, B, [0.5, 2.0], ids, b, dropout_p=[0.3, 0.2]),
        raw, gy, ["x", "weight", "A_stack", "B_stack", "bias"])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dropout_p,autocast", [(0.0, False), (0.3, False), (0.0, True)])
def test_eager_path_matches_the_custom_op(backend, device, dropout_p, autocast):
    # Eager calls go through an autograd.Function (fastadapt/ops/_declare.py), torch.compile through
    # the custom op: the same backend functions, the same autocast rule (scalings kept float32,
    # dropout float64), so the same bits.
    tensors = _inputs((3, 5), 48, 40, [4, 2], torch.float32, device)
    ids = torch.tensor([1, -1, 0, 1, 0] * 3, device=device)
    scalings, ranks = torch.tensor([0.5, 2.0], device=device), torch.tensor([4, 2], dtype=torch.int32, device=device)
    results = []
    for eager in (True, False):
        x, A, B, b = (_leaf(t) for t in (tensors[0], *tensors[2:]))
        torch.manual_seed(11)
        with dispatch.use_backend(backend), torch.autocast(device, torch.bfloat16, enabled=autocast):
            if eager:
                y = fastadapt.multi_lora_linear(x, tensors[1], A, B, scalings, ids.view(3, 5), b,
                                                dropout_p=dropout_p, ranks=ranks)
            else:
                p = torch.full((2,), dropout_p, dtype=torch.float64, device=device) if dropout_p else None
                seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p else None
                y = torch.ops.fastadapt.multi_lora_linear(x, tensors[1], A, B, scalings, ranks, ids, b, p, seed)[0]
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, A.grad, B.grad, b.grad])
    for name, mine, op in zip(["y", "x", "A_stack", "B_stack", "bias"], *results):
        torch.testing.assert_close(mine, op, rtol=0, atol=0, equal_nan=True, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_a_non_finite_row_reaches_no_other_adapter(backend, device):
    # An inf in a base-only row (and in its output gradient) is that row's alone: every adapter's
    # gradient stays finite and the padding's exactly zero.
    x, weight, A, B, b = _inputs((6,), 24, 16, RANKS, torch.float32, device)
    ids = torch.tensor([0, -1, 1, 2, -1, 3], device=device)
    x[1, 3] = float("inf")
    x, A, B = _leaf(x), _leaf(A), _leaf(B)
    with dispatch.use_backend(backend):
        y = fastadapt.multi_lora_linear(x, weight, A, B, [0.5, 1.0, 2.0, 0.25], ids, b, ranks=RANKS)
    gy = torch.randn_like(y)
    gy[4, 2] = float("inf")
    with dispatch.use_backend(backend):
        y.backward(gy)
    assert torch.isfinite(y[ids >= 0]).all() and torch.isfinite(x.grad[ids >= 0]).all()
    for grad in (A.grad, B.grad.transpose(1, 2)):
        for a, r in enumerate(RANKS):
            assert torch.isfinite(grad[a, :r]).all(), (a, grad[a, :r])
            assert (grad[a, r:] == 0).all(), (a, grad[a, r:])


def test_reference_is_lora_per_adapter():
    # The multi-adapter reference is the single-adapter one run on each adapter's own rows.
    gen = torch.Generator().manual_seed(5)
    x, weight, A, B, b = _inputs((41,), 24, 20, RANKS, torch.float64, "cpu")
    ids = _ids("some_base", 41, len(RANKS), "cpu", gen)
    scalings = [0.5, 2.0, 1.5, 3.0]
    y = reference.multi_lora_linear(x, weight, A, B, torch.tensor(scalings, dtype=torch.float64),
                                    torch.tensor(RANKS), ids, b)
    expected = torch.nn.functional.linear(x, weight, b)
    for a, r in enumerate(RANKS):
        rows = ids == a
        expected[rows] = lora_reference.lora_linear(x[rows], weight, A[a, :r], B[a, :, :r], scalings[a], b)
    assert rel_err(y, expected) < 1e-12


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_eval_mode_has_no_dropout(backend, device):
    x, weight, A, B, b = _inputs((9,), 48, 32, [4, 2], torch.float32, device)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0], device=device)
    with dispatch.use_backend(backend):
        y = fastadapt.multi_lora_linear(x, weight, A, B, [2.0, 1.0], ids, b, dropout_p=0.5, training=False,
                                        ranks=[4, 2])
    y64 = reference.multi_lora_linear(x.double(), weight.double(), A.double(), B.double(),
                                      torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([4, 2]), ids,
                                      b.double())
    assert rel_err(y, y64) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_empty_batch(backend, device):
    x, weight, A, B, b = _inputs((0,), 48, 32, [4], torch.float32, device)
    with dispatch.use_backend(backend):
        y = fastadapt.multi_lora_linear(x, weight, A, B, [2.0], torch.zeros(0, dtype=torch.long, device=device), b)
    assert y.shape == (0, 32)


def test_adapter_weights_in_float32_with_half_input():
    x, weight, A, B, b = _inputs((11,), 48, 32, [4, 4], torch.bfloat16, "cpu")
    A32, B32 = _leaf(A, torch.float32), _leaf(B, torch.float32)
    ids = torch.tensor([0, 1] * 5 + [-1])
    y = fastadapt.multi_lora_linear(x, weight, A32, B32, [2.0, 0.5], ids, b)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and A32.grad.dtype == torch.float32 and B32.grad.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_autocast_keeps_scalings_in_float32(backend, device):
    # Under autocast x, weight and the stacks run in bf16; the scalings must not be rounded to it.
    x, weight, A, B, b = _inputs((3, 7), 80, 48, [7, 7], torch.float32, device)
    ids = torch.tensor([0, 1, -1], device=device)
    scalings = [1 / 3, 1.0 + 2**-10]  # not representable in bf16
    leaves = [_leaf(t) for t in (x, A, B)]
    with dispatch.use_backend(backend), torch.autocast(device, torch.bfloat16):
        y = fastadapt.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], scalings, ids, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    exact = [t.to(torch.bfloat16).double() for t in (x, weight, A, B, b)]
    y64 = reference.multi_lora_linear(exact[0].reshape(21, 80), exact[1], exact[2], exact[3],
                                      torch.tensor(scalings, dtype=torch.float64), torch.tensor([7, 7]),
                                      ids[:, None].expand(3, 7).reshape(-1), exact[4])
    assert_close("y", y.reshape(21, 48), y64, torch.bfloat16, device)


def test_triton_launchers_write_every_element():
    if "triton" not in backends_for("multi_lora_linear", "cpu"):
        pytest.skip("triton backend not available on the CPU here (needs TRITON_INTERPRET=1)")
    from fastadapt.kernels import multi_lora as kernels

    M, K, N = 37, 80, 48
    x, weight, A, B, _ = _inputs((M,), K, N, RANKS, torch.float32, "cpu")
    ids = _ids("some_base", M, len(RANKS), "cpu", torch.Generator().manual_seed(2))
    ranks, scalings = torch.tensor(RANKS, dtype=torch.int32), torch.tensor([0.5, 1.0, 1.5, 2.0])
    _, u = reference.forward(x.double(), weight.double(), A.double(), B.double(), scalings.double(), ranks, ids,
                             None, None, 0)
    gy = torch.randn(M, N)
    expected = torch.stack([gy.double().t() @ torch.where((ids == a)[:, None], u, 0.0) for a in range(4)])
    batch = kernels.Batch(ids, scalings, ranks)
    for splits in (1, 3):  # 3 splits of each adapter's rows accumulate with atomics
        gBt = kernels.multi_reduce(u.float(), gy, batch, nan_like(torch.empty(4, N, 16)).transpose(1, 2),
                                   splits=splits).transpose(1, 2)
        assert rel_err(gBt, expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_selects_triton_first_and_falls_back(device):
    x, weight, A, B, b = _inputs((3,), 16, 8, [2], torch.float64, device)
    reasons = dispatch.explain("multi_lora_linear", x=x, weight=weight, A_stack=A, B_stack=B, bias=b)
    assert any("float64" in r for r in reasons["triton"])
    with pytest.raises(fastadapt.BackendUnavailableError, match="float64"):
        with dispatch.use_backend("triton"):
            fastadapt.multi_lora_linear(x, weight, A, B, [1.0], torch.zeros(3, dtype=torch.long, device=device), b)


def _bad(args, **kw):
    x, weight, A, B, b, ids = args
    fastadapt.multi_lora_linear(x, weight, A, B, kw.pop("scalings", [1.0, 2.0]), ids, b, **kw)


@pytest.mark.parametrize("mutate,kwargs,error,match", [
    (lambda a: a.__setitem__(0, a[0][..., :-1]), {}, ValueError, "in_features"),
    (lambda a: a.__setitem__(2, a[2][:, :, :-1]), {}, ValueError, r"A_stack.shape\[2\]"),
    (lambda a: a.__setitem__(3, a[3][:1]), {}, ValueError, r"B_stack.shape\[0\] \(adapters\)"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), {}, ValueError, r"B_stack.shape\[1\]"),
    (lambda a: a.__setitem__(3, a[3][:, :, :-1]), {}, ValueError, r"B_stack.shape\[2\] \(r_max\)"),
    (lambda a: a.__setitem__(2, a[2][:, :0]), {}, ValueError, "rank >= 1"),
    (lambda a: a.__setitem__(2, a[2][0]), {}, ValueError, "A_stack must have 3 dimensions"),
    (lambda a: a.__setitem__(4, a[4][:-1]), {}, ValueError, "bias"),
    (lambda a: a.__setitem__(1, a[1].double()), {}, TypeError, "weight: torch.float64"),
    (lambda a: a.__setitem__(5, a[5].float()), {}, TypeError, "adapter_ids must be an int32 or int64"),
    (lambda a: a.__setitem__(5, [0, 1]), {}, TypeError, "adapter_ids must be a torch.Tensor"),
    (lambda a: a.__setitem__(5, a[5][:-1]), {}, ValueError, r"adapter_ids must have shape"),
    (lambda a: a[5].__setitem__(0, 2), {}, RuntimeError, r"adapter_ids must be in \[-1, 2\)"),
    (lambda a: a[5].__setitem__(0, -2), {}, RuntimeError, r"adapter_ids must be in \[-1, 2\)"),
    (lambda a: None, dict(ranks=[2, 4]), ValueError, r"ranks must be ints in \[1, r_max = 3\]"),
    (lambda a: None, dict(ranks=[0, 1]), ValueError, "ranks must be ints"),
    (lambda a: None, dict(ranks=[1]), ValueError, "ranks has 1 values, expected 2"),
    (lambda a: None, dict(ranks=torch.tensor([1, 4])), RuntimeError, r"ranks must be in \[1, r_max = 3\]"),
    (lambda a: None, dict(ranks=torch.tensor([1.0, 2.0])), TypeError, "ranks must be an integer tensor"),
    (lambda a: None, dict(scalings=[1.0]), ValueError, "scalings has 1 values, expected 2"),
    (lambda a: None, dict(scalings=[1.0, float("nan")]), ValueError, "scalings must be finite"),
    (lambda a: None, dict(scalings=torch.ones(3)), ValueError, r"scalings must have shape \(2,\)"),
    (lambda a: None, dict(dropout_p=[0.1, 1.0]), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: None, dict(dropout_p=torch.tensor([0.1, 1.5])), RuntimeError, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_input(mutate, kwargs, error, match):
    x, weight, A, B, b = _inputs((5,), 16, 8, [3, 3], torch.float32, "cpu")
    args = [x, weight, A.nan_to_num(), B.nan_to_num(), b, torch.tensor([0, 1, -1, 1, 0])]
    mutate(args)
    with pytest.raises(error, match=match):
        _bad(args, **kwargs)


def test_opcheck():
    x, weight, A, B, b = _inputs((2, 5), 16, 8, [3, 2], torch.float32, "cpu")
    A, B = A.nan_to_num(), B.nan_to_num()
    ids = torch.tensor([[0, 1, -1, 1, 0], [1, 1, 0, -1, -1]])
    scalings, ranks = torch.tensor([0.5, 2.0]), torch.tensor([3, 2], dtype=torch.int32)
    for bias in (b, None):
        for p, seed in ((None, None), (torch.tensor([0.2, 0.0]), torch.tensor(7))):
            args = (x.requires_grad_(), weight, A.requires_grad_(), B.requires_grad_(), scalings, ranks, ids, bias, p,
                    seed)
            torch.library.opcheck(torch.ops.fastadapt.multi_lora_linear.default, args)
    for bias, needs in ((b, [True, True, True, True, False]), (None, [False, True, True, False, True])):
        args = (x.detach(), weight, A.detach(), B.detach(), scalings, ranks, ids, bias, None, None)
        output = torch.ops.fastadapt.multi_lora_linear(*args)
        torch.library.opcheck(torch.ops.fastadapt.multi_lora_linear_backward.default,
                              MULTI_LORA_LINEAR.backward_inputs(args, output, needs))


def test_compile_fullgraph():
    x, weight, A, B, b = _inputs((2, 5), 16, 8, [3, 2], torch.float32, "cpu")
    A, B = _leaf(A.nan_to_num()), _leaf(B.nan_to_num())
    ids = torch.tensor([1, -1])  # per sequence
    scalings, ranks = torch.tensor([0.5, 2.0]), torch.tensor([3, 2])

    def step(x, A, B, ids):
        return fastadapt.multi_lora_linear(x, weight, A, B, scalings, ids, b, dropout_p=[0.1, 0.2], ranks=ranks)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(x, A, B, ids)
    y.sum().backward()
    grads = (A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    torch.manual_seed(0)
    y_eager = step(x, A, B, ids)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grads, (A.grad, B.grad))
