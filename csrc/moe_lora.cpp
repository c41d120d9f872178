// MoE experts with per-expert LoRA, CPU kernels (math: fastadapt/reference/moe_lora.py).
//
// The (token, slot) pairs are grouped by expert on the host (a stable counting sort: on the CPU
// reading the routing costs nothing), each token's row gathered once into grouped order, and each
// expert's products run as ATen GEMMs on its consecutive rows (MKL / oneDNN run them faster than
// loops of ours, csrc/README.md), the LoRA terms added in place; the products never form
// W + s B A. What ATen cannot fuse is one pass each here: the activation and its gradient (read g
// once, write h or the gradient of g once), the weighted sum of each token's k expert outputs and
// its backward (the routing weight's gradient and w * gy in one read of gy). Dropout masks are
// drawn over the grouped rows (csrc/common.h), gate_up's from seed and down's from seed + 1, the
// same draw as fastadapt_C::dropout_keep, regenerated in the backward, never stored.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"

namespace fastadapt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// A call as the kernels read it: sizes, LoRA ranks (0: none), the activation, and the routing
// grouped by expert: order[p] the pair (t * k + j) of grouped row p, bounds[e] where expert e's
// rows start, inv[pair] its grouped row.
struct Call {
  int64_t T, H, E, I, k, S, r1, r2;
  bool gpt_oss;
  std::vector<int64_t> order, bounds, inv;
  Tensor token;  // (S,) int64: the token of each grouped row
};

void check_lora(const ArgCheck& c, const char* a_name, const char* b_name, const OptTensor& A, const OptTensor& B,
                int64_t E, int64_t n_in, int64_t n_out, at::ScalarType dt) {
  TORCH_CHECK(present(A) == present(B), c.op(), ": ", a_name, " and ", b_name, " must be given together");
  if (!present(A)) return;
  c(a_name, *A, {E, kAnySize, n_in}, dt);
  TORCH_CHECK(A->size(1) >= 1, c.op(), ": ", a_name, " has rank 0");
  c(b_name, *B, {E, n_out, A->size(1)}, dt);
}

Call check_moe(const ArgCheck& c, const Tensor& x, const Tensor& top_k_index, const Tensor& top_k_weights,
               const Tensor& gate_up_proj, const Tensor& down_proj, const OptTensor& gate_up_A,
               const OptTensor& gate_up_B, const OptTensor& down_A, const OptTensor& down_B,
               const std::string& activation, double dropout_p) {
  const at::ScalarType dt = x.scalar_type();
  c("x", x, {kAnySize, kAnySize}, dt);
  c.kernel_dtype("x", x);
  const int64_t T = x.size(0), H = x.size(1);
  c("top_k_index", top_k_index, {T, kAnySize}, at::kLong);
  const int64_t k = top_k_index.size(1);
  TORCH_CHECK(k >= 1, c.op(), ": top_k_index must have at least one slot per token");
  TORCH_CHECK(top_k_weights.is_floating_point(), c.op(), ": top_k_weights must be floating, got ",
              top_k_weights.scalar_type());
  c("top_k_weights", top_k_weights, {T, k}, top_k_weights.scalar_type());
  c("gate_up_proj", gate_up_proj, {kAnySize, kAnySize, H}, dt);
  const int64_t E = gate_up_proj.size(0), two_i = gate_up_proj.size(1);
  TORCH_CHECK(E >= 1 && two_i >= 2 && two_i % 2 == 0, c.op(), ": gate_up_proj must have shape (E >= 1, 2I >= 2, ",
              H, ") with an even 2I, got ", gate_up_proj.sizes());
  const int64_t I = two_i / 2;
  c("down_proj", down_proj, {E, H, I}, dt);
  check_lora(c, "gate_up_A", "gate_up_B", gate_up_A, gate_up_B, E, H, two_i, dt);
  check_lora(c, "down_A", "down_B", down_A, down_B, E, I, H, dt);
  TORCH_CHECK(activation == "silu" || activation == "gpt_oss", c.op(), ": activation must be silu or gpt_oss, got ",
              activation);
  c.probability("dropout_p", dropout_p);
  Call call{T, H, E, I, k, c.mul("T * k", T, k), present(gate_up_A) ? gate_up_A->size(1) : 0,
            present(down_A) ? down_A->size(1) : 0, activation == "gpt_oss", {}, {}, {}, Tensor()};
  const Tensor ids = top_k_index.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t s = 0; s < call.S; ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < E, c.op(), ": top_k_index must be in [0, ", E, "), got ", id[s], " at token ",
                s / k, ", slot ", s % k);
    ++count[id[s] + 1];
  }
  std::partial_sum(count.begin(), count.end(), count.begin());
  call.bounds = count;
  call.order.resize(call.S);
  call.inv.resize(call.S);
  for (int64_t s = 0; s < call.S; ++s) {  // stable: pairs of one expert keep their order
    const int64_t p = count[id[s]]++;
    call.order[p] = s;
    call.inv[s] = p;
  }
  call.token = at::empty({call.S}, at::kLong);
  int64_t* tok = call.token.data_ptr<int64_t>();
  for (int64_t p = 0; p < call.S; ++p) tok[p] = call.order[p] / k;
  return call;
}

