// Gated prefix attention / prefix tuning: the argument contracts that csrc/prefix_attention.cpp
// defines and its CUDA twin (csrc/prefix_attention_cuda.cu) runs too.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fastadapt {

// q (B, H, Sq, D) against k, v (B, Hkv, Sk, D), k_p, v_p (B, Hkv, L, D), the mask (B, Sk) and, in
// gated mode, the gate (H,); the backward's dout, out and statistics too.
void check_prefix_attention_forward(c10::DeviceType device, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& k_p, const at::Tensor& v_p,
                                    const std::optional<at::Tensor>& gate,
                                    const std::optional<at::Tensor>& key_padding_mask, bool joint);
void check_prefix_attention_backward(c10::DeviceType device, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_p,
                                     const at::Tensor& v_p, const std::optional<at::Tensor>& gate,
                                     const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
                                     const at::Tensor& stats, const at::Tensor& stats_p, bool joint);

}  // namespace fastadapt
