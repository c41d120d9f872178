// Gated prefix attention / prefix tuning, CPU kernels (math, the saved statistics and the gradient
// formulas: fastadapt/reference/prefix_attention.py).
//
// One query row at a time: its base-2 scores against the prefix and the visible token keys go to
// a per-thread row buffer (Sk + L floats: on a CPU the whole row fits in L1/L2, so the exact
// two-pass softmax costs no more than flash attention's online rescaling and needs no second
// accumulator), P V is accumulated in float32, and only the output and the row statistics
// (m, l) are written. The backward recomputes P from (m, l) exactly as the forward formed it.
//   forward:  parallel over (batch, head, query row).
//   backward: parallel over (batch, kv head): each task owns the dK/dV (and prefix dK/dV) of its
//             kv head, accumulated in float32 over the query heads of its GQA group and over the
//             query rows, so no atomics and a deterministic sum order; dgate partials per task.
// Operands are read through their strides (batch stride 0 for a broadcast prefix); only a
// last-dimension stride other than 1 costs a copy.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"
#include "prefix_attention.h"

namespace fastadapt {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

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
  TORCH_CHECK(gate.has_value() && gate->defined(), c.op(), ": gated mode (joint=False) needs a gate");
  c("gate", gate, {H}, at::kFloat);
}

}  // namespace

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

namespace {

constexpr double kLog2e = 1.4426950408889634;

struct View4 {  // element (b, h, s, :) of a (B, H, S, D) tensor with unit last stride
  int64_t sb, sh, ss;
  explicit View4(const Tensor& t) : sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  int64_t at(int64_t b, int64_t h, int64_t s) const { return b * sb + h * sh + s * ss; }
};

Tensor last_contiguous(const Tensor& t) { return t.stride(3) == 1 || t.size(3) <= 1 ? t : t.contiguous(); }

inline float dot_d(const float* a, const float* b, int64_t n) {
  double s = 0.0;  // D <= a few hundred: double keeps the score within an ulp of the oracle's
  for (int64_t k = 0; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return static_cast<float>(s);
}

template <typename T>
inline void load(const T* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

struct Problem {
  int64_t B, H, Hkv, Sq, Sk, L, D, group;
  bool causal, joint;
  float hi, lo;  // scale * log2(e) = hi + lo, as the reference and the Triton kernels split it
  float scale;
  const bool* pad;  // (B, Sk) or null
  int64_t pad_sb, pad_ss;

  bool visible(int64_t b, int64_t i, int64_t j) const {
    if (causal && j > i + Sk - Sq) return false;
    return pad == nullptr || pad[b * pad_sb + j * pad_ss];
  }
  float s2(float s) const { return s * hi + s * lo; }
};

// Softmax statistics of the base-2 scores s[0:n] where vis[j]: (m, l); an empty row gives
// (+inf, 1) so that exp2(s - m) / l recomputes P = 0.
inline void softmax_stats(const float* s, const uint8_t* vis, int64_t n, float& m, float& l) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j)
    if (!vis || vis[j]) mx = std::max(mx, s[j]);
  if (mx == -std::numeric_limits<float>::infinity()) {
    m = std::numeric_limits<float>::infinity();
    l = 1.f;
    return;
  }
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j)
    if (!vis || vis[j]) sum += static_cast<double>(std::exp2(s[j] - mx));
  m = mx;
  l = static_cast<float>(sum);
}

// Scores of query row (b, h, i) (q_row in float) against the prefix (sp[0:L]) and the tokens
// (st[0:Sk], vis[0:Sk]).
template <typename T>
void row_scores(const Problem& P, const float* q_row, const T* kp, const View4& vkp, const T* k, const View4& vk,
                int64_t b, int64_t hk, int64_t i, float* sp, float* st, uint8_t* vis, float* tmp) {
  for (int64_t p = 0; p < P.L; ++p) {
    load(kp + vkp.at(b, hk, p), P.D, tmp);
    sp[p] = P.s2(dot_d(q_row, tmp, P.D));
  }
  for (int64_t j = 0; j < P.Sk; ++j) {
    vis[j] = P.visible(b, i, j);
    if (!vis[j]) continue;
    load(k + vk.at(b, hk, j), P.D, tmp);
    st[j] = P.s2(dot_d(q_row, tmp, P.D));
  }
}

