// LoRA linear, CPU kernels (math: fastadapt/reference/lora.py).
//
// Forward:  one parallel pass over blocks of rows computes u = s D(x) A^T and seeds y with
//           b + u B^T; ATen's GEMM then accumulates the frozen product into it (beta = 1), so the
//           rank-r update costs no extra pass over y and D(x) is never materialized.
// Backward: one parallel pass over blocks of rows reads gy and x once each and produces
//           gu = s gy B (kept in registers/L1, never stored), gB = gy^T u, gbias = sum gy,
//           gA = gu^T D(x) (per-thread float32 accumulators, reduced in a fixed order), and seeds
//           gx with D(gu A); ATen's GEMM then adds gy W into gx. The dropout mask is regenerated
//           from (seed, flat index) in both passes (csrc/common.h).
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "cpu_common.h"
#include "ops.h"

namespace fastadapt {
namespace {

using cpu::RB;

void check_inputs(const char* name, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2, name,
              ": x, weight, lora_A, lora_B must be 2-D");
  TORCH_CHECK(weight.size(1) == x.size(1) && lora_A.size(1) == x.size(1), name, ": in_features mismatch");
  TORCH_CHECK(lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0), name,
              ": lora_B must be (out_features, r)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && lora_A.scalar_type() == x.scalar_type() &&
                  lora_B.scalar_type() == x.scalar_type(),
              name, ": x, weight, lora_A, lora_B must share one dtype");
  TORCH_CHECK(x.device().is_cpu(), name, ": CPU kernel called with ", x.device(), " tensors");
}

template <typename T>
void forward_pass(const Tensor& x, const float* A, const float* Bt, const float* bias, Tensor& u,
                  Tensor& y, float s, const cpu::Dropout& d) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), r = u.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  T* up = u.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t blocks = (M + RB - 1) / RB;
  at::parallel_for(0, blocks, cpu::block_grain(RB * r * (K + N)), [&](int64_t b0, int64_t b1) {
    std::vector<float> xd(RB * K), ys(RB * N), ur(RB * r);
    float dots[RB];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * RB, rows = std::min(RB, M - m0);
      cpu::load_rows(xp, ldx, m0, rows, K, xd.data(), d);
      for (int64_t j = 0; j < r; ++j) {
        cpu::dot_rows(xd.data(), K, A + j * K, K, dots);
        for (int64_t i = 0; i < RB; ++i) ur[i * r + j] = s * dots[i];
      }
      // y is seeded with the rounded u, the values the backward reads back.
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const T v = static_cast<T>(ur[i * r + j]);
          up[(m0 + i) * r + j] = v;
          ur[i * r + j] = static_cast<float>(v);
        }
      for (int64_t i = 0; i < RB; ++i) {
        float* row = ys.data() + i * N;
        if (bias) std::copy(bias, bias + N, row);
        else std::fill(row, row + N, 0.f);
      }
      cpu::outer_rows(ur.data(), r, Bt, N, ys.data(), N);
      for (int64_t i = 0; i < rows; ++i) {
        T* out = yp + (m0 + i) * N;
        const float* row = ys.data() + i * N;
        for (int64_t n = 0; n < N; ++n) out[n] = static_cast<T>(row[n]);
      }
    }
  });
}

struct BackwardNeeds {
  bool x, A, B, bias;
};

