"""Compile every Triton kernel of fastadapt to a CUDA cubin, without a GPU.

The CPU interpreter, in which the test suite runs the kernels, accepts code that the compiler
rejects (dot operands smaller than 16, loop-carried values that change type, constexpr branches it
never takes). This script runs the kernels' own launchers on meta tensors (no memory, no device)
over each op's grid of inputs (its ``compile_grid``, beside its other cases in
fastadapt/bench/cases/OP.py), with Triton's launch intercepted: each launch is recorded as the kernel
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


class _Grid:
    """What an op's ``compile_grid(grid)`` (in its cases module, fastadapt/bench/cases/OP.py) records
    its launches with: ``with grid.setting(name, dtype, env) as dt`` (a name for the report, one of
    ``grid.dtypes`` with its matmul precision, environment variables; yields the torch dtype) around
    launcher calls on ``grid.meta(*shape, dtype=...)`` tensors."""

    dtypes = tuple(name for name, *_ in DTYPES)
    setting = staticmethod(_setting)
    meta = staticmethod(_meta)


def record() -> list[Launch]:
    from fastadapt.bench import cases

    _recorded.clear()
    with _intercept():
        for module in cases.modules().values():
            if hasattr(module, "compile_grid"):
                module.compile_grid(_Grid)
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
