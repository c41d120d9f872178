// Kernels registered by csrc/ops.cpp on the fastadapt_C schemas, one block per op.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fastadapt {

using at::Tensor;

// The argument contracts of the schemas (csrc/ops.cpp): each kernel, CPU or CUDA, calls its op's
// check first with its device type; a violation raises an error naming the argument.
void check_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const std::optional<Tensor>& bias, double dropout_p);
void check_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, double dropout_p);
// Rank segments of lora_A (r rows): one probability each, every segment at least one row, r in all.
void check_lora_segments(const char* op, int64_t r, at::IntArrayRef segments, at::ArrayRef<double> segment_p);
void check_dora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const Tensor& magnitude, const std::optional<Tensor>& bias,
                        double dropout_p);
void check_dora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude, const Tensor& u,
                         const Tensor& pre, const Tensor& norm, double dropout_p);
void check_multi_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                              const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks,
                              const Tensor& adapter_ids, const std::optional<Tensor>& bias,
                              const std::optional<Tensor>& dropout_p);
void check_multi_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                               const Tensor& A_stack, const Tensor& B_stack, const Tensor& u, const Tensor& scalings,
                               const Tensor& ranks, const Tensor& adapter_ids, const std::optional<Tensor>& dropout_p);
void check_dropout_keep(c10::DeviceType device, const Tensor& like, double p);
void check_bottleneck_forward(
    c10::DeviceType device, const Tensor& z, const std::optional<Tensor>& residual, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight, const std::optional<Tensor>& up_bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& ln_before_weight,
    const std::optional<Tensor>& ln_before_bias, const std::optional<Tensor>& ln_after_weight,
    const std::optional<Tensor>& ln_after_bias, const std::optional<Tensor>& gate, double eps, double dropout_p);
void check_bottleneck_backward(
    c10::DeviceType device, const Tensor& gout, const Tensor& z, const std::optional<Tensor>& residual,
    const Tensor& down_weight, const std::optional<Tensor>& down_bias, const Tensor& up_weight,
    const std::optional<Tensor>& up_bias, const Tensor& h, const Tensor& stats, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& ln_before_weight, const std::optional<Tensor>& ln_before_bias,
    const std::optional<Tensor>& ln_after_weight, const std::optional<Tensor>& ln_after_bias,
    const std::optional<Tensor>& gate, double eps, double dropout_p);
void check_prefix_attention_forward(c10::DeviceType device, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& k_p, const Tensor& v_p, const std::optional<Tensor>& gate,
                                    const std::optional<Tensor>& key_padding_mask, bool joint);
void check_prefix_attention_backward(c10::DeviceType device, const Tensor& dout, const Tensor& q, const Tensor& k,
                                     const Tensor& v, const Tensor& k_p, const Tensor& v_p,
                                     const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask,
                                     const Tensor& out, const Tensor& stats, const Tensor& stats_p, bool joint);

// LoRA linear (csrc/lora.cpp, csrc/lora_cuda.cu); math in fastadapt/reference/lora.py.
std::tuple<Tensor, Tensor> lora_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, double scaling,
                                            const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs);
Tensor dropout_keep_cpu(const Tensor& like, double p, int64_t seed);
// Several adapters summed, each rank segment with its own dropout (CPU only: Triton serves CUDA).
std::tuple<Tensor, Tensor> lora_segments_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                                     const Tensor& lora_B, double scaling,
                                                     const std::optional<Tensor>& bias, at::IntArrayRef segments,
                                                     at::ArrayRef<double> segment_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_segments_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, at::IntArrayRef segments, at::ArrayRef<double> segment_p, int64_t seed,
    std::array<bool, 5> needs);

// DoRA linear (csrc/dora.cpp, CPU only); math in fastadapt/reference/dora.py.
std::tuple<Tensor, Tensor, Tensor, Tensor> dora_forward_cpu(const Tensor& x, const Tensor& weight,
                                                            const Tensor& lora_A, const Tensor& lora_B,
                                                            const Tensor& magnitude, double scaling,
                                                            const std::optional<Tensor>& bias, double dropout_p,
                                                            int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& magnitude, const Tensor& u, const Tensor& pre, const Tensor& norm, double scaling,
    double dropout_p, int64_t seed, std::array<bool, 6> needs);
// Multi-adapter LoRA linear (csrc/multi_lora.cpp); math in fastadapt/reference/multi_lora.py.
std::tuple<Tensor, Tensor> multi_lora_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                                                  const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks,
                                                  const Tensor& adapter_ids, const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& A_stack, const Tensor& B_stack,
    const Tensor& u, const Tensor& scalings, const Tensor& ranks, const Tensor& adapter_ids,
    const std::optional<Tensor>& dropout_p, int64_t seed, std::array<bool, 5> needs);

// A quantized frozen weight (NF4 / FP8) as fastadapt/reference/qlora.py lays it out: codes in
// `data` (uint8; 2 per byte at 4 bits), the value table `code`, block scales `absmax` (uint8 and
// decoded through absmax2 / code2 / offset when double-quantized).
struct QuantizedWeight {
  Tensor data, code, absmax;
  std::optional<Tensor> absmax2, code2, offset;
  int64_t blocksize, blocksize2, bits;
};
void check_qlora_weight(c10::DeviceType device, const QuantizedWeight& q, int64_t out_features, int64_t in_features);

