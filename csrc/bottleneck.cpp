// Bottleneck adapter, CPU kernels (math and gradient formulas: fastadapt/reference/bottleneck.py).
//
// The two projections are ATen GEMMs (MKL / oneDNN: on AVX512-BF16 machines their bf16 products
// run 2-3x faster than any float loop of ours, measured on the LoRA products of the same shapes).
// Everything between and around them is ours, in row passes (at::parallel_for over blocks of
// rows, float32 math, one rounding to the input dtype where eager rounds: LN outputs, h, a, g_u,
// g_h) that read each (M, d) tensor once and write each result once:
//   forward:  [LN_before] -> h = zn W_d^T + b_d (GEMM) -> a = f(h) -> u = a W_u^T + b_u (GEMM)
//             -> one epilogue pass: scale, dropout (mask from (seed, flat index), never stored),
//                gate, residual, LN_after with its statistics, out written once.
//             The eager module instead materializes s, q, o, o + r and the mask: five (M, d)
//             temporaries and as many passes.
//   backward: recompute a and (if LN_after, gate or scale need it) u, then one pass over (gout, u, r) for the LN_after backward,
//             g_gate, g_scale, g_b_u, g_u; GEMMs for g_W_u, g_a, g_W_d, g_zn; a small pass for
//             g_h = g_a f'(h); one pass for the LN_before backward. Column sums (parameter
//             gradients) go to per-chunk partials reduced in chunk order (deterministic).
#include <cmath>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bottleneck.h"
#include "cpu_common.h"
#include "registration.h"

namespace fastadapt {
namespace {

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

BottleneckDims check_bottleneck(const ArgCheck& c, const BottleneckArgs& a) {
  const Tensor& z = a.z;
  const at::ScalarType dt = z.scalar_type();
  c("z", z, {kAnySize, kAnySize}, dt);
  c.kernel_dtype("z", z);
  const int64_t M = z.size(0), d = z.size(1);
  c("down_weight", a.down_weight, {kAnySize, d}, dt);
  const int64_t m = a.down_weight.size(0);
  c("up_weight", a.up_weight, {d, m}, dt);
  c("residual", a.residual, {M, d}, dt);
  c("down_bias", a.down_bias, {m}, dt);
  c("up_bias", a.up_bias, {d}, dt);
  c("scale", a.scale, {kAnySize}, dt);
  TORCH_CHECK(!present(a.scale) || a.scale->numel() == 1 || a.scale->numel() == d, c.op(),
              ": scale must have 1 or d = ", d, " elements, got ", a.scale->numel());
  c("ln_before_weight", a.ln_before_weight, {d}, dt);
  c("ln_before_bias", a.ln_before_bias, {d}, dt);
  c("ln_after_weight", a.ln_after_weight, {d}, dt);
  c("ln_after_bias", a.ln_after_bias, {d}, dt);
  TORCH_CHECK(present(a.ln_before_weight) == present(a.ln_before_bias), c.op(),
              ": ln_before_weight and ln_before_bias come together");
  TORCH_CHECK(present(a.ln_after_weight) == present(a.ln_after_bias), c.op(),
              ": ln_after_weight and ln_after_bias come together");
  c("gate", a.gate, {M}, dt);
  TORCH_CHECK(std::isfinite(a.eps) && a.eps > 0.0, c.op(), ": eps must be positive and finite, got ", a.eps);
  c.probability("dropout_p", a.dropout_p);
  return {M, d, m};
}

}  // namespace

BottleneckDims check_bottleneck_forward(c10::DeviceType device, const BottleneckArgs& a) {
  return check_bottleneck(ArgCheck("fastadapt_C::bottleneck_forward", a.z, device), a);
}

void check_bottleneck_backward(c10::DeviceType device, const BottleneckArgs& a, const Tensor& gout, const Tensor& h,
                               const Tensor& stats) {
  const ArgCheck c("fastadapt_C::bottleneck_backward", a.z, device);
  const BottleneckDims s = check_bottleneck(c, a);
  c("gout", gout, {s.M, s.d}, a.z.scalar_type());
  c("h", h, {s.M, s.m}, a.z.scalar_type());
  c("stats", stats, {4, s.M}, at::kFloat);
}

std::array<bool, 12> wanted_grads(const BottleneckArgs& a, std::array<bool, 12> needs) {
  const std::array<const OptTensor*, 12> optional = {nullptr, &a.residual, nullptr, &a.down_bias, nullptr,
                                                     &a.up_bias, &a.scale, &a.ln_before_weight, &a.ln_before_bias,
                                                     &a.ln_after_weight, &a.ln_after_bias, &a.gate};
  for (size_t i = 0; i < needs.size(); ++i) needs[i] = needs[i] && (optional[i] == nullptr || present(*optional[i]));
  return needs;
}

namespace {

using cpu::RB;

enum class Act { identity, relu, gelu, gelu_tanh, silu, tanh, leakyrelu };
constexpr float kLeakySlope = 0.01f;  // F.leaky_relu's default, which adapters uses

Act parse_activation(const std::string& name) {
  if (name == "identity") return Act::identity;
  if (name == "relu") return Act::relu;
  if (name == "gelu") return Act::gelu;
  if (name == "gelu_tanh") return Act::gelu_tanh;
  if (name == "silu") return Act::silu;
  if (name == "tanh") return Act::tanh;
  if (name == "leakyrelu") return Act::leakyrelu;
  TORCH_CHECK(false, "fastadapt_C::bottleneck: unknown activation '", name,
              "' (expected a canonical name: identity relu gelu gelu_tanh silu tanh leakyrelu)");
}

inline float act_fwd(Act act, float h) {
  switch (act) {
    case Act::relu: return h <= 0.f ? 0.f : h;  // NaN stays NaN, as F.relu
    case Act::gelu: return 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f));
    case Act::gelu_tanh: {
      const float k = 0.7978845608028654f, c = 0.044715f;
      return 0.5f * h * (1.f + std::tanh(k * (h + c * h * h * h)));
    }
    case Act::silu: return h / (1.f + std::exp(-h));
    case Act::tanh: return std::tanh(h);
    case Act::leakyrelu: return h > 0.f ? h : kLeakySlope * h;
    default: return h;
  }
}

