// Multi-adapter LoRA linear (one adapter per row), CPU kernels (math: fastadapt/reference/multi_lora.py).
//
// As in csrc/lora.cpp, every matrix product is ATen's (MKL / oneDNN run them faster than float
// loops of ours): the frozen product once over all rows, then per adapter present in the batch its
// rows gathered (index_select), its rank-r_a products, and the update added back in place
// (index_add_). On the CPU reading the ids costs nothing, so rows are grouped here on the host.
// Dropout: each adapter's rows are scaled by the mask drawn from (seed, flat index of x) with that
// adapter's probability (csrc/common.h), the same draw as fastadapt_C::dropout_keep, regenerated
// in the backward, never stored.
#include <algorithm>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "registration.h"

namespace fastadapt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A multi-adapter LoRA call as the kernels read it: its sizes (M, K, N, n, r_max), and the ids
// and per-adapter vectors as the contiguous tensors that the check read (ids in [-1, n), ranks in
// [1, r_max], dropout probabilities in [0, 1)). The kernels read these, never the arguments, which
// may be strided or expanded views (a batch of one sequence hands its per-sequence ids as a
// stride-0 view); each is copied at most once, here.
struct Batch {
  int64_t M, K, N, n, R;
  Tensor ids, ranks, scalings, dropout_p;  // dropout_p undefined: no dropout
};

Batch check_multi_lora(const ArgCheck& c, const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                       const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks, const Tensor& adapter_ids,
                       const OptTensor& dropout_p) {
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
  c("dropout_p", dropout_p, {n}, at::kDouble);  // float64: 1 / (1 - p) from a float32 p is 1.3e-5 off at 0.999
  Batch b{M, K, N, n, R, adapter_ids.contiguous(), ranks.contiguous(), scalings.contiguous(), Tensor()};
  const int64_t* id = b.ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(id[m] >= -1 && id[m] < n, c.op(), ": adapter_ids must be in [-1, ", n, "), got ", id[m], " at row ",
                m);
  const int32_t* r = b.ranks.data_ptr<int32_t>();
  for (int64_t a = 0; a < n; ++a)
    TORCH_CHECK(r[a] >= 1 && r[a] <= R, c.op(), ": ranks must be in [1, r_max = ", R, "], got ", r[a],
                " for adapter ", a);
  if (dropout_p.has_value() && dropout_p->defined()) {
    b.dropout_p = dropout_p->contiguous();
    for (int64_t a = 0; a < n; ++a) c.probability("dropout_p", b.dropout_p.data_ptr<double>()[a]);
  }
  return b;
}

Batch check_multi_lora_forward(const Tensor& x, const Tensor& weight, const Tensor& A_stack, const Tensor& B_stack,
                               const Tensor& scalings, const Tensor& ranks, const Tensor& adapter_ids,
                               const OptTensor& bias, const OptTensor& dropout_p) {
  const ArgCheck c("fastadapt_C::multi_lora_forward", x, c10::kCPU);
  Batch b = check_multi_lora(c, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, dropout_p);
  c("bias", bias, {b.N}, x.scalar_type());
  return b;
}

Batch check_multi_lora_backward(const Tensor& gy, const Tensor& x, const Tensor& weight, const Tensor& A_stack,
                                const Tensor& B_stack, const Tensor& u, const Tensor& scalings, const Tensor& ranks,
                                const Tensor& adapter_ids, const OptTensor& dropout_p) {
  const ArgCheck c("fastadapt_C::multi_lora_backward", x, c10::kCPU);
  Batch b = check_multi_lora(c, x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, dropout_p);
  c("gy", gy, {b.M, b.N}, x.scalar_type());
  c("u", u, {b.M, b.R}, x.scalar_type());
  return b;
}

// fn(a, idx, rows, r, s, p) for each adapter a with rows in the batch: its rows (ascending, as a
// vector and as an index tensor), its rank, scaling and dropout probability.
template <typename Fn>
void for_each_adapter(const Batch& b, Fn fn) {
  std::vector<std::vector<int64_t>> rows(b.n);
  const int64_t* id = b.ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < b.M; ++m)
    if (id[m] >= 0) rows[id[m]].push_back(m);
  const int32_t* rk = b.ranks.data_ptr<int32_t>();
  const float* s = b.scalings.data_ptr<float>();
  const double* p = b.dropout_p.defined() ? b.dropout_p.data_ptr<double>() : nullptr;
  for (int64_t a = 0; a < b.n; ++a) {
    if (rows[a].empty()) continue;
    // A tensor of its own, not a view of `rows`: what is handed to ATen may outlive this loop
    // (index_select keeps its index for a backward, were autograd recording).
    Tensor idx = at::empty({static_cast<int64_t>(rows[a].size())}, at::kLong);
    std::copy(rows[a].begin(), rows[a].end(), idx.data_ptr<int64_t>());
    fn(a, idx, rows[a], static_cast<int64_t>(rk[a]), s[a], p ? p[a] : 0.0);
  }
}

