"""Compile every Triton kernel of fastadapt to a CUDA cubin, without a GPU.

The CPU interpreter, in which the test suite runs the kernels, accepts code that the compiler
rejects (dot operands smaller than 16, loop-carried values that change type, constexpr branches it
never takes). This script runs the kernels' own launchers on meta tensors (no memory, no device)
over a grid of inputs, with Triton's launch intercepted: each launch is recorded as the kernel
would be specialised on a GPU (argument types, divisibility, the constexprs the launcher passes)
and, for an autotuned kernel, once per autotune config its pruning keeps. Distinct launches are
then compiled with Triton's own front end and bundled ptxas for a GPUTarget, and the result is
checked: shared memory against the device limit (Triton only checks it at load time, on the GPU),
dot precision and atomics in the Triton IR (:func:`ttir_problems`), grid size.

The launches are derived from the launchers, never listed by hand: a new constexpr or config shows
up here by itself. By default a cover of them is compiled for sm_90: a hundred-odd launches in
which every kernel, every value of each of its constexprs, every pointer dtype and every autotune
config occur at least once (about 1.5 CPU-minutes cold). ``--full`` compiles every combination
of constexpr values on sm_90 and every value and config for each dtype on sm_90 and sm_80 (about
2600 launches, CPU-hours).

Usage, from the repository root (the Triton compiled against is whichever this Python imports)::

    python tests/compile_check.py                 # the cover (tests/test_compile.py runs it in CI)
    python tests/compile_check.py --full -j 8     # every combination, 8 compiler processes
    .venv36/bin/python tests/compile_check.py     # against another Triton, e.g. the GPU image's 3.6

Exits non-zero if any launch fails to compile or breaks a check; prints one line per failure.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, don't interpret

import argparse  # noqa: E402
import contextlib  # noqa: E402
import heapq  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ARCHS = (90, 80)
# cudaDevAttrMaxSharedMemoryPerBlockOptin: H100 227 KB, A100 163 KB (the 228 / 164 KB of the
# datasheets less the 1 KB the driver reserves per block).
SHARED_LIMIT = {90: 232448, 80: 166912}
GRID_LIMIT = (2**31 - 1, 65535, 65535)
# fp32 in both precisions the launchers pick from torch's matmul setting (dot_constexprs).
DTYPES = (("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
          ("fp16", torch.float16, "highest"), ("bf16", torch.bfloat16, "highest"))


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    tuner: Autotuner | None  # None for a plain launch
    origin: str


@dataclass
class Job:
    kernel: JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    grid: tuple
    config: str
    origin: str
    consts: dict = field(default_factory=dict)  # the declared constexprs, by name
    dtypes: tuple = ()  # pointer argument types

    def features(self, full: bool) -> set:
        """What compiling this job checks. The cover: every kernel, every value of each of its
        constexprs, every pointer dtype and every autotune config, on each arch. Full: every
        combination of constexpr values on sm_90, and every value and every config for each dtype
        on each arch."""
        name = self.kernel.__name__
        if not full:
            return {(self.arch, *f) for f in ({("kernel", name), ("config", name, self.config)} | {
                ("const", name, n, repr(v)) for n, v in self.consts.items()} | {
                ("dtype", name, i, t) for i, t in enumerate(self.dtypes)})}
        dtype = (self.dtypes, self.consts.get("PRECISION"))
        return ({("combo", name, repr(sorted(self.consts.items())))} if self.arch == 90 else set()) | {
            ("config", name, self.config, dtype, self.arch)} | {
            ("const", name, n, repr(v), dtype, self.arch) for n, v in self.consts.items()}

    def cost(self) -> float:
        """A guess at the compile time, so that the cover picks cheap jobs: measured on Triton 3.9,
        fp32 dots in IEEE precision compile ~4x slower than tf32/bf16 ones, every enabled feature
        flag adds code, larger tiles take longer."""
        tiles = 1
        for n, v in self.consts.items():
            if n.startswith("BLOCK_"):
                tiles *= v
        flags = sum(v is True for v in self.consts.values())
        ieee = self.consts.get("PRECISION") == "ieee" and "*fp32" in self.dtypes
        return (1 + flags) * (4 if ieee else 1) * (tiles / 4096) ** 0.5

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.consts.items())
        return f"{self.kernel.__name__} sm_{self.arch} [{self.config}] {consts} ({self.origin})"


def _declared(kernel) -> set:
    return {p.name for p in kernel.params if p.is_constexpr}


# ---------------------------------------------------------------------------------------------
# Recording: the launchers run on meta tensors and Triton's launch is intercepted.

_recorded: list[Launch] = []
_origin = ""


def _record_jit(self, *args, grid, warmup, **kwargs):
    _recorded.append(Launch(self, args, kwargs, grid, None, _origin))


def _record_autotuned(self, *args, grid=None, warmup=False, **kwargs):
    _recorded.append(Launch(self.fn, args, kwargs, grid, self, _origin))


@contextlib.contextmanager
def _intercept():
    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = _record_jit, _record_autotuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


@contextlib.contextmanager
def _setting(name: str, dtype_name: str, env: dict | None = None):
    global _origin
    prec = dict((n, p) for n, _, p in DTYPES)[dtype_name]
    old_prec = torch.get_float32_matmul_precision()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    torch.set_float32_matmul_precision(prec)
    os.environ.update(env or {})
    _origin = f"{name} {dtype_name}" + "".join(f" {k}={v}" for k, v in (env or {}).items())
    try:
        yield dict((n, d) for n, d, _ in DTYPES)[dtype_name]
    finally:
        torch.set_float32_matmul_precision(old_prec)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def _lora_grid():
    from fastadapt.kernels import common, lora
    # (M, K, N, R): decode M=1, odd sizes, aligned sizes (divisibility specialisations), r past 64.
    shapes = ((1, 4096, 4096, 16), (129, 80, 123, 7), (2048, 4096, 11008, 64), (7, 123, 80, 128))
    for dname, *_ in DTYPES:
        for gemm in ("torch", "triton"):
            for M, K, N, R in shapes:
                for bias in (False, True):
                    for p in (0.0, 0.1):
                        with _setting(f"lora M={M} K={K} N={N} r={R} bias={bias} p={p}", dname,
                                      {lora.GEMM_ENV: gemm}) as dt:
                            x = _meta(M, K, dtype=dt)
                            W, A, B = _meta(N, K, dtype=dt), _meta(R, K, dtype=dt), _meta(N, R, dtype=dt)
                            b = _meta(N, dtype=dt) if bias else None
                            y, u = lora.forward(x, W, A, B, 0.5, b, p, 1)
                            lora.backward(y, x, W, A, B, u, 0.5, p, 1, (True,) * 5)
                            # Split M reductions (atomics) are chosen from the SM count of a CUDA device.
                            lora.lora_reduce(u, x, 1.0, _meta(R, K, dtype=torch.float32), dropout_p=p, seed=1,
                                             splits=3)
        with _setting("lora non-contiguous x", dname) as dt:
            x = _meta(300, 96, dtype=dt).t()
            y, u = lora.forward(x, _meta(64, 300, dtype=dt), _meta(16, 300, dtype=dt), _meta(64, 16, dtype=dt),
                                2.0, None, 0.1, 1)
            lora.backward(y, x, _meta(64, 300, dtype=dt), _meta(16, 300, dtype=dt), _meta(64, 16, dtype=dt), u,
                          2.0, 0.1, 1, (True,) * 5)
    with _setting("dropout_keep", "fp32"):
        common.dropout_keep(1, (129, 123), 0.1, "meta")


def _dora_grid():
    from fastadapt.kernels import dora
    from fastadapt.strategy import DORA_NORM
    # As LoRA's: decode M=1, odd sizes, aligned sizes, r past 64 (the norm's r loop); each shape
    # under both strategies (the norm in the GEMM, or its own kernel beside cuBLAS).
    shapes = ((1, 4096, 4096, 16), (129, 80, 123, 7), (2048, 4096, 11008, 64), (7, 123, 80, 128))
    norms = (DORA_NORM.fused, DORA_NORM.split)
    for dname, *_ in DTYPES:
        for (M, K, N, R), norm in itertools.product(shapes, norms):
            for bias in (False, True):
                for p in (0.0, 0.1):
                    with _setting(f"dora M={M} K={K} N={N} r={R} bias={bias} p={p}", dname,
                                  {DORA_NORM.env: norm}) as dt:
                        x = _meta(M, K, dtype=dt)
                        W, A, B = _meta(N, K, dtype=dt), _meta(R, K, dtype=dt), _meta(N, R, dtype=dt)
                        m, b = _meta(N, dtype=torch.float32), _meta(N, dtype=dt) if bias else None
                        y, u, pre, n = dora.forward(x, W, A, B, m, 0.5, b, p, 1)
                        dora.backward(y, x, W, A, B, m, u, pre, n, 0.5, p, 1, (True,) * 5 + (False,))
                        # Split reductions (atomics) are chosen from the SM count of a CUDA device.
                        dora.dora_colsum(y, pre, n, _meta(N, dtype=torch.float32),
                                         _meta(N, dtype=torch.float32) if bias else None, splits=3)
                        dora.weight_norm(W, A, B, 0.5, _meta(N, dtype=torch.float32), splits=3)
        for norm in norms:
            with _setting("dora non-contiguous x, transposed weight", dname, {DORA_NORM.env: norm}) as dt:
                x = _meta(300, 96, dtype=dt).t()
                W = _meta(300, 64, dtype=dt).t()
                args = (x, W, _meta(16, 300, dtype=dt), _meta(64, 16, dtype=dt), _meta(64, dtype=torch.float32))
                y, u, pre, n = dora.forward(*args, 2.0, None, 0.1, 1)
                dora.backward(y, *args, u, pre, n, 2.0, 0.1, 1, (True,) * 5 + (False,))


def _multi_lora_grid():
    from fastadapt.kernels import multi_lora as ml
    # (M, K, N, n, r_max): decode M=1 with many adapters, odd sizes, aligned sizes, r past 64.
    shapes = ((1, 4096, 4096, 16, 16), (129, 80, 123, 3, 7), (8192, 4096, 4096, 4, 16), (7, 123, 80, 2, 128))
    for dname, *_ in DTYPES:
        for M, K, N, n, R in shapes:
            for bias in (False, True):
                for dropout in (False, True):
                    with _setting(f"multi_lora M={M} K={K} N={N} n={n} r={R} bias={bias} dropout={dropout}",
                                  dname) as dt:
                        x = _meta(M, K, dtype=dt)
                        W, A, B = _meta(N, K, dtype=dt), _meta(n, R, K, dtype=dt), _meta(n, N, R, dtype=dt)
                        b = _meta(N, dtype=dt) if bias else None
                        scalings, ranks = _meta(n, dtype=torch.float32), _meta(n, dtype=torch.int32)
                        p = _meta(n, dtype=torch.float32) if dropout else None
                        ids = _meta(M, dtype=torch.int64)
                        y, u = ml.forward(x, W, A, B, scalings, ranks, ids, b, p, 1)
                        ml.backward(y, x, W, A, B, u, scalings, ranks, ids, p, 1, (True,) * 5)
                        # Split chunks of each adapter's rows (atomics) are chosen from the SM count of a CUDA device.
                        ml.multi_reduce(u, x, ml.Batch(ids, scalings, ranks, p), _meta(n, R, K, dtype=torch.float32),
                                        dropout=True, seed=1, splits=3)
        with _setting("multi_lora non-contiguous x", dname) as dt:
            x = _meta(300, 96, dtype=dt).t()
            n, ids = 3, _meta(96, dtype=torch.int64)
            W, A, B = _meta(64, 300, dtype=dt), _meta(n, 16, 300, dtype=dt), _meta(n, 64, 16, dtype=dt)
            scalings, ranks = _meta(n, dtype=torch.float32), _meta(n, dtype=torch.int32)
            y, u = ml.forward(x, W, A, B, scalings, ranks, ids, None, scalings, 1)
            ml.backward(y, x, W, A, B, u, scalings, ranks, ids, scalings, 1, (True,) * 5)


def _moe_lora_grid():
    from fastadapt.kernels import moe_lora as moe
    # (T, H, I, E, k, r): decode T=1, odd sizes, Qwen3-30B-A3B's and gpt-oss-20b's experts (the
    # benchmark's shapes). On meta tensors torch._grouped_mm never serves: each product runs the
    # Triton grouped GEMM, whose launches are what is recorded here.
    shapes = ((1, 2048, 768, 128, 8, 16), (7, 123, 37, 5, 2, 3), (4096, 2048, 768, 128, 8, 16),
              (4096, 2880, 2880, 32, 4, 16))
    for dname, *_ in DTYPES:
        for T, H, I, E, k, R in shapes:
            for activation, bias in (("silu", False), ("gpt_oss", True)):
                for p in (0.0, 0.1):
                    with _setting(f"moe_lora T={T} H={H} I={I} E={E} k={k} r={R} {activation} p={p}", dname) as dt:
                        x, idx, w = _meta(T, H, dtype=dt), _meta(T, k, dtype=torch.int64), _meta(T, k, dtype=dt)
                        W1, W2 = _meta(E, 2 * I, H, dtype=dt), _meta(E, H, I, dtype=dt)
                        b1, b2 = (_meta(E, 2 * I, dtype=dt), _meta(E, H, dtype=dt)) if bias else (None, None)
                        lora = (_meta(E, R, H, dtype=dt), _meta(E, 2 * I, R, dtype=dt), 0.5,
                                _meta(E, R, I, dtype=dt), _meta(E, H, R, dtype=dt), 2.0)
                        out = moe.forward(x, idx, w, W1, b1, W2, b2, *lora, activation, 1.702, 7.0, p, 1)
                        moe.backward(out[0], x, idx, w, W1, W2, *lora, activation, 1.702, 7.0, p, 1, *out[1:],
                                     (True,) * 6)
        with _setting("moe_lora transposed weights (gpt-oss's storage), float32 routing", dname) as dt:
            T, H, I, E, k = 9, 64, 32, 4, 2
            x, idx, w = _meta(T, H, dtype=dt), _meta(T, k, dtype=torch.int64), _meta(T, k, dtype=torch.float32)
            W1, W2 = _meta(E, H, 2 * I, dtype=dt).transpose(1, 2), _meta(E, I, H, dtype=dt).transpose(1, 2)
            lora = (None, None, 1.0, _meta(E, 4, I, dtype=dt), _meta(E, H, 4, dtype=dt), 2.0)
            out = moe.forward(x, idx, w, W1, None, W2, None, *lora, "silu", 1.702, 7.0, 0.0, 1)
            moe.backward(out[0], x, idx, w, W1, W2, *lora, "silu", 1.702, 7.0, 0.0, 1, *out[1:], (True,) * 6)


def _qlora_grid():
    from fastadapt.kernels import qlora
    from fastadapt.reference.qlora import QuantizedWeight
    from fastadapt.strategy import QLORA_DEQUANT
    # (M, K, N, R): decode M=1, odd sizes (blocks spanning rows), aligned sizes; each under both
    # strategies (dequantized in the GEMM, or once into a buffer for LoRA's path).
    shapes = ((1, 4096, 4096, 16), (129, 80, 123, 7), (2048, 4096, 11008, 64))
    for dname, *_ in DTYPES:
        for (M, K, N, R), dequant in itertools.product(shapes, (QLORA_DEQUANT.fused, QLORA_DEQUANT.split)):
            for bits, nested in ((4, False), (4, True), (8, False)):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    with _setting(f"qlora M={M} K={K} N={N} r={R} bits={bits} nested={nested} bias={bias} p={p}",
                                  dname, {QLORA_DEQUANT.env: dequant}) as dt:
                        blocksize = 64 if bits == 4 else K
                        blocks = -(-N * K // blocksize)
                        f32 = (lambda *s: _meta(*s, dtype=torch.float32))
                        q = QuantizedWeight(_meta((N * K * bits + 7) // 8, dtype=torch.uint8), f32(2 ** bits),
                                            _meta(blocks, dtype=torch.uint8) if nested else f32(blocks),
                                            f32(-(-blocks // 256)) if nested else None, f32(256) if nested else None,
                                            f32(1) if nested else None, blocksize, 256, bits, (N, K))
                        x, A, B = _meta(M, K, dtype=dt), _meta(R, K, dtype=dt), _meta(N, R, dtype=dt)
                        y, u = qlora.forward(x, q, A, B, 0.5, _meta(N, dtype=dt) if bias else None, p, 1)
                        qlora.backward(y, x, q, A, B, u, 0.5, p, 1, (True,) * 4)


def _bottleneck_grid():
    from fastadapt.kernels import bottleneck as bn
    d = 4096
    # Every combination of the flags that steer the kernels' control flow, at one width and
    # activation; then each activation and each bottleneck width (BLOCK_B 16..1024) with every
    # flag on and with every flag off.
    flags = [dict(res=res, lnb=lnb, lna=lna, res_before=rb, gate=gate, scale=sc, p=p, bias=True, act="relu", m=64)
             for res in (False, True) for lnb in (False, True) for lna in (False, True) for rb in (False, True)
             for gate in (False, True) for sc in (None, "scalar", "channel") for p in (0.0, 0.1)]
    base = dict(res=True, lnb=True, lna=True, res_before=True, gate=True, scale="channel", p=0.1, bias=True)
    off = dict(res=False, lnb=False, lna=False, res_before=False, gate=False, scale=None, p=0.0, bias=True)
    flags += [dict(flags_, act=act, m=64) for act in bn.ACT_CODES for flags_ in (base, off)]
    flags += [dict(flags_, act="gelu", m=m, bias=False) for m in (1, 48, 200, 1024) for flags_ in (base, off)]
    for dname, *_ in DTYPES:
        for f in flags:
            with _setting("bottleneck " + " ".join(f"{k}={v}" for k, v in f.items()), dname) as dt:
                M, m = 129, f["m"]
                z = _meta(M, d, dtype=dt)
                vec = (lambda n: _meta(n, dtype=dt))
                r = _meta(M, d, dtype=dt) if f["res"] else None
                scale = {None: None, "scalar": vec(1), "channel": vec(d)}[f["scale"]]
                lnb = (vec(d), vec(d)) if f["lnb"] else (None, None)
                lna = (vec(d), vec(d)) if f["lna"] else (None, None)
                gate = _meta(M, 1, dtype=dt)[:, 0] if f["gate"] else None
                wd, bd, wu, bu = _meta(m, d, dtype=dt), vec(m) if f["bias"] else None, _meta(d, m, dtype=dt), \
                    vec(d) if f["bias"] else None
                args = (z, r, wd, bd, wu, bu, scale, *lnb, *lna, gate, 1.5, f["act"], 1e-5, f["res_before"], f["p"], 1)
                out, h, stats = bn.forward(*args)
                bwd = (out, z, r, wd, bd, wu, bu, h, stats, scale, *lnb, *lna, gate, 1.5, f["act"], 1e-5,
                       f["res_before"], f["p"], 1)
                bn.backward(*bwd, [True] * 12, splits=1)
                bn.backward(*bwd, [True] * 12, splits=3)  # atomics: chosen from the SM count on CUDA
                bn.backward(*bwd, [False, True] + [False] * 10, splits=1)  # no g_z: NEED_Z off


def _prefix_grid():
    from fastadapt.kernels import prefix_attention as pa
    # (B, H, Hkv, Sq, Sk, L, D): training (GQA, odd lengths, D=80 padded to 128), decode Sq=1, D=64.
    shapes = ((2, 8, 2, 129, 129, 10, 80), (1, 4, 4, 1, 300, 3, 64), (2, 32, 8, 512, 512, 30, 128))
    for dname, *_ in DTYPES:
        for B, H, Hkv, Sq, Sk, L, D in shapes:
            for joint in (False, True):
                for causal in (False, True):
                    for kpm in (False, True):
                        with _setting(f"prefix B={B} H={H}/{Hkv} S={Sq}/{Sk} L={L} D={D} joint={joint} "
                                      f"causal={causal} kpm={kpm}", dname) as dt:
                            q = _meta(B, Sq, H, D, dtype=dt).transpose(1, 2)  # (B, S, H, D) read in place
                            k, v = _meta(B, Hkv, Sk, D, dtype=dt), _meta(B, Hkv, Sk, D, dtype=dt)
                            kp = _meta(1, Hkv, L, D, dtype=dt).expand(B, -1, -1, -1)
                            vp = _meta(1, Hkv, L, D, dtype=dt).expand(B, -1, -1, -1)
                            gate = None if joint else _meta(H, dtype=torch.float32)
                            mask = _meta(B, Sk, dtype=torch.bool) if kpm else None
                            out, st, stp = pa.forward(q, k, v, kp, vp, gate, mask, D ** -0.5, causal, joint)
                            needs = (True, True, True, True, True, not joint)
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        needs)
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        (False, False, False, True, True, False))  # frozen tokens: prefix only
                            pa.backward(out, q, k, v, kp, vp, gate, mask, out, st, stp, D ** -0.5, causal, joint,
                                        (True, True, True, False, False, False))  # tokens only


def record() -> list[Launch]:
    _recorded.clear()
    with _intercept():
        _lora_grid()
        _dora_grid()
        _multi_lora_grid()
        _moe_lora_grid()
        _qlora_grid()
        _bottleneck_grid()
        _prefix_grid()
    return list(_recorded)


# ---------------------------------------------------------------------------------------------
# Binding (as JITFunction.run does, minus the driver) and compiling.


def _grid_of(launch: Launch, bound: dict) -> tuple:
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


def _configs(launch: Launch, arch: int) -> list:
    """The autotune configs the tuner would try on an ``arch`` device: all, or those its
    ``early_config_prune`` keeps, given that device's shared memory."""
    tuner = launch.tuner
    if not tuner.early_config_prune:
        return list(tuner.configs)
    from fastadapt import kernels
    patched = [m for m in vars(kernels).values() if hasattr(m, "shared_memory_limit")]
    saved = [m.shared_memory_limit for m in patched]
    for m in patched:
        m.shared_memory_limit = lambda device: SHARED_LIMIT[arch]
    try:
        return tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, launch.args)), **launch.kwargs)
    finally:
        for m, f in zip(patched, saved):
            m.shared_memory_limit = f