// f'(h) with torch's choices at the kinks (relu'(0) = 0, leaky_relu'(0) = slope) and at NaN
// (relu'(NaN) = 1, leaky_relu'(NaN) = slope: torch tests h <= 0 and h > 0 respectively).
inline float act_grad(Act act, float h) {
  switch (act) {
    case Act::relu: return h <= 0.f ? 0.f : 1.f;
    case Act::gelu:
      return 0.5f * (1.f + std::erf(h * 0.70710678118654752f)) + h * std::exp(-0.5f * h * h) * 0.3989422804014327f;
    case Act::gelu_tanh: {
      const float k = 0.7978845608028654f, c = 0.044715f;
      const float t = std::tanh(k * (h + c * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k * (1.f + 3.f * c * h * h);
    }
    case Act::silu: {
      const float sg = 1.f / (1.f + std::exp(-h));
      return sg * (1.f + h * (1.f - sg));
    }
    case Act::tanh: {
      const float t = std::tanh(h);
      return 1.f - t * t;
    }
    case Act::leakyrelu: return h > 0.f ? 1.f : kLeakySlope;
    default: return 1.f;
  }
}

// g * f'(h), where a dead ReLU passes exactly 0 whatever g holds (torch's threshold_backward
// selects, it does not multiply: a NaN or inf g must not reach the down-projection's gradient).
inline float act_backward(Act act, float g, float h) {
  return act == Act::relu ? (h <= 0.f ? 0.f : g) : g * act_grad(act, h);
}

// Row reductions in double (16 independent lanes, so they still vectorize): a per-row LN
// statistic or gate gradient is one number from d terms that cancel.
inline double row_sum(const float* v, int64_t n) {
  double part[cpu::LANES] = {};
  int64_t k = 0;
  for (; k + cpu::LANES <= n; k += cpu::LANES)
    for (int64_t l = 0; l < cpu::LANES; ++l) part[l] += static_cast<double>(v[k + l]);
  double s = 0.0;
  for (int64_t l = 0; l < cpu::LANES; ++l) s += part[l];
  for (; k < n; ++k) s += static_cast<double>(v[k]);
  return s;
}

inline double row_dot(const float* a, const float* b, int64_t n) {
  double part[cpu::LANES] = {};
  int64_t k = 0;
  for (; k + cpu::LANES <= n; k += cpu::LANES)
    for (int64_t l = 0; l < cpu::LANES; ++l) part[l] += static_cast<double>(a[k + l]) * static_cast<double>(b[k + l]);
  double s = 0.0;
  for (int64_t l = 0; l < cpu::LANES; ++l) s += part[l];
  for (; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return s;
}

// Mean and 1/sqrt(var + eps) of a row (two-pass, as the reference's _stats).
inline void row_stats(const float* x, int64_t n, float eps, float* tmp, float& mean, float& rstd) {
  const double mu = row_sum(x, n) / static_cast<double>(n);
  for (int64_t k = 0; k < n; ++k) tmp[k] = x[k] - static_cast<float>(mu);
  const double var = row_dot(tmp, tmp, n) / static_cast<double>(n);
  mean = static_cast<float>(mu);
  rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
}

// LayerNorm backward of one row given xhat: gx = rstd (gg - mean(gg) - xhat mean(gg xhat)), gg = g w.
inline void ln_backward_row(const float* g, const float* xhat, const float* w, float rstd, int64_t n, float* gg,
                            float* gx) {
  for (int64_t k = 0; k < n; ++k) gg[k] = g[k] * w[k];
  const float mg = static_cast<float>(row_sum(gg, n) / static_cast<double>(n));
  const float mgx = static_cast<float>(row_dot(gg, xhat, n) / static_cast<double>(n));
  for (int64_t k = 0; k < n; ++k) gx[k] = rstd * (gg[k] - mg - xhat[k] * mgx);
}

Tensor f32(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : Tensor();
}

const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

int64_t chunks_for(int64_t M) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + RB - 1) / RB));
}

