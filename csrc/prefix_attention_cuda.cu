// Gated prefix attention / prefix tuning, CUDA kernels (math, saved statistics and gradient
// formulas: fastadapt/reference/prefix_attention.py; CPU twin: csrc/prefix_attention.cpp).
//
// A fallback for GPUs without Triton, written for clarity over speed: one warp per query row,
// the head dimension spread over the lanes (up to 8 elements each: D <= 256), an online base-2
// softmax over the prefix and the visible token keys (one joint softmax in prefix-tuning mode),
// and only the output and the row statistics (m, l) written. The backward recomputes P from
// (m, l); dK/dV (and the prefix's) accumulate with fp32 atomics into float32 buffers, dgate from
// per-row partials summed by ATen (deterministic).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cuda_common.cuh"
#include "prefix_attention.h"

namespace fastadapt {
namespace {

using namespace fastadapt::cuda;
using at::Tensor;

constexpr int kMaxPerLane = 8;  // head dim up to 32 * 8 = 256
constexpr int kWarpsPerBlock = 4;
constexpr double kLog2e = 1.4426950408889634;

struct Strides {
  int64_t b, h, s;
  __host__ __device__ int64_t at(int64_t bi, int64_t hi, int64_t si) const { return bi * b + hi * h + si * s; }
};

Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct Shape {
  int64_t B, H, Hkv, Sq, Sk, L, D, group;
  bool causal, joint;
  float hi, lo, scale;
  const bool* pad;
  int64_t pad_sb, pad_ss;

  __device__ bool visible(int64_t b, int64_t i, int64_t j) const {
    if (causal && j > i + Sk - Sq) return false;
    return pad == nullptr || pad[b * pad_sb + j * pad_ss];
  }
};

template <typename T>
__device__ __forceinline__ void load_lanes(const T* row, int64_t D, int lane, float (&r)[kMaxPerLane]) {
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    r[t] = d < D ? static_cast<float>(row[d]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ float dot_lanes(const float (&q)[kMaxPerLane], const T* row, int64_t D, int lane) {
  float s = 0.f;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) s += q[t] * static_cast<float>(row[d]);
  }
  return warp_sum(s);
}

// Online softmax state of one row (base 2).
struct Online {
  float m = -INFINITY, l = 0.f, acc[kMaxPerLane] = {};

  template <typename T>
  __device__ void add(float s2, const T* vrow, int64_t D, int lane) {
    const float m_new = fmaxf(m, s2);
    const float alpha = (m == -INFINITY) ? 0.f : exp2f(m - m_new);
    const float p = exp2f(s2 - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      acc[t] = acc[t] * alpha + (d < D ? p * static_cast<float>(vrow[d]) : 0.f);
    }
    m = m_new;
  }
  // (m, l) as saved: an empty row gives (+inf, 1), which recomputes P = 0.
  __device__ float saved_m() const { return m == -INFINITY ? INFINITY : m; }
  __device__ float saved_l() const { return m == -INFINITY ? 1.f : l; }
  __device__ float inv_l() const { return m == -INFINITY ? 0.f : 1.f / l; }
};

template <typename T>
__global__ void forward_kernel(Shape P, const T* __restrict__ q, Strides sq, const T* __restrict__ k, Strides sk,
                               const T* __restrict__ v, Strides sv, const T* __restrict__ kp, Strides skp,
                               const T* __restrict__ vp, Strides svp, const float* __restrict__ gate, T* __restrict__ out,
                               float* stats, float* stats_p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= P.B * P.H * P.Sq) return;  // whole warps
  const int64_t i = r % P.Sq, h = (r / P.Sq) % P.H, b = r / (P.Sq * P.H), hk = h / P.group;
  float qr[kMaxPerLane];
  load_lanes(q + sq.at(b, h, i), P.D, lane, qr);
  Online tok, pre;
  Online& prefix_state = P.joint ? tok : pre;
  for (int64_t p = 0; p < P.L; ++p) {
    const float s = dot_lanes(qr, kp + skp.at(b, hk, p), P.D, lane);
    prefix_state.add(s * P.hi + s * P.lo, vp + svp.at(b, hk, p), P.D, lane);
  }
  for (int64_t j = 0; j < P.Sk; ++j) {
    if (!P.visible(b, i, j)) continue;
    const float s = dot_lanes(qr, k + sk.at(b, hk, j), P.D, lane);
    tok.add(s * P.hi + s * P.lo, v + sv.at(b, hk, j), P.D, lane);
  }
  const float g = P.joint ? 0.f : gate[h];
  const float it = tok.inv_l(), ip = pre.inv_l();
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < P.D) out[r * P.D + d] = static_cast<T>(tok.acc[t] * it + (P.joint ? 0.f : g * pre.acc[t] * ip));
  }
  if (lane == 0) {
    stats[2 * r] = tok.saved_m();
    stats[2 * r + 1] = tok.saved_l();
    if (!P.joint) {
      stats_p[2 * r] = pre.saved_m();
      stats_p[2 * r + 1] = pre.saved_l();
    }
  }
}

