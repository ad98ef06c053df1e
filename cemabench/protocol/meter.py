"""What executes, seen op by op: FLOPs for edge and cloud, and the forward-only rule enforced on the edge; and
samples counted through model forwards (:class:`SampleCounter`).

A :class:`ComputeMeter` is a ``TorchDispatchMode``: every aten op that runs inside it passes through it, whichever
module, function or copy issued it (the autograd engine carries the mode into backward, also on its own threads). A
thread that plugin code starts does not inherit it: the C++ meter's guard sees every thread's ops through a callback
(``native_meter.cpp``); the Python meter leaves threads to the edge's seal, which catches their writes into edge
parameters (:mod:`cemabench.protocol.edge`). FLOPs come from
PyTorch's own formulas (``torch.utils.flop_counter.flop_registry``, the table behind ``FlopCounterMode``), with
the same rule as ``FlopCounterMode`` for ops without a formula: run their composite decomposition under the mode,
so that the convolution or matmul inside is counted. Only matmul- and convolution-like ops carry FLOPs, as there.

With a guard, the meter also enforces the forward-only edge by what executes: no backward kernel, no optimizer
kernel (``_foreach_*_`` / ``_fused_*``), no in-place write into an ``nn.Parameter`` that holds a gradient (an
optimizer's step, on any model, wherever it is kept), and no in-place write into the storage of a protected
parameter (the edge model's, also through ``.data`` or a view) may run. Buffers such as BatchNorm statistics may
change: a forward-only device can. A violation raises :class:`ForwardOnlyViolation` at the op and is remembered,
so that a plugin which catches the exception is still caught when the step ends.

Two implementations do this, chosen by ``CEMABENCH_METER`` (:mod:`cemabench.protocol.native`): a boxed dispatcher
fallback in C++ (``native_meter.cpp``, about a microsecond per op; it calls into Python only to count an op with a
formula it has not seen with these shapes), and, where that does not build, :class:`_DispatchMeter`, a Python
``TorchDispatchMode``. Both count the same FLOPs and refuse the same ops. In the Python one, per op the meter does as
little as it can in Python: most ops have no FLOP formula, write nothing and are no
optimizer's (worked out once per op overload), so it only refuses a backward kernel on the edge and runs them. FLOP
formulas run once per argument shapes (a flat key of shapes and values), composite ops are decomposed once per
argument shapes and layouts.
"""
from __future__ import annotations

import threading

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from cemabench.errors import ForwardOnlyViolation, MeterBlind
from cemabench.protocol.hygiene import kernels_for_the_meters_key
from cemabench.protocol.native import meter_module

# ops that only ask for metadata: FlopCounterMode leaves them to the default handling, and so do we
_METADATA = {
    torch.ops.aten.is_contiguous.default, torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.is_strides_like_format.default, torch.ops.aten.is_non_overlapping_and_dense.default,
    torch.ops.aten.size.default, torch.ops.aten.sym_size.default, torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default, torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default, torch.ops.aten.numel.default, torch.ops.aten.sym_numel.default,
    torch.ops.aten.dim.default, torch.ops.prim.layout.default,
}
_Tensor, _Parameter = torch.Tensor, nn.Parameter
_autograd_node = torch._C._current_autograd_node