// Rows [begin, end) of chunk c when M rows are split into `chunks` contiguous chunks.
inline void chunk_rows(int64_t c, int64_t chunks, int64_t M, int64_t& begin, int64_t& end) {
  const int64_t per = (M + chunks - 1) / chunks;
  begin = std::min(M, c * per);
  end = std::min(M, begin + per);
}

// out = LN(x) rounded to T, and its row statistics. (LN_before in the forward, and the recompute
// of zn in the backward.)
template <typename T>
void layer_norm_pass(const Tensor& x, const float* w, const float* b, float eps, Tensor& out, float* mean,
                     float* rstd, bool use_stats) {
  const int64_t M = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t ldx = x.stride(0);
  T* op = out.data_ptr<T>();
  at::parallel_for(0, M, cpu::block_grain(8 * d) * RB, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(d), tmp(d);
    for (int64_t m = m0; m < m1; ++m) {
      const T* src = xp + m * ldx;
      for (int64_t k = 0; k < d; ++k) row[k] = static_cast<float>(src[k]);
      float mu, rs;
      if (use_stats) {
        mu = mean[m];
        rs = rstd[m];
      } else {
        row_stats(row.data(), d, eps, tmp.data(), mu, rs);
        mean[m] = mu;
        rstd[m] = rs;
      }
      T* dst = op + m * d;
      for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<T>((row[k] - mu) * rs * w[k] + b[k]);
    }
  });
}

// a = f(h) rounded to T (M x m, small).
template <typename T>
void activation_pass(const Tensor& h, Act act, Tensor& a) {
  const int64_t n = h.numel();
  const T* hp = h.data_ptr<T>();
  T* ap = a.data_ptr<T>();
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) ap[i] = static_cast<T>(act_fwd(act, static_cast<float>(hp[i])));
  });
}

struct Epilogue {
  const float* scale = nullptr;  // (1,) or (d,) or null
  int64_t scale_n = 0;
  float scaling = 1.f;
  const float* gate = nullptr;   // (M,) or null
  const float* lna_w = nullptr;  // LN_after, or null
  const float* lna_b = nullptr;
  bool res_in_ln = false;        // LN_after(o + r) (else LN_after(o) + r)
  float eps = 1e-5f;
  cpu::Dropout drop{0.0, 0};

  // f[k] = dropout(k) * scaling * scale[k] for row m.
  void factors(int64_t m, int64_t d, float* f) const {
    if (drop.active) cpu::dropout_row(drop, m, d, f);
    else std::fill(f, f + d, 1.f);
    if (scale && scale_n == d) {
      for (int64_t k = 0; k < d; ++k) f[k] *= scaling * scale[k];
    } else {
      const float s = scaling * (scale ? scale[0] : 1.f);
      for (int64_t k = 0; k < d; ++k) f[k] *= s;
    }
  }
};

