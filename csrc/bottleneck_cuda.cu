// Bottleneck adapter, CUDA kernels (math: fastadapt/reference/bottleneck.py; CPU twin:
// csrc/bottleneck.cpp, same structure and rounding points).
//
// The projections are cuBLAS GEMMs through ATen. Around them, our kernels:
//   ln_rows_kernel          LN_before (and the recompute of its output in the backward), one block per row
//   act_kernel / act_grad_kernel   a = f(h), g_h = g_a f'(h)   (M x m, elementwise)
//   epilogue_fwd_kernel     scale, dropout (in-register mask), gate, residual, LN_after: out written once
//   epilogue_bwd_row_kernel LN_after backward row sums, g_gate, g_u, g_r (one block per row)
//   epilogue_bwd_col_kernel the column sums g_lna_w, g_lna_b, g_b_u, g_scale (threads own columns,
//                           rows split across blocks, fp32 / fp64 atomics at the end of each split)
//   ln_bwd_row/col_kernel   LN_before backward
// The dropout mask is drawn from (seed, flat index in the (M, d) output), csrc/common.h.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bottleneck.h"
#include "cuda_common.cuh"

namespace fastadapt {
namespace {

using namespace fastadapt::cuda;

enum Act : int { kIdentity, kRelu, kGelu, kGeluTanh, kSilu, kTanh, kLeakyRelu };
constexpr float kLeakySlope = 0.01f;

int parse_activation(const std::string& name) {
  if (name == "identity") return kIdentity;
  if (name == "relu") return kRelu;
  if (name == "gelu") return kGelu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "silu") return kSilu;
  if (name == "tanh") return kTanh;
  if (name == "leakyrelu") return kLeakyRelu;
  TORCH_CHECK(false, "fastadapt_C::bottleneck: unknown activation '", name, "'");
}

__device__ __forceinline__ float act_fwd(int act, float h) {
  switch (act) {
    case kRelu: return h <= 0.f ? 0.f : h;  // NaN stays NaN, as F.relu
    case kGelu: return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case kGeluTanh: return 0.5f * h * (1.f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
    case kSilu: return h / (1.f + expf(-h));
    case kTanh: return tanhf(h);
    case kLeakyRelu: return h > 0.f ? h : kLeakySlope * h;
    default: return h;
  }
}

// At NaN as torch: relu'(NaN) = 1, leaky_relu'(NaN) = slope (it tests h <= 0 and h > 0).
__device__ __forceinline__ float act_grad(int act, float h) {
  switch (act) {
    case kRelu: return h <= 0.f ? 0.f : 1.f;
    case kGelu: return 0.5f * (1.f + erff(h * 0.70710678118654752f)) + h * expf(-0.5f * h * h) * 0.3989422804014327f;
    case kGeluTanh: {
      const float k = 0.7978845608028654f, c = 0.044715f;
      const float t = tanhf(k * (h + c * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k * (1.f + 3.f * c * h * h);
    }
    case kSilu: {
      const float sg = 1.f / (1.f + expf(-h));
      return sg * (1.f + h * (1.f - sg));
    }
    case kTanh: {
      const float t = tanhf(h);
      return 1.f - t * t;
    }
    case kLeakyRelu: return h > 0.f ? 1.f : kLeakySlope;
    default: return 1.f;
  }
}

// Everything the epilogue needs besides the (M, d) tensors.
struct Epi {
  const float* scale;  // (1,) or (d,) or null
  int64_t scale_n;
  float scaling;
  const float* gate;  // (M,) or null
  const float* lna_w;  // LN_after or null
  const float* lna_b;
  bool res_in_ln;
  float eps;
  DropoutArgs drop;

  __device__ __forceinline__ float dropk(int64_t m, int64_t n, int64_t d) const {
    return drop.active ? keep_scale(drop, m, n, d) : 1.f;
  }
  __device__ __forceinline__ float factor(int64_t m, int64_t n, int64_t d) const {  // dropout * scaling * scale
    const float s = scale ? scale[scale_n == d ? n : 0] : 1.f;
    return dropk(m, n, d) * scaling * s;
  }
};

template <typename T>
__global__ void ln_rows_kernel(const T* __restrict__ x, int64_t ldx, const float* __restrict__ w,
                               const float* __restrict__ b, T* __restrict__ out, float* mean, float* rstd, int64_t d,
                               float eps, bool use_stats) {
  __shared__ float shared[33];
  const int64_t m = blockIdx.x;
  const T* row = x + m * ldx;
  float mu, rs;
  if (use_stats) {
    mu = mean[m];
    rs = rstd[m];
  } else {
    float s = 0.f;
    for (int64_t n = threadIdx.x; n < d; n += blockDim.x) s += static_cast<float>(row[n]);
    mu = block_sum(s, shared) / static_cast<float>(d);
    float v = 0.f;
    for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
      const float c = static_cast<float>(row[n]) - mu;
      v += c * c;
    }
    rs = rsqrtf(block_sum(v, shared) / static_cast<float>(d) + eps);
    if (threadIdx.x == 0) {
      mean[m] = mu;
      rstd[m] = rs;
    }
  }
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x)
    out[m * d + n] = static_cast<T>((static_cast<float>(row[n]) - mu) * rs * w[n] + b[n]);
}

template <typename T>
__global__ void act_kernel(const T* __restrict__ h, T* __restrict__ a, int64_t n, int act) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) a[i] = static_cast<T>(act_fwd(act, static_cast<float>(h[i])));
}

