"""The eager path of the fused ops: the custom op's own forward, context and backward, called
through a ``torch.autograd.Function`` instead of the ``torch.library`` dispatcher.

A custom op's Python layers (schema default filling, the autograd kernel, redispatch to the
backend kernel, and the backward custom op) cost more than the kernels of a small layer: on the
CPU (1 thread, LoRA M=64, 64 -> 128, r=8, fwd+bwd) the cpp kernels took 49 us, an
autograd.Function around them 99 us and the custom op 274 us. So an eager call on plain tensors
takes this path; ``torch.compile`` (and anything else that traces: fake or functional tensors,
dispatch or function modes, tensor subclasses) gets the custom op, which it traces as one node.
Both paths run the same functions on the same backend, so they compute the same bits.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastadapt import dispatch
from fastadapt.ops import _autocast

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def fast_path(*tensors: torch.Tensor | None) -> bool:
    """True when nothing is tracing or transforming the call: eager mode, plain tensors, no dispatch
    or function mode, no torch.func transform."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """The autograd.Function of an op, called as ``apply(*inputs, impl)``: ``forward(impl, *inputs)``
    returns the custom op's outputs; ``setup_context(ctx, inputs, outputs, backend)`` and
    ``backward(ctx, *grads)`` are the custom op's own (the backend named, so the backward runs
    where the forward did; ``impl`` last, so ``ctx.needs_input_grad[i]`` is the op's input i).
    ``ctx.eager`` tells ``backward`` to call the backend directly, not the backward custom op."""
    # Old-style forward(ctx, ...): with a separate setup_context, Function.apply binds the
    # arguments through inspect.signature on every call (8 us here).
    def forward_(ctx, *args):
        ctx.eager = True
        outputs = forward(args[-1], *args[:-1])
        setup_context(ctx, args[:-1], outputs, args[-1].backend)
        return outputs

    def backward_(ctx, *grads):
        return *backward(ctx, *grads), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_), "backward": staticmethod(backward_),
                                                   "op_forward": staticmethod(forward)})


def run(fn: type, select: Callable[..., dispatch.Implementation], *inputs, autocast_device: str | None = None,
        keep: tuple[int, ...] = ()):
    """The outputs of ``fn`` (from :func:`function`) for ``inputs`` on the backend ``select(*inputs)``
    picks. With ``autocast_device``, the op's autocast rule (:mod:`fastadapt.ops._autocast`, with
    the positions it keeps) is applied here, outside the Function, so autograd records the casts
    as it does for the custom op."""
    if autocast_device is not None and torch.is_autocast_enabled(autocast_device):
        dtype = torch.get_autocast_dtype(autocast_device)
        inputs = tuple(a if i in keep else _autocast.cast(a, autocast_device, dtype) for i, a in enumerate(inputs))
        with torch.autocast(autocast_device, enabled=False):
            return _apply(fn, select, inputs)
    return _apply(fn, select, inputs)


def _apply(fn, select, inputs):
    impl = select(*inputs)
    if impl.composite is not None:
        return impl.composite(*inputs)
    if not torch.is_grad_enabled():  # inference: no graph to record, no context to save
        return fn.op_forward(impl, *inputs)
    return fn.apply(*inputs, impl)