template <typename T>
void epilogue_forward(const Tensor& u, const T* rp, int64_t ldr, const Epilogue& e, Tensor& out, float* mean,
                      float* rstd) {
  const int64_t M = u.size(0), d = u.size(1);
  const T* up = u.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, M, cpu::block_grain(8 * d) * RB, [&](int64_t m0, int64_t m1) {
    std::vector<float> f(d), t(d), tmp(d);
    for (int64_t m = m0; m < m1; ++m) {
      e.factors(m, d, f.data());
      const float g = e.gate ? e.gate[m] : 1.f;
      const T* urow = up + m * d;
      const T* rrow = rp ? rp + m * ldr : nullptr;
      for (int64_t k = 0; k < d; ++k) t[k] = g * (static_cast<float>(urow[k]) * f[k]);  // o
      T* orow = op + m * d;
      if (e.lna_w) {
        if (e.res_in_ln && rrow)
          for (int64_t k = 0; k < d; ++k) t[k] += static_cast<float>(rrow[k]);
        float mu, rs;
        row_stats(t.data(), d, e.eps, tmp.data(), mu, rs);
        mean[m] = mu;
        rstd[m] = rs;
        if (rrow && !e.res_in_ln) {
          // LN_after(o) rounded as eager's layer_norm output, then + r.
          for (int64_t k = 0; k < d; ++k) {
            const float ln = static_cast<float>(static_cast<T>((t[k] - mu) * rs * e.lna_w[k] + e.lna_b[k]));
            orow[k] = static_cast<T>(ln + static_cast<float>(rrow[k]));
          }
        } else {
          for (int64_t k = 0; k < d; ++k) orow[k] = static_cast<T>((t[k] - mu) * rs * e.lna_w[k] + e.lna_b[k]);
        }
      } else if (rrow) {
        for (int64_t k = 0; k < d; ++k) orow[k] = static_cast<T>(t[k] + static_cast<float>(rrow[k]));
      } else {
        for (int64_t k = 0; k < d; ++k) orow[k] = static_cast<T>(t[k]);
      }
    }
  });
}

// Backward epilogue: per row, LN_after backward, g_gate, g_u (T), and per-chunk column partials
// of g_lna_w, g_lna_b, g_b_u (float) and g_scale (double).
template <typename T>
void epilogue_backward(const Tensor& gout, const Tensor& u, const T* rp, int64_t ldr, const Epilogue& e,
                       const float* mean, const float* rstd, Tensor& g_u, T* g_r, float* g_gate, Tensor& fslots,
                       Tensor& dslots, bool need_scale) {
  const int64_t M = gout.size(0), d = gout.size(1);
  const T* gp = gout.data_ptr<T>();
  const int64_t ldg = gout.stride(0);
  const T* up = u.defined() ? u.data_ptr<T>() : nullptr;  // only LN_after, gate and scale need u
  T* gup = g_u.data_ptr<T>();
  const int64_t chunks = fslots.size(0);
  float* fbase = fslots.data_ptr<float>();
  double* dbase = dslots.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> f(d), t(d), xhat(d), go(d), gg(d), tmp(d);
    for (int64_t c = c0; c < c1; ++c) {
      float* g_lnw = fbase + c * 3 * d;
      float* g_lnb = g_lnw + d;
      float* g_bu = g_lnb + d;
      double* g_sc = dbase + c * d;
      int64_t begin, end;
      chunk_rows(c, chunks, M, begin, end);
      for (int64_t m = begin; m < end; ++m) {
        e.factors(m, d, f.data());
        const float g = e.gate ? e.gate[m] : 1.f;
        const T* urow = up ? up + m * d : nullptr;
        const T* grow = gp + m * ldg;
        for (int64_t k = 0; k < d; ++k) go[k] = static_cast<float>(grow[k]);
        if (e.lna_w) {
          const T* rrow = (rp && e.res_in_ln) ? rp + m * ldr : nullptr;
          for (int64_t k = 0; k < d; ++k) {
            float o = g * (static_cast<float>(urow[k]) * f[k]);
            if (rrow) o += static_cast<float>(rrow[k]);
            xhat[k] = (o - mean[m]) * rstd[m];
          }
          for (int64_t k = 0; k < d; ++k) {
            g_lnw[k] += go[k] * xhat[k];
            g_lnb[k] += go[k];
          }
          ln_backward_row(go.data(), xhat.data(), e.lna_w, rstd[m], d, gg.data(), tmp.data());
          std::copy(tmp.begin(), tmp.end(), go.begin());  // g_o = g_t
          if (g_r && rrow) {
            T* out = g_r + m * d;
            for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(go[k]);
          }
        }
        if (e.gate) {
          // g_gate = sum_k g_o q_k with q = u f
          for (int64_t k = 0; k < d; ++k) t[k] = static_cast<float>(urow[k]) * f[k];
          if (g_gate) g_gate[m] = static_cast<float>(row_dot(go.data(), t.data(), d));
          for (int64_t k = 0; k < d; ++k) go[k] *= g;
        }
        T* gurow = gup + m * d;
        for (int64_t k = 0; k < d; ++k) {
          const float gu = go[k] * f[k];
          g_bu[k] += gu;
          gurow[k] = static_cast<T>(gu);
        }
        if (need_scale) {
          // d(loss)/d(scale_k) = scaling * g_o * drop * u: f / scale_k without dividing by scale.
          const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(d);
          for (int64_t k = 0; k < d; ++k) {
            const float dk = e.drop.active
                                 ? (dropout_keep_at(e.drop.seed, base + k, e.drop.threshold) ? e.drop.inv_keep : 0.f)
                                 : 1.f;
            g_sc[k] += static_cast<double>(go[k] * dk * static_cast<float>(urow[k])) * e.scaling;
          }
        }
      }
    }
  });
}

