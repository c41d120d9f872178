// LoRA on a quantized frozen base (NF4 QLoRA, FP8), CPU kernels (layout and math:
// fastadapt/reference/qlora.py).
//
// On the CPU the frozen product runs in ATen's GEMMs (csrc/lora.cpp says why: our own loops cost
// 1.5-3x MKL / oneDNN there), and a GEMM cannot dequantize inside its tile loop. So each call
// dequantizes the weight once, in parallel over the blocks, into an N x K buffer of the compute
// dtype (the memory a dense weight would take, for the call's duration), and runs csrc/lora.cpp's
// forward or backward on it; the buffer is not kept between forward and backward.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"
#include "lora.h"

namespace fastadapt {
namespace {

// A quantized frozen weight (NF4 / FP8) as fastadapt/reference/qlora.py lays it out: codes in
// `data` (uint8; 2 per byte at 4 bits), the value table `code`, block scales `absmax` (uint8 and
// decoded through absmax2 / code2 / offset when double-quantized).
struct QuantizedWeight {
  Tensor data, code, absmax;
  std::optional<Tensor> absmax2, code2, offset;
  int64_t blocksize, blocksize2, bits;
};

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

void check_qlora_weight(const QuantizedWeight& q, int64_t out_features, int64_t in_features) {
  const ArgCheck c("fastadapt_C::qlora", q.data, c10::kCPU);
  const char* op = c.op();
  TORCH_CHECK(q.bits == 4 || q.bits == 8, op, ": bits must be 4 (NF4) or 8 (FP8), got ", q.bits);
  TORCH_CHECK(out_features > 0 && in_features > 0, op, ": the weight shape must be non-empty, got (", out_features,
              ", ", in_features, ")");
  TORCH_CHECK(q.blocksize > 0, op, ": blocksize must be positive, got ", q.blocksize);
  // Overflow-free: a wrapped block count let a short (or empty) absmax pass, and the kernel read
  // past it or left the weight unwritten.
  const int64_t numel = c.mul("the weight's size out_features * in_features", out_features, in_features);
  const int64_t blocks = ceil_div(numel, q.blocksize);
  const bool nested = present(q.absmax2);
  // Flat buffers: each must hold exactly what the kernel indexes, contiguous.
  auto flat = [&](const char* name, const Tensor& t, int64_t n, at::ScalarType dt) {
    c(name, t.reshape(-1), {n}, dt);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  flat("data", q.data, ceil_div(numel, 8 / q.bits), at::kByte);  // 2 codes a byte at 4 bits
  flat("code", q.code, int64_t{1} << q.bits, at::kFloat);
  flat("absmax", q.absmax, blocks, nested ? at::kByte : at::kFloat);
  if (nested) {
    TORCH_CHECK(present(q.code2) && present(q.offset), op, ": a double-quantized weight needs absmax2, code2 and offset");
    TORCH_CHECK(q.blocksize2 > 0, op, ": blocksize2 must be positive, got ", q.blocksize2);
    flat("absmax2", *q.absmax2, ceil_div(blocks, q.blocksize2), at::kFloat);
    flat("code2", *q.code2, 256, at::kFloat);
    flat("offset", *q.offset, 1, at::kFloat);
  } else {
    TORCH_CHECK(!present(q.code2) && !present(q.offset), op, ": code2 / offset given without absmax2");
  }
}

template <typename T>
void dequantize_blocks(const QuantizedWeight& q, int64_t numel, T* out) {
  const uint8_t* data = q.data.data_ptr<uint8_t>();
  const float* code = q.code.data_ptr<float>();
  const bool nested = q.absmax2.has_value() && q.absmax2->defined();
  const int64_t bs = q.blocksize, blocks = ceil_div(numel, bs);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float scale;
      if (nested) {
        // bnb's dequantize_blockwise, then `+= offset`: two fp32 roundings. `volatile` keeps the
        // compiler from contracting them into one FMA (GCC does so across statements by default).
        volatile float product = q.code2->data_ptr<float>()[q.absmax.data_ptr<uint8_t>()[b]] *
                                 q.absmax2->data_ptr<float>()[b / q.blocksize2];
        scale = product + q.offset->data_ptr<float>()[0];
      } else {
        scale = q.absmax.data_ptr<float>()[b];
      }
      const int64_t begin = b * bs, end = begin + std::min(bs, numel - begin);  // (b + 1) * bs may overflow
      for (int64_t i = begin; i < end; ++i) {
        // NF4: element 2j is byte j's high nibble.
        const uint8_t c = q.bits == 4 ? (data[i >> 1] >> ((i & 1) ? 0 : 4)) & 0xF : data[i];
        out[i] = static_cast<T>(code[c] * scale);  // the fp32 product, rounded once to T
      }
    }
  });
}