template <typename T>
void forward_impl(const Problem& P, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kp,
                  const Tensor& vp, const float* gate, Tensor& out, float* stats, float* stats_p) {
  const T *qp = q.data_ptr<T>(), *kptr = k.data_ptr<T>(), *vptr = v.data_ptr<T>();
  const T *kpp = kp.data_ptr<T>(), *vpp = vp.data_ptr<T>();
  const View4 vq(q), vk(k), vv(v), vkp(kp), vvp(vp);
  T* op = out.data_ptr<T>();  // contiguous (B, H, Sq, D)
  const int64_t rows = P.B * P.H * P.Sq;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, (P.Sk + P.L) * P.D / 64)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<float> qrow(P.D), tmp(P.D), acc(P.D), acc_p(P.D), sp(P.L), st(P.Sk);
    std::vector<uint8_t> vis(P.Sk);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % P.Sq, h = (r / P.Sq) % P.H, b = r / (P.Sq * P.H), hk = h / P.group;
      load(qp + vq.at(b, h, i), P.D, qrow.data());
      row_scores(P, qrow.data(), kpp, vkp, kptr, vk, b, hk, i, sp.data(), st.data(), vis.data(), tmp.data());
      float m, l, m_p = 0.f, l_p = 1.f;
      if (P.joint) {
        // One softmax over [prefix; tokens]: the prefix is always visible.
        float mt, lt;
        softmax_stats(st.data(), vis.data(), P.Sk, mt, lt);
        float mp, lp;
        softmax_stats(sp.data(), nullptr, P.L, mp, lp);
        m = (mt == std::numeric_limits<float>::infinity()) ? mp : std::max(mp, mt);
        l = static_cast<float>(static_cast<double>(lp) * std::exp2(static_cast<double>(mp - m)) +
                               (mt == std::numeric_limits<float>::infinity()
                                    ? 0.0 : static_cast<double>(lt) * std::exp2(static_cast<double>(mt - m))));
      } else {
        softmax_stats(st.data(), vis.data(), P.Sk, m, l);
        softmax_stats(sp.data(), nullptr, P.L, m_p, l_p);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(acc_p.begin(), acc_p.end(), 0.f);
      for (int64_t j = 0; j < P.Sk; ++j) {
        if (!vis[j]) continue;
        const float pj = std::exp2(st[j] - m) / l;
        load(vptr + vv.at(b, hk, j), P.D, tmp.data());
        for (int64_t d = 0; d < P.D; ++d) acc[d] += pj * tmp[d];
      }
      const float mp_ = P.joint ? m : m_p, lp_ = P.joint ? l : l_p;
      for (int64_t p = 0; p < P.L; ++p) {
        const float pp = std::exp2(sp[p] - mp_) / lp_;
        load(vpp + vvp.at(b, hk, p), P.D, tmp.data());
        for (int64_t d = 0; d < P.D; ++d) acc_p[d] += pp * tmp[d];
      }
      const float g = P.joint ? 1.f : gate[h];
      T* o = op + r * P.D;
      for (int64_t d = 0; d < P.D; ++d) o[d] = static_cast<T>(acc[d] + g * acc_p[d]);
      stats[2 * r] = m;
      stats[2 * r + 1] = l;
      if (!P.joint) {
        stats_p[2 * r] = m_p;
        stats_p[2 * r + 1] = l_p;
      }
    }
  });
}

struct Needs {
  bool q, k, v, kp, vp, gate;
};