// g_h = f'(h) * g_a rounded to T (M x m).
template <typename T>
void activation_grad_pass(const Tensor& h, const Tensor& g_a, Act act, Tensor& g_h) {
  const int64_t n = h.numel();
  const T* hp = h.data_ptr<T>();
  const T* gap = g_a.data_ptr<T>();
  T* ghp = g_h.data_ptr<T>();
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      ghp[i] = static_cast<T>(act_backward(act, static_cast<float>(gap[i]), static_cast<float>(hp[i])));
  });
}

// LN_before backward: g_z from g_zn, with per-chunk partials of g_lnb_w, g_lnb_b.
template <typename T>
void ln_before_backward(const Tensor& g_zn, const Tensor& z, const float* w, const float* mean, const float* rstd,
                        Tensor& g_z, Tensor& slots) {
  const int64_t M = z.size(0), d = z.size(1);
  const T* gp = g_zn.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const int64_t ldz = z.stride(0);
  T* gzp = g_z.data_ptr<T>();
  const int64_t chunks = slots.size(0);
  float* base = slots.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> g(d), xhat(d), gg(d), gx(d);
    for (int64_t c = c0; c < c1; ++c) {
      float* g_w = base + c * 2 * d;
      float* g_b = g_w + d;
      int64_t begin, end;
      chunk_rows(c, chunks, M, begin, end);
      for (int64_t m = begin; m < end; ++m) {
        const T* grow = gp + m * d;
        const T* zrow = zp + m * ldz;
        for (int64_t k = 0; k < d; ++k) {
          g[k] = static_cast<float>(grow[k]);
          xhat[k] = (static_cast<float>(zrow[k]) - mean[m]) * rstd[m];
          g_w[k] += g[k] * xhat[k];
          g_b[k] += g[k];
        }
        ln_backward_row(g.data(), xhat.data(), w, rstd[m], d, gg.data(), gx.data());
        T* out = gzp + m * d;
        for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(gx[k]);
      }
    }
  });
}

