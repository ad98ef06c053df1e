"""The online cloud-edge protocol: stream order, the link, the forward-only edge and the per-batch loop.

Per edge batch t: the edge predicts with its current parameters (that prediction is scored), its logic picks what to
upload, the link counts and budgets it, the cloud runs, and whatever it sends down is applied to the edge before
batch t + 1 + delivery_delay. This module is the only place those rules live.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
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
from cemabench.method import CloudLogic, CloudReply, CloudResources, Download, EdgeDecision, EdgeLogic, Method, Upload

RESETS = ("per_domain", "continual")


@dataclass(frozen=True)
class Protocol:
    batch_size: int = 64
    reset: str = "per_domain"
    delivery_delay: int = 0
    upload_budget: int | None = None  # samples per run unit; None = unlimited


def unit_groups(reset: str, domains: Sequence) -> list[tuple]:
    """The domains each run unit covers: one each under per-domain reset, all of them under continual."""
    return [(d,) for d in domains] if reset == "per_domain" else [tuple(domains)]


def derive_seed(*parts) -> int:
    """A 31-bit seed from any printable parts, stable across processes and platforms."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2 ** 31)


def domain_order(seed: int, domain: str, n: int) -> np.ndarray:
    """The sample order inside a domain: a permutation from (seed, domain), the same for every method."""
    return np.random.default_rng(derive_seed("order", seed, domain)).permutation(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class LinkCounters:
    uploaded: int = 0
    refused: int = 0
    upload_bytes: int = 0
    upload_tensor_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0
    answers: int = 0
    answer_bytes: int = 0


class Link:
    """Everything that crosses between edge and cloud: counted, budgeted and delayed here."""

    def __init__(self, budget: int | None, delay: int):
        self.budget, self.delay = budget, delay
        self.total_uploaded = 0
        self.counters = LinkCounters()
        self._in_flight: deque[tuple[int, Download]] = deque()

    def send_up(self, x: torch.Tensor, decision: EdgeDecision, sample_nbytes: int, batch_index: int) -> Upload:
        index = decision.upload if decision.upload is not None else torch.empty(0, dtype=torch.long)
        if self.budget is not None:
            allowed = max(0, self.budget - self.total_uploaded)
            self.counters.refused += max(0, len(index) - allowed)
            index = index[:allowed]
        self.total_uploaded += len(index)
        self.counters.uploaded += len(index)
        self.counters.upload_bytes += len(index) * sample_nbytes
        self.counters.upload_tensor_bytes += _nbytes(decision.tensors)
        samples = x[index.to(x.device)]  # advanced indexing copies
        return Upload(samples=samples, tensors={k: v.clone() for k, v in decision.tensors.items()},
                      batch_index=batch_index, index=index)

    def answer(self, answers: torch.Tensor) -> torch.Tensor:
        self.counters.answers += len(answers)
        self.counters.answer_bytes += answers.numel() * answers.element_size()
        return answers.detach().clone()

    def send_down(self, download: Download, batch_index: int) -> None:
        self.counters.downloads += 1
        self.counters.download_bytes += _nbytes(download)
        due = batch_index + 1 + self.delay
        self._in_flight.append((due, {k: v.detach().clone() for k, v in download.items()}))

    def arrived(self, batch_index: int) -> list[Download]:
        out = []
        while self._in_flight and self._in_flight[0][0] <= batch_index:
            out.append(self._in_flight.popleft()[1])
        return out

    def next_domain(self) -> LinkCounters:
        done, self.counters = self.counters, LinkCounters()
        return done


class SampleCounter:
    """Counts samples through a model's forward passes, split into passes with and without autograd."""

    def __init__(self):
        self.with_grad = 0
        self.without_grad = 0

    def attach(self, model: nn.Module) -> nn.Module:
        model.register_forward_pre_hook(self._hook)
        return model

    def _hook(self, module, args):
        n = len(args[0]) if args and torch.is_tensor(args[0]) else 0
        if torch.is_grad_enabled():
            self.with_grad += n
        else:
            self.without_grad += n


class ForwardOnlyEdge:
    """The edge device: runs the method's edge logic in inference mode and proves it changed no parameter."""

    def __init__(self, model: nn.Module, logic: EdgeLogic):
        self.logic = logic
        self.model = logic.configure(model)
        # models the edge logic keeps beside the edge model (a frozen source copy, say) are part of the edge too
        self.extras = {name: m for name, m in vars(logic).items() if isinstance(m, nn.Module) and m is not self.model}
        self.forwards = SampleCounter()
        for m in (self.model, *self.extras.values()):
            m.requires_grad_(False)
            self.forwards.attach(m)
        self._snapshot()

    def _parameters(self):
        yield from self.model.named_parameters()
        for prefix, m in self.extras.items():
            yield from ((f"{prefix}.{n}", p) for n, p in m.named_parameters())

    def _snapshot(self) -> None:
        self._reference = {n: p.detach().clone() for n, p in self._parameters()}

    def step(self, x: torch.Tensor, num_classes: int) -> EdgeDecision:
        try:
            with torch.inference_mode():
                decision = self.logic.step(self.model, x)
        except RuntimeError as error:
            if "grad" in str(error) or "Inference tensors" in str(error):
                raise ForwardOnlyViolation(
                    f"the edge is forward-only, but its logic tried to compute gradients ({error}). Train a replica "
                    f"in the method's CloudLogic and send the new parameters down instead.") from error
            raise
        changed = [n for n, p in self._parameters() if p.requires_grad or not torch.equal(p, self._reference[n])]
        if changed:
            raise ForwardOnlyViolation(
                f"the edge logic changed edge parameters outside a download: {', '.join(changed[:5])}. Only buffers "
                f"such as BatchNorm statistics may change in a forward pass; send parameter updates from the cloud.")
        _validate(decision, len(x), num_classes)
        return decision

    def receive(self, download: Download) -> None:
        with torch.no_grad():
            self.logic.receive(self.model, download)
        self.model.requires_grad_(False)
        self._snapshot()


def _validate(decision: EdgeDecision, batch: int, num_classes: int) -> None:
    if not isinstance(decision, EdgeDecision):
        raise TypeError(f"EdgeLogic.step must return an EdgeDecision, got {type(decision).__name__}")
    if tuple(decision.logits.shape) != (batch, num_classes):
        raise ValueError(f"edge logits have shape {tuple(decision.logits.shape)}, expected ({batch}, {num_classes})")
    index = decision.upload
    if index is not None:
        if index.dtype != torch.long or index.dim() != 1:
            raise ValueError("EdgeDecision.upload must be a 1-D int64 tensor of batch indices")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= batch or len(index.unique()) != len(index)):
            raise ValueError(f"EdgeDecision.upload must hold distinct indices in [0, {batch})")