template <typename T>
void backward_impl(const Problem& P, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& kp, const Tensor& vp, const float* gate, const Tensor& out, const float* stats,
                   const float* stats_p, Needs need, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dkp, Tensor& dvp,
                   double* dgate_parts) {
  const T *qp = q.data_ptr<T>(), *kptr = k.data_ptr<T>(), *vptr = v.data_ptr<T>();
  const T *kpp = kp.data_ptr<T>(), *vpp = vp.data_ptr<T>(), *dop = dout.data_ptr<T>(), *outp = out.data_ptr<T>();
  const View4 vq(q), vk(k), vv(v), vkp(kp), vvp(vp), vdo(dout), vo(out);
  at::parallel_for(0, P.B * P.Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qrow(P.D), dorow(P.D), tmp(P.D), dqrow(P.D), sp(P.L), st(P.Sk), dpv(P.Sk), dpvp(P.L);
    std::vector<uint8_t> vis(P.Sk);
    std::vector<float> dk_acc(P.Sk * P.D), dv_acc(P.Sk * P.D), dkp_acc(P.L * P.D), dvp_acc(P.L * P.D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / P.Hkv, hk = t % P.Hkv;
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      std::fill(dkp_acc.begin(), dkp_acc.end(), 0.f);
      std::fill(dvp_acc.begin(), dvp_acc.end(), 0.f);
      for (int64_t h = hk * P.group; h < (hk + 1) * P.group; ++h) {
        const float g = P.joint ? 1.f : gate[h];
        double r_sum = 0.0;
        for (int64_t i = 0; i < P.Sq; ++i) {
          const int64_t r = (b * P.H + h) * P.Sq + i;
          load(qp + vq.at(b, h, i), P.D, qrow.data());
          load(dop + vdo.at(b, h, i), P.D, dorow.data());
          load(outp + vo.at(b, h, i), P.D, tmp.data());
          double delta = 0.0;
          for (int64_t d = 0; d < P.D; ++d) delta += static_cast<double>(dorow[d]) * tmp[d];
          row_scores(P, qrow.data(), kpp, vkp, kptr, vk, b, hk, i, sp.data(), st.data(), vis.data(), tmp.data());
          const float m = stats[2 * r], l = stats[2 * r + 1];
          const float m_p = P.joint ? m : stats_p[2 * r], l_p = P.joint ? l : stats_p[2 * r + 1];
          // P (in place of the scores) and dO . v_j
          for (int64_t j = 0; j < P.Sk; ++j) {
            if (!vis[j]) {
              st[j] = 0.f;
              continue;
            }
            st[j] = std::exp2(st[j] - m) / l;
            load(vptr + vv.at(b, hk, j), P.D, tmp.data());
            dpv[j] = dot_d(dorow.data(), tmp.data(), P.D);
          }
          double r_p = 0.0;
          for (int64_t p = 0; p < P.L; ++p) {
            sp[p] = std::exp2(sp[p] - m_p) / l_p;
            load(vpp + vvp.at(b, hk, p), P.D, tmp.data());
            dpvp[p] = dot_d(dorow.data(), tmp.data(), P.D);
            r_p += static_cast<double>(sp[p]) * dpvp[p];
          }
          double delta_p;
          if (P.joint) {
            delta_p = delta;
          } else {
            delta_p = g * r_p;  // rowsum(dO * g O_p)
            delta -= delta_p;
            r_sum += r_p;
          }
          std::fill(dqrow.begin(), dqrow.end(), 0.f);
          for (int64_t j = 0; j < P.Sk; ++j) {
            if (!vis[j]) continue;
            const float ds = st[j] * static_cast<float>(dpv[j] - delta);
            float* dkj = dk_acc.data() + j * P.D;
            float* dvj = dv_acc.data() + j * P.D;
            if (need.q) {
              load(kptr + vk.at(b, hk, j), P.D, tmp.data());
              for (int64_t d = 0; d < P.D; ++d) dqrow[d] += ds * tmp[d];
            }
            for (int64_t d = 0; d < P.D; ++d) {
              dkj[d] += P.scale * ds * qrow[d];
              dvj[d] += st[j] * dorow[d];
            }
          }
          for (int64_t p = 0; p < P.L; ++p) {
            const float ds = sp[p] * static_cast<float>(g * dpvp[p] - delta_p);
            float* dkp_p = dkp_acc.data() + p * P.D;
            float* dvp_p = dvp_acc.data() + p * P.D;
            if (need.q) {
              load(kpp + vkp.at(b, hk, p), P.D, tmp.data());
              for (int64_t d = 0; d < P.D; ++d) dqrow[d] += ds * tmp[d];
            }
            for (int64_t d = 0; d < P.D; ++d) {
              dkp_p[d] += P.scale * ds * qrow[d];
              dvp_p[d] += g * sp[p] * dorow[d];
            }
          }
          if (need.q) {
            T* dst = dq.data_ptr<T>() + r * P.D;
            for (int64_t d = 0; d < P.D; ++d) dst[d] = static_cast<T>(P.scale * dqrow[d]);
          }
        }
        if (dgate_parts) dgate_parts[t * P.H + h] = r_sum;
      }
      const int64_t kv = (b * P.Hkv + hk);
      if (need.k) {
        T* dst = dk.data_ptr<T>() + kv * P.Sk * P.D;
        for (int64_t e = 0; e < P.Sk * P.D; ++e) dst[e] = static_cast<T>(dk_acc[e]);
      }
      if (need.v) {
        T* dst = dv.data_ptr<T>() + kv * P.Sk * P.D;
        for (int64_t e = 0; e < P.Sk * P.D; ++e) dst[e] = static_cast<T>(dv_acc[e]);
      }
      if (need.kp) {
        T* dst = dkp.data_ptr<T>() + kv * P.L * P.D;
        for (int64_t e = 0; e < P.L * P.D; ++e) dst[e] = static_cast<T>(dkp_acc[e]);
      }
      if (need.vp) {
        T* dst = dvp.data_ptr<T>() + kv * P.L * P.D;
        for (int64_t e = 0; e < P.L * P.D; ++e) dst[e] = static_cast<T>(dvp_acc[e]);
      }
    }
  });
}