class _Op:
    """What the meter needs to know about an op, worked out once per op overload."""

    __slots__ = ("name", "formula", "optimizer", "backward", "written", "whole", "aten", "metadata", "plain",
                 "cacheable")

    def __init__(self, func):
        self.name = func.name()
        self.formula = flop_registry.get(func._overloadpacket)
        short = self.name.split("::")[-1].split(".")[0]
        self.optimizer = short.startswith("_fused_") or (short.startswith("_foreach_") and short.endswith("_"))
        self.backward = "_backward" in short  # a gradient op called by name (a traced backward graph, say)
        self.cacheable = "attention" not in short  # attention formulas read sequence lengths from tensor values
        # positions and keyword names of the arguments the op writes to (its ``Tensor(a!)`` arguments, and batch
        # norm's running statistics, which some of its schemas do not mark)
        self.written = tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                             if (a.alias_info is not None and a.alias_info.is_write)
                             or a.name in ("running_mean", "running_var"))
        # only PyTorch's own composite ops have their decompositions cached; a plugin's op is decomposed every call
        self.aten = func.namespace == "aten"
        self.metadata = func in _METADATA
        # an op without a decomposition (learnt at its first call): it runs whole
        self.runs_whole(func is torch.ops.prim.device.default)

    def runs_whole(self, whole: bool) -> None:
        self.whole = whole
        # the fast path: nothing to count, nothing it writes, no optimizer; only a backward kernel to refuse
        self.plain = (whole and self.formula is None and not self.written and not self.optimizer and not self.metadata
                      and not self.backward)


_ops: dict = {}


def _storage(t) -> int | None:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return None


def _shape_key(value):
    """What a FLOP formula reads of an argument: a tensor's shape, a list's items, a scalar as it is."""
    if isinstance(value, _Tensor):
        return "T", value.shape
    if type(value) is list or type(value) is tuple:
        return tuple([_shape_key(v) for v in value])
    return value


def _layout_key(value):
    """:func:`_shape_key`, and also what can steer a composite op's decomposition or matters to the guard: a tensor's
    strides, dtype, device, whether it requires grad and whether it is a parameter."""
    if isinstance(value, _Tensor):
        return ("T", value.shape, value.stride(), value.dtype, value.device, value.requires_grad,
                isinstance(value, _Parameter))
    if type(value) is list or type(value) is tuple:
        return tuple([_layout_key(v) for v in value])
    return value


def _call_key(func, args, kwargs, key=_shape_key, out=None):
    """A hashable key of one call's arguments (and output) as ``key`` sees them, or None."""
    found = (func, key(args), tuple(sorted([(k, key(v)) for k, v in kwargs.items()])) if kwargs else (),
             _shape_key(out))
    try:
        hash(found)
    except TypeError:  # an unhashable argument
        return None
    return found


_counted: dict = {}  # (op, argument shapes and values) -> FLOPs: the formulas depend on nothing else
# (composite aten op, argument shapes, layouts and values) -> FLOPs its decomposition counted (zero included), for
# decompositions that ran no optimizer op and wrote into no parameter and no protected tensor: a repeated call with
# the same key runs the op in one piece and adds these FLOPs, as its decomposition is the same sequence of ops
_decomposed: dict = {}


def _flops(func, op: _Op, args, kwargs, out) -> int:
    """``op.formula``'s count, looked up by shapes when this call's were seen before (torch's formulas walk every
    argument with pytree, which costs more than the op on a small model)."""
    key = _call_key(func, args, kwargs, out=out) if op.cacheable else None
    if key is None:  # an unhashable argument: count without the cache
        return int(op.formula(*args, **kwargs, out_val=out))
    flops = _counted.get(key)
    if flops is None:
        flops = _counted[key] = int(op.formula(*args, **kwargs, out_val=out))
    return flops


def _count_native(name: str, overload: str, arguments: list, outputs: list) -> int:
    """The C++ meter's call for an op with a formula: its FLOPs by the formula (the C++ side caches by shapes)."""
    func = getattr(getattr(getattr(torch.ops, name.split("::")[0]), name.split("::")[1]), overload or "default")
    args, kwargs = [], {}
    for argument, value in zip(func._schema.arguments, arguments):
        if argument.kwarg_only:
            kwargs[argument.name] = value
        else:
            args.append(value)
    out = outputs[0] if len(outputs) == 1 else tuple(outputs)
    return int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))


