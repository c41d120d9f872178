// DoRA linear, CPU kernels (math: fastadapt/reference/dora.py).
//
// As for LoRA (csrc/lora.cpp), every product is an ATen GEMM (MKL / oneDNN) on an in-place output:
// our own float loops cost 1.5-3x ATen's on the rank-r products there, and the frozen ones are
// ATen's business. What is written here: the weight norm ||W + s B A|| per row of W, in one pass
// over W with the row of s B A built in a float buffer (no N x K temporary); and, with dropout,
// the mask regenerated from (seed, flat index) (csrc/common.h), never stored: D(x) is a temporary
// of the forward and of the backward, and the backward applies the mask to its gx term in place.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"
#include "lora.h"

namespace fastadapt {
namespace {

void check_dora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const Tensor& magnitude, const std::optional<Tensor>& bias,
                        double dropout_p) {
  const ArgCheck c("fastadapt_C::dora_forward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("magnitude", magnitude, {s.N}, at::kFloat);
  c("bias", bias, {s.N}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

void check_dora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude, const Tensor& u,
                         const Tensor& pre, const Tensor& norm, double dropout_p) {
  const ArgCheck c("fastadapt_C::dora_backward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("gy", gy, {s.M, s.N}, x.scalar_type());
  c("magnitude", magnitude, {s.N}, at::kFloat);
  c("u", u, {s.M, s.r}, x.scalar_type());
  c("pre", pre, {s.M, s.N}, x.scalar_type());
  c("norm", norm, {s.N}, at::kFloat);
  c.probability("dropout_p", dropout_p);
}

// ||W[n, :] + s (B A)[n, :]|| for every row n, float32 (N,); partial sums in double.
template <typename T>
Tensor weight_norm(const Tensor& weight_in, const Tensor& lora_A, const Tensor& lora_B, float s) {
  const Tensor weight = cpu::rows_contiguous(weight_in);
  const Tensor A = lora_A.to(at::kFloat).contiguous(), B = lora_B.to(at::kFloat).contiguous();
  const int64_t N = weight.size(0), K = weight.size(1), r = A.size(0);
  Tensor norm = at::empty({N}, weight.options().dtype(at::kFloat));
  const T* wp = weight.data_ptr<T>();
  const int64_t ldw = weight.stride(0);
  const float *ap = A.data_ptr<float>(), *bp = B.data_ptr<float>();
  float* np = norm.data_ptr<float>();
  at::parallel_for(0, N, cpu::block_grain(r * K), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      const T* w = wp + n * ldw;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(w[k]);
      for (int64_t j = 0; j < r; ++j) {
        const float c = s * bp[n * r + j];
        const float* a = ap + j * K;
        for (int64_t k = 0; k < K; ++k) row[k] += c * a[k];
      }
      double sq = 0.0;
      for (int64_t k = 0; k < K; ++k) sq += static_cast<double>(row[k]) * row[k];
      np[n] = static_cast<float>(std::sqrt(sq));
    }
  });
  return norm;
}

// t = D(t) in place for a contiguous (M, K) t, D(t) rounded to T (as eager dropout would be).
template <typename T>
void dropout_inplace(Tensor& t, const cpu::Dropout& d) {
  const int64_t M = t.size(0), K = t.size(1);
  T* tp = t.data_ptr<T>();
  at::parallel_for(0, M, cpu::block_grain(K), [&](int64_t m0, int64_t m1) {
    std::vector<float> scale(K);
    for (int64_t m = m0; m < m1; ++m) {
      cpu::dropout_row(d, m, K, scale.data());
      T* row = tp + m * K;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<T>(static_cast<float>(row[k]) * scale[k]);
    }
  });
}

Tensor dropped(const Tensor& x, double p, int64_t seed) {
  Tensor xd = x.clone(at::MemoryFormat::Contiguous);
  const cpu::Dropout d(p, seed);
  FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::dora", [&] { dropout_inplace<scalar_t>(xd, d); });
  return xd;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_forward_cpu(const Tensor& x_in, const Tensor& weight,
                                                            const Tensor& lora_A, const Tensor& lora_B,
                                                            const Tensor& magnitude, double scaling,
                                                            const std::optional<Tensor>& bias, double dropout_p,
                                                            int64_t seed) {
  check_dora_forward(c10::kCPU, x_in, weight, lora_A, lora_B, magnitude, bias, dropout_p);
  const int64_t M = x_in.size(0), N = weight.size(0), r = lora_A.size(0);
  Tensor norm;
  FA_DISPATCH_CPU(weight.scalar_type(), "fastadapt_C::dora_forward", [&] {
    norm = weight_norm<scalar_t>(weight, lora_A, lora_B, static_cast<float>(scaling));
  });
  const auto opts = x_in.options();
  if (M == 0) return {at::empty({0, N}, opts), at::empty({0, r}, opts), at::empty({0, N}, opts), norm};
  const Tensor x = cpu::rows_contiguous(x_in);
  const Tensor xd = dropout_p > 0.0 ? dropped(x, dropout_p, seed) : x;
  Tensor u = at::mm(xd, lora_A.t());
  u.mul_(scaling);
  Tensor pre = at::mm(xd, weight.t());
  pre.addmm_(u, lora_B.t());
  Tensor y = pre.to(at::kFloat, false, true).mul_(magnitude.div(norm));  // copy: pre may be float
  if (dropout_p > 0.0) y.add_(at::mm(x.sub(xd), weight.t()));  // (x - D(x)) W^T: PEFT's x W^T - D(x) W^T
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return {y.to(x.scalar_type()), u, pre, norm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_backward_cpu(
    const Tensor& gy_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& magnitude, const Tensor& u, const Tensor& pre, const Tensor& norm, double scaling,
    double dropout_p, int64_t seed, std::array<bool, 6> needs) {
  check_dora_backward(c10::kCPU, gy_in, x_in, weight, lora_A, lora_B, magnitude, u, pre, norm, dropout_p);
  const bool need_x = needs[0], need_A = needs[1], need_B = needs[2], need_m = needs[3], need_bias = needs[4],
             need_w = needs[5];
  const Tensor gy = cpu::rows_contiguous(gy_in), x = cpu::rows_contiguous(x_in);
  const auto opts = x.options();
  const bool drop = dropout_p > 0.0 && x.size(0) > 0;
  Tensor gx = at::empty({0}, opts), gA = at::empty({0}, opts), gB = at::empty({0}, opts);
  Tensor gm = at::empty({0}, opts), gbias = at::empty({0}, opts), gweight = at::empty({0}, opts);
  // The norm is detached: the backward is LoRA's with gy scaled per column by g = m / n.
  const Tensor g = magnitude.div(norm);
  const Tensor gP32 = gy.to(at::kFloat, false, true).mul_(g);  // copy: gy may be float
  const Tensor gP = gP32.to(gy.scalar_type());
  const Tensor xd = drop && (need_A || need_w) ? dropped(x, dropout_p, seed) : x;
  if (need_m) gm = at::sum(gy.to(at::kFloat, false, true).mul_(pre), {0}).div_(norm);
  if (need_bias) gbias = at::sum(gy, {0}, false, at::kFloat).to(gy.scalar_type());
  if (need_B) gB = at::mm(gP.t(), u).to(lora_B.scalar_type());
  if (need_w) {
    gweight = at::mm(gP.t(), xd);
    if (drop) gweight.addmm_(gy.t(), x.sub(xd));  // gy^T x + (gP - gy)^T D(x)
  }
  if (!need_x && !need_A) return {gx, gA, gB, gm, gbias, gweight};
  // gu from the unrounded g * gy, rounded once (M=1, r=1, bf16: gA was 1.4e-2 off with gu taken
  // from the rounded gP, a bound of 1e-2).
  const Tensor gu = at::mm(gP32, lora_B.to(at::kFloat)).mul_(scaling).to(gy.scalar_type());
  if (need_A) gA = at::mm(gu.t(), xd).to(lora_A.scalar_type());
  if (need_x) {
    if (!drop) {
      gx = at::mm(gP, weight);
      gx.addmm_(gu, lora_A);
    } else {  // gx = gy W + D((gP - gy) W + gu A)
      gx = at::mm(gP.sub(gy), weight);
      gx.addmm_(gu, lora_A);
      const cpu::Dropout d(dropout_p, seed);
      FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::dora_backward", [&] { dropout_inplace<scalar_t>(gx, d); });
      gx.addmm_(gy, weight);
    }
  }
  return {gx, gA, gB, gm, gbias, gweight};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/dora.py: (y, u, pre, norm), and the gradients of
  // (x, lora_A, lora_B, magnitude, bias, weight), empty where not asked for in `needs`. CPU only.
  m.def("dora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, float scaling, "
        "Tensor? bias, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "Tensor u, Tensor pre, Tensor norm, float scaling, float dropout_p, int seed, bool[6] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

FASTADAPT_CPU_KERNELS(dora)
