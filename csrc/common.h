// Pieces shared by every native kernel of fastadapt, host and device: the dropout draw and the
// declarations that csrc/ops.cpp registers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA_HOST_DEVICE inline
#endif

namespace fastadapt {

// Counter-based dropout: element `index` (flat row-major index of the (M, K) input) is kept iff
// 24 bits of splitmix64(seed, index) are >= threshold. Nothing is stored: the forward and the
// backward, on CPU and CUDA, regenerate the same mask from (seed, index) in any tiling. It is not
// Triton's Philox stream (the backends' masks differ); each backend is consistent with itself.
FA_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);  // uniform in [0, 2^24)
}

// keep iff bits >= threshold: P(keep) = 1 - threshold / 2^24, i.e. 1 - p rounded up to 2^-24.
inline uint32_t dropout_threshold(double p) {
  double t = p * 16777216.0;
  uint32_t ti = static_cast<uint32_t>(t);
  return (static_cast<double>(ti) < t) ? ti + 1 : ti;
}

FA_HOST_DEVICE bool dropout_keep_at(uint64_t seed, uint64_t index, uint32_t threshold) {
  return dropout_bits(seed, index) >= threshold;
}

}  // namespace fastadapt
