// Bottleneck adapter: the arguments, contracts and schema bindings that csrc/bottleneck.cpp and its
// CUDA twin (csrc/bottleneck_cuda.cu) share. The schemas take 18 (forward) and 22 (backward) flat
// arguments; past the binding below, every function takes them as one BottleneckArgs.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fastadapt {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The arguments of bottleneck_forward in schema order; bottleneck_backward takes them too, around
// its own (gout, h, stats, needs).
struct BottleneckArgs {
  Tensor z;
  OptTensor residual;
  Tensor down_weight;
  OptTensor down_bias;
  Tensor up_weight;
  OptTensor up_bias, scale, ln_before_weight, ln_before_bias, ln_after_weight, ln_after_bias, gate;
  double scaling;
  std::string activation;
  double eps;
  bool residual_before_ln;
  double dropout_p;
  int64_t seed;
};

// (M, d) of z and the bottleneck width m.
struct BottleneckDims {
  int64_t M, d, m;
};

// The contracts of the schemas: each kernel, CPU or CUDA, runs its op's check first.
BottleneckDims check_bottleneck_forward(c10::DeviceType device, const BottleneckArgs& a);
void check_bottleneck_backward(c10::DeviceType device, const BottleneckArgs& a, const Tensor& gout, const Tensor& h,
                               const Tensor& stats);

// needs (the 12 gradients in GRAD_NAMES order: z, residual, down_weight, down_bias, up_weight,
// up_bias, scale, ln_before_weight, ln_before_bias, ln_after_weight, ln_after_bias, gate) less
// those of absent optional inputs, which are never computed.
std::array<bool, 12> wanted_grads(const BottleneckArgs& a, std::array<bool, 12> needs);

using BottleneckForward = std::tuple<Tensor, Tensor, Tensor> (*)(const BottleneckArgs&);
using BottleneckBackward = std::vector<Tensor> (*)(const BottleneckArgs&, const Tensor& gout, const Tensor& h,
                                                   const Tensor& stats, std::array<bool, 12> needs);

// The schemas' flat signatures bound to a kernel that takes BottleneckArgs: each backend registers
// its instantiation (m.impl("bottleneck_forward", &bottleneck_forward_entry<&forward_cpu>)).
template <BottleneckForward Kernel>
std::tuple<Tensor, Tensor, Tensor> bottleneck_forward_entry(
    const Tensor& z, const OptTensor& residual, const Tensor& down_weight, const OptTensor& down_bias,
    const Tensor& up_weight, const OptTensor& up_bias, const OptTensor& scale, const OptTensor& ln_before_weight,
    const OptTensor& ln_before_bias, const OptTensor& ln_after_weight, const OptTensor& ln_after_bias,
    const OptTensor& gate, double scaling, std::string activation, double eps, bool residual_before_ln,
    double dropout_p, int64_t seed) {
  return Kernel({z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight, ln_before_bias,
                 ln_after_weight, ln_after_bias, gate, scaling, std::move(activation), eps, residual_before_ln,
                 dropout_p, seed});
}

template <BottleneckBackward Kernel>
std::vector<Tensor> bottleneck_backward_entry(
    const Tensor& gout, const Tensor& z, const OptTensor& residual, const Tensor& down_weight,
    const OptTensor& down_bias, const Tensor& up_weight, const OptTensor& up_bias, const Tensor& h,
    const Tensor& stats, const OptTensor& scale, const OptTensor& ln_before_weight, const OptTensor& ln_before_bias,
    const OptTensor& ln_after_weight, const OptTensor& ln_after_bias, const OptTensor& gate, double scaling,
    std::string activation, double eps, bool residual_before_ln, double dropout_p, int64_t seed,
    std::array<bool, 12> needs) {
  return Kernel({z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight, ln_before_bias,
                 ln_after_weight, ln_after_bias, gate, scaling, std::move(activation), eps, residual_before_ln,
                 dropout_p, seed},
                gout, h, stats, needs);
}

}  // namespace fastadapt
