// Device helpers shared by the CUDA kernels (header-only; c10/cuda headers only, see lora_cuda.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace fastadapt::cuda {

constexpr int kThreads = 256;

#define FA_DISPATCH_CUDA_TYPES(DTYPE, NAME, ...)                                                  \
  [&] {                                                                                           \
    switch (DTYPE) {                                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                        \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }             \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                     \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                          \
                           " (the native kernels take float32, bfloat16, float16)");             \
    }                                                                                             \
  }()

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DropoutArgs {
  bool active;
  uint64_t seed;
  uint32_t threshold;
  float inv_keep;
};

inline DropoutArgs make_dropout(double p, int64_t seed) {
  return {p > 0.0, static_cast<uint64_t>(seed), dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p))};
}

__device__ __forceinline__ float keep_scale(const DropoutArgs& d, int64_t row, int64_t col, int64_t ncols) {
  return dropout_keep_at(d.seed, static_cast<uint64_t>(row) * static_cast<uint64_t>(ncols) + col, d.threshold)
             ? d.inv_keep : 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread (blockDim.x a multiple of 32; shared: 33 floats).
// Starts with a barrier, so back-to-back calls may reuse the same buffer.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? shared[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) shared[32] = t;
  }
  __syncthreads();
  return shared[32];
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace fastadapt::cuda