// fn(e, b, n) for each expert with rows: its rows are grouped rows [b, b + n).
template <typename Fn>
void for_each_expert(const Call& c, Fn fn) {
  for (int64_t e = 0; e < c.E; ++e) {
    const int64_t b = c.bounds[e], n = c.bounds[e + 1] - b;
    if (n > 0) fn(e, b, n);
  }
}

std::vector<int64_t> row_range(int64_t b, int64_t n) {
  std::vector<int64_t> rows(n);
  std::iota(rows.begin(), rows.end(), b);
  return rows;
}

// Columns of row p of g (2I wide) holding the gate and the up value of intermediate unit i.
inline int64_t gate_col(const Call& c, int64_t i) { return c.gpt_oss ? 2 * i : i; }
inline int64_t up_col(const Call& c, int64_t i) { return c.gpt_oss ? 2 * i + 1 : c.I + i; }

// torch.clamp's values: NaN stays NaN (std::fmin would return the bound).
inline float clamp_max(float v, float hi) { return v > hi ? hi : v; }
inline float clamp(float v, float lim) { return v > lim ? lim : (v < -lim ? -lim : v); }

// h = act(g) for g (S, 2I) contiguous, in float, rounded once.
Tensor activate(const Call& c, const Tensor& g, double alpha, double limit) {
  Tensor h = at::empty({c.S, c.I}, g.options());
  const float a = static_cast<float>(alpha), lim = static_cast<float>(limit);
  FA_DISPATCH_CPU(g.scalar_type(), "fastadapt_C::moe_lora", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, c.S, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* row = gp + p * 2 * c.I;
        for (int64_t i = 0; i < c.I; ++i) {
          const float gate = static_cast<float>(row[gate_col(c, i)]), up = static_cast<float>(row[up_col(c, i)]);
          float out;
          if (c.gpt_oss) {
            const float gc = clamp_max(gate, lim), uc = clamp(up, lim);
            out = (uc + 1.f) * (gc / (1.f + std::exp(-a * gc)));
          } else {
            out = gate / (1.f + std::exp(-gate)) * up;
          }
          hp[p * c.I + i] = static_cast<scalar_t>(out);
        }
      }
    });
  });
  return h;
}

