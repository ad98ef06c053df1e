"""The forward-only edge: the method's edge logic runs under a guarding meter, and the edge parameters are sealed.

No backward kernel, no optimizer kernel and no write into an edge parameter may run during the edge step, whatever
issued it (:class:`~cemabench.protocol.meter.ComputeMeter`); after it, no parameter may have been swapped, set to
require grad or changed in value. Parameters change only through a download, applied by the logic's ``receive``
under the same guard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import ForwardOnlyViolation
from cemabench.method import PAYLOAD_ENCODINGS, Download, EdgeDecision, EdgeLogic
from cemabench.protocol import checks as device_checks
from cemabench.protocol.checks import Checks
from cemabench.protocol.meter import ComputeMeter, SampleCounter
from cemabench.protocol.plain import plain_decision
from cemabench.protocol.tasks import Classification, Task

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
SEAL_COPY_ELEMENTS = 1 << 18  # a group up to this size is compared on the host as one copy, larger ones in place


def _identity(p: torch.Tensor) -> tuple:
    """What must stay the same for a parameter's seal to hold: the tensor, its storage (the object, not only its
    address: ``.data`` can move a parameter onto another storage at the same address), shape, strides and dtype."""
    storage = p.untyped_storage()
    return id(p), storage._cdata, p.data_ptr(), tuple(p.shape), p.stride(), p.storage_offset(), p.dtype


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as raw integers of its element size (64-bit words for 8 bytes and more), for bit-exact
    comparison whatever its dtype."""
    return t.detach().reshape(-1).view(_SAME_SIZE_INT.get(t.element_size(), torch.int64))


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()``: each module once, in its order, named as torch names it; without a generator per
    module, as the seal walks the modules at every step. A module is told apart by ``id`` (torch's walk uses ``==``,
    which a module class can redefine to hide itself and its parameters)."""
    out, seen, stack = [], set(), [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((name, module))
        stack.extend((f"{name}.{child_name}" if name else child_name, child)
                     for child_name, child in reversed(module._modules.items()) if child is not None)
    return out


class ForwardOnlyEdge:
    """The edge device: runs the method's edge logic in inference mode under a guarding :class:`ComputeMeter`
    (no backward kernel, no optimizer kernel, no write into an edge parameter, whatever issued it), and checks
    afterwards that no edge parameter was swapped, set to require grad or (on CPU, where a NumPy view could write
    behind torch's back) changed in value."""

    def __init__(self, model: nn.Module, logic: EdgeLogic):
        self.logic = logic
        self.model = logic.configure(model)
        # models the edge logic keeps beside the edge model (a frozen source copy, say) are part of the edge too
        self.extras = {name: m for name, m in vars(logic).items() if isinstance(m, nn.Module) and m is not self.model}
        self.forwards = SampleCounter()
        self.meter = ComputeMeter(guard=True)
        # whether the buffers are snapshot after each step, for :meth:`check_untouched` after a cloud step (the loop
        # clears it where the method has no cloud)
        self.watch_buffers = True
        for m in (self.model, *self.extras.values()):
            m.requires_grad_(False)
            self.forwards.attach(m)
        self._seal()

    def _named(self) -> tuple[dict, dict]:
        """Every edge parameter and every edge buffer (BatchNorm statistics, say) by name, in one walk of the modules:
        the model's, and those of the modules the edge logic keeps beside it (named ``attribute.parameter``), as
        ``named_parameters`` and ``named_buffers`` name them. A name held twice would hide one of the two from the seal
        (a parameter) or from the check after a cloud step (a buffer): refused."""
        found = {"parameters": {}, "buffers": {}}
        twice = {"parameters": set(), "buffers": set()}
        for root, model in (("", self.model), *((prefix + ".", m) for prefix, m in self.extras.items())):
            seen = {"parameters": set(), "buffers": set()}  # per model, as named_parameters() and named_buffers() do
            for prefix, module in _modules(model):  # (by id: a tensor's __hash__ is a Python call)
                dotted = f"{root}{prefix}." if prefix else root
                for kind, tensors in (("parameters", module._parameters), ("buffers", module._buffers)):
                    for name, t in tensors.items():
                        if t is not None and id(t) not in seen[kind]:
                            seen[kind].add(id(t))
                            if dotted + name in found[kind]:
                                twice[kind].add(dotted + name)
                            found[kind][dotted + name] = t
        for kind, names in twice.items():
            if names:
                raise ForwardOnlyViolation(f"two edge {kind} are named {', '.join(sorted(names)[:3])}: a module the "
                                           f"edge logic keeps is named like a part of the model; rename the attribute")
        params, buffers = found["parameters"], found["buffers"]
        return params, buffers

    def _parameters(self) -> dict:
        """Every edge parameter by name (:meth:`_named`)."""
        return self._named()[0]

    def _seal(self, changed=None) -> None:
        """Seal the edge parameters as they are now. ``changed``: the only names whose values may differ from the
        last seal (a download's, checked by the caller); the other parameters keep their snapshots."""
        params = self._parameters()
        for n, p in params.items():  # the seal reads what it compares through torch, not through the plugin's class
            if type(p) is not nn.Parameter or p.layout != torch.strided or p.is_quantized:
                raise ForwardOnlyViolation(f"the edge parameter {n} is a {type(p).__name__} ({p.layout}"
                                           f"{', quantised' if p.is_quantized else ''}); the forward-only edge "
                                           f"accepts plain strided nn.Parameter tensors only")
        self._identity = {n: _identity(p) for n, p in params.items()}
        self.meter.protect(params)
        # every parameter's bits, compared after each step (a NaN that stays NaN is unchanged): on CPU a NumPy view,
        # on any device another thread, could write behind the meter's back. While a parameter keeps its identity
        # (the same tensor, storage address, shape, strides and dtype), the bits of a contiguous one are read through
        # a view taken now; otherwise they are read afresh. The snapshots of a group (one device, one element size)
        # are one flat tensor, so that one comparison on the device covers the group (:meth:`_value_flags`).
        self._views = {n: _bits(p) if p.is_contiguous() else None for n, p in params.items()}
        layout = {n: (p.device, _bits(p).dtype, _bits(p).numel()) for n, p in params.items()}  # complex: 2 words
        if changed is not None and getattr(self, "_layout", None) == layout:
            for n in changed:  # the download's parameters take their new values; the others keep their snapshots
                self._values[n].copy_(self._current(n, params[n]))
            return
        kept = {} if changed is None else {n: v for n, v in self._values.items() if n not in changed}
        self._layout, self._groups, self._values = layout, {}, {}
        for n, (device, dtype, _) in layout.items():
            self._groups.setdefault((device, dtype), []).append(n)
        self._bounds = {}
        for group, names in self._groups.items():
            flat = torch.cat([kept[n].reshape(-1) if n in kept else self._current(n, params[n]) for n in names])
            self._values[group] = flat
            ends = torch.tensor([layout[n][2] for n in names]).cumsum(0)
            self._bounds[group] = ((ends - torch.tensor([layout[n][2] for n in names])).to(group[0]), ends.to(group[0]))
            offset = 0
            for n in names:
                self._values[n] = flat[offset:offset + layout[n][2]]
                offset += layout[n][2]

    def _current(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return _bits(p) if self._views[name] is None else self._views[name]

    def _value_flags(self, params: dict, on_host: bool | None = None) -> list[tuple[list[str], torch.Tensor]]:
        """Per group, its parameters' names and one flag each, read later with the batch's other checks: whether any
        of its bits differs from the seal. Where the group's device has no queue to stall
        (:data:`cemabench.protocol.checks.ON_HOST`: the CPU), ``torch.equal`` on the host: of the group's bits as one
        copy while they are few (:data:`SEAL_COPY_ELEMENTS`), else per parameter (no copy), and per parameter again
        to name those that differ; on a GPU a few kernels per group (one concatenation, one comparison, one
        cumulative sum) and no synchronisation. ``on_host`` chooses either way on any device."""
        out = []
        for group, names in self._groups.items():
            if group[0].type in device_checks.ON_HOST if on_host is None else on_host:
                current = [self._current(n, params[n]) for n in names]
                if len(names) > 1 and self._values[group].numel() <= SEAL_COPY_ELEMENTS and torch.equal(
                        torch.cat(current), self._values[group]):  # a small group, unchanged: one comparison
                    flags = torch.zeros(len(names), dtype=torch.bool)
                else:
                    flags = torch.tensor([not torch.equal(c, self._values[n]) for c, n in zip(current, names)])
            else:  # differing bits counted up to each parameter's end, minus those up to its start: no host sync
                differs = torch.ne(torch.cat([self._current(n, params[n]) for n in names]), self._values[group])
                counted = F.pad(differs.cumsum(0), (1, 0))
                starts, ends = self._bounds[group]
                flags = counted[ends] > counted[starts]
            out.append((names, flags))
        return out

    def _changed(self, values: bool = True, params: dict | None = None) -> list[str]:
        """Names of the parameters swapped, set to require grad, removed or (with ``values``) changed in value since
        the last seal."""
        params = self._parameters() if params is None else params
        changed = [n for n, p in params.items() if p.requires_grad or self._identity.get(n) != _identity(p)]
        changed += [n for n in self._identity if n not in params]
        if not values:
            return changed
        seen = set(changed)
        changed += [n for n in self._identity  # always: one swapped parameter must not excuse the others
                    if n in params and n not in seen and not torch.equal(self._current(n, params[n]),
                                                                         self._values[n])]
        return changed

    def step(self, x: torch.Tensor, task: Task | int, checks: Checks | None = None) -> EdgeDecision:
        """Run the edge logic on a batch under the guard; its prediction must be ``task``'s (a number of classes
        stands for classification). What can be checked on the host is checked now; what needs the device's values
        (the parameters' bits, the upload indices) is added to ``checks``, which the caller reads once per batch
        (read here when no ``checks`` is given)."""
        if checks is None:
            checks = Checks()
            decision = self.step(x, task, checks)
            checks.read()
            return decision
        refusals = self.meter.refusals  # a count that only grows: code that catches a refusal is still refused
        try:
            with torch.inference_mode(), self.meter:
                decision = self.logic.step(self.model, x)
        except RuntimeError as error:
            if _raised_by_autograd(error):  # torch refused the backward pass itself: the edge has no graph
                self.meter.refuse_later(f"its logic called autograd ({error})")
            raise
        finally:
            if self.meter.refusals != refusals:
                raise ForwardOnlyViolation(
                    f"the edge is forward-only, but {self.meter.refusal(refusals)}. Train a replica in the method's "
                    f"CloudLogic and send the new parameters down instead.")
        params, buffers = self._named()
        changed = self._changed(values=False, params=params)
        if changed:
            raise ForwardOnlyViolation(self._outside_download(changed))
        for names, flags in self._value_flags(params):
            checks.add(flags, lambda bad, names=names: ForwardOnlyViolation(
                self._outside_download([n for n, b in zip(names, bad) if b])))
        decision = plain_decision(decision)  # read once, into plain copies: what is validated is what is used
        validate_decision(decision, len(x), Classification(task) if isinstance(task, int) else task, checks)
        if self.watch_buffers:
            self._buffers_now = self._buffer_state(buffers)
        return decision

    def _buffers(self) -> dict:
        """Every edge buffer by name (:meth:`_named`)."""
        return self._named()[1]

    def _buffer_state(self, buffers: dict) -> tuple[dict, dict]:
        """The buffers' identities (the tensor, and where its data is), and per group (device, element size) their
        names and bits in one flat copy. A contiguous buffer's bits are read through a view kept while the buffer
        keeps its identity (:func:`_identity`)."""
        views, kept = {}, getattr(self, "_buffer_views", {})
        groups: dict = {}
        for n, b in buffers.items():
            identity = _identity(b)
            view = kept.get(n)
            views[n] = view if view is not None and view[0] == identity else (identity, _bits(b) if
                                                                               b.is_contiguous() else None)
            groups.setdefault((b.device, b.element_size()), []).append(n)
        self._buffer_views = views
        return ({n: (id(b), b.data_ptr()) for n, b in buffers.items()},
                {g: (names, torch.cat([_bits(buffers[n]) if views[n][1] is None else views[n][1] for n in names]))
                 for g, names in groups.items()})

    def check_untouched(self, checks: Checks, by: str) -> None:
        """Between edge steps only a download changes the edge. After ``by`` (the cloud step: its code can reach the
        edge's objects in this process), no edge buffer may have been swapped, added, removed or changed in value (on
        its device, through ``checks``). Parameters are checked where they always are, after the next edge step:
        swapped, set to require grad or changed in value outside a download."""
        if not hasattr(self, "_buffers_now"):
            return
        identities, groups = self._buffers_now
        buffers = self._buffers()
        swapped = [n for n, identity in identities.items()
                   if n not in buffers or (id(buffers[n]), buffers[n].data_ptr()) != identity]
        swapped += [n for n in buffers if n not in identities]
        if swapped:
            raise ForwardOnlyViolation(self._reached(swapped, by))
        views = self._buffer_views
        for names, before in groups.values():
            now = [views[n][1] if views[n][1] is not None and views[n][0] == _identity(buffers[n]) else
                   _bits(buffers[n]) for n in names]
            sizes = torch.tensor([v.numel() for v in now], device=before.device)
            ends = sizes.cumsum(0)
            counted = F.pad(torch.ne(torch.cat(now), before).cumsum(0), (1, 0))
            flags = counted[ends] > counted[ends - sizes]  # differing bits up to each buffer's end, minus its start
            checks.add(flags, lambda bad, names=names: ForwardOnlyViolation(
                self._reached([n for n, b in zip(names, bad) if b], by)))

    @staticmethod
    def _reached(names: list[str], by: str) -> str:
        return (f"{by} changed the edge's {', '.join(names[:5])} outside a download: the cloud reaches the edge only "
                f"through what it sends down, and every byte of that is counted")

    @staticmethod
    def _outside_download(changed: list[str]) -> str:
        return (f"edge parameters changed outside a download since the last edge step: {', '.join(changed[:5])} (by "
                f"the edge logic, or by other code that reached the edge). Only buffers such as BatchNorm statistics "
                f"may change in a forward pass; send parameter updates from the cloud.")

    def receive(self, download: Download) -> None:
        """Apply a download with the logic's ``receive``, under the same guard as the step, except that edge
        parameters may be written: no backward or optimizer kernel may run, and only parameters that the download
        names (exactly, or as the prefix of a name such as ``fc.weight.scale``) may change: the others may not be
        swapped or removed here, and their values are compared after the next step. Its FLOPs count as edge FLOPs."""
        def named(n: str) -> bool:
            return any(k == n or k.startswith(n + ".") for k in download)

        self.meter.protect({n: p for n, p in self._parameters().items() if not named(n)})  # the others stay sealed
        self.meter.phase = "the edge's receive"
        refusals = self.meter.refusals
        try:
            with torch.no_grad(), self.meter:
                self.logic.receive(self.model, download)
        finally:
            self.meter.phase = "the edge step"
            if self.meter.refusals != refusals:
                raise ForwardOnlyViolation(f"the edge is forward-only, but {self.meter.refusal(refusals)}. "
                                           f"Train a replica in the method's CloudLogic and send the new parameters "
                                           f"down instead.")
        self.model.requires_grad_(False)
        params = self._parameters()
        # a download may change the values of the parameters it names; it may not remove a parameter. The others
        # keep their snapshots, and their values are compared after the edge step that follows every receive (the
        # same batch's, before its predictions count)
        bad = [n for n in self._changed(values=False) if n not in params or not named(n)]
        if bad:
            raise ForwardOnlyViolation(
                f"the edge logic swapped or removed edge parameters that the download does not name while receiving "
                f"it: {', '.join(bad[:5])}. A download may only change the values of the parameters it carries.")
        self._seal(changed={n for n in params if named(n)})


_AUTOGRAD_ENTRIES = {torch.autograd.backward.__code__, torch.autograd.grad.__code__}


def _raised_by_autograd(error: BaseException) -> bool:
    """Whether the error came out of ``torch.autograd.backward`` / ``grad`` (``Tensor.backward`` calls the former):
    decided by where it was raised, not by what its text says."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in _AUTOGRAD_ENTRIES:
            return True
        tb = tb.tb_next
    return False


def validate_decision(decision: EdgeDecision, batch: int, task: Task, checks: Checks) -> None:
    """What the protocol requires of an edge decision; the upload indices' values are checked on their device,
    through ``checks``."""
    task.check(decision, batch)
    predicts = decision.logits is not None or decision.detections is not None
    if not predicts and not decision.await_answers:
        raise ValueError("the edge's prediction (EdgeDecision.logits, or .detections on detection) may be None only "
                         "when the edge awaits the cloud's answers")
    index = decision.upload
    uploaded = 0
    if index is not None:
        if index.dtype != torch.long or index.dim() != 1:
            raise ValueError("EdgeDecision.upload must be a 1-D int64 tensor of batch indices")
        if len(index):  # in increasing order: the order of indices is not charged, so it may carry nothing
            bad = (index[0] < 0) | (index[-1] >= batch) | (index[1:] <= index[:-1]).any()
            checks.add(bad, lambda _: ValueError(
                f"EdgeDecision.upload must hold distinct indices in [0, {batch}) in increasing order (their order "
                f"would cross uncharged): sort them (index.sort().values, torch.where(mask)[0])"))
        uploaded = len(index)
    if not predicts and uploaded != batch:
        raise ValueError(f"an edge without logits of its own must upload every sample ({uploaded} of {batch})")
    if decision.payload_dtype is not None and decision.payload_dtype not in PAYLOAD_ENCODINGS:
        raise ValueError(f"EdgeDecision.payload_dtype must be None or one of {', '.join(PAYLOAD_ENCODINGS)}, "
                         f"got {decision.payload_dtype!r}")
    for name, rows in decision.payload.items():
        if not torch.is_tensor(rows) or rows.dim() == 0 or len(rows) != uploaded:
            raise ValueError(f"EdgeDecision.payload[{name!r}] must have one row per uploaded sample ({uploaded}), "
                             f"got {tuple(rows.shape) if torch.is_tensor(rows) else type(rows).__name__}")
    for name, t in decision.tensors.items():
        if not torch.is_tensor(t):
            raise ValueError(f"EdgeDecision.tensors[{name!r}] must be a tensor, got {type(t).__name__}")
        if batch > 1 and t.dim() >= 2 and t.shape[0] == batch:
            raise ValueError(f"EdgeDecision.tensors[{name!r}] has one row per sample of the batch {tuple(t.shape)}: "
                             f"per-sample data travels in EdgeDecision.payload, for uploaded samples only")

