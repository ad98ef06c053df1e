"""The online cloud-edge protocol: stream order, the link, the forward-only edge and the per-batch loop.

Per edge batch t: the edge predicts with its current parameters (that prediction is recorded at arrival), its logic
picks what to upload (raw inputs and/or per-sample payload, plus per-batch tensors), the link encodes, counts and
budgets every byte of it, the cloud runs, and whatever it sends down is applied to the edge before batch
t + 1 + delivery_delay; answers the edge awaits replace its prediction for those samples. Labels are read only after
a run unit's stream has ended, when the recorded predictions are scored. Every op of the edge and cloud steps runs
under a :class:`~cemabench.meter.ComputeMeter` that counts FLOPs and, on the edge, refuses what a forward-only
device cannot do. This module is the only place those rules live.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import resource
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cemabench.data import DomainData
from cemabench.errors import ForwardOnlyViolation, UserError
from cemabench.meter import ComputeMeter
from cemabench.method import (
    PAYLOAD_DTYPES,
    CloudLogic,
    CloudReply,
    CloudResources,
    Download,
    EdgeDecision,
    EdgeLogic,
    Method,
    TrainingResources,
    Upload,
    check_declared,
)
from cemabench.stream import DEVICE_STREAMS, Block, DeviceStreams, derive_seed, parse_setting, plain
from cemabench.training import run_training


@dataclass(frozen=True)
class Protocol:
    batch_size: int = 64
    setting: str = "per-domain"  # cemabench.stream: per-domain | continual | gradual | mixed-domains [+correlated]
    rounds: int = 1  # times the stream repeats (settings without reset)
    concentration: float = 0.1  # the Dirichlet concentration of +correlated (smaller: longer runs of one class)
    delivery_delay: int = 0
    upload_budget: int | None = None  # samples per run unit; None = unlimited
    upload_budget_bytes: int | None = None  # bytes up per run unit (inputs, payload and tensors); None = unlimited
    # the link model: None / 0 = a link that only counts (transfers take no time)
    bandwidth: float | None = None  # bytes per second, both directions
    latency: float = 0.0  # seconds per transfer, each direction
    batch_interval: float = 1.0  # seconds between edge batches: how transfer time becomes batches of delay
    answer_deadline: float | None = None  # seconds after a batch's arrival by which an offloaded answer must be back
    # many edges on one cloud: N devices in lockstep, each with its own stream, link and counters
    devices: int = 1
    device_streams: str = "partition"  # partition: each device its own domains; rotate: its own domain order
    cloud_capacity: int | None = None  # uploaded samples the cloud accepts per step, over all devices; None = any

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("rounds", 1), ("devices", 1), ("delivery_delay", 0),
                          ("upload_budget", 0), ("upload_budget_bytes", 0), ("cloud_capacity", 0)):
            value = getattr(self, name)
            if value is None and (name.startswith("upload_budget") or name == "cloud_capacity"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                unset = " (or unset for no limit)" if name.startswith("upload") or name == "cloud_capacity" else ""
                raise UserError(f"protocol {name} must be an integer >= {low}{unset}, got {value!r}")
        base, modifiers = parse_setting(self.setting)
        if self.rounds > 1 and base == "per-domain":
            raise UserError("protocol rounds > 1 repeats a stream without reset: use setting continual, gradual or "
                            "mixed-domains")
        if self.devices > 1 and base == "per-domain":
            raise UserError("protocol devices > 1 share one cloud over a stream without reset: use setting continual, "
                            "gradual or mixed-domains")
        if self.device_streams not in DEVICE_STREAMS:
            raise UserError(f"protocol device_streams must be one of {', '.join(DEVICE_STREAMS)}, got "
                            f"{self.device_streams!r}")
        c = self.concentration
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c <= 0:
            raise UserError(f"protocol concentration must be a number > 0 (the Dirichlet concentration), got {c!r}")
        object.__setattr__(self, "concentration", float(c))  # 1 and 1.0 are one stream (and one stored key)
        if self.concentration != 0.1 and "correlated" not in modifiers:
            raise UserError(f"protocol concentration applies to the +correlated settings; setting {self.setting} has "
                            f"no correlated order (use {base}+correlated)")
        if self.cloud_capacity == 0:
            raise UserError("protocol cloud_capacity must be an integer >= 1 (uploaded samples the cloud accepts per "
                            "step), or unset for no limit")
        for name, positive in (("bandwidth", True), ("latency", False), ("batch_interval", True),
                               ("answer_deadline", False)):
            value = getattr(self, name)
            if value is None and name in ("bandwidth", "answer_deadline"):
                continue
            bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            if bad or value < 0 or (positive and value == 0):
                raise UserError(f"protocol {name} must be a number {'> 0' if positive else '>= 0'} (seconds or bytes "
                                f"per second){' or unset' if name in ('bandwidth', 'answer_deadline') else ''}, "
                                f"got {value!r}")

    def transfer_seconds(self, nbytes: int) -> float:
        """How long ``nbytes`` take over the link: latency + bytes / bandwidth."""
        return self.latency + (nbytes / self.bandwidth if self.bandwidth else 0.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class LinkCounters:
    uploaded: int = 0  # samples
    refused: int = 0  # samples the budget kept from crossing
    busy: int = 0  # samples the cloud had no capacity for in that step (many edges on one cloud)
    upload_bytes: int = 0  # raw inputs (uint8 pixels)
    upload_payload_bytes: int = 0  # per-sample payload rows, as encoded
    upload_tensor_bytes: int = 0  # per-batch tensors
    refused_bytes: int = 0  # what the byte budget kept from crossing
    downloads: int = 0
    download_bytes: int = 0
    answers: int = 0
    answer_bytes: int = 0
    late_answers: int = 0  # answers that missed the deadline: the edge's own prediction stands for those samples
    download_delay_batches: int = 0  # summed over downloads: batches each arrived later than the next one

    @property
    def bytes_up(self) -> int:
        return self.upload_bytes + self.upload_payload_bytes + self.upload_tensor_bytes

    def add(self, other: LinkCounters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def bytes_down(self) -> int:
        return self.download_bytes + self.answer_bytes


def encode(t: torch.Tensor, dtype: str | None) -> tuple[torch.Tensor, int]:
    """A per-sample payload tensor as the cloud decodes it, and the bytes one row of it costs on the link.

    ``None`` sends it as produced; ``float32`` / ``float16`` cast floating tensors; ``int8`` quantises each row
    symmetrically, q = round(t / s) in [-127, 127] with s = max|row| / 127, and sends q plus s as one float32."""
    row = t[0].numel() if len(t) else int(np.prod(t.shape[1:], dtype=np.int64))
    if dtype is None or not t.is_floating_point():
        return t.detach().clone(), row * t.element_size()
    t = t.detach()
    if len(t) == 0:  # nothing to encode; a row still has its price (int8: values plus the scale)
        return t.float().clone(), row * {"float32": 4, "float16": 2, "int8": 1}[dtype] + (4 if dtype == "int8" else 0)
    if dtype == "float32":
        return t.float(), row * 4
    if dtype == "float16":
        return t.half().float(), row * 2
    scale = t.abs().reshape(len(t), -1).amax(1).clamp_min(torch.finfo(torch.float32).tiny).float() / 127
    scale = scale.reshape((-1,) + (1,) * (t.dim() - 1))
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q.float() * scale, row + 4


class Link:
    """Everything that crosses between edge and cloud: encoded, counted, budgeted and delayed here."""

    def __init__(self, budget: int | None, delay: int, budget_bytes: int | None = None,
                 protocol: Protocol | None = None):
        self.budget, self.budget_bytes, self.delay = budget, budget_bytes, delay
        self.protocol = protocol or Protocol()
        self._batch_up_bytes = 0  # what the current batch sent up: its answers and downloads wait for it to cross
        self.total_uploaded = 0
        self.total_bytes = 0
        self.counters = LinkCounters()
        self._in_flight: deque[tuple[int, Download]] = deque()

    def _bytes_left(self) -> float:
        return float("inf") if self.budget_bytes is None else max(0, self.budget_bytes - self.total_bytes)

    def send_up(self, x: torch.Tensor, decision: EdgeDecision, sample_nbytes: int, batch_index: int,
                first_id: int = 0, capacity: int | None = None, device: int = 0) -> Upload:
        index = decision.upload if decision.upload is not None else torch.empty(0, dtype=torch.long)
        if capacity is not None:  # the cloud's capacity left in this step: the rest does not cross
            self.counters.busy += max(0, len(index) - capacity)
            index = index[:capacity]
        wanted = len(index)
        tensors = {k: v.detach().clone() for k, v in decision.tensors.items()}
        tensor_bytes = _nbytes(tensors)
        if tensor_bytes > self._bytes_left():
            self.counters.refused_bytes += tensor_bytes
            tensors, tensor_bytes = {}, 0
        self.counters.upload_tensor_bytes += tensor_bytes
        self.total_bytes += tensor_bytes
        if self.budget is not None:
            index = index[:max(0, self.budget - self.total_uploaded)]
        payload, row_bytes = {}, 0
        for name, rows in decision.payload.items():
            payload[name], nbytes = encode(rows[:len(index)], decision.payload_dtype)
            row_bytes += nbytes
        input_bytes = sample_nbytes if decision.send_input else 0
        per_sample = input_bytes + row_bytes
        if per_sample and per_sample * len(index) > self._bytes_left():
            fit = int(self._bytes_left() // per_sample)
            self.counters.refused_bytes += per_sample * (len(index) - fit)
            index, payload = index[:fit], {k: v[:fit] for k, v in payload.items()}
        self.counters.refused += wanted - len(index)
        self.total_uploaded += len(index)
        self.counters.uploaded += len(index)
        self.counters.upload_bytes += len(index) * input_bytes
        self.counters.upload_payload_bytes += len(index) * row_bytes
        self.total_bytes += len(index) * per_sample
        self._batch_up_bytes = tensor_bytes + len(index) * per_sample
        samples = x[index.to(x.device)] if decision.send_input else x[:0]  # advanced indexing copies
        return Upload(samples=samples, tensors=tensors, batch_index=batch_index, index=index, payload=payload,
                      sample_ids=index + first_id, device=device)

    def answer(self, answers: torch.Tensor) -> torch.Tensor | None:
        """The answers as the edge receives them, or None when they arrive after the deadline (counted as late)."""
        nbytes = answers.numel() * answers.element_size()
        self.counters.answers += len(answers)
        self.counters.answer_bytes += nbytes
        deadline = self.protocol.answer_deadline
        if deadline is not None and self._round_trip(nbytes) > deadline:
            self.counters.late_answers += len(answers)
            return None
        return answers.detach().clone()

    def _round_trip(self, down_bytes: int) -> float:
        """Seconds from the batch's arrival until ``down_bytes`` sent back for it reach the edge (cloud time not
        modelled: it would make the numbers depend on the machine)."""
        if not self.protocol.bandwidth and not self.protocol.latency:
            return 0.0
        return self.protocol.transfer_seconds(self._batch_up_bytes) + self.protocol.transfer_seconds(down_bytes)

    def send_down(self, download: Download, batch_index: int) -> None:
        nbytes = _nbytes(download)
        self.counters.downloads += 1
        self.counters.download_bytes += nbytes
        late = max(0, math.ceil(self._round_trip(nbytes) / self.protocol.batch_interval) - 1)
        self.counters.download_delay_batches += self.delay + late
        due = batch_index + 1 + self.delay + late
        self._in_flight.append((due, {k: v.detach().clone() for k, v in download.items()}))

    def arrived(self, batch_index: int) -> list[Download]:
        out = []
        while self._in_flight and self._in_flight[0][0] <= batch_index:
            out.append(self._in_flight.popleft()[1])
        return out

    def next_domain(self) -> LinkCounters:
        done, self.counters = self.counters, LinkCounters()
        return done


COUNTERS = "_cemabench_counters"  # on a counted model: its SampleCounters, which cemabench.split carries to a tail


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


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _identity(p: torch.Tensor) -> tuple:
    """What must stay the same for a parameter's seal to hold: the tensor, its storage (the object, not only its
    address: ``.data`` can move a parameter onto another storage at the same address), shape, strides and dtype."""
    storage = p.untyped_storage()
    return id(p), storage._cdata, p.data_ptr(), tuple(p.shape), p.stride(), p.storage_offset(), p.dtype


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as raw integers of its element size (64-bit words for 8 bytes and more), for bit-exact
    comparison whatever its dtype."""
    return t.detach().reshape(-1).view(_SAME_SIZE_INT.get(t.element_size(), torch.int64))


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
        for m in (self.model, *self.extras.values()):
            m.requires_grad_(False)
            self.forwards.attach(m)
        self._seal()

    def _parameters(self) -> dict:
        """Every edge parameter by name: the model's, and those of the modules the edge logic keeps beside it
        (named ``attribute.parameter``). A name held twice would hide one of the two from the seal: refused."""
        named = list(self.model.named_parameters())
        for prefix, m in self.extras.items():
            named += [(f"{prefix}.{n}", p) for n, p in m.named_parameters()]
        params = dict(named)
        if len(params) != len(named):
            twice = sorted({n for n, _ in named if sum(1 for k, _ in named if k == n) > 1})
            raise ForwardOnlyViolation(f"two edge parameters are named {', '.join(twice[:3])}: a module the edge "
                                       f"logic keeps is named like a part of the model; rename the attribute")
        return params

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
        # a view taken now; otherwise they are read afresh.
        self._views = {n: _bits(p) if p.is_contiguous() else None for n, p in params.items()}
        kept = {} if changed is None else {n: v for n, v in self._values.items() if n not in changed}
        self._values = {n: kept[n] if n in kept else _bits(p).clone() for n, p in params.items()}

    def _changed(self, values: bool = True) -> list[str]:
        """Names of the parameters swapped, set to require grad, removed or (with ``values``) changed in value since
        the last seal."""
        params = self._parameters()
        changed = [n for n, p in params.items() if p.requires_grad or self._identity.get(n) != _identity(p)]
        changed += [n for n in self._identity if n not in params]
        if not values:
            return changed
        seen = set(changed)
        changed += [n for n, v in self._values.items()  # always: one swapped parameter must not excuse the others
                    if n in params and n not in seen and not torch.equal(
                        _bits(params[n]) if self._views[n] is None else self._views[n], v)]
        return changed

    def step(self, x: torch.Tensor, num_classes: int) -> EdgeDecision:
        try:
            with torch.inference_mode(), self.meter:
                decision = self.logic.step(self.model, x)
        except RuntimeError as error:
            if _raised_by_autograd(error):  # torch refused the backward pass itself: the edge has no graph
                self.meter.violation = self.meter.violation or f"its logic called autograd ({error})"
            raise
        finally:
            violation, self.meter.violation = self.meter.violation, None
            if violation is not None:
                raise ForwardOnlyViolation(
                    f"the edge is forward-only, but {violation}. Train a replica in the method's CloudLogic and send "
                    f"the new parameters down instead.")
        changed = self._changed()
        if changed:
            raise ForwardOnlyViolation(
                f"the edge logic changed edge parameters outside a download: {', '.join(changed[:5])}. Only buffers "
                f"such as BatchNorm statistics may change in a forward pass; send parameter updates from the cloud.")
        _validate(decision, len(x), num_classes)
        return decision

    def receive(self, download: Download) -> None:
        """Apply a download with the logic's ``receive``, under the same guard as the step, except that edge
        parameters may be written: no backward or optimizer kernel may run, and only parameters that the download
        names (exactly, or as the prefix of a name such as ``fc.weight.scale``) may change: the others may not be
        swapped or removed here, and their values are compared after the next step. Its FLOPs count as edge FLOPs."""
        def named(n: str) -> bool:
            return any(k == n or k.startswith(n + ".") for k in download)

        self.meter.protect({n: p for n, p in self._parameters().items() if not named(n)})  # the others stay sealed
        self.meter.phase = "the edge's receive"
        try:
            with torch.no_grad(), self.meter:
                self.logic.receive(self.model, download)
        finally:
            self.meter.phase = "the edge step"
            violation, self.meter.violation = self.meter.violation, None
            if violation is not None:
                raise ForwardOnlyViolation(f"the edge is forward-only, but {violation}. "
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


def _validate(decision: EdgeDecision, batch: int, num_classes: int) -> None:
    if not isinstance(decision, EdgeDecision):
        raise TypeError(f"EdgeLogic.step must return an EdgeDecision, got {type(decision).__name__}")
    if decision.logits is None:
        if not decision.await_answers:
            raise ValueError("EdgeDecision.logits may be None only when the edge awaits the cloud's answers")
    elif tuple(decision.logits.shape) != (batch, num_classes):
        raise ValueError(f"edge logits have shape {tuple(decision.logits.shape)}, expected ({batch}, {num_classes})")
    index = decision.upload
    uploaded = 0
    if index is not None:
        if index.dtype != torch.long or index.dim() != 1:
            raise ValueError("EdgeDecision.upload must be a 1-D int64 tensor of batch indices")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= batch or len(index.unique()) != len(index)):
            raise ValueError(f"EdgeDecision.upload must hold distinct indices in [0, {batch})")
        uploaded = len(index)
    if decision.logits is None and uploaded != batch:
        raise ValueError(f"an edge without logits of its own must upload every sample ({uploaded} of {batch})")
    if decision.payload_dtype is not None and decision.payload_dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"EdgeDecision.payload_dtype must be None or one of {', '.join(PAYLOAD_DTYPES)}, "
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


