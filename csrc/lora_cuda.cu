// LoRA linear, CUDA kernels (math: fastadapt/reference/lora.py; CPU twin: csrc/lora.cpp).
//
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h): it pulls in the cuBLAS/cuSPARSE/cuSOLVER
// headers, which a minimal toolkit (nvcc + cudart) lacks, and slows every compile.
//
// The frozen products (x W^T, gy W, gy^T x) go to cuBLAS through ATen (addmm_ with beta = 1 on a
// seeded output, so the rank-r update costs no extra pass over y or gx). Around them, three
// kernels of ours do the rank-r work with the dropout mask drawn in-register from
// (seed, flat index) (csrc/common.h), identically in the forward and the backward:
//   down_kernel:   out = scale * D(X) V^T      (M x R)  u = s D(x) A^T;  gu = s gy B
//   seed_kernel:   out = D(U V) + b            (M x N)  y seed = u B^T + b;  gx seed = D(gu A)
//   reduce_kernel: out += P^T D(X)             (R x C)  gA = gu^T D(x);  gB^T = u^T gy
// fp32 accumulation throughout; float32 / bfloat16 / float16 inputs.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cuda_common.cuh"
#include "lora.h"

namespace fastadapt {
namespace {

constexpr int WARPS = 8;         // rows per block in down_kernel, one warp per row
constexpr int RCHUNK = 16;       // rank columns per pass held in registers
constexpr int SEED_ROWS = 8;     // rows per thread in seed_kernel: each V element is loaded once per 8 rows
constexpr int THREADS = 256;

using cuda::cdiv;
using cuda::DropoutArgs;
using cuda::keep_scale;
using cuda::make_dropout;

template <typename T, typename TO>
__global__ void down_kernel(const T* __restrict__ x, int64_t ldx, const float* __restrict__ V,
                            TO* __restrict__ out, int64_t M, int64_t C, int64_t R, float scale, DropoutArgs d) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (m >= M) return;  // whole warps only: the shuffles below see full warps
  const T* xr = x + m * ldx;
  for (int64_t j0 = 0; j0 < R; j0 += RCHUNK) {
    const int nj = static_cast<int>(R - j0 < RCHUNK ? R - j0 : RCHUNK);
    float acc[RCHUNK];
#pragma unroll
    for (int t = 0; t < RCHUNK; ++t) acc[t] = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      float xv = static_cast<float>(xr[c]);
      if (d.active) xv = static_cast<float>(static_cast<T>(xv * keep_scale(d, m, c, C)));  // eager rounding
#pragma unroll
      for (int t = 0; t < RCHUNK; ++t)
        if (t < nj) acc[t] += xv * V[(j0 + t) * C + c];
    }
#pragma unroll
    for (int t = 0; t < RCHUNK; ++t) {
      float v = acc[t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == t && t < nj) out[m * R + j0 + t] = static_cast<TO>(v * scale);
    }
  }
}

template <typename T>
__global__ void seed_kernel(const float* __restrict__ U, const float* __restrict__ V, const float* __restrict__ bias,
                            T* __restrict__ out, int64_t M, int64_t N, int64_t R, DropoutArgs d) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * SEED_ROWS;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float b = bias ? bias[n] : 0.f;
  float acc[SEED_ROWS];
#pragma unroll
  for (int i = 0; i < SEED_ROWS; ++i) acc[i] = b;
  for (int64_t j = 0; j < R; ++j) {
    const float v = V[j * N + n];
#pragma unroll
    for (int i = 0; i < SEED_ROWS; ++i)
      if (m0 + i < M) acc[i] += U[(m0 + i) * R + j] * v;
  }
#pragma unroll
  for (int i = 0; i < SEED_ROWS; ++i) {
    if (m0 + i >= M) break;
    float o = acc[i];
    if (d.active) o *= keep_scale(d, m0 + i, n, N);
    out[(m0 + i) * N + n] = static_cast<T>(o);
  }
}

