// CPU building blocks shared by the C++ kernels (header-only: each op stays one translation unit).
//
// Every kernel works on blocks of RB = 8 rows converted to float32 in a per-thread buffer: the
// adapter weights (float32, a few hundred KB at most) and the reduction accumulators are then read
// once per 8 rows instead of once per row, and the inner loops below are plain contiguous loops
// over a fixed number of rows that the compiler vectorizes (-O3, and -march=native in JIT builds).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace fastadapt::cpu {

constexpr int64_t RB = 8;      // rows per block
constexpr int64_t LANES = 16;  // independent partial sums per dot product (one AVX-512 register)

// Float32 / bfloat16 / float16 kernels (fp32 accumulation throughout); float64 is served by the
// reference backend, so it is not instantiated here (compile time).
#define FA_DISPATCH_CPU(DTYPE, NAME, ...)                                                         \
  [&] {                                                                                           \
    switch (DTYPE) {                                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                        \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }             \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                     \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                          \
                           " (the native kernels take float32, bfloat16, float16)");             \
    }                                                                                             \
  }()

// A 2-D view whose rows are contiguous (any row stride); copies only when columns are strided.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float inv_keep = 1.f;  // 1 / (1 - p)

  Dropout(double p, int64_t seed_) {
    active = p > 0.0;
    seed = static_cast<uint64_t>(seed_);
    threshold = dropout_threshold(p);
    inv_keep = static_cast<float>(1.0 / (1.0 - p));
  }
};

// scale[k] = keep(row, k) / (1 - p) for one row of K elements (flat index row * K + k).
inline void dropout_row(const Dropout& d, int64_t row, int64_t K, float* __restrict__ scale) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(K);
  const uint64_t seed = d.seed;
  const uint32_t threshold = d.threshold;
  const float inv_keep = d.inv_keep;
  for (int64_t k = 0; k < K; ++k)
    scale[k] = dropout_keep_at(seed, base + static_cast<uint64_t>(k), threshold) ? inv_keep : 0.f;
}

// The inverted-dropout scale keep / (1 - p) of gathered rows (`rows`: their row indices in the
// (., K) tensor the mask is drawn over), float32 (rows.size(), K).
inline at::Tensor dropout_scale(const std::vector<int64_t>& rows, int64_t K, double p, int64_t seed) {
  const Dropout d(p, seed);
  at::Tensor scale = at::empty({static_cast<int64_t>(rows.size()), K}, at::kFloat);
  float* s = scale.data_ptr<float>();
  for (size_t i = 0; i < rows.size(); ++i) dropout_row(d, rows[i], K, s + i * K);
  return scale;
}

// D(t) of gathered rows in t's dtype (rounded after scaling, as eager dropout(x) is).
inline at::Tensor dropped(const at::Tensor& t, const std::vector<int64_t>& rows, double p, int64_t seed) {
  if (p == 0.0) return t;
  return t.to(at::kFloat).mul(dropout_scale(rows, t.size(1), p, seed)).to(t.scalar_type());
}

// dst[i, :] = float(src row m0 + i) for i < rows, zero for the padding rows up to RB. With
// dropout, dst is D(x) rounded to the input dtype (as eager dropout(x) would be), and `scale`
// (RB x K) receives the per-element factor keep / (1 - p) for reuse by the caller. The mask and
// the conversion are separate loops so that both vectorize.
template <typename T>
inline void load_rows(const T* src, int64_t ld, int64_t m0, int64_t rows, int64_t K, float* dst,
                      const Dropout& d = Dropout(0.0, 0), float* scale = nullptr) {
  for (int64_t i = 0; i < RB; ++i) {
    float* __restrict__ o = dst + i * K;
    if (i >= rows) {
      std::fill(o, o + K, 0.f);
      if (scale) std::fill(scale + i * K, scale + (i + 1) * K, 0.f);
      continue;
    }
    const T* __restrict__ s = src + (m0 + i) * ld;
    if (!d.active) {
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(s[k]);
      continue;
    }
    float* __restrict__ sc = scale ? scale + i * K : o;  // without a scale buffer, stage it in dst
    dropout_row(d, m0 + i, K, sc);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t k = 0; k < K; ++k) o[k] = s[k] * sc[k];
    } else {
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(static_cast<T>(static_cast<float>(s[k]) * sc[k]));
    }
  }
}

// out[i] = dot(rows[i, :n], v[:n]) for the RB rows (row stride ld), partial sums in Acc: double
// for float32 inputs, where one dot product (u = s D(x) A^T) decides a whole row of y and of gB
// and float partials lost up to ~20 ulp on K = 123 against PyTorch's 1; float for 16-bit inputs.
template <typename Acc>
inline void dot_rows(const float* rows, int64_t ld, const float* v, int64_t n, float* out) {
  Acc part[RB][LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int64_t i = 0; i < RB; ++i)
      for (int64_t l = 0; l < LANES; ++l)
        part[i][l] += static_cast<Acc>(rows[i * ld + k + l]) * static_cast<Acc>(v[k + l]);
  for (int64_t i = 0; i < RB; ++i) {
    Acc s = 0;
    for (int64_t l = 0; l < LANES; ++l) s += part[i][l];
    for (int64_t kk = k; kk < n; ++kk) s += static_cast<Acc>(rows[i * ld + kk]) * static_cast<Acc>(v[kk]);
    out[i] = static_cast<float>(s);
  }
}

template <typename T>
using dot_acc_t = std::conditional_t<std::is_same_v<T, float>, double, float>;

// acc[:n] += sum_i c[i] * rows[i, :n]: one pass over the accumulator for RB rows.
inline void axpy_rows(const float* c, const float* rows, int64_t ld, float* acc, int64_t n) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7];
  const float *r0 = rows, *r1 = rows + ld, *r2 = rows + 2 * ld, *r3 = rows + 3 * ld;
  const float *r4 = rows + 4 * ld, *r5 = rows + 5 * ld, *r6 = rows + 6 * ld, *r7 = rows + 7 * ld;
  for (int64_t k = 0; k < n; ++k)
    acc[k] += ((c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k])) +
              ((c4 * r4[k] + c5 * r5[k]) + (c6 * r6[k] + c7 * r7[k]));
}

inline void axpy1(float* __restrict__ out, const float* __restrict__ v, float c, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] += c * v[k];
}

// out[i, :n] += sum_j c[i, j] * V[j, :n] for the RB rows: c is RB x r (row stride ldc), V is r x n,
// out has row stride ldo. Each row of V is used by the 8 rows while it is in L1. (Written with
// 8 output pointers in one loop, gcc gave up vectorizing on the aliasing checks: 1.5x slower
// LoRA forward at M=2048, d=1024.)
inline void outer_rows(const float* c, int64_t ldc, int64_t r, const float* V, int64_t n, float* out, int64_t ldo) {
  for (int64_t j = 0; j < r; ++j)
    for (int64_t i = 0; i < RB; ++i) axpy1(out + i * ldo, V + j * n, c[i * ldc + j], n);
}

// Blocks of RB rows per at::parallel_for task: enough work per task to amortize the fork.
inline int64_t block_grain(int64_t flops_per_block) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, flops_per_block));
}

}  // namespace fastadapt::cpu