class ComputeMeter:
    """Counts FLOPs of every op run inside it; with ``guard=True``, also refuses what a forward-only device cannot
    do. Enter it once per step (``with meter:``); :meth:`take` returns the FLOPs since the last ``take``.
    ``refusals`` counts the refusals so far and :meth:`refusal` says what each was (neither can be reset: an owner
    compares the count before and after a step), ``phase`` names what runs, in the refusals' messages."""

    def __init__(self, guard: bool = False):
        self.guard = guard
        native = meter_module()
        self.kind = "python" if native is None else "native"
        phase = "the edge step" if guard else "the cloud step"
        self._meter = (_DispatchMeter(guard, phase) if native is None
                       else native.Meter(guard, phase, _count_native, ForwardOnlyViolation))
        replaced = kernels_for_the_meters_key() if native is not None else []
        if replaced:  # a kernel for one op beats the meter's fallback for that op (checked per unit, see hygiene)
            raise MeterBlind(f"kernels are registered for the C++ meter's dispatch key ({', '.join(replaced[:3])}): "
                             f"they take those ops out of the meter; no unit runs in this process")
        self._taken = 0

    phase = property(lambda self: self._meter.phase, lambda self, value: self._meter.set_phase(value))
    refusals = property(lambda self: self._meter.refusals)

    def refusal(self, number: int) -> str:
        """The message of refusal ``number`` (0 is the first; the latest 64 are kept)."""
        return self._meter.refusal(number)

    def refuse_later(self, message: str) -> None:
        """Count a refusal its owner found (a thread left running, autograd refused by torch itself)."""
        self._meter.refuse_later(message)

    def protect(self, parameters: dict) -> None:
        """Refuse in-place writes into these named tensors' memory: through any view (both meters) or any alias at an
        offset, such as a DLPack import (the C++ meter compares address ranges)."""
        self._meter.protect(list(parameters.items()))

    def __enter__(self):
        if self.guard:
            self._threads = set(threading.enumerate())
        self._blinds = self._meter.blinds
        self._meter.enter()
        return self

    def __exit__(self, *exc_info) -> None:
        self._meter.exit()
        if self._meter.blinds != self._blinds and exc_info[0] is None:
            raise MeterBlind(f"{self.phase} ran {self._meter.last_blind} behind a Python __torch_dispatch__ (a "
                             f"dispatch mode or a tensor subclass), under a torch.func transform or with forward-mode "
                             f"AD, where the C++ meter cannot count or guard every op; run it with "
                             f"CEMABENCH_METER=python")
        if self.guard:  # a thread still running would compute, unguarded, after the guarded code returned
            left = [t.name for t in threading.enumerate() if t not in self._threads and t.is_alive()]
            if left:
                self.refuse_later(f"{self.phase} returned with thread(s) it started still running "
                                  f"({', '.join(left[:3])}); join every thread before returning")

    def take(self) -> int:
        """The FLOPs counted since the last ``take``."""
        total = self._meter.flops
        flops, self._taken = total - self._taken, total
        return flops


def guard_process() -> ComputeMeter | None:
    """For an isolated edge half (:mod:`cemabench.protocol.isolation`): a meter whose refusals count every backward or
    optimizer kernel that runs in this process from now on, on any thread, in a step or between steps. None under the
    Python meter, which sees only the ops of the thread that entered it."""
    native = meter_module()
    if native is None:
        return None
    meter = ComputeMeter(guard=True)
    meter.phase = "the life of the edge's half"
    native.guard_process(meter._meter)
    return meter