// The sizes and flags the kernels take (the arguments are checked by check_prefix_attention_*).
Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& kp, const std::optional<Tensor>& pad,
                     double scale, bool causal, bool joint) {
  Problem P{};
  P.B = q.size(0);
  P.H = q.size(1);
  P.Sq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Sk = k.size(2);
  P.L = kp.size(2);
  P.group = P.H / P.Hkv;
  P.causal = causal;
  P.joint = joint;
  const double s2 = scale * kLog2e;
  P.hi = static_cast<float>(s2);
  P.lo = static_cast<float>(s2 - static_cast<double>(P.hi));
  P.scale = static_cast<float>(scale);
  P.pad = nullptr;
  if (pad.has_value() && pad->defined()) {
    P.pad = pad->data_ptr<bool>();
    P.pad_sb = pad->stride(0);
    P.pad_ss = pad->stride(1);
  }
  return P;
}

#define FA_PREFIX_DISPATCH(DTYPE, ...) FA_DISPATCH_CPU(DTYPE, "fastadapt_C::prefix_attention", __VA_ARGS__)

std::tuple<Tensor, Tensor, Tensor> prefix_attention_forward_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& kp_in, const Tensor& vp_in,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, double scale, bool causal,
    bool joint) {
  check_prefix_attention_forward(c10::kCPU, q_in, k_in, v_in, kp_in, vp_in, gate, key_padding_mask, joint);
  const Problem P = make_problem(q_in, k_in, kp_in, key_padding_mask, scale, causal, joint);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const Tensor kp = last_contiguous(kp_in), vp = last_contiguous(vp_in);
  Tensor g32;
  if (!joint) {
    g32 = gate->to(at::kFloat).contiguous();
  }
  Tensor out = at::empty({P.B, P.H, P.Sq, P.D}, q.options());
  Tensor stats = at::empty({P.B, P.H, P.Sq, 2}, q.options().dtype(at::kFloat));
  Tensor stats_p = joint ? at::empty({0}, stats.options()) : at::empty({P.B, P.H, P.Sq, 2}, stats.options());
  FA_PREFIX_DISPATCH(q.scalar_type(), [&] {
    forward_impl<scalar_t>(P, q, k, v, kp, vp, joint ? nullptr : g32.data_ptr<float>(), out,
                           stats.data_ptr<float>(), joint ? nullptr : stats_p.data_ptr<float>());
  });
  return {out, stats, stats_p};
}

