// LoRA linear, CPU kernels (math: fastadapt/reference/lora.py).
//
// What is fused, and what is left to ATen's GEMMs (MKL / oneDNN), is decided by measurement on
// this workload (M=2048, d=1024, r=16, one core, best of 6 runs): the frozen products x W^T and gy W take
// ~46 ms fp32 / ~11 ms bf16 each, while every rank-r product (x A^T, gy B, gy^T u, gu^T x,
// u B^T into y) takes 0.4-1.4 ms in ATen, which runs the bf16 ones on the AVX512-BF16 dot
// instructions; our own float loops for the same products cost 1.5-3x that. So without dropout
// the op is ATen GEMMs on in-place outputs (no temporaries, no extra passes over y or gx).
// With dropout, fusion pays: the reference draws a mask tensor (torch.rand, single-threaded) and
// materializes D(x) twice; here the mask is regenerated in-register from (seed, flat index)
// (csrc/common.h) inside two row passes, and neither the mask nor D(x) is ever stored:
//   forward:  u = s D(x) A^T                      (one pass over x)
//   backward: gx = D(gu A) (seed of the gy W GEMM), gA = gu^T D(x)   (one pass over x)
// Several adapters summed, each with its own dropout (rank segments, fastadapt/reference/lora.py):
// the same passes, each block of rows loaded once per segment with that segment's mask.
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"
#include "lora.h"