__device__ __forceinline__ void atomic_row(float* dst, const float (&val)[kMaxPerLane], float c, int64_t D, int lane) {
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) atomicAdd(dst + d, c * val[t]);
  }
}

template <typename T>
__global__ void backward_kernel(Shape P, const T* __restrict__ dout, Strides sdo, const T* __restrict__ q, Strides sq,
                                const T* __restrict__ k, Strides sk, const T* __restrict__ v, Strides sv,
                                const T* __restrict__ kp, Strides skp, const T* __restrict__ vp, Strides svp,
                                const float* __restrict__ gate, const T* __restrict__ out, Strides so,
                                const float* stats, const float* stats_p, T* __restrict__ dq, float* dk, float* dv,
                                float* dkp, float* dvp, float* rp_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= P.B * P.H * P.Sq) return;
  const int64_t i = r % P.Sq, h = (r / P.Sq) % P.H, b = r / (P.Sq * P.H), hk = h / P.group;
  const int64_t kv = b * P.Hkv + hk;
  float qr[kMaxPerLane], dor[kMaxPerLane], orow[kMaxPerLane], dqr[kMaxPerLane] = {};
  load_lanes(q + sq.at(b, h, i), P.D, lane, qr);
  load_lanes(dout + sdo.at(b, h, i), P.D, lane, dor);
  load_lanes(out + so.at(b, h, i), P.D, lane, orow);
  float delta = 0.f;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) delta += dor[t] * orow[t];
  delta = warp_sum(delta);
  const float m = stats[2 * r], l = stats[2 * r + 1];
  const float m_p = P.joint ? m : stats_p[2 * r], l_p = P.joint ? l : stats_p[2 * r + 1];
  const float g = P.joint ? 1.f : gate[h];
  float delta_p = delta;
  if (!P.joint) {
    float r_p = 0.f;  // rowsum(dO * O_p) = sum_p P_p (dO . v_p)
    for (int64_t p = 0; p < P.L; ++p) {
      const float s = dot_lanes(qr, kp + skp.at(b, hk, p), P.D, lane);
      const float pp = exp2f(s * P.hi + s * P.lo - m_p) / l_p;
      r_p += pp * dot_lanes(dor, vp + svp.at(b, hk, p), P.D, lane);
    }
    delta_p = g * r_p;
    delta -= delta_p;
    if (lane == 0) rp_rows[r] = r_p;
  }
  for (int64_t p = 0; p < P.L; ++p) {
    const T* kprow = kp + skp.at(b, hk, p);
    const float s = dot_lanes(qr, kprow, P.D, lane);
    const float pp = exp2f(s * P.hi + s * P.lo - m_p) / l_p;
    const float ds = pp * (g * dot_lanes(dor, vp + svp.at(b, hk, p), P.D, lane) - delta_p);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < P.D) dqr[t] += ds * static_cast<float>(kprow[d]);
    }
    if (dkp) atomic_row(dkp + (kv * P.L + p) * P.D, qr, P.scale * ds, P.D, lane);
    if (dvp) atomic_row(dvp + (kv * P.L + p) * P.D, dor, g * pp, P.D, lane);
  }
  for (int64_t j = 0; j < P.Sk; ++j) {
    if (!P.visible(b, i, j)) continue;
    const T* krow = k + sk.at(b, hk, j);
    const float s = dot_lanes(qr, krow, P.D, lane);
    const float pj = exp2f(s * P.hi + s * P.lo - m) / l;
    const float ds = pj * (dot_lanes(dor, v + sv.at(b, hk, j), P.D, lane) - delta);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < P.D) dqr[t] += ds * static_cast<float>(krow[d]);
    }
    if (dk) atomic_row(dk + (kv * P.Sk + j) * P.D, qr, P.scale * ds, P.D, lane);
    if (dv) atomic_row(dv + (kv * P.Sk + j) * P.D, dor, pj, P.D, lane);
  }
  if (dq) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < P.D) dq[r * P.D + d] = static_cast<T>(P.scale * dqr[t]);
    }
  }
}