std::vector<Tensor> prefix_attention_backward_cpu(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& kp_in,
    const Tensor& vp_in, const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask,
    const Tensor& out_in, const Tensor& stats, const Tensor& stats_p, double scale, bool causal, bool joint,
    std::array<bool, 6> needs) {
  check_prefix_attention_backward(c10::kCPU, dout_in, q_in, k_in, v_in, kp_in, vp_in, gate, key_padding_mask, out_in,
                                  stats, stats_p, joint);
  const Problem P = make_problem(q_in, k_in, kp_in, key_padding_mask, scale, causal, joint);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const Tensor kp = last_contiguous(kp_in), vp = last_contiguous(vp_in);
  const Tensor dout = last_contiguous(dout_in), out = last_contiguous(out_in);
  const Tensor st = stats.contiguous();
  Tensor st_p, g32;
  if (!joint) {
    st_p = stats_p.contiguous();
    g32 = gate->to(at::kFloat).contiguous();
  }
  const Needs need{needs[0], needs[1], needs[2], needs[3], needs[4], needs[5] && !joint};
  const auto opts = q.options();
  auto grad = [&](bool needed, at::IntArrayRef shape) { return at::empty(needed ? shape : at::IntArrayRef{0}, opts); };
  Tensor dq = grad(need.q, q.sizes()), dk = grad(need.k, k.sizes()), dv = grad(need.v, v.sizes());
  Tensor dkp = grad(need.kp, kp.sizes()), dvp = grad(need.vp, vp.sizes());
  Tensor parts = at::zeros({P.B * P.Hkv, P.H}, opts.dtype(at::kDouble));
  if (need.q || need.k || need.v || need.kp || need.vp || need.gate) {
    FA_PREFIX_DISPATCH(q.scalar_type(), [&] {
      backward_impl<scalar_t>(P, dout, q, k, v, kp, vp, joint ? nullptr : g32.data_ptr<float>(), out,
                              st.data_ptr<float>(), joint ? nullptr : st_p.data_ptr<float>(), need, dq, dk, dv,
                              dkp, dvp, need.gate ? parts.data_ptr<double>() : nullptr);
    });
  }
  Tensor dgate = need.gate ? parts.sum(0).to(at::kFloat) : at::empty({0}, opts.dtype(at::kFloat));
  return {dq, dk, dv, dkp, dvp, dgate};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/prefix_attention.py: (out, stats, stats_p), and
  // (dq, dk, dv, dk_p, dv_p, dgate).
  m.def("prefix_attention_forward(Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, float scale, bool causal, bool joint) -> (Tensor, Tensor, Tensor)");
  m.def("prefix_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor k_p, Tensor v_p, Tensor? gate, "
        "Tensor? key_padding_mask, Tensor out, Tensor stats, Tensor stats_p, float scale, bool causal, bool joint, "
        "bool[6] needs) -> Tensor[]");
}

FASTADAPT_CPU_KERNELS(prefix_attention)