// gy, x, u rows -> gx seed (M x K, T), and per-chunk float32 partials of gA (r x K), gB^T (r x N),
// gbias (N) in `slots` (chunks x (rK + rN + N)), summed by the caller in chunk order.
template <typename T>
void backward_pass(const Tensor& gy, const Tensor& x, const Tensor& u, const float* A, const float* Bt,
                   float s, const cpu::Dropout& d, BackwardNeeds need, Tensor& gx, Tensor& slots) {
  const int64_t M = x.size(0), K = x.size(1), N = gy.size(1), r = u.size(1);
  const T* gyp = gy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* upp = u.data_ptr<T>();
  const int64_t ldg = gy.stride(0), ldx = x.stride(0), ldu = u.stride(0);
  T* gxp = need.x ? gx.data_ptr<T>() : nullptr;
  const int64_t blocks = (M + RB - 1) / RB;
  const int64_t chunks = slots.size(0), width = slots.size(1);
  const int64_t blocks_per_chunk = (blocks + chunks - 1) / chunks;
  float* slot_base = slots.data_ptr<float>();
  const bool need_gu = need.x || need.A;

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> gyf(RB * N), xd(need.A ? RB * K : 0), scale(d.active && need_gu ? RB * K : 0),
        gxs(need.x ? RB * K : 0), gu(RB * r), uf(RB * r);
    float dots[RB], coef[RB];
    const float ones[RB] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
    for (int64_t c = c0; c < c1; ++c) {
      float* gA = slot_base + c * width;
      float* gBt = gA + r * K;
      float* gb = gBt + r * N;
      const int64_t end = std::min(blocks, (c + 1) * blocks_per_chunk);
      for (int64_t blk = c * blocks_per_chunk; blk < end; ++blk) {
        const int64_t m0 = blk * RB, rows = std::min(RB, M - m0);
        cpu::load_rows(gyp, ldg, m0, rows, N, gyf.data());
        if (need.bias) cpu::axpy_rows(ones, gyf.data(), N, gb, N);
        if (need.B) {
          for (int64_t i = 0; i < RB; ++i)
            for (int64_t j = 0; j < r; ++j)
              uf[i * r + j] = i < rows ? static_cast<float>(upp[(m0 + i) * ldu + j]) : 0.f;
          for (int64_t j = 0; j < r; ++j) {
            for (int64_t i = 0; i < RB; ++i) coef[i] = uf[i * r + j];
            cpu::axpy_rows(coef, gyf.data(), N, gBt + j * N, N);
          }
        }
        if (!need_gu) continue;
        for (int64_t j = 0; j < r; ++j) {
          cpu::dot_rows(gyf.data(), N, Bt + j * N, N, dots);
          for (int64_t i = 0; i < RB; ++i) gu[i * r + j] = s * dots[i];  // padding rows: 0
        }
        if (need.A) {
          // Also fills `scale` with the mask that the gx seed below reuses.
          cpu::load_rows(xp, ldx, m0, rows, K, xd.data(), d, d.active ? scale.data() : nullptr);
          for (int64_t j = 0; j < r; ++j) {
            for (int64_t i = 0; i < RB; ++i) coef[i] = gu[i * r + j];
            cpu::axpy_rows(coef, xd.data(), K, gA + j * K, K);
          }
        } else if (d.active) {
          for (int64_t i = 0; i < rows; ++i) {
            const uint64_t base = static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(K);
            for (int64_t k = 0; k < K; ++k)
              scale[i * K + k] = dropout_keep_at(d.seed, base + k, d.threshold) ? d.inv_keep : 0.f;
          }
        }
        if (need.x) {
          std::fill(gxs.begin(), gxs.end(), 0.f);
          cpu::outer_rows(gu.data(), r, A, K, gxs.data(), K);
          for (int64_t i = 0; i < rows; ++i) {
            T* out = gxp + (m0 + i) * K;
            const float* row = gxs.data() + i * K;
            if (d.active) {
              const float* sc = scale.data() + i * K;
              for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(row[k] * sc[k]);
            } else {
              for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(row[k]);
            }
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> lora_forward_cpu(const Tensor& x_in, const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, double scaling,
                                            const std::optional<Tensor>& bias, double dropout_p, int64_t seed) {
  check_inputs("fastadapt_C::lora_forward", x_in, weight, lora_A, lora_B);
  const int64_t M = x_in.size(0), N = weight.size(0), r = lora_A.size(0);
  Tensor y = at::empty({M, N}, x_in.options());
  Tensor u = at::empty({M, r}, x_in.options());
  if (M == 0) return {y, u};
  const Tensor x = cpu::rows_contiguous(x_in);
  // The adapter weights are tiny: float32 copies laid out for the row passes (A: r x K, B^T: r x N).
  const Tensor A = lora_A.to(at::kFloat).contiguous();
  const Tensor Bt = lora_B.t().to(at::kFloat).contiguous();
  Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "fastadapt_C::lora_forward: bias must be (out_features,)");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const cpu::Dropout d(dropout_p, seed);
  FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::lora_forward", [&] {
    forward_pass<scalar_t>(x, A.data_ptr<float>(), Bt.data_ptr<float>(),
                           bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, u, y,
                           static_cast<float>(scaling), d);
  });
  y.addmm_(x, weight.t());  // frozen product on top of the seed: ATen's GEMM, beta = 1
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& gy_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u_in, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs) {
  check_inputs("fastadapt_C::lora_backward", x_in, weight, lora_A, lora_B);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(gy_in.dim() == 2 && gy_in.size(0) == M && gy_in.size(1) == N, "fastadapt_C::lora_backward: gy must be (M, out_features)");
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(0) == M && u_in.size(1) == r, "fastadapt_C::lora_backward: u must be (M, r)");
  TORCH_CHECK(gy_in.scalar_type() == x_in.scalar_type() && u_in.scalar_type() == x_in.scalar_type(),
              "fastadapt_C::lora_backward: gy and u must have x's dtype");
  const BackwardNeeds need{needs[0], needs[1], needs[2], needs[3]};
  const bool need_weight = needs[4];
  const Tensor gy = cpu::rows_contiguous(gy_in), x = cpu::rows_contiguous(x_in), u = cpu::rows_contiguous(u_in);
  const auto opts = x.options();
  Tensor gx = need.x ? at::empty({M, K}, opts) : at::empty({0}, opts);

  // Per-chunk float32 partials of gA, gB^T, gbias; one chunk per thread (fixed split: the sum
  // order, hence the result, does not depend on scheduling).
  const int64_t blocks = (M + RB - 1) / RB;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  Tensor slots = at::zeros({chunks, r * K + r * N + N}, opts.dtype(at::kFloat));
  if (M > 0 && (need.x || need.A || need.B || need.bias)) {
    const Tensor A = lora_A.to(at::kFloat).contiguous();
    const Tensor Bt = lora_B.t().to(at::kFloat).contiguous();
    const cpu::Dropout d(dropout_p, seed);
    FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::lora_backward", [&] {
      backward_pass<scalar_t>(gy, x, u, A.data_ptr<float>(), Bt.data_ptr<float>(), static_cast<float>(scaling),
                              d, need, gx, slots);
    });
    if (need.x) gx.addmm_(gy, weight);  // gx = D(gu A) + gy W
  }
  const Tensor total = chunks == 1 ? slots[0] : slots.sum(0);
  // Fresh outputs (copies): returns of a custom op must not alias each other.
  using Shape = std::vector<int64_t>;
  const auto shape = [](bool needed, Shape s) { return needed ? s : Shape{0}; };
  Tensor gA = at::empty(shape(need.A, {r, K}), opts.dtype(lora_A.scalar_type()));
  Tensor gB = at::empty(shape(need.B, {N, r}), opts.dtype(lora_B.scalar_type()));
  Tensor gbias = at::empty(shape(need.bias, {N}), opts);
  if (need.A) gA.copy_(total.narrow(0, 0, r * K).view({r, K}));
  if (need.B) gB.copy_(total.narrow(0, r * K, r * N).view({r, N}).t());
  if (need.bias) gbias.copy_(total.narrow(0, r * (K + N), N));
  Tensor gweight = need_weight ? at::mm(gy.t(), x) : at::empty({0}, opts);
  return {gx, gA, gB, gbias, gweight};
}

Tensor dropout_keep_cpu(const Tensor& like, double p, int64_t seed) {
  TORCH_CHECK(like.dim() == 2, "fastadapt_C::dropout_keep: expected a 2-D (M, K) tensor");
  const int64_t M = like.size(0), K = like.size(1);
  Tensor keep = at::empty({M, K}, like.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const cpu::Dropout d(p, seed);
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k)
        out[m * K + k] = dropout_keep_at(d.seed, static_cast<uint64_t>(m * K + k), d.threshold);
  });
  return keep;
}

}  // namespace fastadapt