template <typename T>
__global__ void act_grad_kernel(const T* __restrict__ h, const T* __restrict__ g_a, T* __restrict__ g_h, int64_t n,
                                int act) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {  // a dead ReLU passes exactly 0 whatever g_a holds, as torch's threshold_backward
    const float g = static_cast<float>(g_a[i]), hv = static_cast<float>(h[i]);
    g_h[i] = static_cast<T>(act == kRelu ? (hv <= 0.f ? 0.f : g) : g * act_grad(act, hv));
  }
}

// o + r (LN_after input when the residual goes inside it) for element (m, n).
template <typename T>
__device__ __forceinline__ float ln_input(const Epi& e, const T* u, const T* r, int64_t ldr, int64_t m, int64_t n,
                                          int64_t d) {
  const float g = e.gate ? e.gate[m] : 1.f;
  float t = g * (static_cast<float>(u[m * d + n]) * e.factor(m, n, d));
  if (r && e.res_in_ln) t += static_cast<float>(r[m * ldr + n]);
  return t;
}

template <typename T>
__global__ void epilogue_fwd_kernel(const T* __restrict__ u, const T* __restrict__ r, int64_t ldr, Epi e,
                                    T* __restrict__ out, float* mean, float* rstd, int64_t d) {
  __shared__ float shared[33];
  const int64_t m = blockIdx.x;
  if (!e.lna_w) {
    for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
      float o = ln_input(e, u, r, ldr, m, n, d);  // res_in_ln is false without LN_after
      if (r) o += static_cast<float>(r[m * ldr + n]);
      out[m * d + n] = static_cast<T>(o);
    }
    return;
  }
  float s = 0.f;
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) s += ln_input(e, u, r, ldr, m, n, d);
  const float mu = block_sum(s, shared) / static_cast<float>(d);
  float v = 0.f;
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
    const float c = ln_input(e, u, r, ldr, m, n, d) - mu;
    v += c * c;
  }
  const float rs = rsqrtf(block_sum(v, shared) / static_cast<float>(d) + e.eps);
  if (threadIdx.x == 0) {
    mean[m] = mu;
    rstd[m] = rs;
  }
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
    const float ln = (ln_input(e, u, r, ldr, m, n, d) - mu) * rs * e.lna_w[n] + e.lna_b[n];
    if (r && !e.res_in_ln)  // LN_after(o) rounded as eager's layer_norm output, then + r
      out[m * d + n] = static_cast<T>(static_cast<float>(static_cast<T>(ln)) + static_cast<float>(r[m * ldr + n]));
    else
      out[m * d + n] = static_cast<T>(ln);
  }
}

