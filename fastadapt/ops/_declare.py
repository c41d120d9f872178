"""One declaration per op: the wiring every fused op shares, generated from its :class:`OpSpec`.

An op states its arguments by name and role (differentiable, kept for the backward, left in their
own dtype under autocast, read by the backends' capability checks), its outputs, and two pieces
of glue: ``forward(impl, *args)`` (its parameters named and ordered as the arguments) and
``backward(impl, needs, grad, **saved)``, which call a backend. :func:`declare` makes of it:

- the custom op ``fastadapt::<name>`` (schema from the spec) with its fake, for ``torch.compile``;
- the backward custom op ``fastadapt::<name>_backward`` with its fake, and the autograd formula
  (``register_autograd``) that calls it;
- PyTorch's matmul autocast rule for both devices (:mod:`fastadapt.ops._autocast`);
- the eager twin: an ``autograd.Function`` around the same glue (the custom op's Python layers cost
  more than a small layer's kernels: on the CPU, 1 thread, LoRA M=64, 64 -> 128, r=8, fwd+bwd, the
  cpp kernels took 49 us, an autograd.Function around them 99 us, the custom op 274 us), which an
  eager call on plain tensors takes (:func:`fast_path`); both paths run the same glue on the same
  backend, so they compute the same bits;
- the record of the backend the forward ran on: the custom op returns its index as a 0-d CPU
  tensor that the backward reads when it runs, so a compiled graph never bakes in the backend it
  was traced with (each backend draws its own dropout masks: a backward on another backend than
  its forward's computes wrong gradients);
- a backward that is once differentiable: a double backward raises one clear error on every path
  (the reference's eager composite excepted: PyTorch's own autograd, it differentiates twice).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastadapt import dispatch
from fastadapt.ops import _autocast

_PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True)
class Arg:
    """One argument of an op, in schema order.

    ``type``: its schema type (``Tensor``, ``Tensor?``, ``float``, ``int``, ``bool``, ``str``,
    ``int[]?``, ``float[]?``). ``grad``: it gets a gradient. ``save``: a tensor the backward reads
    (every differentiable one is kept, for its gradient's shape). ``keep``: autocast leaves it in
    its own dtype (PyTorch's fp32-policy operands: DoRA's magnitude, per-adapter tables).
    ``select``: the backends' capability checks read it (a tensor's device, dtype and shape, or
    a flag's value)."""

    name: str
    type: str
    grad: bool = False
    save: bool = True
    keep: bool = False
    select: bool = False
    optional: bool = False  # a trailing argument that defaults to None

    @property
    def tensor(self) -> bool:
        return self.type.startswith("Tensor")

    @property
    def schema(self) -> str:
        return f"{self.type} {self.name}" + ("=None" if self.optional else "")


@dataclass(frozen=True)
class OpSpec:
    """An op, declared once. ``outputs``: the names of what ``forward`` returns, the first being
    what the public function returns; ``saved``: those the backward reads. ``grads``: the
    differentiable arguments in the order ``backward`` returns their gradients (and takes
    ``needs``). ``fake(**args)``: the outputs' shapes and dtypes. ``passthrough``: an argument
    whose gradient is an output's (``{"residual": "out"}``) wherever ``unsaved(**args)`` names it:
    then it is not kept and the backward is not asked for it. ``autocast``: give the op PyTorch's
    matmul autocast rule. ``fuzz(draw)``: a random call of the public function with its float64
    truth (:class:`fastadapt.testing.FuzzCase`), which tests/test_fuzz.py runs for every op."""

    name: str
    args: tuple[Arg, ...]
    outputs: tuple[str, ...]
    saved: tuple[str, ...]
    grads: tuple[str, ...]
    fake: Callable[..., tuple]
    forward: Callable[..., tuple]
    backward: Callable[..., tuple]
    passthrough: dict[str, str] = field(default_factory=dict)
    unsaved: Optional[Callable[..., frozenset]] = None
    autocast: bool = True  # PyTorch's matmul autocast rule (every floating input but ``keep`` ones cast)
    fuzz: Optional[Callable] = None  # draw -> fastadapt.testing.FuzzCase: a random call for the shared fuzz

    def __post_init__(self):
        names = [a.name for a in self.args]
        assert len(set(names)) == len(names), f"{self.name}: duplicate argument names"
        assert list(inspect.signature(self.forward).parameters)[1:] == names, (
            f"{self.name}: forward(impl, ...) must take the arguments by their names, in order")
        for name in self.grads:
            assert name in names and self.arg(name).grad and self.arg(name).save, f"{self.name}: grad {name}"
        assert set(self.saved) <= set(self.outputs), f"{self.name}: saved outputs must be outputs"

    def arg(self, name: str) -> Arg:
        return next(a for a in self.args if a.name == name)


def fast_path(tensors: list[torch.Tensor | None]) -> bool:
    """True when nothing is tracing or transforming the call: eager mode, plain tensors, no dispatch
    or function mode, no torch.func transform."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


_DECLARED: dict[str, "Declared"] = {}


def declared() -> dict[str, "Declared"]:
    """Every declared op, by name (the registry the shared tools loop over)."""
    return dict(_DECLARED)


class Declared:
    """The generated wiring of one :class:`OpSpec`; call it with every argument, in schema order."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.names = tuple(a.name for a in spec.args)
        self._tensor_pos = tuple(i for i, a in enumerate(spec.args) if a.tensor)
        self._scalar_pos = tuple(i for i, a in enumerate(spec.args) if not a.tensor)
        self._select_pos = tuple(i for i, a in enumerate(spec.args) if a.select)
        self._grad_pos = tuple(self.names.index(n) for n in spec.grads)
        self._saved_out = tuple(spec.outputs.index(n) for n in spec.saved)
        self._keep = tuple(i for i, a in enumerate(spec.args) if a.keep)
        self._save = tuple(spec.args[i].save for i in self._tensor_pos)
        self._tensor_names = tuple(self.names[i] for i in self._tensor_pos)
        self._scalar_names = tuple(self.names[i] for i in self._scalar_pos)
        # (position, name, whether a list may come: lists are made tuples, hashable for dispatch's cache)
        self._select_args = tuple((i, self.names[i], "[]" in spec.args[i].type) for i in self._select_pos)
        assert spec.args[0].type == "Tensor", f"{spec.name}: the first argument is a tensor (its device decides)"
        ns = "fastadapt::" + spec.name
        params = ", ".join(a.schema for a in spec.args)
        returns = ", ".join(["Tensor"] * (len(spec.outputs) + 1))
        self.op = torch.library.custom_op(ns, self._op_forward, mutates_args=(), schema=f"({params}) -> ({returns})")
        self.op.register_fake(self._fake)
        scalars = "".join(f", {spec.args[i].type} {spec.args[i].name}" for i in self._scalar_pos)
        self.backward_op = torch.library.custom_op(
            ns + "_backward", self._op_backward, mutates_args=(),
            schema=(f"(Tensor?[] grads, Tensor?[] tensors, Tensor[] saved{scalars}, bool[] needs, Tensor backend)"
                    " -> Tensor[]"))
        self.backward_op.register_fake(self._backward_fake)
        self.backward_op.register_autograd(self._no_double_backward, setup_context=_nothing_to_save)
        self.op.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        if spec.autocast:
            _autocast.register(spec.name, keep=self._keep)
        self.function = self._eager_function()
        _DECLARED[spec.name] = self

    # --- dispatch -------------------------------------------------------------------------------

    def select(self, args) -> dispatch.Implementation:
        return dispatch.select(self.spec.name, **{name: (_hashable(args[i]) if listed else args[i])
                                                  for i, name, listed in self._select_args})

    def _run_forward(self, impl, args) -> tuple:
        return tuple(self.spec.forward(impl, *args))  # positional: its parameters are the arguments

    # --- the custom op --------------------------------------------------------------------------

    def _full(self, args) -> tuple:
        """``args`` with the omitted trailing optional ones (the dispatcher does not fill them in)."""
        return args + (None,) * (len(self.names) - len(args))

    def _op_forward(self, *args):
        args = self._full(args)
        impl = self.select(args)
        outputs = (_not_a_view(o) for o in self._run_forward(impl, args))
        return (*outputs, torch.tensor(dispatch.BACKENDS.index(impl.backend), dtype=torch.int8))

    def _fake(self, *args):
        return (*self.spec.fake(**dict(zip(self.names, self._full(args)))), torch.empty((), dtype=torch.int8))

    def _saved(self, inputs, output) -> tuple[frozenset, list, list, tuple]:
        """(the arguments not kept, the tensor arguments kept (None where not), the outputs kept,
        the non-tensor arguments) of a forward call: what its backward gets."""
        spec = self.spec
        inputs = self._full(tuple(inputs))
        unsaved = spec.unsaved(**dict(zip(self.names, inputs))) if spec.unsaved else frozenset()
        tensors = [inputs[i] if save and name not in unsaved else None
                   for i, name, save in zip(self._tensor_pos, self._tensor_names, self._save)]
        return unsaved, tensors, [output[i] for i in self._saved_out], [inputs[i] for i in self._scalar_pos]

    def backward_inputs(self, inputs, output, needs) -> tuple:
        """The arguments of ``fastadapt::<name>_backward`` for a call of the custom op with
        ``inputs`` that returned ``output``: random output gradients, and what the autograd formula
        passes (for opcheck and the fuzz)."""
        _, tensors, saved, scalars = self._saved(inputs, output)
        grads = [torch.randn_like(t) if t.is_floating_point() else None for t in output[:-1]]
        return grads, tensors, saved, *scalars, list(needs), output[-1]

    def _setup_context(self, ctx, inputs, output, backend=None):
        ctx.unsaved, tensors, saved, ctx.scalars = self._saved(inputs, output)
        if backend is None:  # the custom op: its last output is the index of the backend it ran on
            saved.append(output[-1])
        ctx.backend = backend
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*tensors, *saved)

    def _needs(self, ctx) -> list[bool]:
        passthrough = self.spec.passthrough
        return [bool(ctx.needs_input_grad[i]) and not (name in passthrough and name in ctx.unsaved)
                for i, name in zip(self._grad_pos, self.spec.grads)]

    def _grads(self, ctx, grads, computed, needs) -> tuple:
        """The autograd result: one entry per argument, None where no gradient flows."""
        out: list = [None] * len(self.names)
        for i, g, need in zip(self._grad_pos, computed, needs):
            out[i] = g if need else None
        for name, output in self.spec.passthrough.items():
            i = self.names.index(name)
            if name in ctx.unsaved and ctx.needs_input_grad[i]:
                out[i] = grads[self.spec.outputs.index(output)]
        return tuple(out)

    def _autograd_backward(self, ctx, *grads):
        grads = grads[:-1]  # the backend index has none
        saved = ctx.saved_tensors
        tensors, rest = list(saved[:ctx.n_tensors]), list(saved[ctx.n_tensors:])
        backend = rest.pop()
        needs = self._needs(ctx)
        computed = self.backward_op(list(grads), tensors, rest, *ctx.scalars, needs, backend)
        return self._grads(ctx, grads, computed, needs)[:len(ctx.needs_input_grad)]

    def _no_double_backward(self, ctx, *_):
        raise RuntimeError(f"fastadapt::{self.spec.name}: double backward (create_graph=True, then a backward "
                           "through the gradients) is not supported: the backward is a fused kernel with no "
                           "derivative of its own")

    def _values(self, tensors, scalars) -> dict:
        values = dict(zip(self._tensor_names, tensors))
        values.update(zip(self._scalar_names, scalars))
        return values

    def _run_backward(self, impl, grads, tensors, saved, scalars, needs) -> tuple:
        values = self._values(tensors, scalars)
        if impl.composite is not None:
            return self._composite_grads(impl, grads[0], values, needs)
        values.update(zip(self.spec.saved, saved))
        return tuple(self.spec.backward(impl, needs, *grads, **values))

    def _composite_grads(self, impl, grad, values, needs) -> tuple:
        """The gradients of a backend with an autograd composite (the reference), taken through
        that composite, recomputed here: the eager path runs the composite itself, so both paths
        give the same bits."""
        wanted = dict(zip(self.spec.grads, needs))
        args = [values[n].detach().requires_grad_() if wanted.get(n) else values[n] for n in self.names]
        leaves = [args[self.names.index(n)] for n, need in wanted.items() if need]
        if not leaves:
            return (None,) * len(needs)
        with _autograd_inside_custom_op(), torch.enable_grad():
            computed = iter(torch.autograd.grad(impl.composite(*args)[0], leaves, grad))
        return tuple(next(computed) if need else None for need in needs)

    def _op_backward(self, grads, tensors, saved, *rest):
        *scalars, needs, backend = rest
        impl = dispatch.get(self.spec.name, dispatch.BACKENDS[int(backend)])
        computed = self._run_backward(impl, grads, tensors, saved, scalars, needs)
        like = tensors[0] if tensors[0] is not None else saved[0]
        return [g if g is not None else like.new_empty(0) for g in computed]

    def _backward_fake(self, grads, tensors, saved, *rest):
        *scalars, needs, _ = rest
        values = self._values(tensors, scalars)
        like = tensors[0] if tensors[0] is not None else saved[0]
        return [values[name].new_empty(values[name].shape) if need else like.new_empty(0)
                for name, need in zip(self.spec.grads, needs)]

    # --- the eager twin -------------------------------------------------------------------------

    def _eager_function(self) -> type:
        declared = self

        # Old-style forward(ctx, ...): with a separate setup_context, Function.apply binds the
        # arguments through inspect.signature on every call (8 us on the CPU).
        def forward(ctx, *args):
            impl = args[-1]
            outputs = declared._run_forward(impl, args[:-1])
            declared._setup_context(ctx, args[:-1], outputs, impl)
            return tuple([_not_a_view(o) for o in outputs])

        def backward(ctx, *grads):
            saved = ctx.saved_tensors
            tensors, rest = saved[:ctx.n_tensors], saved[ctx.n_tensors:]
            needs = declared._needs(ctx)
            create_graph = torch.is_grad_enabled()
            if not create_graph:
                computed = declared._run_backward(ctx.backend, grads, tensors, rest, ctx.scalars, needs)
            else:
                with torch.no_grad():
                    computed = declared._run_backward(ctx.backend, grads, tensors, rest, ctx.scalars, needs)
            out = declared._grads(ctx, grads, computed, needs)
            if create_graph:  # the gradients get a backward that says why there is none
                anchor = next((t for t in saved if t is not None and t.requires_grad), None)
                if anchor is not None:
                    out = _NoDoubleBackward.apply(declared, anchor, *out)
            return *out, None

        name = "".join(part.title() for part in self.spec.name.split("_"))
        return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward)})

    # --- the call -------------------------------------------------------------------------------

    def __call__(self, *args) -> tuple:
        """The op's outputs for ``args`` (every argument, schema order), eager or traced."""
        if not fast_path([args[i] for i in self._tensor_pos]):
            return self.op(*args)[:-1]
        device = args[0].device
        if self.spec.autocast and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
            args = tuple(a if i in self._keep else _autocast.cast(a, device.type, dtype) for i, a in enumerate(args))
            with torch.autocast(device.type, enabled=False):
                return self._eager(args)
        return self._eager(args)

    def _eager(self, args) -> tuple:
        impl = self.select(args)
        if impl.composite is not None:
            return impl.composite(*args)
        if not torch.is_grad_enabled():  # inference: no graph to record, no context to save
            return self._run_forward(impl, args)
        return self.function.apply(*args, impl)