template <typename T>
__global__ void reduce_kernel(const float* __restrict__ P, const T* __restrict__ X, int64_t ldx,
                              float* __restrict__ out, int64_t M, int64_t C, int64_t R, int64_t rows_per_split,
                              bool atomic, DropoutArgs d) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RCHUNK;
  const int64_t m_start = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_end = m_start + rows_per_split < M ? m_start + rows_per_split : M;
  if (c >= C) return;
  const int nj = static_cast<int>(R - j0 < RCHUNK ? R - j0 : RCHUNK);
  float acc[RCHUNK];
#pragma unroll
  for (int t = 0; t < RCHUNK; ++t) acc[t] = 0.f;
  for (int64_t m = m_start; m < m_end; ++m) {
    float xv = static_cast<float>(X[m * ldx + c]);
    if (d.active) xv = static_cast<float>(static_cast<T>(xv * keep_scale(d, m, c, C)));
#pragma unroll
    for (int t = 0; t < RCHUNK; ++t)
      if (t < nj) acc[t] += P[m * R + j0 + t] * xv;
  }
#pragma unroll
  for (int t = 0; t < RCHUNK; ++t) {
    if (t >= nj) break;
    float* o = out + (j0 + t) * C + c;
    if (atomic) atomicAdd(o, acc[t]);
    else *o = acc[t];
  }
}

__global__ void dropout_keep_kernel(bool* out, int64_t total, int64_t ncols, DropoutArgs d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) out[i] = keep_scale(d, i / ncols, i % ncols, ncols) != 0.f;
}

Tensor rows_contiguous(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}


