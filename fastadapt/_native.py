"""Build and load the native extension ``fastadapt._C`` (csrc/): the ``cpp`` and ``cuda`` backends.

Nothing here runs at ``import fastadapt``. The first use of a native backend (dispatch asking
whether it can serve, ``fastadapt info``) calls :func:`status`, which loads, in order:

1. a prebuilt ``fastadapt._C`` (``FASTADAPT_BUILD_EXT=1 pip install .``), unless csrc/ is newer;
2. a JIT build (``torch.utils.cpp_extension.load`` with ninja) cached under
   ``$FASTADAPT_CACHE`` (default ``~/.cache/fastadapt``) per torch / CUDA / Python version, source
   hash and CPU flags; the first build takes about a minute, later processes load the cached .so.
   Processes starting at once build it once (:func:`build_lock`); a killed build never blocks;
   once built, processes load it without locking (``built.ok``).

CUDA sources are compiled only when torch has CUDA and nvcc is found; if that build fails the
CPU kernels are still built and the cuda backend reports why it is missing. ``status()`` never
raises: every failure becomes ``(False, reason)``, and the backends report the reason.
``FASTADAPT_NO_NATIVE=1`` turns the extension off (no compile at all). ``FASTADAPT_SANITIZE=address``
JIT-builds the CPU kernels under AddressSanitizer into a cache entry of their own (for the tests'
malformed calls; the process needs ``LD_PRELOAD="$(c++ -print-file-name=libasan.so)
$(c++ -print-file-name=libstdc++.so)"``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

DISABLE_ENV = "FASTADAPT_NO_NATIVE"
SANITIZE_ENV = "FASTADAPT_SANITIZE"
SANITIZERS = ("address",)
CACHE_ENV = "FASTADAPT_CACHE"
_HERE = Path(__file__).resolve().parent
# Installed (pip install ., a wheel): fastadapt/csrc; a checkout (pip install -e .): csrc/ beside the package.
CSRC = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc"


def _in_csrc(*suffixes: str) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in CSRC.iterdir() if p.suffix in suffixes)) if CSRC.is_dir() else ()


# Every source in csrc/ is built, so that an op's csrc/OP.cpp (its schemas, checks and kernels) and
# csrc/OP_cuda.cu are listed nowhere else; ops.cpp, what they share (the TORCH_LIBRARY), first.
CPP_SOURCES = tuple(sorted(_in_csrc(".cpp"), key=lambda name: name != "ops.cpp"))
CUDA_SOURCES = _in_csrc(".cu")
HEADERS = _in_csrc(".h", ".cuh")
CUDA_ARCHS = "8.0;9.0"  # setup.py builds; the JIT build targets the GPUs it sees
# How long first use waits for another live process that is building the same extension (a build
# takes about a minute; a dead builder's lock is never waited on).
LIVE_BUILD_WAIT_S = 600.0

_lock = threading.Lock()
_result: tuple[bool, str] | None = None
_details: dict[str, str] = {}


def _sources(names) -> list[Path]:
    return [CSRC / n for n in names if (CSRC / n).exists()]


def source_hash(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for path in sorted(_sources(CPP_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ()))):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cpu_tag() -> str:
    # The JIT build uses -march=native: a cache shared between different CPUs (NFS home) must not
    # hand one machine's binary to another.
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastadapt")
    return Path(root)


def cuda_build_reason() -> str | None:
    """Why the CUDA kernels are not compiled in this environment (None: they are)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME)"
    return None


def sanitizer() -> str | None:
    """The sanitizer ``FASTADAPT_SANITIZE`` asks for (None: a normal build)."""
    return os.environ.get(SANITIZE_ENV) or None


def compile_flags(with_cuda: bool, native_arch: bool, sanitize: str | None = None) -> dict:
    cflags = ["-O3", "-fopenmp"] + (["-march=native"] if native_arch else [])
    ldflags = ["-fopenmp"]
    if with_cuda:
        cflags.append("-DFASTADAPT_WITH_CUDA")
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        ldflags.append(f"-fsanitize={sanitize}")
    return dict(
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        # -lineinfo keeps profiles readable; fast-math is off so that results match the reference.
        extra_cuda_cflags=["-O3", "-lineinfo", "-DFASTADAPT_WITH_CUDA", "--expt-relaxed-constexpr"],
    )


def _compiler_reason() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (f"no C++ compiler found (looked for {cxx!r}; install g++ or set CXX) - needed once to "
                "build fastadapt._C, or install with FASTADAPT_BUILD_EXT=1")
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja) - needed to build fastadapt._C"
    return None