@dataclass
class DomainResult:
    """The measurements of one method on one domain. Accuracy is online top-1 of the predictions made at arrival."""

    domain: str
    status: str = "ok"  # ok | diverged | error | skipped
    message: str = ""
    note: str = ""  # what a reader should know about an ok cell (empty selection, exhausted budget)
    seen: int = 0
    correct: int = 0
    unanswered: int = 0  # samples with no prediction (an edge without logits whose upload the budget refused)
    edge_forward_samples: int = 0
    cloud_forward_samples_grad: int = 0
    cloud_forward_samples_nograd: int = 0
    edge_flops: int = 0  # everything the edge step executed (torch.utils.flop_counter's formulas)
    cloud_flops: int = 0  # forward and backward of everything the cloud step executed
    edge_seconds: float = 0.0
    cloud_seconds: float = 0.0
    peak_memory_bytes: int = 0
    link: LinkCounters = field(default_factory=LinkCounters)
    training: dict = field(default_factory=dict)  # the unit's offline training stage: key, seconds, cached
    # stretches of the stream counted in this result (severity steps, rounds), when there are several: name, seen,
    # correct; and, for a stream that mixes domains, seen and correct per domain
    segments: list = field(default_factory=list)
    by_domain: dict = field(default_factory=dict)
    device: int = 0  # the edge device, when several share the cloud

    _SUMMED = ("seen", "correct", "unanswered", "edge_forward_samples", "cloud_forward_samples_grad",
               "cloud_forward_samples_nograd", "edge_flops", "cloud_flops", "edge_seconds", "cloud_seconds")

    def add(self, part: DomainResult, block: Block) -> None:
        """Count a further stretch of the stream (a block) toward this result."""
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.peak_memory_bytes = max(self.peak_memory_bytes, part.peak_memory_bytes)
        self.link.add(part.link)
        self.segments.append({"segment": block.segment, "round": block.round, "severity": block.severity,
                              "seen": part.seen, "correct": part.correct})
        for domain, (seen, correct) in part.by_domain.items():
            mine = self.by_domain.setdefault(domain, [0, 0])
            mine[0], mine[1] = mine[0] + seen, mine[1] + correct
        if part.status != "ok" and self.status == "ok":
            self.status, self.message = part.status, part.message

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.seen if self.seen and self.status == "ok" else None

    @property
    def upload_ratio(self) -> float | None:
        return 100.0 * self.link.uploaded / self.seen if self.seen and self.status == "ok" else None

    def per_sample(self, total: int) -> float | None:
        return total / self.seen if self.seen and self.status == "ok" else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["link"].update(bytes_up=self.link.bytes_up, bytes_down=self.link.bytes_down)
        out.update(accuracy=self.accuracy, upload_ratio=self.upload_ratio,
                   bytes_up_per_sample=self.per_sample(self.link.bytes_up),
                   bytes_down_per_sample=self.per_sample(self.link.bytes_down),
                   edge_gflops_per_sample=_giga(self.per_sample(self.edge_flops)),
                   cloud_gflops_per_sample=_giga(self.per_sample(self.cloud_flops)))
        return out


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