// Per row: c1 = mean(gout w), c2 = mean(gout w xhat) of the LN_after backward (rowc), g_gate,
// g_u = g_o * gate * factor (T), g_r = g_t (T, when the residual is inside LN_after).
template <typename T>
__global__ void epilogue_bwd_row_kernel(const T* __restrict__ gout, int64_t ldg, const T* __restrict__ u,
                                        const T* __restrict__ r, int64_t ldr, Epi e, const float* mean,
                                        const float* rstd, float* rowc, float* g_gate, T* __restrict__ g_u,
                                        T* __restrict__ g_r, int64_t d) {
  __shared__ float shared[33];
  const int64_t m = blockIdx.x;
  float c1 = 0.f, c2 = 0.f;
  const float mu = e.lna_w ? mean[m] : 0.f, rs = e.lna_w ? rstd[m] : 0.f;
  if (e.lna_w) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
      const float gg = static_cast<float>(gout[m * ldg + n]) * e.lna_w[n];
      const float xhat = (ln_input(e, u, r, ldr, m, n, d) - mu) * rs;
      s1 += gg;
      s2 += gg * xhat;
    }
    c1 = block_sum(s1, shared) / static_cast<float>(d);
    c2 = block_sum(s2, shared) / static_cast<float>(d);
    if (threadIdx.x == 0) {
      rowc[2 * m] = c1;
      rowc[2 * m + 1] = c2;
    }
  }
  auto g_t = [&](int64_t n) {
    const float go = static_cast<float>(gout[m * ldg + n]);
    if (!e.lna_w) return go;
    const float xhat = (ln_input(e, u, r, ldr, m, n, d) - mu) * rs;
    return rs * (go * e.lna_w[n] - c1 - xhat * c2);
  };
  const float g = e.gate ? e.gate[m] : 1.f;
  if (e.gate && g_gate) {
    float s = 0.f;
    for (int64_t n = threadIdx.x; n < d; n += blockDim.x) s += g_t(n) * static_cast<float>(u[m * d + n]) * e.factor(m, n, d);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) g_gate[m] = s;
  }
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
    const float gt = g_t(n);
    if (g_r) g_r[m * d + n] = static_cast<T>(gt);
    g_u[m * d + n] = static_cast<T>(gt * g * e.factor(m, n, d));
  }
}

// Column sums over rows [split * rows_per_split, ...): g_lna_w, g_lna_b, g_b_u (float), g_scale (double).
template <typename T>
__global__ void epilogue_bwd_col_kernel(const T* __restrict__ gout, int64_t ldg, const T* __restrict__ u,
                                        const T* __restrict__ r, int64_t ldr, Epi e, const float* mean,
                                        const float* rstd, const float* rowc, float* g_lnw, float* g_lnb, float* g_bu,
                                        double* g_scale, int64_t M, int64_t d, int64_t rows_per_split) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= d) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m1 = m0 + rows_per_split < M ? m0 + rows_per_split : M;
  float lnw = 0.f, lnb = 0.f, bu = 0.f;
  double sc = 0.0;
  for (int64_t m = m0; m < m1; ++m) {
    const float go = static_cast<float>(gout[m * ldg + n]);
    float gt = go;
    if (e.lna_w) {
      const float xhat = (ln_input(e, u, r, ldr, m, n, d) - mean[m]) * rstd[m];
      lnw += go * xhat;
      lnb += go;
      gt = rstd[m] * (go * e.lna_w[n] - rowc[2 * m] - xhat * rowc[2 * m + 1]);
    }
    const float g = e.gate ? e.gate[m] : 1.f;
    const float go2 = gt * g;
    bu += go2 * e.factor(m, n, d);
    if (g_scale) sc += static_cast<double>(go2 * e.dropk(m, n, d) * static_cast<float>(u[m * d + n])) * e.scaling;
  }
  if (g_lnw) {
    atomicAdd(g_lnw + n, lnw);
    atomicAdd(g_lnb + n, lnb);
  }
  if (g_bu) atomicAdd(g_bu + n, bu);
  if (g_scale) atomicAdd(g_scale + n, sc);
}

template <typename T>
__global__ void ln_bwd_row_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                                  const float* __restrict__ w, const float* mean, const float* rstd,
                                  T* __restrict__ gx, int64_t d) {
  __shared__ float shared[33];
  const int64_t m = blockIdx.x;
  const float mu = mean[m], rs = rstd[m];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
    const float gg = static_cast<float>(g[m * d + n]) * w[n];
    s1 += gg;
    s2 += gg * (static_cast<float>(x[m * ldx + n]) - mu) * rs;
  }
  const float c1 = block_sum(s1, shared) / static_cast<float>(d);
  const float c2 = block_sum(s2, shared) / static_cast<float>(d);
  for (int64_t n = threadIdx.x; n < d; n += blockDim.x) {
    const float xhat = (static_cast<float>(x[m * ldx + n]) - mu) * rs;
    gx[m * d + n] = static_cast<T>(rs * (static_cast<float>(g[m * d + n]) * w[n] - c1 - xhat * c2));
  }
}

