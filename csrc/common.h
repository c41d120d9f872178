// Pieces shared by every native kernel of fastadapt, host and device: the dropout draw and the
// vocabulary of the argument checks that every entry point (csrc/OP.cpp, csrc/OP_cuda.cu) runs first.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

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
// that is wrong. Strides are free: each kernel reads what it checked, copied as contiguous where it
// indexes it so (rows or vectors).

// "Any size" in an expected shape. A type of its own, not a reserved value such as -1: a size
// computed from the caller's integers (wrapped, or negative) can never stand for it.
struct AnySize {};
inline constexpr AnySize kAnySize{};

// One dimension of an expected shape: an exact size, or kAnySize.
class Dim {
 public:
  // Implicit, so that a shape reads {kAnySize, K}.
  Dim(int64_t size) : size_(size) {}
  Dim(AnySize) : any_(true) {}
  bool matches(int64_t size) const { return any_ || size == size_; }
  friend std::ostream& operator<<(std::ostream& out, const Dim& d) {
    return d.any_ ? out << "*" : out << d.size_;
  }

 private:
  int64_t size_ = 0;
  bool any_ = false;
};

// ceil(a / b) for a >= 0, b > 0, without the a + b - 1 that overflows for a large b.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

class ArgCheck {
 public:
  // Every tensor argument must be on `first`'s device, which must be of type `device_type`.
  ArgCheck(const char* op, const at::Tensor& first, c10::DeviceType device_type) : op_(op) {
    TORCH_CHECK(first.defined(), op_, ": undefined tensor argument");
    device_ = first.device();
    TORCH_CHECK(device_.type() == device_type, op_, ": the ", c10::DeviceTypeName(device_type, true),
                " kernel was called with tensors on ", device_);
  }

  // `t` has shape `sizes`, dtype `dtype` and the device.
  void operator()(const char* name, const at::Tensor& t, std::initializer_list<Dim> sizes,
                  at::ScalarType dtype) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is an undefined tensor");
    bool ok = t.dim() == static_cast<int64_t>(sizes.size());
    int64_t i = 0;
    for (const Dim& s : sizes) {
      if (ok && !s.matches(t.size(i))) ok = false;
      ++i;
    }
    TORCH_CHECK(ok, op_, ": ", name, " must have shape ", shape(sizes), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, op_, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " must be on ", device_, " (as the first argument), got ",
                t.device());
  }

  // a * b and a + b, sizes from the caller's integers: an error naming `what` where they overflow
  // int64 (a wrapped size could pass a shape check and index past a buffer).
  int64_t mul(const char* what, int64_t a, int64_t b) const {
    int64_t out = 0;
    TORCH_CHECK(!c10::mul_overflows(a, b, &out), op_, ": ", what, " (", a, " * ", b, ") overflows int64");
    return out;
  }
  int64_t add(const char* what, int64_t a, int64_t b) const {
    int64_t out = 0;
    TORCH_CHECK(!c10::add_overflows(a, b, &out), op_, ": ", what, " (", a, " + ", b, ") overflows int64");
    return out;
  }

  // An optional argument: absent (None) passes, present is checked as above.
  void operator()(const char* name, const std::optional<at::Tensor>& t, std::initializer_list<Dim> sizes,
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
  static std::string shape(std::initializer_list<Dim> sizes) {
    std::ostringstream out;
    out << "(";
    const char* sep = "";
    for (const Dim& s : sizes) {
      out << sep << s;
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
