// How the tensor ops of fastadapt_C are defined: each schema with an Autograd kernel that keeps
// autograd out of the native kernels (host only: the .cu files register kernels, never schemas).
#pragma once

#include <torch/library.h>

namespace fastadapt {

// The Autograd kernel of every fastadapt_C op (csrc/ops.cpp). The native kernels compute with ATen
// ops; an op with no Autograd kernel of its own is run by PyTorch's fallback, which lets autograd
// record those inner calls: a graph of the kernel's internals that saves tensors the kernel does
// not own, and is wrong wherever the kernel writes through raw pointers. So with grad mode on and
// a tensor argument that requires grad it raises, naming the argument; otherwise it runs the
// kernel below autograd, where nothing is recorded.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

// The schemas of one TORCH_LIBRARY_FRAGMENT, each defined with not_differentiable:
//   TORCH_LIBRARY_FRAGMENT(fastadapt_C, lib) { const fastadapt::Schemas m(lib); m.def("op(Tensor x) -> Tensor"); }
class Schemas {
 public:
  explicit Schemas(torch::Library& lib) : lib_(lib) {}

  void def(const char* schema) const {
    lib_.def(schema, torch::dispatch(c10::DispatchKey::Autograd,
                                     torch::CppFunction::makeFromBoxedFunction<&not_differentiable>()));
  }

 private:
  torch::Library& lib_;
};

}  // namespace fastadapt

// The CPU kernels of an op's forward and backward schemas, by the naming every csrc/OP.cpp keeps:
// OP_forward -> fastadapt::OP_forward_cpu, OP_backward -> fastadapt::OP_backward_cpu.
#define FASTADAPT_CPU_KERNELS(op)                                \
  TORCH_LIBRARY_IMPL(fastadapt_C, CPU, m) {                      \
    m.impl(#op "_forward", &fastadapt::op##_forward_cpu);        \
    m.impl(#op "_backward", &fastadapt::op##_backward_cpu);      \
  }
