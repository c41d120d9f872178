// CPU building blocks shared by the C++ kernels (header-only: each op stays one translation unit).
//
// Every kernel works on blocks of RB = 8 rows converted to float32 in a per-thread buffer: the
// adapter weights (float32, a few hundred KB at most) and the reduction accumulators are then read
// once per 8 rows instead of once per row, and the inner loops below are plain contiguous loops
// over a fixed number of rows that the compiler vectorizes (-O3, and -march=native in JIT builds).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
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

// dst[i, :] = float(src row m0 + i) for i < rows, zero for the padding rows up to RB. With
// dropout, dst is D(x) rounded to the input dtype (as eager dropout(x) would be), and `scale`
// (if given) receives the per-element factor keep / (1 - p) for reuse by the caller.
template <typename T>
inline void load_rows(const T* src, int64_t ld, int64_t m0, int64_t rows, int64_t K, float* dst,
                      const Dropout& d = Dropout(0.0, 0), float* scale = nullptr) {
  for (int64_t i = 0; i < RB; ++i) {
    float* o = dst + i * K;
    float* sc = scale ? scale + i * K : nullptr;
    if (i >= rows) {
      std::fill(o, o + K, 0.f);
      if (sc) std::fill(sc, sc + K, 0.f);
      continue;
    }
    const T* s = src + (m0 + i) * ld;
    if (!d.active) {
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(s[k]);
      continue;
    }
    const uint64_t base = static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(K);
    for (int64_t k = 0; k < K; ++k) {
      const float f = dropout_keep_at(d.seed, base + k, d.threshold) ? d.inv_keep : 0.f;
      if (sc) sc[k] = f;
      o[k] = static_cast<float>(static_cast<T>(static_cast<float>(s[k]) * f));
    }
  }
}

// out[i] = dot(rows[i, :n], v[:n]) for the RB rows (row stride ld). The partial sums are double:
// a single dot product (u = s x A^T, gu = s gy B) decides a whole row of gA or gx, so its
// cancellation error would show up unaveraged (float partials: up to ~20 ulp on K = 123 where
// PyTorch's GEMM got 1); these skinny products cost little next to the frozen GEMM.
inline void dot_rows(const float* rows, int64_t ld, const float* v, int64_t n, float* out) {
  double part[RB][LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int64_t i = 0; i < RB; ++i)
      for (int64_t l = 0; l < LANES; ++l)
        part[i][l] += static_cast<double>(rows[i * ld + k + l]) * static_cast<double>(v[k + l]);
  for (int64_t i = 0; i < RB; ++i) {
    double s = 0.0;
    for (int64_t l = 0; l < LANES; ++l) s += part[i][l];
    for (int64_t kk = k; kk < n; ++kk) s += static_cast<double>(rows[i * ld + kk]) * static_cast<double>(v[kk]);
    out[i] = static_cast<float>(s);
  }
}

// acc[:n] += sum_i c[i] * rows[i, :n]: one pass over the accumulator for RB rows.
inline void axpy_rows(const float* c, const float* rows, int64_t ld, float* acc, int64_t n) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7];
  const float *r0 = rows, *r1 = rows + ld, *r2 = rows + 2 * ld, *r3 = rows + 3 * ld;
  const float *r4 = rows + 4 * ld, *r5 = rows + 5 * ld, *r6 = rows + 6 * ld, *r7 = rows + 7 * ld;
  for (int64_t k = 0; k < n; ++k)
    acc[k] += ((c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k])) +
              ((c4 * r4[k] + c5 * r5[k]) + (c6 * r6[k] + c7 * r7[k]));
}

// out[i, :n] += sum_j c[i, j] * V[j, :n] for the RB rows: c is RB x r (row stride r), V is r x n,
// out has row stride ldo. V's rows are read once per block.
inline void outer_rows(const float* c, int64_t r, const float* V, int64_t n, float* out, int64_t ldo) {
  for (int64_t j = 0; j < r; ++j) {
    const float c0 = c[j], c1 = c[r + j], c2 = c[2 * r + j], c3 = c[3 * r + j];
    const float c4 = c[4 * r + j], c5 = c[5 * r + j], c6 = c[6 * r + j], c7 = c[7 * r + j];
    const float* v = V + j * n;
    float *o0 = out, *o1 = out + ldo, *o2 = out + 2 * ldo, *o3 = out + 3 * ldo;
    float *o4 = out + 4 * ldo, *o5 = out + 5 * ldo, *o6 = out + 6 * ldo, *o7 = out + 7 * ldo;
    for (int64_t k = 0; k < n; ++k) {
      const float b = v[k];
      o0[k] += c0 * b; o1[k] += c1 * b; o2[k] += c2 * b; o3[k] += c3 * b;
      o4[k] += c4 * b; o5[k] += c5 * b; o6[k] += c6 * b; o7[k] += c7 * b;
    }
  }
}

// Blocks of RB rows per at::parallel_for task: enough work per task to amortize the fork.
inline int64_t block_grain(int64_t flops_per_block) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, flops_per_block));
}

}  // namespace fastadapt::cpu