namespace fastadapt {

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

void check_lora_forward(c10::DeviceType device, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                        const Tensor& lora_B, const std::optional<Tensor>& bias, double dropout_p, const char* op) {
  const ArgCheck c(op, x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("bias", bias, {s.N}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

void check_lora_backward(c10::DeviceType device, const Tensor& gy, const Tensor& x, const Tensor& weight,
                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, double dropout_p,
                         const char* op) {
  const ArgCheck c(op, x, device);
  const LoraDims s = check_lora(c, x, weight, lora_A, lora_B);
  c("gy", gy, {s.M, s.N}, x.scalar_type());
  c("u", u, {s.M, s.r}, x.scalar_type());
  c.probability("dropout_p", dropout_p);
}

namespace {

// The adapters' ranks: rank segments of lora_A (r rows), one dropout probability each, every segment at
// least one row, r in all.
void check_lora_ranks(const char* op, const Tensor& lora_A, at::IntArrayRef ranks,
                         at::ArrayRef<double> ranks_p) {
  const ArgCheck c(op, lora_A, c10::kCPU);
  TORCH_CHECK(!ranks.empty() && ranks.size() == ranks_p.size(), op, ": ranks and ranks_p need one entry "
              "per adapter, got ", ranks.size(), " and ", ranks_p.size());
  int64_t total = 0;  // overflow-checked: a sum that wraps to r let segments past r through
  for (size_t k = 0; k < ranks.size(); ++k) {
    TORCH_CHECK(ranks[k] >= 1, op, ": ranks[", k, "] is ", ranks[k], ", expected at least 1");
    TORCH_CHECK(ranks_p[k] >= 0.0 && ranks_p[k] < 1.0, op, ": ranks_p[", k, "] must be in [0, 1), got ",
                ranks_p[k]);
    total = c.add("the sum of ranks", total, ranks[k]);
  }
  TORCH_CHECK(total == lora_A.size(0), op, ": ranks sum to ", total, ", expected r = ", lora_A.size(0));
}

using cpu::RB;

// Rows [begin, end) of A (columns of u, B) and the dropout mask they see.
struct Segment {
  int64_t begin, end;
  cpu::Dropout d;
};

std::vector<Segment> segments_of(int64_t r, at::IntArrayRef ranks, at::ArrayRef<double> ranks_p, int64_t seed) {
  std::vector<Segment> out;
  int64_t begin = 0;
  for (size_t k = 0; k < ranks.size(); ++k) {
    // Segment k's mask from seed + k, wrapping (in uint64: a signed seed + k may overflow).
    const auto seed_k = static_cast<int64_t>(static_cast<uint64_t>(seed) + k);
    out.push_back({begin, begin + ranks[k], cpu::Dropout(ranks_p[k], seed_k)});
    begin += ranks[k];
  }
  return out;
}

bool any_dropout(const std::vector<Segment>& segs) {
  for (const Segment& g : segs)
    if (g.d.active) return true;
  return false;
}

// u = s D(x) A^T, rounded to T, each segment's columns from its own D; the masks live only in
// registers.
template <typename T>
void dropout_down_pass(const Tensor& x, const float* A, Tensor& u, float s, const std::vector<Segment>& segs) {
  const int64_t M = x.size(0), K = x.size(1), r = u.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  T* up = u.data_ptr<T>();
  const int64_t blocks = (M + RB - 1) / RB;
  at::parallel_for(0, blocks, cpu::block_grain(RB * r * K), [&](int64_t b0, int64_t b1) {
    std::vector<float> xd(RB * K);
    float dots[RB];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * RB, rows = std::min(RB, M - m0);
      for (const Segment& g : segs) {
        cpu::load_rows(xp, ldx, m0, rows, K, xd.data(), g.d);
        for (int64_t j = g.begin; j < g.end; ++j) {
          cpu::dot_rows<cpu::dot_acc_t<T>>(xd.data(), K, A + j * K, K, dots);
          for (int64_t i = 0; i < rows; ++i) up[(m0 + i) * r + j] = static_cast<T>(s * dots[i]);
        }
      }
    }
  });
}

// With dropout: gx = sum_k D_k(gu_k A_k) (M x K, T; the caller adds gy W on top) and per-chunk
// float32 partials of gA = gu^T D(x) in `slots` (chunks x rK), summed by the caller in chunk
// order. One pass over x, one mask draw per element and segment shared by both.
template <typename T>
void dropout_up_pass(const Tensor& x, const Tensor& gu, const float* A, const std::vector<Segment>& segs,
                     bool need_x, bool need_A, Tensor& gx, Tensor& slots) {
  const int64_t M = x.size(0), K = x.size(1), r = gu.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  const float* gup = gu.data_ptr<float>();
  T* gxp = need_x ? gx.data_ptr<T>() : nullptr;
  const int64_t blocks = (M + RB - 1) / RB;
  const int64_t chunks = slots.size(0), width = slots.size(1);
  const int64_t blocks_per_chunk = (blocks + chunks - 1) / chunks;
  float* slot_base = slots.data_ptr<float>();

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // acc: gx's rows in float32 (the first segment's part, then the others' added); part: one more.
    std::vector<float> xd(RB * K), scale(RB * K), acc(need_x ? RB * K : 0), part(need_x ? RB * K : 0), g(RB * r);
    float coef[RB];
    for (int64_t c = c0; c < c1; ++c) {
      float* gA = need_A ? slot_base + c * width : nullptr;
      const int64_t end = std::min(blocks, (c + 1) * blocks_per_chunk);
      for (int64_t blk = c * blocks_per_chunk; blk < end; ++blk) {
        const int64_t m0 = blk * RB, rows = std::min(RB, M - m0);
        for (int64_t i = 0; i < RB; ++i)  // padding rows: 0, so they add nothing to gA
          for (int64_t j = 0; j < r; ++j) g[i * r + j] = i < rows ? gup[(m0 + i) * r + j] : 0.f;
        for (size_t k = 0; k < segs.size(); ++k) {
          const Segment& sg = segs[k];
          cpu::load_rows(xp, ldx, m0, rows, K, xd.data(), sg.d, scale.data());
          if (need_A) {
            for (int64_t j = sg.begin; j < sg.end; ++j) {
              for (int64_t i = 0; i < RB; ++i) coef[i] = g[i * r + j];
              cpu::axpy_rows(coef, xd.data(), K, gA + j * K, K);
            }
          }
          if (!need_x) continue;
          float* out = k == 0 ? acc.data() : part.data();
          std::fill(out, out + RB * K, 0.f);
          cpu::outer_rows(g.data() + sg.begin, r, sg.end - sg.begin, A + sg.begin * K, K, out, K);
          const float* sc = scale.data();
          const int64_t n = rows * K;
          if (k == 0) {
            if (sg.d.active)
              for (int64_t e = 0; e < n; ++e) acc[e] *= sc[e];
          } else if (sg.d.active) {
            for (int64_t e = 0; e < n; ++e) acc[e] += out[e] * sc[e];
          } else {
            for (int64_t e = 0; e < n; ++e) acc[e] += out[e];
          }
        }
        if (need_x) {
          for (int64_t i = 0; i < rows; ++i) {
            T* out = gxp + (m0 + i) * K;
            const float* row = acc.data() + i * K;
            for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(row[k]);
          }
        }
      }
    }
  });
}

}  // namespace

namespace {

std::tuple<Tensor, Tensor> forward(const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                                   double scaling, const std::optional<Tensor>& bias,
                                   const std::vector<Segment>& segs) {
  const int64_t M = x_in.size(0), N = weight.size(0), r = lora_A.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (M == 0) return {at::empty({0, N}, x_in.options()), at::empty({0, r}, x_in.options())};
  const Tensor x = cpu::rows_contiguous(x_in);
  Tensor u;
  if (any_dropout(segs)) {
    u = at::empty({M, r}, x.options());
    const Tensor A = lora_A.to(at::kFloat).contiguous();
    FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::lora_forward", [&] {
      dropout_down_pass<scalar_t>(x, A.data_ptr<float>(), u, static_cast<float>(scaling), segs);
    });
  } else {
    u = at::mm(x, lora_A.t());
    u.mul_(scaling);
  }
  Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(u, lora_B.t());  // rank-r update in place: no temporary, no extra pass
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& gy_in, const Tensor& x_in,
                                                            const Tensor& weight, const Tensor& lora_A,
                                                            const Tensor& lora_B, const Tensor& u, double scaling,
                                                            const std::vector<Segment>& segs,
                                                            std::array<bool, 5> needs) {
  const int64_t M = x_in.size(0), K = x_in.size(1), r = lora_A.size(0);
  const bool need_x = needs[0], need_A = needs[1], need_B = needs[2], need_bias = needs[3], need_w = needs[4];
  const Tensor gy = cpu::rows_contiguous(gy_in), x = cpu::rows_contiguous(x_in);
  const auto opts = x.options();
  Tensor gx = at::empty({0}, opts), gA = at::empty({0}, opts), gB = at::empty({0}, opts);
  Tensor gbias = at::empty({0}, opts), gweight = at::empty({0}, opts);
  if (need_B) gB = at::mm(gy.t(), u).to(lora_B.scalar_type());
  if (need_bias) gbias = at::sum(gy, {0}, false, at::kFloat).to(gy.scalar_type());
  if (need_w) gweight = at::mm(gy.t(), x);
  if (!need_x && !need_A) return {gx, gA, gB, gbias, gweight};

  Tensor gu = at::mm(gy, lora_B);
  gu.mul_(scaling);
  if (!any_dropout(segs)) {
    if (need_x) {
      gx = at::mm(gy, weight);
      gx.addmm_(gu, lora_A);
    }
    if (need_A) gA = at::mm(gu.t(), x).to(lora_A.scalar_type());
    return {gx, gA, gB, gbias, gweight};
  }
  // Dropout: one fused pass over x for gx's seed and gA, then the frozen GEMM on top of the seed.
  const int64_t blocks = (M + RB - 1) / RB;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  Tensor slots = at::zeros({chunks, need_A ? r * K : 0}, opts.dtype(at::kFloat));
  if (need_x) gx = at::empty({M, K}, opts);
  if (M > 0) {
    const Tensor A = lora_A.to(at::kFloat).contiguous();
    const Tensor gu32 = gu.to(at::kFloat).contiguous();
    FA_DISPATCH_CPU(x.scalar_type(), "fastadapt_C::lora_backward", [&] {
      dropout_up_pass<scalar_t>(x, gu32, A.data_ptr<float>(), segs, need_x, need_A, gx, slots);
    });
    if (need_x) gx.addmm_(gy, weight);  // gx = D(gu A) + gy W
  }
  if (need_A) {
    // A fresh tensor even when no cast is needed: returns of a custom op must not alias.
    gA = at::empty({r, K}, opts.dtype(lora_A.scalar_type()));
    gA.copy_((chunks == 1 ? slots[0] : slots.sum(0)).view({r, K}));
  }
  return {gx, gA, gB, gbias, gweight};
}

}  // namespace

