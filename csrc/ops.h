// Kernels registered by csrc/ops.cpp on the fastadapt_C schemas, one block per op.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastadapt {

using at::Tensor;

// LoRA linear (csrc/lora.cpp, csrc/lora_cuda.cu); math in fastadapt/reference/lora.py.
std::tuple<Tensor, Tensor> lora_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, double scaling,
                                            const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs);
Tensor dropout_keep_cpu(const Tensor& like, double p, int64_t seed);

#ifdef FASTADAPT_WITH_CUDA
std::tuple<Tensor, Tensor> lora_forward_cuda(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                             const Tensor& lora_B, double scaling,
                                             const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cuda(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs);
Tensor dropout_keep_cuda(const Tensor& like, double p, int64_t seed);
#endif

}  // namespace fastadapt