def _not_a_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own over the same memory: an output of the custom op or the eager
    Function that is a view made inside (the glue's y.view(*lead, N)) could not be modified in
    place by the caller (an activation's inplace=True, AdaLoRA's +=). ``detach()`` makes one in
    1 us on the CPU (``set_`` on a new tensor: 4 us)."""
    return t.detach() if t._base is not None else t


def _nothing_to_save(ctx, inputs, output) -> None:
    pass


class _NoDoubleBackward(torch.autograd.Function):
    """The eager path's gradients as they are, with a backward that raises what the backward custom
    op's raises (``anchor``: an input that requires grad, so that a graph is recorded)."""

    @staticmethod
    def forward(ctx, declared, anchor, *grads):
        ctx.declared = declared
        return tuple(g.view_as(g) if g is not None else None for g in grads)

    @staticmethod
    def backward(ctx, *_):
        ctx.declared._no_double_backward(ctx)


def _autograd_inside_custom_op():
    """Autograd back on inside a custom op's implementation (the dispatcher excludes it there)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(keys.AutogradFunctionality).remove(keys.AutogradOther)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def declare(spec: OpSpec) -> Declared:
    return Declared(spec)


def _hashable(value):
    """A dispatch input: lists (ranks, ranks_p) as tuples, so that decisions can be cached on them."""
    return tuple(value) if isinstance(value, list) else value