Tensor dequantize(const QuantizedWeight& q, int64_t out_features, int64_t in_features, at::ScalarType dtype) {
  check_qlora_weight(q, out_features, in_features);
  Tensor w = at::empty({out_features, in_features}, q.code.options().dtype(dtype));
  FA_DISPATCH_CPU(dtype, "fastadapt_C::qlora_dequantize", [&] {
    dequantize_blocks<scalar_t>(q, out_features * in_features, w.data_ptr<scalar_t>());
  });
  return w;
}

// x (M, K) in a kernel dtype, checked before the weight is dequantized to its dtype.
ArgCheck check_x(const char* op, const Tensor& x) {
  ArgCheck c(op, x, c10::kCPU);
  c("x", x, {kAnySize, kAnySize}, x.scalar_type());
  c.kernel_dtype("x", x);
  return c;
}

Tensor qlora_dequantize_cpu(const Tensor& data, const Tensor& code, const Tensor& absmax,
                            const std::optional<Tensor>& absmax2, const std::optional<Tensor>& code2,
                            const std::optional<Tensor>& offset, int64_t blocksize, int64_t blocksize2, int64_t bits,
                            int64_t out_features, int64_t in_features, at::ScalarType dtype) {
  return dequantize({data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits}, out_features,
                    in_features, dtype);
}

std::tuple<Tensor, Tensor> qlora_forward_cpu(const Tensor& x, const Tensor& data, const Tensor& code,
                                             const Tensor& absmax, const std::optional<Tensor>& absmax2,
                                             const std::optional<Tensor>& code2, const std::optional<Tensor>& offset,
                                             int64_t blocksize, int64_t blocksize2, int64_t bits, int64_t out_features,
                                             const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                             const std::optional<Tensor>& bias, double dropout_p, int64_t seed) {
  const char* op = "fastadapt_C::qlora_forward";
  check_x(op, x);
  const Tensor w = dequantize({data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits},
                              out_features, x.size(1), x.scalar_type());
  // The LoRA arguments against the weight, under this op's name (lora_forward_cpu checks them again
  // under its own: a few comparisons).
  check_lora_forward(c10::kCPU, x, w, lora_A, lora_B, bias, dropout_p, op);
  return lora_forward_cpu(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qlora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& data, const Tensor& code, const Tensor& absmax,
    const std::optional<Tensor>& absmax2, const std::optional<Tensor>& code2, const std::optional<Tensor>& offset,
    int64_t blocksize, int64_t blocksize2, int64_t bits, const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
    double scaling, double dropout_p, int64_t seed, std::array<bool, 4> needs) {
  const char* op = "fastadapt_C::qlora_backward";
  const ArgCheck c = check_x(op, x);
  c("gy", gy, {x.size(0), kAnySize}, x.scalar_type());  // out_features: gy's columns
  const Tensor w = dequantize({data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits}, gy.size(1),
                              x.size(1), x.scalar_type());
  check_lora_backward(c10::kCPU, gy, x, w, lora_A, lora_B, u, dropout_p, op);  // as in the forward
  auto [gx, gA, gB, gbias, gw] = lora_backward_cpu(gy, x, w, lora_A, lora_B, u, scaling, dropout_p, seed,
                                                   {needs[0], needs[1], needs[2], needs[3], false});
  return {gx, gA, gB, gbias};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/qlora.py (the quantized weight as its parts), and the
  // dequantized weight alone, for the tests; gradients (x, lora_A, lora_B, bias).
  m.def("qlora_dequantize(Tensor data, Tensor code, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
        "int blocksize, int blocksize2, int bits, int out_features, int in_features, ScalarType dtype) -> Tensor");
  m.def("qlora_forward(Tensor x, Tensor data, Tensor code, Tensor absmax, Tensor? absmax2, Tensor? code2, "
        "Tensor? offset, int blocksize, int blocksize2, int bits, int out_features, Tensor lora_A, Tensor lora_B, "
        "float scaling, Tensor? bias, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("qlora_backward(Tensor gy, Tensor x, Tensor data, Tensor code, Tensor absmax, Tensor? absmax2, Tensor? code2, "
        "Tensor? offset, int blocksize, int blocksize2, int bits, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, int seed, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {
  m.impl("qlora_dequantize", &fastadapt::qlora_dequantize_cpu);
}
FASTADAPT_CPU_KERNELS(qlora)
