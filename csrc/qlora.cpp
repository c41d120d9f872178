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

#include "cpu_common.h"
#include "ops.h"

namespace fastadapt {
namespace {

template <typename T>
void dequantize_blocks(const QuantizedWeight& q, int64_t numel, T* out) {
  const uint8_t* data = q.data.data_ptr<uint8_t>();
  const float* code = q.code.data_ptr<float>();
  const bool nested = q.absmax2.has_value() && q.absmax2->defined();
  const int64_t bs = q.blocksize, blocks = (numel + bs - 1) / bs;
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
      const int64_t end = std::min(numel, (b + 1) * bs);
      for (int64_t i = b * bs; i < end; ++i) {
        // NF4: element 2j is byte j's high nibble.
        const uint8_t c = q.bits == 4 ? (data[i >> 1] >> ((i & 1) ? 0 : 4)) & 0xF : data[i];
        out[i] = static_cast<T>(code[c] * scale);  // the fp32 product, rounded once to T
      }
    }
  });
}

Tensor dequantize(const QuantizedWeight& q, int64_t out_features, int64_t in_features, at::ScalarType dtype) {
  check_qlora_weight(c10::kCPU, q, out_features, in_features);
  Tensor w = at::empty({out_features, in_features}, q.code.options().dtype(dtype));
  FA_DISPATCH_CPU(dtype, "fastadapt_C::qlora_dequantize", [&] {
    dequantize_blocks<scalar_t>(q, out_features * in_features, w.data_ptr<scalar_t>());
  });
  return w;
}

}  // namespace

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
  TORCH_CHECK(x.dim() == 2, "fastadapt_C::qlora_forward: x must have shape (M, K), got ", x.sizes());
  TORCH_CHECK(x.device() == data.device(), "fastadapt_C::qlora_forward: data must be on ", x.device(), ", got ",
              data.device());
  const Tensor w = dequantize({data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits},
                              out_features, x.size(1), x.scalar_type());
  return lora_forward_cpu(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qlora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& data, const Tensor& code, const Tensor& absmax,
    const std::optional<Tensor>& absmax2, const std::optional<Tensor>& code2, const std::optional<Tensor>& offset,
    int64_t blocksize, int64_t blocksize2, int64_t bits, const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
    double scaling, double dropout_p, int64_t seed, std::array<bool, 4> needs) {
  TORCH_CHECK(x.dim() == 2 && gy.dim() == 2, "fastadapt_C::qlora_backward: x and gy must be 2-D, got ", x.sizes(),
              " and ", gy.sizes());
  TORCH_CHECK(x.device() == data.device(), "fastadapt_C::qlora_backward: data must be on ", x.device(), ", got ",
              data.device());
  const Tensor w = dequantize({data, code, absmax, absmax2, code2, offset, blocksize, blocksize2, bits}, gy.size(1),
                              x.size(1), x.scalar_type());
  auto [gx, gA, gB, gbias, gw] = lora_backward_cpu(gy, x, w, lora_A, lora_B, u, scaling, dropout_p, seed,
                                                   {needs[0], needs[1], needs[2], needs[3], false});
  return {gx, gA, gB, gbias};
}

}  // namespace fastadapt