def _prebuilt() -> tuple[bool, str] | None:
    """Import a setup.py build of fastadapt._C if there is one and csrc/ has not changed since."""
    spec = importlib.util.find_spec("fastadapt._C")
    if spec is None or spec.origin is None:
        return None
    so = Path(spec.origin)
    newest = max((p.stat().st_mtime for p in _sources(CPP_SOURCES + CUDA_SOURCES + HEADERS)), default=0.0)
    if newest > so.stat().st_mtime:
        _details["prebuilt"] = f"{so} is older than csrc/ (ignored)"
        return None
    import fastadapt._C  # noqa: F401  (loading registers the fastadapt_C ops)
    return True, f"prebuilt by setup.py: {so}"


def build_tag(with_cuda: bool, sanitize: str | None) -> str:
    tag = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return tag + (f"_{sanitize}" if sanitize else "")  # a sanitized build has a cache entry of its own


def build_dir(tag: str, with_cuda: bool) -> Path:
    """The JIT build's cache entry: per torch, Python, kernels, CPU and sources."""
    return cache_dir() / (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}-"
                          f"{_cpu_tag()}-{source_hash(with_cuda)}").replace("+", "_")


class BuildBusy(RuntimeError):
    """Another live process has been building the extension for longer than we wait."""


@contextlib.contextmanager
def build_lock(build: Path, wait_s: float = LIVE_BUILD_WAIT_S):
    """The right to build and load in ``build``, across processes.

    cpp_extension serializes builds with a plain ``lock`` file and waits forever while one exists,
    so a build that was killed (Ctrl-C on first use) blocked every later process. Here the owner
    is an ``flock`` on ``owner.lock``, which the kernel releases when its process dies: a dead
    builder never blocks. Whoever holds it removes a leftover ``lock`` (stale, or made by a foreign
    process outside this protocol) before cpp_extension looks. A live fastadapt builder is waited
    on, up to ``wait_s``."""
    with open(build / "owner.lock", "a+") as f:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "?"
                if time.monotonic() > deadline:
                    raise BuildBusy(f"process {owner} has been building fastadapt._C in {build} for more than "
                                    f"{wait_s:.0f} s") from None
                if not told:
                    print(f"fastadapt: waiting for process {owner}, which is building fastadapt._C in {build}",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}@{platform.node()}")
            f.flush()
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Written into a build directory once its extension has been built and loaded: from then on a
# process loads it without the build lock or ninja's up-to-date check (the directory's name holds
# the sources' hash, so the library there is theirs). Processes starting together, such as the
# ranks of a distributed job, then never wait on each other or on a build.
_BUILT = "built.ok"


def _load_built(build: Path, name: str) -> bool:
    if not (build / _BUILT).exists():
        return False
    try:
        torch.ops.load_library(str(build / f"{name}.so"))
    except OSError:  # removed or damaged since: build again, under the lock
        (build / _BUILT).unlink(missing_ok=True)
        return False
    return True


