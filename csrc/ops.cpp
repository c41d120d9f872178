// The one registration file of fastadapt._C: schemas of the native kernels in the namespace
// fastadapt_C (kept apart from the Python custom ops fastadapt::*, which call these through the
// dispatch backends "cpp" and "cuda"), and their CPU / CUDA implementations.
#include <Python.h>  // only for PyInit__C, which makes the setup.py build importable as fastadapt._C

#include <cmath>
#include <string>

#include <torch/library.h>

#include "common.h"
#include "ops.h"

namespace fastadapt {

using OptTensor = std::optional<Tensor>;

namespace {

// (M, in_features) of x, out_features, r: the shapes every other LoRA argument is checked against.
struct LoraDims {
  int64_t M, K, N, r;
};

LoraDims check_lora(const ArgCheck& c, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                    const Tensor& lora_B) {
  const at::ScalarType dt = x.scalar_type();
  c("x", x, {kAnySize, kAnySize}, dt);
  c.kernel_dtype("x", x);
  const int64_t M = x.size(0), K = x.size(1);
  c("weight", weight, {kAnySize, K}, dt);
  c("lora_A", lora_A, {kAnySize, K}, dt);
  const int64_t N = weight.size(0), r = lora_A.size(0);
  c("lora_B", lora_B, {N, r}, dt);
  return {M, K, N, r};
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// (M, K, N, n, r_max) of a multi-adapter LoRA call; on the CPU the per-adapter values are read
// and checked too (ids in [-1, n), ranks in [1, r_max], dropout probabilities in [0, 1)).
struct MultiLoraDims {
  int64_t M, K, N, n, R;
};

MultiLoraDims check_multi_lora(const ArgCheck& c, const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                               const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks,
                               const Tensor& adapter_ids, const OptTensor& dropout_p) {
  const at::ScalarType dt = x.scalar_type();
  c("x", x, {kAnySize, kAnySize}, dt);
  c.kernel_dtype("x", x);
  const int64_t M = x.size(0), K = x.size(1);
  c("weight", weight, {kAnySize, K}, dt);
  c("A_stack", A_stack, {kAnySize, kAnySize, K}, dt);
  const int64_t N = weight.size(0), n = A_stack.size(0), R = A_stack.size(1);
  c("B_stack", B_stack, {n, N, R}, dt);
  c("scalings", scalings, {n}, at::kFloat);
  c("ranks", ranks, {n}, at::kInt);
  c("adapter_ids", adapter_ids, {M}, at::kLong);
  c("dropout_p", dropout_p, {n}, at::kFloat);
  if (x.device().is_cpu()) {
    const Tensor ids = adapter_ids.contiguous(), rk = ranks.contiguous();
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(id[m] >= -1 && id[m] < n, c.op(), ": adapter_ids must be in [-1, ", n, "), got ", id[m],
                  " at row ", m);
    const int32_t* r = rk.data_ptr<int32_t>();
    for (int64_t a = 0; a < n; ++a)
      TORCH_CHECK(r[a] >= 1 && r[a] <= R, c.op(), ": ranks must be in [1, r_max = ", R, "], got ", r[a],
                  " for adapter ", a);
    if (present(dropout_p)) {
      const Tensor p = dropout_p->contiguous();
      for (int64_t a = 0; a < n; ++a) c.probability("dropout_p", p.data_ptr<float>()[a]);
    }
  }
  return {M, K, N, n, R};
}

// (M, d, m) of z and down_weight.
struct BottleneckDims {
  int64_t M, d, m;
};

BottleneckDims check_bottleneck(const ArgCheck& c, const Tensor& z, const OptTensor& residual,
                                const Tensor& down_weight, const OptTensor& down_bias, const Tensor& up_weight,
                                const OptTensor& up_bias, const OptTensor& scale, const OptTensor& lnb_w,
                                const OptTensor& lnb_b, const OptTensor& lna_w, const OptTensor& lna_b,
                                const OptTensor& gate, double eps, double dropout_p) {
  const at::ScalarType dt = z.scalar_type();
  c("z", z, {kAnySize, kAnySize}, dt);
  c.kernel_dtype("z", z);
  const int64_t M = z.size(0), d = z.size(1);
  c("down_weight", down_weight, {kAnySize, d}, dt);
  const int64_t m = down_weight.size(0);
  c("up_weight", up_weight, {d, m}, dt);
  c("residual", residual, {M, d}, dt);
  c("down_bias", down_bias, {m}, dt);
  c("up_bias", up_bias, {d}, dt);
  c("scale", scale, {kAnySize}, dt);
  TORCH_CHECK(!present(scale) || scale->numel() == 1 || scale->numel() == d, c.op(),
              ": scale must have 1 or d = ", d, " elements, got ", scale->numel());
  c("ln_before_weight", lnb_w, {d}, dt);
  c("ln_before_bias", lnb_b, {d}, dt);
  c("ln_after_weight", lna_w, {d}, dt);
  c("ln_after_bias", lna_b, {d}, dt);
  TORCH_CHECK(present(lnb_w) == present(lnb_b), c.op(), ": ln_before_weight and ln_before_bias come together");
  TORCH_CHECK(present(lna_w) == present(lna_b), c.op(), ": ln_after_weight and ln_after_bias come together");
  c("gate", gate, {M}, dt);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, c.op(), ": eps must be positive and finite, got ", eps);
  c.probability("dropout_p", dropout_p);
  return {M, d, m};
}

// q (B, H, Sq, D) against k, v (B, Hkv, Sk, D), k_p, v_p (B, Hkv, L, D), the mask and the gate.
void check_prefix(const ArgCheck& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_p,
                  const Tensor& v_p, const OptTensor& gate, const OptTensor& key_padding_mask, bool joint) {
  const at::ScalarType dt = q.scalar_type();
  c("q", q, {kAnySize, kAnySize, kAnySize, kAnySize}, dt);
  c.kernel_dtype("q", q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  c("k", k, {B, kAnySize, kAnySize, D}, dt);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, c.op(), ": the heads of q (", H, ") must be a multiple of those of k (", Hkv,
              ")");
  c("v", v, {B, Hkv, Sk, D}, dt);
  c("k_p", k_p, {B, Hkv, kAnySize, D}, dt);
  c("v_p", v_p, {B, Hkv, k_p.size(2), D}, dt);
  c("key_padding_mask", key_padding_mask, {B, Sk}, at::kBool);
  if (joint) return;
  TORCH_CHECK(present(gate), c.op(), ": gated mode (joint=False) needs a gate");
  c("gate", gate, {H}, at::kFloat);
}

}  // namespace

void check_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const OptTensor& bias, double dropout_p) {
  const ArgCheck c("fastadapt_C::lora_forward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("bias", bias, {s.N}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

void check_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, double dropout_p) {
  const ArgCheck c("fastadapt_C::lora_backward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("gy", gy, {s.M, s.N}, x.scalar_type());
  c("u", u, {s.M, s.r}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

void check_lora_segments(const char* op, int64_t r, at::IntArrayRef segments, at::ArrayRef<double> segment_p) {
  TORCH_CHECK(!segments.empty() && segments.size() == segment_p.size(), op, ": segments and segment_p need one entry "
              "per segment, got ", segments.size(), " and ", segment_p.size());
  int64_t total = 0;
  for (size_t k = 0; k < segments.size(); ++k) {
    TORCH_CHECK(segments[k] >= 1, op, ": segment ", k, " has ", segments[k], " rows, expected at least 1");
    TORCH_CHECK(segment_p[k] >= 0.0 && segment_p[k] < 1.0, op, ": segment_p[", k, "] must be in [0, 1), got ",
                segment_p[k]);
    total += segments[k];
  }
  TORCH_CHECK(total == r, op, ": segments sum to ", total, ", expected r = ", r);
}

void check_dora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const Tensor& magnitude, const OptTensor& bias, double dropout_p) {
  const ArgCheck c("fastadapt_C::dora_forward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("magnitude", magnitude, {s.N}, at::kFloat);
  c("bias", bias, {s.N}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

void check_dora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude, const Tensor& u,
                         const Tensor& pre, const Tensor& norm, double dropout_p) {
  const ArgCheck c("fastadapt_C::dora_backward", x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("gy", gy, {s.M, s.N}, x.scalar_type());
  c("magnitude", magnitude, {s.N}, at::kFloat);
  c("u", u, {s.M, s.r}, x.scalar_type());
  c("pre", pre, {s.M, s.N}, x.scalar_type());
  c("norm", norm, {s.N}, at::kFloat);
  c.probability("dropout_p", dropout_p);
}

void check_multi_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                              const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks,
                              const Tensor& adapter_ids, const OptTensor& bias, const OptTensor& dropout_p) {
  const ArgCheck c("fastadapt_C::multi_lora_forward", x, device);
  const MultiLoraDims s = check_multi_lora(c, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, dropout_p);
  c("bias", bias, {s.N}, x.scalar_type());
}

void check_multi_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                               const Tensor& A_stack, const Tensor& B_stack, const Tensor& u, const Tensor& scalings,
                               const Tensor& ranks, const Tensor& adapter_ids, const OptTensor& dropout_p) {
  const ArgCheck c("fastadapt_C::multi_lora_backward", x, device);
  const MultiLoraDims s = check_multi_lora(c, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, dropout_p);
  c("gy", gy, {s.M, s.N}, x.scalar_type());
  c("u", u, {s.M, s.R}, x.scalar_type());
}

void check_qlora_weight(c10::DeviceType device, const QuantizedWeight& q, int64_t out_features, int64_t in_features) {
  const ArgCheck c("fastadapt_C::qlora", q.data, device);
  const char* op = c.op();
  TORCH_CHECK(q.bits == 4 || q.bits == 8, op, ": bits must be 4 (NF4) or 8 (FP8), got ", q.bits);
  TORCH_CHECK(out_features > 0 && in_features > 0, op, ": the weight shape must be non-empty, got (", out_features,
              ", ", in_features, ")");
  TORCH_CHECK(q.blocksize > 0, op, ": blocksize must be positive, got ", q.blocksize);
  const int64_t numel = out_features * in_features, blocks = (numel + q.blocksize - 1) / q.blocksize;
  const bool nested = present(q.absmax2);
  // Flat buffers: each must hold exactly what the kernel indexes, contiguous.
  auto flat = [&](const char* name, const Tensor& t, int64_t n, at::ScalarType dt) {
    c(name, t.reshape(-1), {n}, dt);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  flat("data", q.data, (numel * q.bits + 7) / 8, at::kByte);
  flat("code", q.code, int64_t{1} << q.bits, at::kFloat);
  flat("absmax", q.absmax, blocks, nested ? at::kByte : at::kFloat);
  if (nested) {
    TORCH_CHECK(present(q.code2) && present(q.offset), op, ": a double-quantized weight needs absmax2, code2 and offset");
    TORCH_CHECK(q.blocksize2 > 0, op, ": blocksize2 must be positive, got ", q.blocksize2);
    flat("absmax2", *q.absmax2, (blocks + q.blocksize2 - 1) / q.blocksize2, at::kFloat);
    flat("code2", *q.code2, 256, at::kFloat);
    flat("offset", *q.offset, 1, at::kFloat);
  } else {
    TORCH_CHECK(!present(q.code2) && !present(q.offset), op, ": code2 / offset given without absmax2");
  }
}

void check_dropout_keep(c10::DeviceType device, const Tensor& like, double p) {
  const ArgCheck c("fastadapt_C::dropout_keep", like, device);
  c("like", like, {kAnySize, kAnySize}, like.scalar_type());
  c.probability("p", p);
}

void check_bottleneck_forward(c10::DeviceType device, const Tensor& z, const OptTensor& residual,
                              const Tensor& down_weight, const OptTensor& down_bias, const Tensor& up_weight,
                              const OptTensor& up_bias, const OptTensor& scale, const OptTensor& ln_before_weight,
                              const OptTensor& ln_before_bias, const OptTensor& ln_after_weight,
                              const OptTensor& ln_after_bias, const OptTensor& gate, double eps, double dropout_p) {
  const ArgCheck c("fastadapt_C::bottleneck_forward", z, device);
  check_bottleneck(c, z, residual, down_weight, down_bias, up_weight, up_bias, scale, ln_before_weight,
                   ln_before_bias, ln_after_weight, ln_after_bias, gate, eps, dropout_p);
}

void check_bottleneck_backward(c10::DeviceType device, const Tensor& gout, const Tensor& z, const OptTensor& residual,
                               const Tensor& down_weight, const OptTensor& down_bias, const Tensor& up_weight,
                               const OptTensor& up_bias, const Tensor& h, const Tensor& stats, const OptTensor& scale,
                               const OptTensor& ln_before_weight, const OptTensor& ln_before_bias,
                               const OptTensor& ln_after_weight, const OptTensor& ln_after_bias,
                               const OptTensor& gate, double eps, double dropout_p) {
  const ArgCheck c("fastadapt_C::bottleneck_backward", z, device);
  const BottleneckDims s = check_bottleneck(c, z, residual, down_weight, down_bias, up_weight, up_bias, scale,
                                            ln_before_weight, ln_before_bias, ln_after_weight, ln_after_bias, gate,
                                            eps, dropout_p);
  c("gout", gout, {s.M, s.d}, z.scalar_type());
  c("h", h, {s.M, s.m}, z.scalar_type());
  c("stats", stats, {4, s.M}, at::kFloat);
}

void check_prefix_attention_forward(c10::DeviceType device, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& k_p, const Tensor& v_p, const OptTensor& gate,
                                    const OptTensor& key_padding_mask, bool joint) {
  const ArgCheck c("fastadapt_C::prefix_attention_forward", q, device);
  check_prefix(c, q, k, v, k_p, v_p, gate, key_padding_mask, joint);
}

void check_prefix_attention_backward(c10::DeviceType device, const Tensor& dout, const Tensor& q, const Tensor& k,
                                     const Tensor& v, const Tensor& k_p, const Tensor& v_p, const OptTensor& gate,
                                     const OptTensor& key_padding_mask, const Tensor& out, const Tensor& stats,
                                     const Tensor& stats_p, bool joint) {
  const ArgCheck c("fastadapt_C::prefix_attention_backward", q, device);
  check_prefix(c, q, k, v, k_p, v_p, gate, key_padding_mask, joint);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  c("dout", dout, {B, H, Sq, D}, q.scalar_type());
  c("out", out, {B, H, Sq, D}, q.scalar_type());
  c("stats", stats, {B, H, Sq, 2}, at::kFloat);
  if (!joint) c("stats_p", stats_p, {B, H, Sq, 2}, at::kFloat);
}

}  // namespace fastadapt

namespace {

std::string build_info() {
  std::string info;
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#endif
#if defined(__AVX512F__)
  info += ", AVX-512";
#elif defined(__AVX2__)
  info += ", AVX2";
#else
  info += ", baseline SIMD";
#endif
#if defined(__SANITIZE_ADDRESS__)
  info += ", AddressSanitizer";
#endif
#ifdef _OPENMP
  info += ", OpenMP";
#else
  info += ", no OpenMP (single-threaded row passes)";
#endif
#ifdef FASTADAPT_WITH_CUDA
  info += ", CUDA kernels";
#else
  info += ", no CUDA kernels";
#endif
  return info;
}

bool has_cuda() {
#ifdef FASTADAPT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(fastadapt_C, m) {
  m.def("build_info() -> str", &build_info);
  m.def("has_cuda() -> bool", &has_cuda);
  // Flat index dropout mask (csrc/common.h) of a 2-D (M, K) input, True = kept.
  m.def("dropout_keep(Tensor like, float p, int seed) -> Tensor");
  // Backend signatures of fastadapt/ops/lora.py; gradients not asked for in `needs`
  // (x, lora_A, lora_B, bias, weight) come back as empty tensors.
  m.def("lora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, int seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with several adapters' rank segments, each with its own dropout (CPU only).
  m.def("lora_segments_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
        "int[] segments, float[] segment_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_segments_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, int[] segments, float[] segment_p, int seed, bool[5] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backend signatures of fastadapt/ops/dora.py: (y, u, pre, norm), and the gradients of
  // (x, lora_A, lora_B, magnitude, bias, weight), empty where not asked for in `needs`. CPU only.
  m.def("dora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, float scaling, "
        "Tensor? bias, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "Tensor u, Tensor pre, Tensor norm, float scaling, float dropout_p, int seed, bool[6] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backend signatures of fastadapt/ops/multi_lora.py; gradients not asked for in `needs`
  // (x, A_stack, B_stack, bias, weight) come back as empty tensors.
  m.def("multi_lora_forward(Tensor x, Tensor weight, Tensor A_stack, Tensor B_stack, Tensor scalings, Tensor ranks, "
        "Tensor adapter_ids, Tensor? bias, Tensor? dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("multi_lora_backward(Tensor gy, Tensor x, Tensor weight, Tensor A_stack, Tensor B_stack, Tensor u, "
        "Tensor scalings, Tensor ranks, Tensor adapter_ids, Tensor? dropout_p, int seed, bool[5] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
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
  // Backend signatures of fastadapt/ops/bottleneck.py: (out, h, stats), and the 12 gradients in
  // GRAD_NAMES order (empty where not needed or the input is absent).
  m.def("bottleneck_forward(Tensor z, Tensor? residual, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
        "Tensor? up_bias, Tensor? scale, Tensor? ln_before_weight, Tensor? ln_before_bias, Tensor? ln_after_weight, "
        "Tensor? ln_after_bias, Tensor? gate, float scaling, str activation, float eps, bool residual_before_ln, "
        "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("bottleneck_backward(Tensor gout, Tensor z, Tensor? residual, Tensor down_weight, Tensor? down_bias, "
        "Tensor up_weight, Tensor? up_bias, Tensor h, Tensor stats, Tensor? scale, Tensor? ln_before_weight, "
        "Tensor? ln_before_bias, Tensor? ln_after_weight, Tensor? ln_after_bias, Tensor? gate, float scaling, "
        "str activation, float eps, bool residual_before_ln, float dropout_p, int seed, bool[12] needs) -> Tensor[]");
  // Backend signatures of fastadapt/ops/prefix_attention.py: (out, stats, stats_p), and
  // (dq, dk, dv, dk_p, dv_p, dgate).
  m.def("prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, float scale, bool causal, bool joint) -> (Tensor, Tensor, Tensor)");
  m.def("prefix_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, Tensor out, Tensor stats, Tensor stats_p, float scale, bool causal, bool joint, "
        "bool[6] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {
  m.impl("dropout_keep", &fastadapt::dropout_keep_cpu);
  m.impl("lora_forward", &fastadapt::lora_forward_cpu);
  m.impl("lora_backward", &fastadapt::lora_backward_cpu);
  m.impl("lora_segments_forward", &fastadapt::lora_segments_forward_cpu);
  m.impl("lora_segments_backward", &fastadapt::lora_segments_backward_cpu);
  m.impl("dora_forward", &fastadapt::dora_forward_cpu);
  m.impl("dora_backward", &fastadapt::dora_backward_cpu);
  m.impl("multi_lora_forward", &fastadapt::multi_lora_forward_cpu);
  m.impl("multi_lora_backward", &fastadapt::multi_lora_backward_cpu);
  m.impl("qlora_dequantize", &fastadapt::qlora_dequantize_cpu);
  m.impl("qlora_forward", &fastadapt::qlora_forward_cpu);
  m.impl("qlora_backward", &fastadapt::qlora_backward_cpu);
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_cpu);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_cpu);
  m.impl("prefix_attention_forward", &fastadapt::prefix_attention_forward_cpu);
  m.impl("prefix_attention_backward", &fastadapt::prefix_attention_backward_cpu);
}

#ifdef FASTADAPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastadapt_C, CUDA, m) {
  m.impl("dropout_keep", &fastadapt::dropout_keep_cuda);
  m.impl("lora_forward", &fastadapt::lora_forward_cuda);
  m.impl("lora_backward", &fastadapt::lora_backward_cuda);
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_cuda);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_cuda);
  m.impl("prefix_attention_forward", &fastadapt::prefix_attention_forward_cuda);
  m.impl("prefix_attention_backward", &fastadapt::prefix_attention_backward_cuda);
}
#endif

// Loading the library registers the ops; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
