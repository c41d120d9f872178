// LoRA linear: what csrc/lora.cpp shares with its CUDA twin (csrc/lora_cuda.cu) and with the ops
// built on its kernels (csrc/dora.cpp checks, csrc/qlora.cpp kernels).
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastadapt {

using at::Tensor;

// (M, in_features) of x, out_features, r: the shapes every other LoRA argument is checked against.
struct LoraDims {
  int64_t M, K, N, r;
};

// x (M, K) in a kernel dtype, weight (N, K), lora_A (r, K), lora_B (N, r), all of x's dtype.
LoraDims check_lora(const ArgCheck& c, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                    const Tensor& lora_B);

// The contracts of the lora_forward / lora_backward schemas; each kernel, CPU or CUDA, runs its
// op's check first with its device type (`op`: the name errors give, lora_segments_* too).
void check_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const std::optional<Tensor>& bias, double dropout_p,
                        const char* op = "fastadapt_C::lora_forward");
void check_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, double dropout_p,
                         const char* op = "fastadapt_C::lora_backward");

// The CPU kernels, which csrc/qlora.cpp runs on the dequantized weight; math in
// fastadapt/reference/lora.py.
std::tuple<Tensor, Tensor> lora_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, double scaling,
                                            const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs);

}  // namespace fastadapt