@dataclass
class DomainResult:
    """The measurements of one method on one domain. Accuracy is online top-1 of the predictions made at arrival."""

    domain: str
    status: str = "ok"  # ok | diverged | error | skipped
    message: str = ""
    note: str = ""  # what a reader should know about an ok cell (empty selection, exhausted budget)
    seen: int = 0
    correct: int = 0
    edge_forward_samples: int = 0
    cloud_forward_samples_grad: int = 0
    cloud_forward_samples_nograd: int = 0
    edge_seconds: float = 0.0
    cloud_seconds: float = 0.0
    peak_memory_bytes: int = 0
    link: LinkCounters = field(default_factory=LinkCounters)

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.seen if self.seen and self.status == "ok" else None

    @property
    def upload_ratio(self) -> float | None:
        return 100.0 * self.link.uploaded / self.seen if self.seen and self.status == "ok" else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(accuracy=self.accuracy, upload_ratio=self.upload_ratio)
        return out


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


def run_unit(method: Method, domains: Sequence[DomainData], models: Models, num_classes: int,
             clean: DomainData | None, protocol: Protocol, seed: int, execution: Execution = Execution(),
             scored_classes: torch.Tensor | None = None) -> list[DomainResult]:
    """Run one method over ``domains`` with no reset in between; a failure ends the unit, not the caller.

    With ``scored_classes``, the scored prediction is the argmax over those classes only; methods still see all."""
    device = torch.device(execution.device)
    memory_format = torch.channels_last if execution.channels_last else torch.preserve_format
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if execution.amp else contextlib.nullcontext
    seed_everything(derive_seed(seed, method.name, *(d.name for d in domains)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cloud_passes = SampleCounter()
    results = [DomainResult(d.name) for d in domains]
    try:
        edge = ForwardOnlyEdge(models.edge().to(device, memory_format=memory_format), method.edge(num_classes))

        def clean_images(n: int) -> torch.Tensor:
            if clean is None:
                raise LookupError("this method needs clean in-distribution images, and the dataset has none "
                                  "(for ImageNet: ROOT/imagenet/val/<wnid>/*.JPEG)")
            return clean.batch(np.arange(min(n, len(clean))))[0].to(device, memory_format=memory_format)

        resources = CloudResources(
            num_classes=num_classes,
            edge_replica=lambda: cloud_passes.attach(models.edge().to(device, memory_format=memory_format)),
            foundation=lambda: cloud_passes.attach(models.foundation().to(device, memory_format=memory_format)),
            clean_images=clean_images, device=device)
        cloud: CloudLogic | None = method.cloud(resources)
    except UserError:
        raise
    except Exception as error:
        results[0].status, results[0].message = "error", f"setup failed: {type(error).__name__}: {error}"
        _skip_rest(results, 1)
        return results

    link = Link(protocol.upload_budget, protocol.delivery_delay)
    batch_index = 0
    for position, (domain, result) in enumerate(zip(domains, results)):
        order = domain_order(seed, domain.name, len(domain))
        edge_before = edge.forwards.with_grad + edge.forwards.without_grad
        cloud_before = (cloud_passes.with_grad, cloud_passes.without_grad)
        try:
            for x, y in domain.batches(order, protocol.batch_size, pin_memory=device.type == "cuda"):
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                for download in link.arrived(batch_index):
                    edge.receive(download)
                with autocast():
                    decision, seconds = _timed(device, edge.step, x, num_classes)
                result.edge_seconds += seconds
                prediction = decision.logits.float()
                upload = link.send_up(x, decision, domain.sample_nbytes, batch_index)
                if cloud is not None:
                    with autocast():
                        reply, seconds = _timed(device, cloud.step, upload)
                    result.cloud_seconds += seconds
                    if not isinstance(reply, CloudReply):
                        reply = CloudReply(download=reply)
                    if decision.await_answers:
                        prediction = _answered(prediction, upload, reply.answers, link)
                    if reply.download:
                        if not all(torch.isfinite(t).all() for t in reply.download.values() if t.is_floating_point()):
                            raise Diverged(f"the cloud sent non-finite parameters at batch {batch_index} of the unit")
                        link.send_down(reply.download, batch_index)
                if not torch.isfinite(prediction).all():
                    raise Diverged(f"non-finite logits at batch {batch_index} of the run unit")
                result.seen += len(y)
                result.correct += int((_predicted(prediction, scored_classes).cpu() == y).sum())
                batch_index += 1
        except Diverged as error:
            result.status, result.message = "diverged", str(error)
        except Exception as error:
            result.status = "error"
            result.message = f"{type(error).__name__}: {error}"
            result.message += "\n" + "".join(traceback.format_exception(error)[-3:])
        result.link = link.next_domain()
        if cloud is not None and result.status == "ok" and result.link.uploaded == 0:
            result.note = "empty selection: nothing was uploaded in this domain, so the cloud never ran"
        elif result.link.refused:
            result.note = f"upload budget exhausted: {result.link.refused} samples refused"
        result.edge_forward_samples = edge.forwards.with_grad + edge.forwards.without_grad - edge_before
        result.cloud_forward_samples_grad = cloud_passes.with_grad - cloud_before[0]
        result.cloud_forward_samples_nograd = cloud_passes.without_grad - cloud_before[1]
        result.peak_memory_bytes = _peak_memory(device)
        if result.status != "ok":
            _skip_rest(results, position + 1)
            break
    return results


def _predicted(logits: torch.Tensor, scored_classes: torch.Tensor | None) -> torch.Tensor:
    if scored_classes is None:
        return logits.argmax(1)
    scored = scored_classes.to(logits.device)
    return scored[logits[:, scored].argmax(1)]


def _answered(logits: torch.Tensor, upload: Upload, answers: torch.Tensor | None, link: Link) -> torch.Tensor:
    """The scored logits when the edge awaits the cloud's answers for what it uploaded."""
    expected = (len(upload.samples), logits.shape[1])
    if answers is None or tuple(answers.shape) != expected:
        got = None if answers is None else tuple(answers.shape)
        raise ValueError(f"the edge awaits answers for {expected[0]} uploaded samples, so the cloud must return "
                         f"CloudReply(answers=...) of shape {expected}; got {got}")
    out = logits.clone()
    out[upload.index.to(logits.device)] = link.answer(answers).to(logits.dtype)
    return out


def _skip_rest(results: list[DomainResult], start: int) -> None:
    for result in results[start:]:
        result.status, result.message = "skipped", "an earlier domain of this run unit failed"
