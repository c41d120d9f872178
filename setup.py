# All metadata lives in pyproject.toml. This file only adds the native extension fastadapt._C
# (csrc/) when asked: `FASTADAPT_BUILD_EXT=1 pip install --no-build-isolation .` builds it ahead of
# time against the torch already installed (CUDA kernels too when torch has CUDA and nvcc is
# found; FASTADAPT_BUILD_CUDA=0 skips them). A plain `pip install -e .` compiles nothing: the
# extension is then JIT-built on first use of the cpp/cuda backends (fastadapt/_native.py).
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default) not in ("", "0")


def _native_extension() -> dict:
    if not _flag("FASTADAPT_BUILD_EXT"):
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit("FASTADAPT_BUILD_EXT=1 builds fastadapt._C against the installed torch: install torch "
                         "first and build with `pip install --no-build-isolation .`") from exc
    # Source lists and flags are shared with the JIT build; _native.py imports only torch.
    spec = importlib.util.spec_from_file_location("_fastadapt_native", os.path.join(HERE, "fastadapt", "_native.py"))
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)

    with_cuda = _flag("FASTADAPT_BUILD_CUDA", "1") and native.cuda_build_reason() is None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", native.CUDA_ARCHS)
    # Portable by default (a wheel may run elsewhere); FASTADAPT_NATIVE_ARCH=1 for -march=native.
    flags = native.compile_flags(with_cuda, native_arch=_flag("FASTADAPT_NATIVE_ARCH"))
    sources = [f"csrc/{name}" for name in native.CPP_SOURCES + (native.CUDA_SOURCES if with_cuda else ())]
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        "fastadapt._C", sources,
        extra_compile_args={"cxx": flags["extra_cflags"], "nvcc": flags["extra_cuda_cflags"]},
        extra_link_args=flags["extra_ldflags"])
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(**_native_extension())