std::tuple<Tensor, Tensor> multi_lora_forward_cpu(const Tensor& x_in, const Tensor& weight, const Tensor& A_stack,
                                                  const Tensor& B_stack, const Tensor& scalings, const Tensor& ranks,
                                                  const Tensor& adapter_ids, const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& dropout_p, int64_t seed) {
  const Batch b = check_multi_lora_forward(x_in, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias,
                                           dropout_p);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x = cpu::rows_contiguous(x_in);
  Tensor u = at::zeros({b.M, b.R}, x.options());
  Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  for_each_adapter(b, [&](int64_t a, const Tensor& idx, const std::vector<int64_t>& rows, int64_t r, float s,
                          double p) {
    Tensor ua = at::mm(cpu::dropped(x.index_select(0, idx), rows, p, seed), A_stack[a].narrow(0, 0, r).t());
    ua.mul_(s);
    y.index_add_(0, idx, at::mm(ua, B_stack[a].narrow(1, 0, r).t()));
    u.narrow(1, 0, r).index_copy_(0, idx, ua);
  });
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_backward_cpu(
    const Tensor& gy_in, const Tensor& x_in, const Tensor& weight, const Tensor& A_stack, const Tensor& B_stack,
    const Tensor& u, const Tensor& scalings, const Tensor& ranks, const Tensor& adapter_ids,
    const std::optional<Tensor>& dropout_p, int64_t seed, std::array<bool, 5> needs) {
  const Batch b = check_multi_lora_backward(gy_in, x_in, weight, A_stack, B_stack, u, scalings, ranks, adapter_ids,
                                            dropout_p);
  const bool need_x = needs[0], need_A = needs[1], need_B = needs[2], need_bias = needs[3], need_w = needs[4];
  const Tensor gy = cpu::rows_contiguous(gy_in), x = cpu::rows_contiguous(x_in);
  const auto opts = x.options();
  Tensor gx = at::empty({0}, opts), gA = at::empty({0}, opts), gB = at::empty({0}, opts);
  Tensor gbias = at::empty({0}, opts), gweight = at::empty({0}, opts);
  if (need_bias) gbias = at::sum(gy, {0}, false, at::kFloat).to(gy.scalar_type());
  if (need_w) gweight = at::mm(gy.t(), x);
  if (need_x) gx = at::mm(gy, weight);
  if (need_A) gA = at::zeros(A_stack.sizes(), opts.dtype(A_stack.scalar_type()));
  if (need_B) gB = at::zeros(B_stack.sizes(), opts.dtype(B_stack.scalar_type()));
  if (!need_x && !need_A && !need_B) return {gx, gA, gB, gbias, gweight};
  for_each_adapter(b, [&](int64_t a, const Tensor& idx, const std::vector<int64_t>& rows, int64_t r, float s,
                          double p) {
    const Tensor gya = gy.index_select(0, idx);
    if (need_B) gB[a].narrow(1, 0, r).copy_(at::mm(gya.t(), u.index_select(0, idx).narrow(1, 0, r)));
    if (!need_x && !need_A) return;
    Tensor gua = at::mm(gya, B_stack[a].narrow(1, 0, r));
    gua.mul_(s);
    if (need_x) gx.index_add_(0, idx, cpu::dropped(at::mm(gua, A_stack[a].narrow(0, 0, r)), rows, p, seed));
    if (need_A) gA[a].narrow(0, 0, r).copy_(at::mm(gua.t(), cpu::dropped(x.index_select(0, idx), rows, p, seed)));
  });
  return {gx, gA, gB, gbias, gweight};
}

}  // namespace
}  // namespace fastadapt

TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) {
  const fastadapt::Schemas m(lib);
  // Backend signatures of fastadapt/ops/multi_lora.py; gradients not asked for in `needs`
  // (x, A_stack, B_stack, bias, weight) come back as empty tensors. CPU only: on CUDA the Triton
  // kernels group the rows on the device.
  m.def("multi_lora_forward(Tensor x, Tensor weight, Tensor A_stack, Tensor B_stack, Tensor scalings, Tensor ranks, "
        "Tensor adapter_ids, Tensor? bias, Tensor? dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("multi_lora_backward(Tensor gy, Tensor x, Tensor weight, Tensor A_stack, Tensor B_stack, Tensor u, "
        "Tensor scalings, Tensor ranks, Tensor adapter_ids, Tensor? dropout_p, int seed, bool[5] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

FASTADAPT_CPU_KERNELS(multi_lora)