template <typename T, typename TO>
void launch_down(const Tensor& x, const Tensor& V, Tensor& out, float scale, DropoutArgs d) {
  const int64_t M = x.size(0), C = x.size(1), R = V.size(0);
  if (M == 0) return;
  down_kernel<T, TO><<<static_cast<unsigned>(cdiv(M, WARPS)), WARPS * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), x.stride(0), V.data_ptr<float>(), out.data_ptr<TO>(), M, C, R, scale, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_seed(const Tensor& U, const Tensor& V, const float* bias, Tensor& out, DropoutArgs d) {
  const int64_t M = U.size(0), R = U.size(1), N = V.size(1);
  if (M == 0) return;
  TORCH_CHECK(cdiv(N, THREADS) < 65536, "fastadapt_C: too many output columns for one grid");
  const dim3 grid(static_cast<unsigned>(cdiv(M, SEED_ROWS)), static_cast<unsigned>(cdiv(N, THREADS)));
  seed_kernel<T><<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      U.data_ptr<float>(), V.data_ptr<float>(), bias, out.data_ptr<T>(), M, N, R, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out (R x C, float32, zero-filled) += P^T D(X). The M reduction is split over enough blocks to
// fill the GPU (atomics), or not at all when deterministic algorithms are requested.
template <typename T>
void launch_reduce(const Tensor& P, const Tensor& X, Tensor& out, DropoutArgs d) {
  const int64_t M = X.size(0), C = X.size(1), R = P.size(1);
  if (M == 0) return;
  const int64_t tiles = cdiv(C, THREADS) * cdiv(R, RCHUNK);
  int64_t splits = 1;
  if (!at::globalContext().deterministicAlgorithms()) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, X.device().index()));
    splits = std::max<int64_t>(1, std::min<int64_t>({cdiv(4 * sms, tiles), cdiv(M, 32), 65535}));
  }
  const int64_t rows_per_split = cdiv(M, splits);
  splits = cdiv(M, rows_per_split);
  TORCH_CHECK(cdiv(R, RCHUNK) < 65536, "fastadapt_C: rank too large");
  const dim3 grid(static_cast<unsigned>(cdiv(C, THREADS)), static_cast<unsigned>(splits),
                  static_cast<unsigned>(cdiv(R, RCHUNK)));
  reduce_kernel<T><<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      P.data_ptr<float>(), X.data_ptr<T>(), X.stride(0), out.data_ptr<float>(), M, C, R, rows_per_split,
      splits > 1, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> lora_forward_cuda(const Tensor& x_in, const Tensor& weight, const Tensor& lora_A,
                                             const Tensor& lora_B, double scaling,
                                             const std::optional<Tensor>& bias, double dropout_p, int64_t seed) {
  check_lora_forward(c10::kCUDA, x_in, weight, lora_A, lora_B, bias, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = weight.size(0), r = lora_A.size(0);
  Tensor y = at::empty({M, N}, x_in.options());
  Tensor u = at::empty({M, r}, x_in.options());
  if (M == 0) return {y, u};
  const Tensor x = rows_contiguous(x_in);
  const Tensor A = lora_A.to(at::kFloat).contiguous();
  const Tensor Bt = lora_B.t().to(at::kFloat).contiguous();
  Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const DropoutArgs d = make_dropout(dropout_p, seed);
  FA_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastadapt_C::lora_forward", [&] {
    launch_down<scalar_t, scalar_t>(x, A, u, static_cast<float>(scaling), d);
    // y is seeded with the rounded u, the values the backward reads back.
    launch_seed<scalar_t>(u.to(at::kFloat), Bt, bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, y,
                          make_dropout(0.0, 0));
  });
  y.addmm_(x, weight.t());  // cuBLAS, beta = 1 on the seed
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cuda(
    const Tensor& gy_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs) {
  check_lora_backward(c10::kCUDA, gy_in, x_in, weight, lora_A, lora_B, u, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), r = lora_A.size(0);
  const bool need_x = needs[0], need_A = needs[1], need_B = needs[2], need_bias = needs[3], need_w = needs[4];
  const Tensor gy = rows_contiguous(gy_in), x = rows_contiguous(x_in);
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  const DropoutArgs d = make_dropout(dropout_p, seed);
  const DropoutArgs none = make_dropout(0.0, 0);
  Tensor gx = at::empty({0}, opts), gA = at::empty({0}, opts), gB = at::empty({0}, opts);
  Tensor gbias = at::empty({0}, opts), gweight = at::empty({0}, opts);

  FA_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastadapt_C::lora_backward", [&] {
    Tensor gu;
    if (need_x || need_A) {
      const Tensor Bt = lora_B.t().to(at::kFloat).contiguous();
      gu = at::empty({M, r}, f32);
      launch_down<scalar_t, float>(gy, Bt, gu, static_cast<float>(scaling), none);
    }
    if (need_x) {
      const Tensor A = lora_A.to(at::kFloat).contiguous();
      gx = at::empty({M, K}, opts);
      launch_seed<scalar_t>(gu, A, nullptr, gx, d);
      if (M > 0) gx.addmm_(gy, weight);  // gx = D(gu A) + gy W
    }
    if (need_A) {
      Tensor acc = at::zeros({r, K}, f32);
      launch_reduce<scalar_t>(gu, x, acc, d);
      gA = acc.to(lora_A.scalar_type());
    }
    if (need_B) {
      Tensor acc = at::zeros({r, N}, f32);
      launch_reduce<scalar_t>(u.to(at::kFloat).contiguous(), gy, acc, none);
      gB = at::empty({N, r}, opts.dtype(lora_B.scalar_type()));
      gB.copy_(acc.t());
    }
  });
  if (need_bias) gbias = at::sum(gy, {0}, false, at::kFloat).to(gy.scalar_type());
  if (need_w) gweight = at::mm(gy.t(), x);
  return {gx, gA, gB, gbias, gweight};
}

Tensor dropout_keep_cuda(const Tensor& like, double p, int64_t seed) {
  check_dropout_keep(c10::kCUDA, like, p);
  const c10::cuda::CUDAGuard guard(like.device());
  Tensor keep = at::empty({like.size(0), like.size(1)}, like.options().dtype(at::kBool));
  const int64_t total = keep.numel();
  if (total == 0) return keep;
  dropout_keep_kernel<<<static_cast<unsigned>(cdiv(total, THREADS)), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      keep.data_ptr<bool>(), total, like.size(1), make_dropout(p, seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_IMPL(fastadapt_C, CUDA, m) {
  m.impl("lora_forward", &fastadapt::lora_forward_cuda);
  m.impl("lora_backward", &fastadapt::lora_backward_cuda);
  m.impl("dropout_keep", &fastadapt::dropout_keep_cuda);  // the schema and CPU kernel: csrc/ops.cpp
}