// The gradient of g (S, 2I) from gh (S, I); zero where a clamp is active (a NaN input included),
// as torch.clamp's backward gives.
Tensor activate_backward(const Call& c, const Tensor& g, const Tensor& gh, double alpha, double limit) {
  Tensor gg = at::empty({c.S, 2 * c.I}, g.options());
  const float a = static_cast<float>(alpha), lim = static_cast<float>(limit);
  FA_DISPATCH_CPU(g.scalar_type(), "fastadapt_C::moe_lora", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ghp = gh.data_ptr<scalar_t>();
    scalar_t* out = gg.data_ptr<scalar_t>();
    at::parallel_for(0, c.S, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* row = gp + p * 2 * c.I;
        scalar_t* orow = out + p * 2 * c.I;
        for (int64_t i = 0; i < c.I; ++i) {
          const float gate = static_cast<float>(row[gate_col(c, i)]), up = static_cast<float>(row[up_col(c, i)]);
          const float d = static_cast<float>(ghp[p * c.I + i]);
          float dgate, dup;
          if (c.gpt_oss) {
            const float gc = clamp_max(gate, lim), uc = clamp(up, lim);
            const float sig = 1.f / (1.f + std::exp(-a * gc));
            dgate = gate <= lim ? d * (uc + 1.f) * (sig + gc * a * sig * (1.f - sig)) : 0.f;
            dup = (up >= -lim && up <= lim) ? d * (gc * sig) : 0.f;
          } else {
            const float sig = 1.f / (1.f + std::exp(-gate));
            dgate = d * up * (sig * (1.f + gate * (1.f - sig)));
            dup = d * (gate * sig);
          }
          orow[gate_col(c, i)] = static_cast<scalar_t>(dgate);
          orow[up_col(c, i)] = static_cast<scalar_t>(dup);
        }
      }
    });
  });
  return gg;
}

// out[t] = sum_j w[t, j] * src[inv[t k + j]] (w = 1 when undefined), float sums, for src (S, N).
Tensor combine(const Call& c, const Tensor& src, const Tensor& weights) {
  Tensor out = at::empty({c.T, src.size(1)}, src.options());
  const int64_t N = src.size(1);
  const Tensor w = weights.defined() ? weights.to(at::kDouble).contiguous() : Tensor();
  FA_DISPATCH_CPU(src.scalar_type(), "fastadapt_C::moe_lora", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const double* wp = w.defined() ? w.data_ptr<double>() : nullptr;
    at::parallel_for(0, c.T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(N);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < c.k; ++j) {
          const scalar_t* row = sp + c.inv[t * c.k + j] * N;
          const float wt = wp ? static_cast<float>(wp[t * c.k + j]) : 1.f;
          for (int64_t n = 0; n < N; ++n) acc[n] += wt * static_cast<float>(row[n]);
        }
        for (int64_t n = 0; n < N; ++n) op[t * N + n] = static_cast<scalar_t>(acc[n]);
      }
    });
  });
  return out;
}

