// The one registration file of fastadapt._C: schemas of the native kernels in the namespace
// fastadapt_C (kept apart from the Python custom ops fastadapt::*, which call these through the
// dispatch backends "cpp" and "cuda"), and their CPU / CUDA implementations.
#include <Python.h>  // only for PyInit__C, which makes the setup.py build importable as fastadapt._C

#include <string>

#include <torch/library.h>

#include "ops.h"

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

}  // namespace

TORCH_LIBRARY(fastadapt_C, m) {
  m.def("build_info() -> str", &build_info);
  m.def("has_cuda() -> bool", &has_cuda);
  // Flat index dropout mask (csrc/common.h) of a 2-D (M, K) input, True = kept.
  m.def("dropout_keep(Tensor like, float p, int seed) -> Tensor");
  // Backend signatures of fastadapt/ops/lora.py; gradients not asked for in `needs`
  // (x, lora_A, lora_B, bias, weight) come back as empty tensors.
  m.def("lora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, int seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backend signatures of fastadapt/ops/bottleneck.py: (out, h, stats), and the 12 gradients in
  // GRAD_NAMES order (empty where not needed or the input is absent).
  m.def("bottleneck_forward(Tensor z, Tensor? residual, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
        "Tensor? up_bias, Tensor? scale, Tensor? ln_before_weight, Tensor? ln_before_bias, Tensor? ln_after_weight, "
        "Tensor? ln_after_bias, Tensor? gate, float scaling, str activation, float eps, bool residual_before_ln, "
        "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("bottleneck_backward(Tensor gout, Tensor z, Tensor? residual, Tensor down_weight, Tensor? down_bias, "
        "Tensor up_weight, Tensor? up_bias, Tensor h, Tensor stats, Tensor? scale, Tensor? ln_before_weight, "
        "Tensor? ln_before_bias, Tensor? ln_after_weight, Tensor? ln_after_bias, Tensor? gate, float scaling, "
        "str activation, float eps, bool residual_before_ln, float dropout_p, int seed, bool[12] needs) -> Tensor[]");
  // Backend signatures of fastadapt/ops/prefix_attention.py: (out, stats, stats_p), and
  // (dq, dk, dv, dk_p, dv_p, dgate).
  m.def("prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, float scale, bool causal, bool joint) -> (Tensor, Tensor, Tensor)");
  m.def("prefix_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, Tensor out, Tensor stats, Tensor stats_p, float scale, bool causal, bool joint, "
        "bool[6] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {
  m.impl("dropout_keep", &fastadapt::dropout_keep_cpu);
  m.impl("lora_forward", &fastadapt::lora_forward_cpu);
  m.impl("lora_backward", &fastadapt::lora_backward_cpu);
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_cpu);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_cpu);
  m.impl("prefix_attention_forward", &fastadapt::prefix_attention_forward_cpu);
  m.impl("prefix_attention_backward", &fastadapt::prefix_attention_backward_cpu);
}

#ifdef FASTADAPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastadapt_C, CUDA, m) {
  m.impl("dropout_keep", &fastadapt::dropout_keep_cuda);
  m.impl("lora_forward", &fastadapt::lora_forward_cuda);
  m.impl("lora_backward", &fastadapt::lora_backward_cuda);
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_cuda);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_cuda);
  m.impl("prefix_attention_forward", &fastadapt::prefix_attention_forward_cuda);
  m.impl("prefix_attention_backward", &fastadapt::prefix_attention_backward_cuda);
}
#endif

// Loading the library registers the ops; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