template <typename T>
__global__ void ln_bwd_col_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx, const float* mean,
                                  const float* rstd, float* gw, float* gb, int64_t M, int64_t d,
                                  int64_t rows_per_split) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= d) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m1 = m0 + rows_per_split < M ? m0 + rows_per_split : M;
  float sw = 0.f, sb = 0.f;
  for (int64_t m = m0; m < m1; ++m) {
    const float gv = static_cast<float>(g[m * d + n]);
    sw += gv * (static_cast<float>(x[m * ldx + n]) - mean[m]) * rstd[m];
    sb += gv;
  }
  atomicAdd(gw + n, sw);
  atomicAdd(gb + n, sb);
}

Tensor rows_contiguous(const Tensor& t) { return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous(); }
bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
Tensor f32(const OptTensor& t) { return present(t) ? t->to(at::kFloat).contiguous() : Tensor(); }
const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// (grid.y splits, rows per split) for a column kernel: enough blocks to fill the GPU, one split
// (no atomics racing) when deterministic algorithms are requested.
std::pair<int64_t, int64_t> column_splits(int64_t M, int64_t d, int device) {
  int64_t splits = 1;
  if (!at::globalContext().deterministicAlgorithms())
    splits = std::max<int64_t>(1, std::min<int64_t>({cdiv(4 * sm_count(device), cdiv(d, kThreads)), cdiv(M, 64),
                                                     65535}));
  const int64_t per = cdiv(std::max<int64_t>(M, 1), splits);
  return {cdiv(std::max<int64_t>(M, 1), per), per};
}

Epi make_epi(const BottleneckArgs& a, const Tensor& scale32, const Tensor& gate32, const Tensor& lna_w,
             const Tensor& lna_b, bool res_in_ln) {
  return Epi{ptr(scale32), scale32.defined() ? scale32.numel() : 0, static_cast<float>(a.scaling), ptr(gate32),
             ptr(lna_w), ptr(lna_b), res_in_ln, static_cast<float>(a.eps), make_dropout(a.dropout_p, a.seed)};
}