Tensor last_contiguous(const Tensor& t) { return t.stride(3) == 1 || t.size(3) <= 1 ? t : t.contiguous(); }

// The sizes and flags the kernels take (the arguments are checked by check_prefix_attention_*).
Shape make_shape(const char* name, const Tensor& q, const Tensor& k, const Tensor& kp,
                 const std::optional<Tensor>& pad, double scale, bool causal, bool joint) {
  Shape P{};
  P.B = q.size(0);
  P.H = q.size(1);
  P.Sq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Sk = k.size(2);
  P.L = kp.size(2);
  TORCH_CHECK(P.D <= 32 * kMaxPerLane, name, ": head dim ", P.D, " > ", 32 * kMaxPerLane);
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

unsigned row_blocks(const Shape& P) {
  return static_cast<unsigned>(cdiv(P.B * P.H * P.Sq, kWarpsPerBlock));
}

std::tuple<Tensor, Tensor, Tensor> prefix_attention_forward_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& kp_in, const Tensor& vp_in,
    const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask, double scale, bool causal,
    bool joint) {
  const char* name = "fastadapt_C::prefix_attention_forward";
  check_prefix_attention_forward(c10::kCUDA, q_in, k_in, v_in, kp_in, vp_in, gate, key_padding_mask, joint);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Shape P = make_shape(name, q_in, k_in, kp_in, key_padding_mask, scale, causal, joint);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const Tensor kp = last_contiguous(kp_in), vp = last_contiguous(vp_in);
  Tensor g32;
  if (!joint) {
    g32 = gate->to(at::kFloat).contiguous();
  }
  Tensor out = at::empty({P.B, P.H, P.Sq, P.D}, q.options());
  Tensor stats = at::empty({P.B, P.H, P.Sq, 2}, q.options().dtype(at::kFloat));
  Tensor stats_p = joint ? at::empty({0}, stats.options()) : at::empty({P.B, P.H, P.Sq, 2}, stats.options());
  if (P.B * P.H * P.Sq == 0) return {out, stats, stats_p};
  FA_DISPATCH_CUDA_TYPES(q.scalar_type(), name, [&] {
    using T = scalar_t;
    forward_kernel<T><<<row_blocks(P), 32 * kWarpsPerBlock, 0, stream()>>>(
        P, q.data_ptr<T>(), strides_of(q), k.data_ptr<T>(), strides_of(k), v.data_ptr<T>(), strides_of(v),
        kp.data_ptr<T>(), strides_of(kp), vp.data_ptr<T>(), strides_of(vp), joint ? nullptr : g32.data_ptr<float>(),
        out.data_ptr<T>(), stats.data_ptr<float>(), joint ? nullptr : stats_p.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats, stats_p};
}

std::vector<Tensor> prefix_attention_backward_cuda(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& kp_in,
    const Tensor& vp_in, const std::optional<Tensor>& gate, const std::optional<Tensor>& key_padding_mask,
    const Tensor& out_in, const Tensor& stats, const Tensor& stats_p, double scale, bool causal, bool joint,
    std::array<bool, 6> needs) {
  const char* name = "fastadapt_C::prefix_attention_backward";
  check_prefix_attention_backward(c10::kCUDA, dout_in, q_in, k_in, v_in, kp_in, vp_in, gate, key_padding_mask, out_in,
                                  stats, stats_p, joint);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Shape P = make_shape(name, q_in, k_in, kp_in, key_padding_mask, scale, causal, joint);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const Tensor kp = last_contiguous(kp_in), vp = last_contiguous(vp_in);
  const Tensor dout = last_contiguous(dout_in), out = last_contiguous(out_in), st = stats.contiguous();
  Tensor st_p, g32;
  if (!joint) {
    st_p = stats_p.contiguous();
    g32 = gate->to(at::kFloat).contiguous();
  }
  const bool need_q = needs[0], need_k = needs[1], need_v = needs[2], need_kp = needs[3], need_vp = needs[4];
  const bool need_gate = needs[5] && !joint;
  const auto opts = q.options(), f32 = q.options().dtype(at::kFloat);
  Tensor dq = need_q ? at::empty({P.B, P.H, P.Sq, P.D}, opts) : at::empty({0}, opts);
  Tensor dk32 = need_k ? at::zeros({P.B, P.Hkv, P.Sk, P.D}, f32) : Tensor();
  Tensor dv32 = need_v ? at::zeros({P.B, P.Hkv, P.Sk, P.D}, f32) : Tensor();
  Tensor dkp32 = need_kp ? at::zeros({P.B, P.Hkv, P.L, P.D}, f32) : Tensor();
  Tensor dvp32 = need_vp ? at::zeros({P.B, P.Hkv, P.L, P.D}, f32) : Tensor();
  Tensor rp_rows = at::zeros({P.B, P.H, P.Sq}, f32);
  const bool any = need_q || need_k || need_v || need_kp || need_vp || need_gate;
  if (any && P.B * P.H * P.Sq > 0) {
    auto fptr = [](Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    FA_DISPATCH_CUDA_TYPES(q.scalar_type(), name, [&] {
      using T = scalar_t;
      backward_kernel<T><<<row_blocks(P), 32 * kWarpsPerBlock, 0, stream()>>>(
          P, dout.data_ptr<T>(), strides_of(dout), q.data_ptr<T>(), strides_of(q), k.data_ptr<T>(), strides_of(k),
          v.data_ptr<T>(), strides_of(v), kp.data_ptr<T>(), strides_of(kp), vp.data_ptr<T>(), strides_of(vp),
          joint ? nullptr : g32.data_ptr<float>(), out.data_ptr<T>(), strides_of(out), st.data_ptr<float>(),
          joint ? nullptr : st_p.data_ptr<float>(), need_q ? dq.data_ptr<T>() : nullptr, fptr(dk32), fptr(dv32),
          fptr(dkp32), fptr(dvp32), rp_rows.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto cast = [&](bool needed, const Tensor& t32) { return needed ? t32.to(q.scalar_type()) : at::empty({0}, opts); };
  Tensor dgate = need_gate ? at::sum(rp_rows, {0, 2}, false, at::kFloat) : at::empty({0}, f32);
  return {dq, cast(need_k, dk32), cast(need_v, dv32), cast(need_kp, dkp32), cast(need_vp, dvp32), dgate};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_IMPL(fastadapt_C, CUDA, m) {
  m.impl("prefix_attention_forward", &fastadapt::prefix_attention_forward_cuda);
  m.impl("prefix_attention_backward", &fastadapt::prefix_attention_backward_cuda);
}