// LoRA on a quantized base (csrc/qlora.cpp); math in fastadapt/reference/qlora.py.
Tensor qlora_dequantize_cpu(const Tensor& data, const Tensor& code, const Tensor& absmax,
                            const std::optional<Tensor>& absmax2, const std::optional<Tensor>& code2,
                            const std::optional<Tensor>& offset, int64_t blocksize, int64_t blocksize2, int64_t bits,
                            int64_t out_features, int64_t in_features, at::ScalarType dtype);
std::tuple<Tensor, Tensor> qlora_forward_cpu(const Tensor& x, const Tensor& data, const Tensor& code,
                                             const Tensor& absmax, const std::optional<Tensor>& absmax2,
                                             const std::optional<Tensor>& code2, const std::optional<Tensor>& offset,
                                             int64_t blocksize, int64_t blocksize2, int64_t bits, int64_t out_features,
                                             const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                             const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor> qlora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& data, const Tensor& code, const Tensor& absmax,
    const std::optional<Tensor>& absmax2, const std::optional<Tensor>& code2, const std::optional<Tensor>& offset,
    int64_t blocksize, int64_t blocksize2, int64_t bits, const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
    double scaling, double dropout_p, int64_t seed, std::array<bool, 4> needs);

// Bottleneck adapter (csrc/bottleneck.cpp); math in fastadapt/reference/bottleneck.py.
std::tuple<Tensor, Tensor, Tensor> bottleneck_forward_cpu(
    const Tensor& z, const std::optional<Tensor>& residual, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight, const std::optional<Tensor>& up_bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& ln_before_weight,
    const std::optional<Tensor>& ln_before_bias, const std::optional<Tensor>& ln_after_weight,
    const std::optional<Tensor>& ln_after_bias, const std::optional<Tensor>& gate, double scaling,
    std::string activation, double eps, bool residual_before_ln, double dropout_p, int64_t seed);
std::vector<Tensor> bottleneck_backward_cpu(
    const Tensor& gout, const Tensor& z, const std::optional<Tensor>& residual, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight, const std::optional<Tensor>& up_bias,
    const Tensor& h, const Tensor& stats, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& ln_before_weight, const std::optional<Tensor>& ln_before_bias,
    const std::optional<Tensor>& ln_after_weight, const std::optional<Tensor>& ln_after_bias,
    const std::optional<Tensor>& gate, double scaling, std::string activation, double eps,
    bool residual_before_ln, double dropout_p, int64_t seed, std::array<bool, 12> needs);

// Gated prefix attention / prefix tuning (csrc/prefix_attention.cpp); math in
// fastadapt/reference/prefix_attention.py.
std::tuple<Tensor, Tensor, Tensor> prefix_attention_forward_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_p, const Tensor& v_p,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, double scale, bool causal,
    bool joint);
std::vector<Tensor> prefix_attention_backward_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_p, const Tensor& v_p,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, const Tensor& out,
    const Tensor& stats, const Tensor& stats_p, double scale, bool causal, bool joint, std::array<bool, 6> needs);

#ifdef FASTADAPT_WITH_CUDA
std::tuple<Tensor, Tensor> lora_forward_cuda(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                             const Tensor& lora_B, double scaling,
                                             const std::optional<Tensor>& bias, double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cuda(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs);
Tensor dropout_keep_cuda(const Tensor& like, double p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor> bottleneck_forward_cuda(
    const Tensor& z, const std::optional<Tensor>& residual, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight, const std::optional<Tensor>& up_bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& ln_before_weight,
    const std::optional<Tensor>& ln_before_bias, const std::optional<Tensor>& ln_after_weight,
    const std::optional<Tensor>& ln_after_bias, const std::optional<Tensor>& gate, double scaling,
    std::string activation, double eps, bool residual_before_ln, double dropout_p, int64_t seed);
std::vector<Tensor> bottleneck_backward_cuda(
    const Tensor& gout, const Tensor& z, const std::optional<Tensor>& residual, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight, const std::optional<Tensor>& up_bias,
    const Tensor& h, const Tensor& stats, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& ln_before_weight, const std::optional<Tensor>& ln_before_bias,
    const std::optional<Tensor>& ln_after_weight, const std::optional<Tensor>& ln_after_bias,
    const std::optional<Tensor>& gate, double scaling, std::string activation, double eps,
    bool residual_before_ln, double dropout_p, int64_t seed, std::array<bool, 12> needs);
std::tuple<Tensor, Tensor, Tensor> prefix_attention_forward_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_p, const Tensor& v_p,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, double scale, bool causal,
    bool joint);
std::vector<Tensor> prefix_attention_backward_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_p, const Tensor& v_p,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, const Tensor& out,
    const Tensor& stats, const Tensor& stats_p, double scale, bool causal, bool joint, std::array<bool, 6> needs);
#endif

}  // namespace fastadapt