@dataclass
class Models:
    """Builders of fresh source models; the harness calls them anew for every run unit."""

    edge: Callable[[], nn.Module]
    foundation: Callable[[], nn.Module]

    @classmethod
    def copies_of(cls, edge: nn.Module, foundation: nn.Module) -> "Models":
        return cls(edge=lambda: copy.deepcopy(edge), foundation=lambda: copy.deepcopy(foundation))


class Diverged(Exception):
    pass


def _timed(device: torch.device, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark on Linux


@dataclass(frozen=True)
class Execution:
    """How a unit runs, as opposed to what it computes: device, memory format, and opt-in bf16 autocast."""

    device: str = "cpu"
    channels_last: bool = False
    amp: bool = False


@contextlib.contextmanager
def _deterministic_threads(device: torch.device):
    """On CPU a unit runs with one intra-op thread: torch's CPU reductions split their work by thread count, so
    with more threads a unit's numbers would depend on the machine's cores and on ``--jobs``. Parallelism comes from
    running units side by side (``--jobs``, Ray)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_unit(method: Method, stream: Sequence[DomainData | Block] | DeviceStreams, models: Models, num_classes: int,
             clean: DomainData | None, protocol: Protocol, seed: int, execution: Execution = Execution(),
             scored_classes: torch.Tensor | None = None) -> list[DomainResult]:
    """Run one method over a stream (see :func:`_run_unit`), on CPU with one intra-op thread so that its numbers are
    the same on every machine and under every executor."""
    with _deterministic_threads(torch.device(execution.device)):
        return _run_unit(method, stream, models, num_classes, clean, protocol, seed, execution, scored_classes)


def _run_unit(method: Method, stream: Sequence[DomainData | Block] | DeviceStreams, models: Models, num_classes: int,
              clean: DomainData | None, protocol: Protocol, seed: int, execution: Execution = Execution(),
              scored_classes: torch.Tensor | None = None) -> list[DomainResult]:
    """Run one method over a stream with no reset in between; a failure ends the unit, not the caller.

    The stream is a list of blocks (:mod:`cemabench.stream` builds them for a setting; a plain domain stands for
    itself in its per-domain order), or one such list per edge device (:class:`~cemabench.stream.DeviceStreams`):
    the devices then step in lockstep (batch t of every device, the device order rotating with t) and share one
    cloud, which keeps one replica per device or one shared (``Method.cloud_replicas``) and accepts at most
    ``protocol.cloud_capacity`` uploaded samples per step over all devices. One result per device and distinct
    ``Block.result``, in the order they first appear. Predictions are recorded at arrival and scored against the
    labels, read only after their block ended. With ``scored_classes``, the scored prediction is the argmax over
    those classes only; methods still see all."""
    method.check_protocol(protocol)  # a protocol the method cannot run under is the user's error, before any compute
    check_declared(method)
    device = torch.device(execution.device)
    memory_format = torch.channels_last if execution.channels_last else torch.preserve_format
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if execution.amp else contextlib.nullcontext
    streams = stream.streams if isinstance(stream, DeviceStreams) else [stream]
    streams = [[b if isinstance(b, Block) else plain(b, seed) for b in s] for s in streams]
    names = list(dict.fromkeys(s.name for blocks in streams for b in blocks for s in b.sources))
    seed_everything(derive_seed(seed, method.name, *names))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cloud_passes = SampleCounter()
    cloud_meter = ComputeMeter()
    results = {(d, b.result): DomainResult(b.result, device=d) for d, blocks in enumerate(streams) for b in blocks}
    try:
        training = run_training(method, TrainingResources(  # offline, before the halves exist; FLOPs not counted
            num_classes=num_classes, edge=lambda: models.edge().to(device), seed=seed,
            foundation=lambda: models.foundation().to(device), clean=clean, device=device))
        for result in results.values():
            result.training = training
        edges = [ForwardOnlyEdge(models.edge().to(device, memory_format=memory_format), method.edge(num_classes))
                 for _ in streams]

        def clean_images(n: int) -> torch.Tensor:
            if clean is None:
                raise LookupError("this method needs clean in-distribution images, and the dataset has none "
                                  "(for ImageNet: ROOT/imagenet/val/<wnid>/*.JPEG)")
            return clean.images(np.arange(min(n, len(clean)))).to(device, memory_format=memory_format)

        resources = CloudResources(
            num_classes=num_classes,
            edge_replica=lambda: cloud_passes.attach(models.edge().to(device, memory_format=memory_format)),
            foundation=lambda: cloud_passes.attach(models.foundation().to(device, memory_format=memory_format)),
            clean_images=clean_images, device=device)
        replicas = 1 if method.cloud_replicas == "shared" else len(streams)
        with cloud_meter:
            clouds: list[CloudLogic | None] = [method.cloud(resources) for _ in range(replicas)]
        cloud_meter.take()  # building the cloud (EATA's Fisher, say) is set-up, not per-sample compute
    except UserError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: B036 - a plugin's sys.exit() must end its cell, not the table
        first, *rest = results.values()
        first.status, first.message = "error", f"setup failed: {_describe(error)}"
        _skip(rest)
        return list(results.values())

    devices = [_Device(d, edges[d], clouds[d % replicas], blocks,
                       Link(protocol.upload_budget, protocol.delivery_delay, protocol.upload_budget_bytes, protocol),
                       device) for d, blocks in enumerate(streams)]
    has_cloud = clouds[0] is not None
    step, failed = 0, None
    try:
        while True:
            capacity = protocol.cloud_capacity
            active = False
            for dev in devices[step % len(devices):] + devices[:step % len(devices)]:
                failed = dev
                x = dev.next_batch(protocol.batch_size, device.type == "cuda", results)
                if x is None:
                    continue
                active = True
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                result, link, batch_index = dev.result, dev.link, dev.batch_index
                for download in link.arrived(batch_index):
                    dev.edge.receive(download)
                with autocast():
                    decision, seconds = _timed(device, dev.edge.step, x, num_classes)
                result.edge_seconds += seconds
                result.edge_flops += dev.edge.meter.take()
                upload = link.send_up(x, decision, dev.sample_nbytes, batch_index, dev.stream_position, capacity,
                                      dev.index)
                if capacity is not None:
                    capacity -= len(upload)
                scored = None if decision.logits is None else _finite(decision.logits.float(), batch_index)
                if dev.cloud is not None:
                    passes = (cloud_passes.with_grad, cloud_passes.without_grad)
                    with autocast(), cloud_meter:
                        reply, seconds = _timed(device, dev.cloud.step, upload)
                    result.cloud_seconds += seconds
                    result.cloud_flops += cloud_meter.take()
                    result.cloud_forward_samples_grad += cloud_passes.with_grad - passes[0]
                    result.cloud_forward_samples_nograd += cloud_passes.without_grad - passes[1]
                    dev.cloud_ran = dev.cloud_ran or len(upload) > 0 or bool(upload.tensors)
                    if not isinstance(reply, CloudReply):
                        reply = CloudReply(download=reply)
                    if decision.await_answers:
                        scored = _answered(scored, len(x), num_classes, upload, reply.answers, link, batch_index)
                    if reply.download:
                        if not all(torch.isfinite(t).all() for t in reply.download.values() if t.is_floating_point()):
                            raise Diverged(f"the cloud sent non-finite parameters at batch {batch_index} of the unit")
                        link.send_down(reply.download, batch_index)
                elif decision.await_answers:
                    raise ValueError("the edge awaits answers, but the method has no cloud to answer")
                made = _predicted(scored, scored_classes)
                if decision.logits is None:  # rows the cloud did not answer have no prediction at all
                    made = torch.where(torch.isnan(scored[:, 0]), -1, made)
                dev.predicted.append(made.cpu())
                dev.batch_index += 1
                dev.stream_position += len(x)
            if not active:
                break
            step += 1
        failed = None
    except Diverged as error:
        failed.result.status, failed.result.message = "diverged", str(error)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: B036 - a plugin's sys.exit() must end its cell, not the table
        failed.result.status = "error"
        failed.result.message = _describe(error)
        if not isinstance(error, (SystemExit, ForwardOnlyViolation)):
            failed.result.message += "\n" + "".join(traceback.format_exception(error)[-3:])
    if failed is not None:
        reason = (f"device {failed.index} failed, which ended the run unit" if len(devices) > 1
                  else "an earlier domain of this run unit failed")
        for dev in devices:
            if dev is not failed and dev.result is not None and dev.result.status == "ok":
                dev.result.status, dev.result.message = "skipped", reason
            dev.finish(results)
            for block in dev.blocks:  # what the unit did not reach: a result partly run (rounds) is not complete
                result = results[(dev.index, block.result)]
                if result.status == "ok":
                    result.status, result.message = "skipped", reason
    for result in results.values():
        if result.segments:  # it ran
            ran = any(dev.ran.get(result.domain) for dev in devices if dev.index == result.device)
            result.note = _note(result, has_cloud, ran)
        if len(result.segments) == 1 and result.segments[0]["segment"] == result.domain:
            result.segments = []  # a result made of one plain block needs no breakdown
    return list(results.values())


class _Device:
    """One edge device of a run unit: its forward-only edge, its link, its cloud (or its share of one), its stream
    of blocks and where it is in it."""

    def __init__(self, index: int, edge: ForwardOnlyEdge, cloud: CloudLogic | None, blocks: list[Block], link: Link,
                 device: torch.device):
        self.index, self.edge, self.cloud, self.link, self.device = index, edge, cloud, link, device
        self.blocks = iter(blocks)
        self.block: Block | None = None
        self.result: DomainResult | None = None  # the current block's counts
        self.batches = iter(())
        self.batch_index = 0
        self.stream_position = 0
        self.ran: dict[str, bool] = {}  # whether the cloud had anything to work on, per result
        self.predicted: list[torch.Tensor] = []
        self.sample_nbytes = 0
        self.cloud_ran = False
        self.edge_before = 0

    def next_batch(self, batch_size: int, pin_memory: bool, results: dict):
        """The next batch of this device's stream (finishing and starting blocks on the way); None at its end."""
        while True:
            x = next(self.batches, None) if self.block is not None else None
            if x is not None:
                return x
            self.finish(results)
            self.block = next(self.blocks, None)
            if self.block is None:
                return None
            self.result = DomainResult(self.block.result, device=self.index)
            self.predicted, self.cloud_ran = [], False
            self.edge_before = self.edge.forwards.with_grad + self.edge.forwards.without_grad
            self.sample_nbytes = self.block.sample_nbytes
            self.batches = self.block.batches(batch_size, pin_memory=pin_memory)

    def finish(self, results: dict) -> None:
        """Score the current block and count it toward its result."""
        if self.block is None:
            return
        block, result = self.block, self.result
        self.block = None
        _score(result, block, self.predicted)
        result.link = self.link.next_domain()
        result.edge_forward_samples = self.edge.forwards.with_grad + self.edge.forwards.without_grad - self.edge_before
        result.peak_memory_bytes = _peak_memory(self.device)
        results[(self.index, block.result)].add(result, block)
        self.ran[block.result] = self.ran.get(block.result, False) or self.cloud_ran


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit: method code called sys.exit({error.code!r}); a method must not end the process"
    return f"{type(error).__name__}: {error}"


def _finite(logits: torch.Tensor, batch_index: int) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise Diverged(f"non-finite logits at batch {batch_index} of the run unit")
    return logits


def _score(result: DomainResult, block: Block, predicted: list[torch.Tensor]) -> None:
    """Score the predictions recorded at arrival against the labels, which are read from storage only now."""
    if not predicted:
        return
    made = torch.cat(predicted)
    hit = made == torch.from_numpy(block.labels()[:len(made)]).long()
    result.seen = len(made)
    result.correct = int(hit.sum())
    result.unanswered = int((made < 0).sum())
    domains = block.domain_of()
    if domains is not None:
        for name in dict.fromkeys(domains[:len(made)]):
            mine = torch.from_numpy(domains[:len(made)] == name)
            result.by_domain[name] = (int(mine.sum()), int(hit[mine].sum()))


def _note(result: DomainResult, has_cloud: bool, cloud_ran: bool) -> str:
    link, notes = result.link, []
    if has_cloud and result.status == "ok" and not cloud_ran:
        notes.append("empty selection: nothing crossed the link in this domain, so the cloud had nothing to work on")
    elif has_cloud and link.uploaded == 0 and link.upload_tensor_bytes:
        notes.append(f"empty selection: no sample was uploaded, but {link.upload_tensor_bytes} bytes of per-batch "
                     f"tensors crossed and the cloud worked on them")
    if link.refused or link.refused_bytes:
        notes.append(f"upload budget exhausted: {link.refused} samples refused")
    if link.busy:
        notes.append(f"cloud at capacity: {link.busy} samples could not be uploaded")
    if link.late_answers:
        notes.append(f"{link.late_answers} answers arrived after the deadline and did not count")
    if result.unanswered:
        notes.append(f"{result.unanswered} samples had no prediction (not uploaded, or answered late) and count as "
                     f"errors")
    return "; ".join(notes)


def _predicted(logits: torch.Tensor, scored_classes: torch.Tensor | None) -> torch.Tensor:
    if scored_classes is None:
        return logits.argmax(1)
    scored = scored_classes.to(logits.device)
    return scored[logits[:, scored].argmax(1)]


def _answered(logits: torch.Tensor | None, batch: int, num_classes: int, upload: Upload,
              answers: torch.Tensor | None, link: Link, batch_index: int) -> torch.Tensor:
    """The scored logits when the edge awaits the cloud's answers, one row per uploaded sample in upload order.
    Samples with neither an edge prediction nor an answer get -inf logits everywhere (scored as errors)."""
    expected = (len(upload), num_classes)
    if answers is None or tuple(answers.shape) != expected:
        got = None if answers is None else tuple(answers.shape)
        raise ValueError(f"the edge awaits answers for {expected[0]} uploaded samples, so the cloud must return "
                         f"CloudReply(answers=...) of shape {expected}; got {got}")
    received = link.answer(answers)
    out = (logits.clone() if logits is not None
           else torch.full((batch, num_classes), float("nan"), device=answers.device))
    if received is not None:  # late answers do not count: the edge's own prediction (if any) stands
        out[upload.index.to(out.device)] = _finite(received.float(), batch_index).to(out.device)
    return out


def _skip(results) -> None:
    for result in results:
        result.status, result.message = "skipped", "an earlier domain of this run unit failed"