// One projection of every expert over its grouped rows: out = in W_e^T (+ bias_e), and with LoRA
// (r > 0) u = s D(in) A_e^T (what the backward reads), out += u B_e^T.
void project(const Call& c, const Tensor& in, const Tensor& W, const OptTensor& bias, const OptTensor& A,
             const OptTensor& B, double s, int64_t r, double dropout_p, int64_t seed, const Tensor& out,
             const Tensor& u) {
  for_each_expert(c, [&](int64_t e, int64_t b, int64_t n) {
    Tensor oe = out.narrow(0, b, n);
    const Tensor ie = in.narrow(0, b, n);
    if (present(bias)) at::addmm_out(oe, (*bias)[e], ie, W[e].t());
    else at::mm_out(oe, ie, W[e].t());
    if (r) {
      Tensor ue = u.narrow(0, b, n);
      at::mm_out(ue, cpu::dropped(ie, row_range(b, n), dropout_p, seed), (*A)[e].t());
      ue.mul_(s);
      oe.addmm_(ue, (*B)[e].t());
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_lora_forward_cpu(
    const Tensor& x_in, const Tensor& top_k_index, const Tensor& top_k_weights, const Tensor& gate_up_proj,
    const OptTensor& gate_up_bias, const Tensor& down_proj, const OptTensor& down_bias, const OptTensor& gate_up_A,
    const OptTensor& gate_up_B, double gate_up_scaling, const OptTensor& down_A, const OptTensor& down_B,
    double down_scaling, const std::string& activation, double alpha, double limit, double dropout_p, int64_t seed) {
  const ArgCheck chk("fastadapt_C::moe_lora_forward", x_in, c10::kCPU);
  const Call c = check_moe(chk, x_in, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_A, gate_up_B,
                           down_A, down_B, activation, dropout_p);
  chk("gate_up_bias", gate_up_bias, {c.E, 2 * c.I}, x_in.scalar_type());
  chk("down_bias", down_bias, {c.E, c.H}, x_in.scalar_type());
  const auto opts = x_in.options();
  const Tensor xs = x_in.index_select(0, c.token);
  Tensor g = at::empty({c.S, 2 * c.I}, opts), d = at::empty({c.S, c.H}, opts);
  Tensor u1 = at::zeros({c.S, c.r1}, opts), u2 = at::zeros({c.S, c.r2}, opts);
  project(c, xs, gate_up_proj, gate_up_bias, gate_up_A, gate_up_B, gate_up_scaling, c.r1, dropout_p, seed, g, u1);
  const Tensor h = activate(c, g, alpha, limit);
  project(c, h, down_proj, down_bias, down_A, down_B, down_scaling, c.r2, dropout_p, seed + 1, d, u2);
  return {combine(c, d, top_k_weights), g, u1, u2, d};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_lora_backward_cpu(
    const Tensor& gout, const Tensor& x_in, const Tensor& top_k_index, const Tensor& top_k_weights,
    const Tensor& gate_up_proj, const Tensor& down_proj, const OptTensor& gate_up_A, const OptTensor& gate_up_B,
    double gate_up_scaling, const OptTensor& down_A, const OptTensor& down_B, double down_scaling,
    const std::string& activation, double alpha, double limit, double dropout_p, int64_t seed, const Tensor& g_in,
    const Tensor& u1, const Tensor& u2, const Tensor& d_in, std::array<bool, 6> needs) {
  const ArgCheck chk("fastadapt_C::moe_lora_backward", x_in, c10::kCPU);
  const Call c = check_moe(chk, x_in, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_A, gate_up_B,
                           down_A, down_B, activation, dropout_p);
  const at::ScalarType dt = x_in.scalar_type();
  chk("gout", gout, {c.T, c.H}, dt);
  chk("g", g_in, {c.S, 2 * c.I}, dt);
  chk("u1", u1, {c.S, c.r1}, dt);
  chk("u2", u2, {c.S, c.r2}, dt);
  chk("d", d_in, {c.S, c.H}, dt);
  const bool need_x = needs[0], need_w = needs[1], need_A1 = needs[2] && c.r1, need_B1 = needs[3] && c.r1;
  const bool need_A2 = needs[4] && c.r2, need_B2 = needs[5] && c.r2;
  const auto opts = x_in.options();
  Tensor gx = at::empty({0}, opts), gw = at::empty({0}, opts), gA1 = at::empty({0}, opts), gB1 = at::empty({0}, opts);
  Tensor gA2 = at::empty({0}, opts), gB2 = at::empty({0}, opts);
  if (need_A1) gA1 = at::zeros(gate_up_A->sizes(), opts);
  if (need_B1) gB1 = at::zeros(gate_up_B->sizes(), opts);
  if (need_A2) gA2 = at::zeros(down_A->sizes(), opts);
  if (need_B2) gB2 = at::zeros(down_B->sizes(), opts);
  const Tensor gy = gout.contiguous(), d = d_in.contiguous(), g = g_in.contiguous();
  // gd[p] = w[pair] gy[t] and gw[pair] = <gy[t], d[p]>, one read of gy per grouped row.
  Tensor gd = at::empty({c.S, c.H}, opts);
  Tensor gw_pairs = at::empty({c.S}, opts.dtype(at::kFloat));
  const Tensor w = top_k_weights.to(at::kDouble).contiguous();
  FA_DISPATCH_CPU(dt, "fastadapt_C::moe_lora", [&] {
    const scalar_t *gyp = gy.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>();
    scalar_t* gdp = gd.data_ptr<scalar_t>();
    const double* wp = w.data_ptr<double>();
    float* gwp = gw_pairs.data_ptr<float>();
    at::parallel_for(0, c.S, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t pair = c.order[p];
        const scalar_t* row = gyp + (pair / c.k) * c.H;
        const float wt = static_cast<float>(wp[pair]);
        float dot = 0.f;
        for (int64_t n = 0; n < c.H; ++n) {
          const float v = static_cast<float>(row[n]);
          gdp[p * c.H + n] = static_cast<scalar_t>(v * wt);
          dot += v * static_cast<float>(dp[p * c.H + n]);
        }
        gwp[pair] = dot;
      }
    });
  });
  if (need_w) gw = gw_pairs.view({c.T, c.k}).to(top_k_weights.scalar_type());
  if (!need_x && !need_A1 && !need_B1 && !need_A2 && !need_B2) return {gx, gw, gA1, gB1, gA2, gB2};
  const bool down_lora = c.r2 > 0, upstream = need_x || need_A1 || need_B1;
  const Tensor h = need_A2 ? activate(c, g, alpha, limit) : Tensor();
  Tensor gh = upstream ? at::empty({c.S, c.I}, opts) : Tensor();
  for_each_expert(c, [&](int64_t e, int64_t b, int64_t n) {
    const Tensor gde = gd.narrow(0, b, n);
    Tensor ghe = upstream ? gh.narrow(0, b, n) : Tensor();
    if (upstream) at::mm_out(ghe, gde, down_proj[e]);
    if (!down_lora) return;
    const std::vector<int64_t> rows = row_range(b, n);
    if (need_B2) {
      Tensor out = gB2[e];
      at::mm_out(out, gde.t(), u2.narrow(0, b, n));
    }
    Tensor gue = at::mm(gde, (*down_B)[e]);
    gue.mul_(down_scaling);
    if (need_A2) {
      Tensor out = gA2[e];
      at::mm_out(out, gue.t(), cpu::dropped(h.narrow(0, b, n), rows, dropout_p, seed + 1));
    }
    if (upstream) ghe.add_(cpu::dropped(at::mm(gue, (*down_A)[e]), rows, dropout_p, seed + 1));
  });
  if (!upstream) return {gx, gw, gA1, gB1, gA2, gB2};
  const Tensor gg = activate_backward(c, g, gh, alpha, limit);
  const Tensor xs = need_A1 ? x_in.index_select(0, c.token) : Tensor();
  Tensor gxs = need_x ? at::empty({c.S, c.H}, opts) : Tensor();
  for_each_expert(c, [&](int64_t e, int64_t b, int64_t n) {
    const Tensor gge = gg.narrow(0, b, n);
    Tensor gxe = need_x ? gxs.narrow(0, b, n) : Tensor();
    if (need_x) at::mm_out(gxe, gge, gate_up_proj[e]);
    if (!c.r1) return;
    const std::vector<int64_t> rows = row_range(b, n);
    if (need_B1) {
      Tensor out = gB1[e];
      at::mm_out(out, gge.t(), u1.narrow(0, b, n));
    }
    if (!need_x && !need_A1) return;
    Tensor gue = at::mm(gge, (*gate_up_B)[e]);
    gue.mul_(gate_up_scaling);
    if (need_A1) {
      Tensor out = gA1[e];
      at::mm_out(out, gue.t(), cpu::dropped(xs.narrow(0, b, n), rows, dropout_p, seed));
    }
    if (need_x) gxe.add_(cpu::dropped(at::mm(gue, (*gate_up_A)[e]), rows, dropout_p, seed));
  });
  if (need_x) gx = combine(c, gxs, Tensor());
  return {gx, gw, gA1, gB1, gA2, gB2};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/moe_lora.py; gradients not asked for in `needs` (x,
  // top_k_weights, gate_up_A, gate_up_B, down_A, down_B) come back as empty tensors. CPU only: on
  // CUDA the Triton kernels group the pairs on the device.
  m.def("moe_lora_forward(Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
        "Tensor? gate_up_bias, Tensor down_proj, Tensor? down_bias, Tensor? gate_up_A, Tensor? gate_up_B, "
        "float gate_up_scaling, Tensor? down_A, Tensor? down_B, float down_scaling, str activation, float alpha, "
        "float limit, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_lora_backward(Tensor gout, Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
        "Tensor down_proj, Tensor? gate_up_A, Tensor? gate_up_B, float gate_up_scaling, Tensor? down_A, "
        "Tensor? down_B, float down_scaling, str activation, float alpha, float limit, float dropout_p, int seed, "
        "Tensor g, Tensor u1, Tensor u2, Tensor d, bool[6] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

FASTADAPT_CPU_KERNELS(moe_lora)