def _jit() -> tuple[bool, str]:
    reason = _compiler_reason()
    if reason:
        return False, reason
    if "ops.cpp" not in CPP_SOURCES:
        return False, f"csrc/ sources not found at {CSRC} (a wheel without them needs FASTADAPT_BUILD_EXT=1)"
    from torch.utils import cpp_extension

    sanitize = sanitizer()
    if sanitize not in (None, *SANITIZERS):
        return False, f"{SANITIZE_ENV}={sanitize!r} is not supported (supported: {', '.join(SANITIZERS)})"
    cuda_reason = cuda_build_reason() if not sanitize else f"{SANITIZE_ENV}={sanitize} builds the CPU kernels only"
    attempts = [True, False] if cuda_reason is None else [False]
    last_error = ""
    for with_cuda in attempts:
        tag = build_tag(with_cuda, sanitize)
        name = f"fastadapt_C_{tag}"
        build = build_dir(tag, with_cuda)
        build.mkdir(parents=True, exist_ok=True)
        if _load_built(build, name):
            how = f"loaded from cache {build}"
        else:
            cached = (build / f"{name}.so").exists()
            if not cached:
                print(f"fastadapt: building the native extension ({tag}) in {build} (first use; about a minute)",
                      file=sys.stderr, flush=True)
            start = time.perf_counter()
            sources = [str(p) for p in _sources(CPP_SOURCES + (CUDA_SOURCES if with_cuda else ()))]
            try:
                with build_lock(build):
                    cpp_extension.load(name=name, sources=sources, build_directory=str(build), verbose=False,
                                       with_cuda=with_cuda, is_python_module=False,
                                       **compile_flags(with_cuda, native_arch=True, sanitize=sanitize))
            except BuildBusy as exc:
                return False, str(exc)
            except Exception as exc:  # compiler errors, nvcc/torch CUDA mismatch, load failures
                text = str(exc).strip()
                (build / "error.log").write_text(text)
                # The compiler's first error lines say more than the tail of ninja's output.
                errors = [line.strip() for line in text.splitlines() if "error" in line.lower()][:3]
                summary = " | ".join(errors) if errors else text[-600:]
                last_error = f"{type(exc).__name__}: {summary[:900]} (full log: {build / 'error.log'})"
                if sanitize:
                    last_error += f"; a {sanitize} sanitizer build loads only with LD_PRELOAD of its runtime library"
                if with_cuda:
                    _details["cuda"] = (f"CUDA build failed, CPU-only build used ({last_error}; "
                                        f"log: {build / 'error.log'})")
                continue
            (build / _BUILT).write_text(f"{name}.so\n")
            took = time.perf_counter() - start
            how = f"loaded from cache {build}" if cached else f"JIT-built in {took:.0f} s, cached in {build}"
        if not with_cuda:
            _details.setdefault("cuda", f"no CUDA kernels: {cuda_reason or 'CUDA build failed'}")
        return True, how
    return False, f"building fastadapt._C failed: {last_error}"


def status() -> tuple[bool, str]:
    """(available, description or reason) of fastadapt._C, building it on first call. Never raises."""
    global _result
    if _result is not None:
        return _result
    with _lock:
        if _result is not None:
            return _result
        if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
            _result = (False, f"disabled by {DISABLE_ENV}=1")
            return _result
        try:
            # A prebuilt extension is never sanitized.
            result = (None if sanitizer() else _prebuilt()) or _jit()
            if result[0]:
                result = (True, f"{result[1]}; {torch.ops.fastadapt_C.build_info()}")
        except Exception as exc:  # never let a broken build break dispatch
            result = (False, f"loading fastadapt._C failed: {type(exc).__name__}: {exc}")
        _result = result
        return _result


def has_cuda() -> bool:
    """True when the loaded extension has its CUDA kernels (False if not loaded)."""
    return status()[0] and bool(torch.ops.fastadapt_C.has_cuda())


def cuda_reason() -> str:
    """Why the cuda backend has no kernels in this process ('' when it has them)."""
    ok, why = status()
    if not ok:
        return why
    if has_cuda():
        return ""
    return _details.get("cuda") or f"fastadapt._C has no CUDA kernels: {cuda_build_reason() or 'built without CUDA'}"


def ops():
    """``torch.ops.fastadapt_C``, building the extension if needed; raises with the reason."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"fastadapt._C is unavailable: {why}")
    return torch.ops.fastadapt_C


def asked(grads, needs) -> tuple:
    """A native backward's gradients, None where ``needs`` did not ask for one (the kernels return an
    empty tensor there)."""
    return tuple([g if need else None for g, need in zip(grads, needs)])


def calls(name: str):
    """(forward, backward) of a native backend that takes the op's backend arguments as they come:
    ``fastadapt_C::<name>_forward(*args)`` and ``<name>_backward(*args, needs)`` (csrc/<name>.cpp)."""

    def forward(*args):
        return getattr(ops(), f"{name}_forward")(*args)

    def backward(*args):
        *args, needs = args
        needs = [bool(n) for n in needs]
        return asked(getattr(ops(), f"{name}_backward")(*args, needs), needs)

    return forward, backward


def dropout_keep(seed: int, shape, p: float, device) -> torch.Tensor:
    """The mask (True = kept) the native kernels draw from ``seed`` for a 2-D input of ``shape``."""
    return ops().dropout_keep(torch.empty(shape, device=device, dtype=torch.int8), p, seed)


def info() -> dict[str, str]:
    """What ``fastadapt info`` shows about the native backends (builds on first call)."""
    ok, why = status()
    out = {"fastadapt._C": ("available: " if ok else "unavailable: ") + why}
    out["cuda kernels"] = "yes" if ok and has_cuda() else (cuda_reason() if ok else "-")
    out.update({k: v for k, v in _details.items() if k != "cuda"})
    return out