Epilogue make_epilogue(const BottleneckArgs& a, const Tensor& scale32, const Tensor& gate32, const Tensor& lna_w32,
                       const Tensor& lna_b32, bool res_in_ln) {
  Epilogue e;
  e.scale = ptr(scale32);
  e.scale_n = scale32.defined() ? scale32.numel() : 0;
  e.scaling = static_cast<float>(a.scaling);
  e.gate = ptr(gate32);
  e.lna_w = ptr(lna_w32);
  e.lna_b = ptr(lna_b32);
  e.res_in_ln = res_in_ln;
  e.eps = static_cast<float>(a.eps);
  e.drop = cpu::Dropout(a.dropout_p, a.seed);
  return e;
}

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const BottleneckArgs& args) {
  const char* name = "fastadapt_C::bottleneck_forward";
  const BottleneckDims s = check_bottleneck_forward(c10::kCPU, args);
  const Act act = parse_activation(args.activation);
  const int64_t M = s.M, d = s.d;
  const auto opts = args.z.options();
  Tensor stats = at::zeros({4, M}, opts.dtype(at::kFloat));
  if (M == 0) return {at::empty({0, d}, opts), at::empty({0, s.m}, opts), stats};
  const Tensor z = cpu::rows_contiguous(args.z);
  Tensor r;
  if (present(args.residual)) r = cpu::rows_contiguous(*args.residual);
  const Tensor lnb_w = f32(args.ln_before_weight), lnb_b = f32(args.ln_before_bias);
  const Tensor lna_w = f32(args.ln_after_weight), lna_b = f32(args.ln_after_bias);
  const Tensor scale32 = f32(args.scale), gate32 = f32(args.gate);
  float* st = stats.data_ptr<float>();

  Tensor out = at::empty({M, d}, opts), h, u;
  FA_DISPATCH_CPU(z.scalar_type(), name, [&] {
    Tensor zn = z;
    if (lnb_w.defined()) {
      zn = at::empty({M, d}, opts);
      layer_norm_pass<scalar_t>(z, lnb_w.data_ptr<float>(), lnb_b.data_ptr<float>(), static_cast<float>(args.eps), zn,
                                st, st + M, false);
    }
    h = present(args.down_bias) ? at::addmm(*args.down_bias, zn, args.down_weight.t())
                                : at::mm(zn, args.down_weight.t());
    Tensor a = at::empty_like(h);
    activation_pass<scalar_t>(h, act, a);
    u = present(args.up_bias) ? at::addmm(*args.up_bias, a, args.up_weight.t()) : at::mm(a, args.up_weight.t());
    const Epilogue e = make_epilogue(args, scale32, gate32, lna_w, lna_b, args.residual_before_ln && r.defined());
    epilogue_forward<scalar_t>(u, r.defined() ? r.data_ptr<scalar_t>() : nullptr, r.defined() ? r.stride(0) : 0,
                               e, out, st + 2 * M, st + 3 * M);
  });
  return {out, h, stats};
}

