// What fastadapt._C shares across its ops: the library fastadapt_C itself (each op adds its schemas
// and kernels from its own csrc/OP.cpp through TORCH_LIBRARY_FRAGMENT; the namespace is kept apart
// from the Python custom ops fastadapt::*, which call these through the dispatch backends "cpp"
// and "cuda"), the build description, and the dropout mask every op draws (csrc/common.h).
#include <Python.h>  // only for PyInit__C, which makes the setup.py build importable as fastadapt._C

#include <string>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"

namespace fastadapt {
namespace {

std::string build_info() {
  std::string info;
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#endif
#if defined(__AVX512F__)
  info += ", AVX-512";
#elif defined(__AVX2__)
  info += ", AVX2";
#else
  info += ", baseline SIMD";
#endif
#if defined(__SANITIZE_ADDRESS__)
  info += ", AddressSanitizer";
#endif
#ifdef _OPENMP
  info += ", OpenMP";
#else
  info += ", no OpenMP (single-threaded row passes)";
#endif
#ifdef FASTADAPT_WITH_CUDA
  info += ", CUDA kernels";
#else
  info += ", no CUDA kernels";
#endif
  return info;
}

bool has_cuda() {
#ifdef FASTADAPT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CUDA twin is in csrc/lora_cuda.cu (a .cu file of its own would cost the build another nvcc run).
at::Tensor dropout_keep_cpu(const at::Tensor& like, double p, int64_t seed) {
  check_dropout_keep(c10::kCPU, like, p);
  const int64_t M = like.size(0), K = like.size(1);
  at::Tensor keep = at::empty({M, K}, like.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const cpu::Dropout d(p, seed);
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k)
        out[m * K + k] = dropout_keep_at(d.seed, static_cast<uint64_t>(m * K + k), d.threshold);
  });
  return keep;
}

}  // namespace

void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()), op.schema().name(), ": ",
                  args[i].name(), " requires grad, and the native kernels are not differentiable: autograd must not "
                  "record them. They are the cpp / cuda backends of fastadapt's ops (fastadapt.lora_linear, ...), "
                  "whose autograd runs them forward and backward; called directly, they take detached tensors or run "
                  "under torch.no_grad(). A double backward (create_graph=True) through these backends is not "
                  "supported: run the op on the reference backend for it "
                  "(fastadapt.dispatch.use_backend(\"reference\") or FASTADAPT_BACKEND=reference).");
    }
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace fastadapt

TORCH_LIBRARY(fastadapt_C, lib) {
  // No tensor arguments: nothing for autograd to record.
  lib.def("build_info() -> str", &fastadapt::build_info);
  lib.def("has_cuda() -> bool", &fastadapt::has_cuda);
  const fastadapt::Schemas m(lib);
  // Flat index dropout mask (csrc/common.h) of a 2-D (M, K) input, True = kept.
  m.def("dropout_keep(Tensor like, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {
  m.impl("dropout_keep", &fastadapt::dropout_keep_cpu);
}

// Loading the library registers the ops; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
