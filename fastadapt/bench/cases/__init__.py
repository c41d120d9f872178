"""The cases of ``fastadapt bench`` and ``fastadapt demo``, one module per op, and what they share.

Each op brings its own module here, named as the op's slice (``lora_linear`` is declared in
fastadapt/ops/lora.py: its cases are fastadapt/bench/cases/lora.py) and found through the op
registry (:func:`modules`), so that adding an op adds one file. A module gives:

- ``OP``: the op's registered name;
- ``verify()``: the calls, at odd shapes, that demo and bench check against float64
  (:class:`fastadapt.verify.OpCase`; the demo checks the first);
- ``cases(scale)``: its timed cases (:class:`Case`) at ``scale`` (:data:`SCALES`), its headline first;
- ``compile_grid(grid)`` where it has Triton kernels: the launches of them that tests/compile_check.py
  compiles for the GPU (see there for ``grid``).

``model`` (the whole PEFT Llama: its check's sizes and its training steps) is not an op and has
``cases(scale)`` only.

A case builds its tensors only when it runs (:meth:`Case.build`), so that one case at a time
holds device memory. Every variant of a case is a closure that the runner times; the fused ones
are named ``fastadapt[<backend>]``, the floor ``floor: ...``.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from fastadapt.bench.report import FUSED_PREFIX
from fastadapt.bench.timing import forward_backward, forward_only

TIERS = ("quick", "default", "full")  # --quick runs the first, a plain run the first two, --full all
SCALES = ("cuda", "cpu", "smoke")  # DESIGN.md's shapes on a GPU; small ones on a CPU; tiny ones for CI


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
    floor: str | None
    floor_ms: float | None = None
    leaves: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Case:
    op: str                      # the name of its module here (the op's slice), or model
    name: str
    params: dict
    tier: str
    build: Callable[[Env], Built]
    rep_ms: float = 100.0        # do_bench's rep on CUDA; the CPU timer's budget
    warmup_ms: float = 25.0
    runs: int | None = None      # a fixed number of timed runs instead (the demo's --steps)
    hbm_floor: bool = False      # its floor is memory traffic at the copy bandwidth, measured before it runs
    # Runs after every other case (the strategy sweeps: a call of their own when a run is short of time).
    last: bool = False


def fused_name(backend: str) -> str:
    return f"{FUSED_PREFIX}{backend}]"


def fused(env: Env, step: Callable[[], None], op: str | None = None,
          name: Callable[[str], str] = fused_name) -> dict[str, Callable[[], None]]:
    """One variant per fused backend (of those ``op`` has, if given): ``step`` forced onto that backend,
    named ``name(backend)``."""
    from fastadapt import dispatch, use_backend

    def under(backend):
        def run():
            with use_backend(backend):
                step()
        return run

    backends = [b for b in env.backends if op is None or b in dispatch._REGISTRY.get(op, {})]
    return {name(b): under(b) for b in backends or ["reference"]}


AUTOMATIC = "fastadapt, automatic dispatch"


def automatic(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with each call on the backend automatic dispatch picks (what ``fastadapt.patch`` gives
    a user: below a backend's declared crossover the plain PyTorch composite runs), leaving out the
    Triton interpreter that demo and bench turn on on a CPU, which a user's process does not have."""
    from fastadapt import dispatch
    from fastadapt.backends import triton_interpret

    def run():
        candidates = [b for b in dispatch.BACKENDS if not (b == "triton" and triton_interpret())]
        with dispatch.use_backend(None), dispatch.only_backends(*candidates):
            step()
    return run


def on_first_fused(env: Env, step: Callable[[], None], op: str) -> Callable[[], None]:
    """``step`` forced onto the first backend :func:`fused` times (triton on a GPU, cpp on a CPU,
    where automatic dispatch would pick the Triton interpreter the bench turns on): for a variant
    that another fastadapt call is compared with."""
    return next(iter(fused(env, step, op).values()))


def compiled(env: Env, fn):
    # dynamic=False: each case's shapes get their own graph, as a user compiling one model would.
    return torch.compile(fn, dynamic=False) if env.compile else None


# ---------------------------------------------------------------------------------------------
# Where the Triton backend runs DoRA's and QLoRA's frozen products (fastadapt/strategy.py), side by side

STRATEGY_ROWS = (1, 16, 256, 2048, 8192)  # around the rules' crossovers (512 rows, an estimate)
DECODE_ROWS = 16  # up to here a call is decoding or a rollout: timed forward only; above, fwd+bwd


def strategy_rows(rule) -> list[int]:
    """:data:`STRATEGY_ROWS`, those nearest ``rule``'s crossover first, so that a run cut short has
    bracketed it."""
    return sorted(STRATEGY_ROWS, key=lambda m: abs(math.log2(m / rule.min_rows)))


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


def strategies(op: str, rule, label: str, M: int, K: int, N: int, r: int, tier: str, make) -> Case:
    """Each strategy of ``rule`` forced on the Triton backend at M rows, the one the rule picks
    first (the headline: the others' "faster by" says whether the rule is right there), and the
    floor, the frozen matmul. ``make(env, x)`` gives the op's call on x (M, K), the adapter tensors
    it trains and the dense (N, K) weight of the floor. The environment variable is set around the
    whole step, so that the backward (on autograd's thread) runs the same strategy. Runs last."""
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
                dict(kind=f"strategies {which}", M=M, K=K, N=N, r=r), tier, build, last=True)


# ---------------------------------------------------------------------------------------------
# The cases of every op, found through the registry


def modules() -> dict[str, ModuleType]:
    """Each op's cases module by name, in the order of the op registry (``fastadapt.dispatch.ops()``),
    then ``model``. The name is the op's slice: that of the module its declaration lives in, which is
    where its glue (``OpSpec.forward``) is defined."""
    from fastadapt import dispatch
    from fastadapt.ops._declare import declared

    names = [declared()[op].spec.forward.__module__.rpartition(".")[2] for op in dispatch.ops()]
    return {name: importlib.import_module(f"{__name__}.{name}") for name in (*names, "model")}


def names() -> list[str]:
    """What ``fastadapt bench --op`` chooses from."""
    return list(modules())


def all_cases(scale: str) -> list[Case]:
    """Every case at ``scale``, in the order they run: tier by tier, the ops' first cases before any
    op's second (each op lists its headline first), so that a run cut short (``--budget``, a killed
    job) has measured every op's headline; the cases marked ``last`` after all the others."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    per_op = [module.cases(scale) for module in modules().values()]
    ordered = []
    for last in (False, True):
        for tier in TIERS:
            queues = [[c for c in cases if c.tier == tier and c.last == last] for cases in per_op]
            ordered += [c for wave in itertools.zip_longest(*queues) for c in wave if c is not None]
    return ordered


def select(scale: str, tier: str, ops=None) -> list[Case]:
    """The cases of ``scale`` up to ``tier`` (quick < default < full), of ``ops`` (None: all)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    upto = TIERS[: TIERS.index(tier) + 1]
    return [c for c in all_cases(scale) if c.tier in upto and (not ops or c.op in ops)]