std::vector<Tensor> backward_cpu(const BottleneckArgs& args, const Tensor& gout_in, const Tensor& h,
                                 const Tensor& stats, std::array<bool, 12> needs) {
  const char* name = "fastadapt_C::bottleneck_backward";
  check_bottleneck_backward(c10::kCPU, args, gout_in, h, stats);
  const Act act = parse_activation(args.activation);
  const int64_t M = args.z.size(0), d = args.z.size(1);
  const auto opts = args.z.options();
  std::vector<Tensor> grads(12);
  for (auto& g : grads) g = at::empty({0}, opts);
  const std::array<bool, 12> want = wanted_grads(args, needs);
  auto wanted = [&](int i) { return want[i]; };
  if (std::none_of(want.begin(), want.end(), [](bool w) { return w; })) return grads;

  const Tensor z = cpu::rows_contiguous(args.z), gout = cpu::rows_contiguous(gout_in);
  const Tensor hc = h.contiguous(), st = stats.contiguous();
  Tensor r;
  if (present(args.residual)) r = cpu::rows_contiguous(*args.residual);
  const Tensor lnb_w = f32(args.ln_before_weight), lnb_b = f32(args.ln_before_bias);
  const Tensor lna_w = f32(args.ln_after_weight), lna_b = f32(args.ln_after_bias);
  const Tensor scale32 = f32(args.scale), gate32 = f32(args.gate);
  const float* mean_b = st.data_ptr<float>();
  const float* rstd_b = mean_b + M;
  const float* mean_a = mean_b + 2 * M;
  const float* rstd_a = mean_b + 3 * M;
  const int64_t chunks = chunks_for(M);

  FA_DISPATCH_CPU(z.scalar_type(), name, [&] {
    using T = scalar_t;
    // Recompute a = f(h) and u = a W_u^T + b_u (the forward's rounded values, bitwise).
    Tensor a = at::empty_like(hc);
    activation_pass<T>(hc, act, a);
    // Without LN_after, gate or a scale gradient, g_u does not depend on u: no recompute (a GEMM).
    const bool need_u = lna_w.defined() || gate32.defined() || wanted(6);
    Tensor u;
    if (need_u)
      u = present(args.up_bias) ? at::addmm(*args.up_bias, a, args.up_weight.t()) : at::mm(a, args.up_weight.t());
    const Epilogue e = make_epilogue(args, scale32, gate32, lna_w, lna_b, args.residual_before_ln && r.defined());
    Tensor g_u = at::empty({M, d}, opts);
    Tensor g_r = (wanted(1) && r.defined() && lna_w.defined() && e.res_in_ln) ? at::empty({M, d}, opts) : Tensor();
    Tensor g_gate = (wanted(11) && gate32.defined()) ? at::empty({M}, opts.dtype(at::kFloat)) : Tensor();
    Tensor fslots = at::zeros({chunks, 3 * d}, opts.dtype(at::kFloat));
    Tensor dslots = at::zeros({chunks, d}, opts.dtype(at::kDouble));
    if (M > 0)
      epilogue_backward<T>(gout, u, r.defined() ? r.data_ptr<T>() : nullptr, r.defined() ? r.stride(0) : 0, e,
                           mean_a, rstd_a, g_u, g_r.defined() ? g_r.data_ptr<T>() : nullptr,
                           g_gate.defined() ? g_gate.data_ptr<float>() : nullptr, fslots, dslots, wanted(6));
    const Tensor fsum = fslots.sum(0);
    if (g_r.defined()) grads[1] = g_r;
    if (wanted(9)) grads[9] = fsum.narrow(0, 0, d).to(args.ln_after_weight->scalar_type(), false, true);
    if (wanted(10)) grads[10] = fsum.narrow(0, d, d).to(args.ln_after_bias->scalar_type(), false, true);
    if (wanted(5)) grads[5] = fsum.narrow(0, 2 * d, d).to(args.up_bias->scalar_type(), false, true);
    if (wanted(6)) {
      const Tensor gs = dslots.sum(0);
      grads[6] = (args.scale->numel() == 1 ? gs.sum().reshape({1}) : gs).to(args.scale->scalar_type());
    }
    if (wanted(11)) grads[11] = g_gate.to(args.gate->scalar_type(), false, true);
    if (wanted(4)) grads[4] = at::mm(g_u.t(), a);

    const bool need_down = wanted(0) || wanted(2) || wanted(3) || wanted(7) || wanted(8);
    if (!need_down) return;
    Tensor g_a = at::mm(g_u, args.up_weight);
    Tensor g_h = at::empty_like(hc);
    activation_grad_pass<T>(hc, g_a, act, g_h);
    if (wanted(3)) grads[3] = at::sum(g_h, {0}, false, at::kFloat).to(args.down_bias->scalar_type());
    if (wanted(2)) {
      Tensor zn = z;
      if (lnb_w.defined()) {
        zn = at::empty({M, d}, opts);
        layer_norm_pass<T>(z, lnb_w.data_ptr<float>(), lnb_b.data_ptr<float>(), static_cast<float>(args.eps), zn,
                           const_cast<float*>(mean_b), const_cast<float*>(rstd_b), true);
      }
      grads[2] = at::mm(g_h.t(), zn);
    }
    if (!(wanted(0) || wanted(7) || wanted(8))) return;
    Tensor g_zn = at::mm(g_h, args.down_weight);
    if (!lnb_w.defined()) {
      if (wanted(0)) grads[0] = g_zn;
      return;
    }
    Tensor g_z = at::empty({M, d}, opts);
    Tensor slots = at::zeros({chunks, 2 * d}, opts.dtype(at::kFloat));
    if (M > 0) ln_before_backward<T>(g_zn, z, lnb_w.data_ptr<float>(), mean_b, rstd_b, g_z, slots);
    const Tensor ssum = slots.sum(0);
    if (wanted(0)) grads[0] = g_z;
    if (wanted(7)) grads[7] = ssum.narrow(0, 0, d).to(args.ln_before_weight->scalar_type(), false, true);
    if (wanted(8)) grads[8] = ssum.narrow(0, d, d).to(args.ln_before_bias->scalar_type(), false, true);
  });
  return grads;
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
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
}

TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_entry<&fastadapt::forward_cpu>);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_entry<&fastadapt::backward_cpu>);
}