std::tuple<Tensor, Tensor> lora_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, double scaling,
                                            const std::optional<Tensor>& bias, double dropout_p, int64_t seed) {
  check_lora_forward(c10::kCPU, x, weight, lora_A, lora_B, bias, dropout_p);
  return forward(x, weight, lora_A, lora_B, scaling, bias, {{0, lora_A.size(0), cpu::Dropout(dropout_p, seed)}});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, std::array<bool, 5> needs) {
  check_lora_backward(c10::kCPU, gy, x, weight, lora_A, lora_B, u, dropout_p);
  return backward(gy, x, weight, lora_A, lora_B, u, scaling, {{0, lora_A.size(0), cpu::Dropout(dropout_p, seed)}},
                  needs);
}

namespace {

std::tuple<Tensor, Tensor> lora_segments_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                                     const Tensor& lora_B, double scaling,
                                                     const std::optional<Tensor>& bias, at::IntArrayRef ranks,
                                                     at::ArrayRef<double> ranks_p, int64_t seed) {
  const char* op = "fastadapt_C::lora_segments_forward";
  check_lora_forward(c10::kCPU, x, weight, lora_A, lora_B, bias, 0.0, op);
  check_lora_ranks(op, lora_A, ranks, ranks_p);
  return forward(x, weight, lora_A, lora_B, scaling, bias, segments_of(lora_A.size(0), ranks, ranks_p, seed));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_segments_backward_cpu(
    const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, at::IntArrayRef ranks, at::ArrayRef<double> ranks_p, int64_t seed,
    std::array<bool, 5> needs) {
  const char* op = "fastadapt_C::lora_segments_backward";
  check_lora_backward(c10::kCPU, gy, x, weight, lora_A, lora_B, u, 0.0, op);
  check_lora_ranks(op, lora_A, ranks, ranks_p);
  return backward(gy, x, weight, lora_A, lora_B, u, scaling, segments_of(lora_A.size(0), ranks, ranks_p, seed),
                  needs);
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/lora.py; gradients not asked for in `needs`
  // (x, lora_A, lora_B, bias, weight) come back as empty tensors.
  m.def("lora_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, int seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with several adapters' rank segments, each with its own dropout (CPU only).
  m.def("lora_segments_forward(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
        "int[] ranks, float[] ranks_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_segments_backward(Tensor gy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, int[] ranks, float[] ranks_p, int seed, bool[5] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

FASTADAPT_CPU_KERNELS(lora)
FASTADAPT_CPU_KERNELS(lora_segments)