template <typename T>
void launch_act(const Tensor& h, Tensor& a, int act) {
  const int64_t n = h.numel();
  if (n == 0) return;
  act_kernel<T><<<static_cast<unsigned>(cdiv(n, kThreads)), kThreads, 0, stream()>>>(h.data_ptr<T>(), a.data_ptr<T>(),
                                                                                     n, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_ln(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& out, float* mean, float* rstd, double eps,
               bool use_stats) {
  const int64_t M = x.size(0), d = x.size(1);
  if (M == 0) return;
  ln_rows_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream()>>>(
      x.data_ptr<T>(), x.stride(0), w.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<T>(), mean, rstd, d,
      static_cast<float>(eps), use_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> forward_cuda(const BottleneckArgs& args) {
  const char* name = "fastadapt_C::bottleneck_forward";
  const BottleneckDims s = check_bottleneck_forward(c10::kCUDA, args);
  const c10::cuda::CUDAGuard guard(args.z.device());
  const int act = parse_activation(args.activation);
  const int64_t M = s.M, d = s.d, m = s.m;
  const auto opts = args.z.options();
  Tensor stats = at::zeros({4, M}, opts.dtype(at::kFloat));
  if (M == 0) return {at::empty({0, d}, opts), at::empty({0, m}, opts), stats};
  const Tensor z = rows_contiguous(args.z);
  Tensor r;
  if (present(args.residual)) r = rows_contiguous(*args.residual);
  const Tensor lnb_w = f32(args.ln_before_weight), lnb_b = f32(args.ln_before_bias);
  const Tensor lna_w = f32(args.ln_after_weight), lna_b = f32(args.ln_after_bias);
  const Tensor scale32 = f32(args.scale), gate32 = f32(args.gate);
  float* st = stats.data_ptr<float>();
  Tensor out = at::empty({M, d}, opts), h;
  FA_DISPATCH_CUDA_TYPES(z.scalar_type(), name, [&] {
    Tensor zn = z;
    if (lnb_w.defined()) {
      zn = at::empty({M, d}, opts);
      launch_ln<scalar_t>(z, lnb_w, lnb_b, zn, st, st + M, args.eps, false);
    }
    h = present(args.down_bias) ? at::addmm(*args.down_bias, zn, args.down_weight.t())
                                : at::mm(zn, args.down_weight.t());
    Tensor a = at::empty_like(h);
    launch_act<scalar_t>(h, a, act);
    const Tensor u =
        present(args.up_bias) ? at::addmm(*args.up_bias, a, args.up_weight.t()) : at::mm(a, args.up_weight.t());
    const Epi e = make_epi(args, scale32, gate32, lna_w, lna_b,
                           args.residual_before_ln && r.defined() && lna_w.defined());
    epilogue_fwd_kernel<scalar_t><<<static_cast<unsigned>(M), kThreads, 0, stream()>>>(
        u.data_ptr<scalar_t>(), r.defined() ? r.data_ptr<scalar_t>() : nullptr, r.defined() ? r.stride(0) : 0, e,
        out.data_ptr<scalar_t>(), st + 2 * M, st + 3 * M, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, h, stats};
}

std::vector<Tensor> backward_cuda(const BottleneckArgs& args, const Tensor& gout_in, const Tensor& h,
                                  const Tensor& stats, std::array<bool, 12> needs) {
  const char* name = "fastadapt_C::bottleneck_backward";
  check_bottleneck_backward(c10::kCUDA, args, gout_in, h, stats);
  const c10::cuda::CUDAGuard guard(args.z.device());
  const int act = parse_activation(args.activation);
  const int64_t M = args.z.size(0), d = args.z.size(1);
  const auto opts = args.z.options();
  std::vector<Tensor> grads(12);
  for (auto& g : grads) g = at::empty({0}, opts);
  const std::array<bool, 12> want = wanted_grads(args, needs);
  auto wanted = [&](int i) { return want[i]; };
  if (std::none_of(want.begin(), want.end(), [](bool w) { return w; })) return grads;

  const Tensor z = rows_contiguous(args.z), gout = rows_contiguous(gout_in), hc = h.contiguous();
  const Tensor st = stats.contiguous();
  Tensor r;
  if (present(args.residual)) r = rows_contiguous(*args.residual);
  const Tensor lnb_w = f32(args.ln_before_weight), lnb_b = f32(args.ln_before_bias);
  const Tensor lna_w = f32(args.ln_after_weight), lna_b = f32(args.ln_after_bias);
  const Tensor scale32 = f32(args.scale), gate32 = f32(args.gate);
  float* mean_b = st.data_ptr<float>();
  float* rstd_b = mean_b + M;
  const float* mean_a = mean_b + 2 * M;
  const float* rstd_a = mean_b + 3 * M;
  const int device = z.device().index();

  FA_DISPATCH_CUDA_TYPES(z.scalar_type(), name, [&] {
    using T = scalar_t;
    Tensor a = at::empty_like(hc);
    launch_act<T>(hc, a, act);
    const bool need_u = lna_w.defined() || gate32.defined() || wanted(6);
    Tensor u;
    if (need_u)
      u = present(args.up_bias) ? at::addmm(*args.up_bias, a, args.up_weight.t()) : at::mm(a, args.up_weight.t());
    const Epi e = make_epi(args, scale32, gate32, lna_w, lna_b,
                           args.residual_before_ln && r.defined() && lna_w.defined());
    const T* up = u.defined() ? u.data_ptr<T>() : nullptr;
    const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
    const int64_t ldr = r.defined() ? r.stride(0) : 0;
    Tensor g_u = at::empty({M, d}, opts);
    Tensor g_r = (wanted(1) && rp && lna_w.defined() && e.res_in_ln) ? at::empty({M, d}, opts) : Tensor();
    Tensor g_gate = (wanted(11) && gate32.defined()) ? at::empty({M}, opts.dtype(at::kFloat)) : Tensor();
    Tensor rowc = at::empty({M, 2}, opts.dtype(at::kFloat));
    Tensor cols = at::zeros({3, d}, opts.dtype(at::kFloat));  // g_lna_w, g_lna_b, g_b_u
    Tensor g_sc = at::zeros({d}, opts.dtype(at::kDouble));
    if (M > 0) {
      epilogue_bwd_row_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream()>>>(
          gout.data_ptr<T>(), gout.stride(0), up, rp, ldr, e, mean_a, rstd_a, rowc.data_ptr<float>(),
          g_gate.defined() ? g_gate.data_ptr<float>() : nullptr, g_u.data_ptr<T>(),
          g_r.defined() ? g_r.data_ptr<T>() : nullptr, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const bool col_ln = wanted(9) || wanted(10), col_bu = wanted(5), col_sc = wanted(6);
      if (col_ln || col_bu || col_sc) {
        const auto [splits, per] = column_splits(M, d, device);
        float* cp = cols.data_ptr<float>();
        epilogue_bwd_col_kernel<T><<<dim3(static_cast<unsigned>(cdiv(d, kThreads)), static_cast<unsigned>(splits)),
                                     kThreads, 0, stream()>>>(
            gout.data_ptr<T>(), gout.stride(0), up, rp, ldr, e, mean_a, rstd_a, rowc.data_ptr<float>(),
            col_ln ? cp : nullptr, col_ln ? cp + d : nullptr, col_bu ? cp + 2 * d : nullptr,
            col_sc ? g_sc.data_ptr<double>() : nullptr, M, d, per);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (g_r.defined()) grads[1] = g_r;
    if (wanted(9)) grads[9] = cols[0].to(args.ln_after_weight->scalar_type(), false, true);
    if (wanted(10)) grads[10] = cols[1].to(args.ln_after_bias->scalar_type(), false, true);
    if (wanted(5)) grads[5] = cols[2].to(args.up_bias->scalar_type(), false, true);
    if (wanted(6)) grads[6] = (args.scale->numel() == 1 ? g_sc.sum().reshape({1}) : g_sc).to(args.scale->scalar_type());
    if (wanted(11)) grads[11] = g_gate.to(args.gate->scalar_type(), false, true);
    if (wanted(4)) grads[4] = at::mm(g_u.t(), a);

    if (!(wanted(0) || wanted(2) || wanted(3) || wanted(7) || wanted(8))) return;
    Tensor g_a = at::mm(g_u, args.up_weight);
    Tensor g_h = at::empty_like(hc);
    if (g_h.numel() > 0) {
      act_grad_kernel<T><<<static_cast<unsigned>(cdiv(g_h.numel(), kThreads)), kThreads, 0, stream()>>>(
          hc.data_ptr<T>(), g_a.data_ptr<T>(), g_h.data_ptr<T>(), g_h.numel(), act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (wanted(3)) grads[3] = at::sum(g_h, {0}, false, at::kFloat).to(args.down_bias->scalar_type());
    if (wanted(2)) {
      Tensor zn = z;
      if (lnb_w.defined()) {
        zn = at::empty({M, d}, opts);
        launch_ln<T>(z, lnb_w, lnb_b, zn, mean_b, rstd_b, args.eps, true);
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
    Tensor lncols = at::zeros({2, d}, opts.dtype(at::kFloat));
    if (M > 0) {
      ln_bwd_row_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream()>>>(
          g_zn.data_ptr<T>(), z.data_ptr<T>(), z.stride(0), lnb_w.data_ptr<float>(), mean_b, rstd_b,
          g_z.data_ptr<T>(), d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto [splits, per] = column_splits(M, d, device);
      ln_bwd_col_kernel<T><<<dim3(static_cast<unsigned>(cdiv(d, kThreads)), static_cast<unsigned>(splits)), kThreads,
                             0, stream()>>>(g_zn.data_ptr<T>(), z.data_ptr<T>(), z.stride(0), mean_b, rstd_b,
                                            lncols.data_ptr<float>(), lncols.data_ptr<float>() + d, M, d, per);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (wanted(0)) grads[0] = g_z;
    if (wanted(7)) grads[7] = lncols[0].to(args.ln_before_weight->scalar_type(), false, true);
    if (wanted(8)) grads[8] = lncols[1].to(args.ln_before_bias->scalar_type(), false, true);
  });
  return grads;
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_IMPL(fastadapt_C, CUDA, m) {
  m.impl("bottleneck_forward", &fastadapt::bottleneck_forward_entry<&fastadapt::forward_cuda>);
  m.impl("bottleneck_backward", &fastadapt::bottleneck_backward_entry<&fastadapt::backward_cuda>);
}
