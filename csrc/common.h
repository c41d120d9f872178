// Pieces shared by every native kernel of fastadapt, host and device: the dropout draw and the
// vocabulary of the argument checks that every entry point (csrc/OP.cpp, csrc/OP_cuda.cu) runs first.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// The ops torch.ops.fastadapt_C.* are public and their kernels index raw pointers, so each entry
// point checks every argument itself (each op's contracts are in its csrc/OP.cpp) and names the one
// that is wrong. Strides are free: each kernel copies what it indexes as contiguous (rows or vectors).
constexpr int64_t kAnySize = -1;

class ArgCheck {
 public:
  // Every tensor argument must be on `first`'s device, which must be of type `device_type`.
  ArgCheck(const char* op, const at::Tensor& first, c10::DeviceType device_type) : op_(op) {
    TORCH_CHECK(first.defined(), op_, ": undefined tensor argument");
    device_ = first.device();
    TORCH_CHECK(device_.type() == device_type, op_, ": the ", c10::DeviceTypeName(device_type, true),
                " kernel was called with tensors on ", device_);
  }

  // `t` has shape `sizes` (kAnySize: any size in that dimension), dtype `dtype` and the device.
  void operator()(const char* name, const at::Tensor& t, std::initializer_list<int64_t> sizes,
                  at::ScalarType dtype) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is an undefined tensor");
    bool ok = t.dim() == static_cast<int64_t>(sizes.size());
    int64_t i = 0;
    for (int64_t s : sizes) {
      if (ok && s != kAnySize && t.size(i) != s) ok = false;
      ++i;
    }
    TORCH_CHECK(ok, op_, ": ", name, " must have shape ", shape(sizes), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, op_, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " must be on ", device_, " (as the first argument), got ",
                t.device());
  }

  // An optional argument: absent (None) passes, present is checked as above.
  void operator()(const char* name, const std::optional<at::Tensor>& t, std::initializer_list<int64_t> sizes,
                  at::ScalarType dtype) const {
    if (t.has_value() && t->defined()) (*this)(name, *t, sizes, dtype);
  }

  // One of the dtypes the native kernels compute in.
  void kernel_dtype(const char* name, const at::Tensor& t) const {
    const at::ScalarType s = t.scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op_, ": ", name, " has dtype ", s,
                "; the native kernels take float32, bfloat16, float16");
  }

  void probability(const char* name, double p) const {
    TORCH_CHECK(p >= 0.0 && p < 1.0, op_, ": ", name, " must be in [0, 1), got ", p);
  }

  const char* op() const { return op_; }

 private:
  static std::string shape(std::initializer_list<int64_t> sizes) {
    std::ostringstream out;
    out << "(";
    const char* sep = "";
    for (int64_t s : sizes) {
      out << sep;
      if (s == kAnySize) out << "*";
      else out << s;
      sep = ", ";
    }
    out << (sizes.size() == 1 ? ",)" : ")");
    return out.str();
  }

  const char* op_;
  c10::Device device_{c10::kCPU};
};

// The contract of dropout_keep (csrc/ops.cpp; its CUDA kernel is in csrc/lora_cuda.cu).
inline void check_dropout_keep(c10::DeviceType device, const at::Tensor& like, double p) {
  const ArgCheck c("fastadapt_C::dropout_keep", like, device);
  c("like", like, {kAnySize, kAnySize}, like.scalar_type());
  c.probability("p", p);
}

}  // namespace fastadapt