class _DispatchMeter(TorchDispatchMode):
    """The meter as a Python dispatch mode, where the C++ one does not build (see the module's docstring)."""

    def __init__(self, guard: bool, phase: str):
        super().__init__()
        self.guard = guard
        self.flops = 0
        self.protected: dict[int, str] = {}  # storage address -> name of each parameter no op may write to
        self.refusals, self.recent = 0, {}
        self.blinds, self.last_blind = 0, ""  # it sees every op: never blind
        self.writes = 0  # ops run inside that were an optimizer's or wrote into a parameter or a protected tensor
        self.decomposing = 0  # depth of the composite ops being decomposed: only there do unguarded writes matter
        self.phase = phase  # what runs under the guard, for its messages

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def refuse_later(self, message: str) -> None:
        self.recent[self.refusals] = message
        self.recent.pop(self.refusals - 64, None)
        self.refusals += 1

    def refusal(self, number: int) -> str:
        return self.recent.get(number) or (self.recent[min(self.recent)] if self.recent else "")

    def protect(self, parameters: list) -> None:
        self.protected = {ptr: name for name, ptr in ((n, _storage(t)) for n, t in parameters) if ptr}

    def enter(self) -> None:
        self.__enter__()

    def exit(self) -> None:
        self.__exit__(None, None, None)

    def _refuse(self, message: str):
        self.refuse_later(message)
        raise ForwardOnlyViolation(message)

    def _check(self, op: _Op, args, kwargs) -> None:
        """With the guard, refuse what a forward-only device cannot run; always, count the ops that a cached
        decomposition may not skip (optimizer ops, writes into a parameter or a protected tensor)."""
        if self.guard and (_autograd_node() is not None or op.backward):
            self._refuse(f"a backward kernel ({op.name}) ran during {self.phase}")
        if op.optimizer:
            self.writes += 1
            if self.guard:
                self._refuse(f"an optimizer kernel ({op.name}) ran during {self.phase}")
        for position, keyword in op.written:
            target = args[position] if position < len(args) else kwargs.get(keyword)
            for t in target if isinstance(target, (list, tuple)) else (target,):
                hit = self.protected.get(_storage(t))
                graded = isinstance(t, torch.Tensor) and t.is_leaf and t.grad is not None
                self.writes += hit is not None or isinstance(t, torch.nn.Parameter) or graded
                if self.guard and hit is not None:
                    self._refuse(f"{op.name} wrote into the edge parameter {hit} during {self.phase}")
                if self.guard and graded:
                    self._refuse(f"{op.name} updated a parameter from its gradient (an optimizer step, on a model "
                                 f"kept beside the edge?) during {self.phase}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = _ops.get(func)
        if op is None:
            op = _ops[func] = _Op(func)
        if op.plain:  # most ops: nothing to count, and nothing to refuse but a backward kernel
            if self.guard and _autograd_node() is not None:
                self._refuse(f"a backward kernel ({op.name}) ran during {self.phase}")
            return func(*args, **kwargs) if kwargs else func(*args)
        if op.metadata:
            return NotImplemented
        kwargs = kwargs or {}
        if self.guard or (self.decomposing and (op.written or op.optimizer)):
            self._check(op, args, kwargs)
        if op.formula is None:
            if op.whole:
                return func(*args, **kwargs)
            # a composite op: its decomposition runs under the meter, which counts the ops with a formula inside
            key = _call_key(func, args, kwargs, _layout_key) if op.aten else None
            flops = _decomposed.get(key) if key is not None else None
            if flops is not None:
                out = func(*args, **kwargs)
                self.flops += flops
                return out
            before, writes = self.flops, self.writes
            self.decomposing += 1
            try:
                with self:
                    out = func.decompose(*args, **kwargs)
            finally:
                self.decomposing -= 1
            if out is NotImplemented:
                op.runs_whole(True)
                return func(*args, **kwargs)
            if key is not None and self.writes == writes:
                _decomposed[key] = self.flops - before
            return out
        out = func(*args, **kwargs)
        self.flops += _flops(func, op, args, kwargs, out)
        return out


# on a counted model: its SampleCounters, which cemabench.models.split carries to a tail
COUNTERS = "_cemabench_counters"


class SampleCounter:
    """Counts samples through a model's forward passes (a pass through a split model's tail is a pass through the
    model: it ends at the model's output), split into passes with and without autograd."""

    def __init__(self):
        self.with_grad = 0
        self.without_grad = 0

    def attach(self, model: nn.Module) -> nn.Module:
        model.register_forward_pre_hook(self._hook)
        vars(model).setdefault(COUNTERS, []).append(self)
        return model

    def _hook(self, module, args):
        n = len(args[0]) if args and torch.is_tensor(args[0]) else 0
        if torch.is_grad_enabled():
            self.with_grad += n
        else:
            self.without_grad += n