def jobs(launches: list[Launch], archs=ARCHS) -> list[Job]:
    """One job per distinct (kernel, specialisation, config, arch)."""
    out: dict = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict = {}
        for launch in launches:
            if id(launch.kernel) not in binders:
                binders[id(launch.kernel)] = create_function_from_signature(launch.kernel.signature,
                                                                            launch.kernel.params, backend)
            for cfg in _configs(launch, arch) if launch.tuner else [None]:
                kwargs = dict(launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
                bound, spec, opts = binders[id(launch.kernel)](*launch.args, **kwargs)
                options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, spec, opts)
                key = (launch.kernel.__name__, arch, tuple(signature.items()), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in out:
                    continue
                job = Job(launch.kernel, arch, signature, constexprs, attrs, options, _grid_of(launch, bound),
                          "" if cfg is None else str(cfg), launch.origin)
                job.consts = {n: bound[n] for n in _declared(launch.kernel)}
                job.dtypes = tuple(t for t in signature.values() if t.startswith("*"))
                out[key] = job
    return list(out.values())


def cover(all_jobs: list[Job], full: bool) -> list[Job]:
    """A small subset of the jobs in which every feature (:meth:`Job.features`) of every job occurs
    (greedy set cover, cheapest first among equals)."""
    feats = [j.features(full) for j in all_jobs]
    left = set().union(*feats)
    # Lazy greedy on gain per cost: a job's gain only shrinks as others are chosen, so a stale
    # heap entry is an upper bound.
    heap = [(-len(f) / all_jobs[i].cost(), i) for i, f in enumerate(feats) if f]
    heapq.heapify(heap)
    chosen = []
    while left:
        _, i = heapq.heappop(heap)
        score = -len(feats[i] & left) / all_jobs[i].cost()
        if heap and (score, i) > heap[0]:
            heapq.heappush(heap, (score, i))
            continue
        chosen.append(all_jobs[i])
        left -= feats[i]
    return chosen


def check(job: Job) -> tuple[list[str], float]:
    """(problems, seconds) of compiling one job."""
    problems = []
    for axis, (n, limit) in enumerate(zip(job.grid, GRID_LIMIT)):
        if n > limit:
            problems.append(f"grid axis {axis} = {n} > {limit}")
    t0 = time.perf_counter()
    try:
        src = ASTSource(job.kernel, job.signature, job.constexprs, job.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options.__dict__)
    except Exception as exc:  # the compiler's error is the finding
        lines = traceback.format_exception_only(type(exc), exc)
        return problems + ["compile error: " + "".join(lines).strip()[-3000:]], time.perf_counter() - t0
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT[job.arch]:
        problems.append(f"shared memory {shared} B > {SHARED_LIMIT[job.arch]} B (sm_{job.arch} per block)")
    return problems + ttir_problems(kernel.asm["ttir"], job), time.perf_counter() - t0


def ttir_problems(ttir: str, job: Job) -> list[str]:
    """What the interpreter hides and the Triton IR shows: fp32 dots in TF32 where the launcher
    asked for IEEE, fp32 dots in a 16-bit kernel (off the tensor cores' 16-bit path), atomics on
    16-bit values (rounded at every add; fp32 buffers are the rule here)."""
    problems = []
    compute = job.dtypes[0] if job.dtypes else ""
    for line in ttir.splitlines():
        if "tt.dot " in line:
            operands = re.search(r": tensor<[0-9x]+x(\w+)> \* tensor<[0-9x]+x(\w+)>", line)
            precision = re.search(r"inputPrecision = (\w+)", line)
            precision = precision.group(1) if precision else "ieee"
            if operands and operands.groups() == ("f32", "f32"):
                if compute in ("*fp16", "*bf16"):
                    problems.append(f"fp32 dot in a {compute[1:]} kernel: {line.strip()[:160]}")
                elif job.consts.get("PRECISION") not in (None, precision):
                    problems.append(f"fp32 dot in {precision}, launcher asked {job.consts['PRECISION']}: "
                                    f"{line.strip()[:160]}")
        if "tt.atomic_rmw" in line and re.search(r"tensor<[0-9x]+x(f16|bf16)>|: \(!tt.ptr<(f16|bf16)>", line):
            problems.append(f"16-bit atomic: {line.strip()[:160]}")
    return problems


def _check_index(i):
    return check(_JOBS[i])


_JOBS: list[Job] = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every combination, not the cover")
    ap.add_argument("--arch", type=int, action="append",
                    help="sm_XX to compile for (default: 90 for the cover, 90 and 80 with --full)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="compiler processes")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per compiled launch")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    launches = record()
    all_jobs = jobs(launches, tuple(args.arch or (ARCHS if args.full else (90,))))
    selected = cover(all_jobs, args.full)
    kernels = sorted({j.kernel.__name__ for j in all_jobs})
    print(f"triton {triton.__version__}: {len(launches)} launches recorded, {len(all_jobs)} distinct, "
          f"compiling {len(selected)} ({'full' if args.full else 'cover'}) of {len(kernels)} kernels: "
          f"{', '.join(kernels)}", flush=True)
    _JOBS[:] = selected
    failures = 0
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            import multiprocessing
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(args.jobs))
            results = pool.imap(_check_index, range(len(selected)))
        else:
            results = map(check, selected)
        for job, (problems, secs) in zip(selected, results):
            if args.verbose or problems:
                print(f"{'FAIL' if problems else 'ok  '} {secs:5.1f}s {job.describe()}", flush=True)
            for p in problems:
                print("     " + p.replace("\n", "\n     "), flush=True)
            failures += bool(problems)
    print(f"{len(selected) - failures} compiled, {failures} failed, {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
