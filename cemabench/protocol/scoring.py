"""Scoring: the predictions recorded at arrival, the cloud's answers that replace them, and the measurements of a
cell (:class:`DomainResult`). Labels are read from storage only here, after a block's stream has ended."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cemabench.protocol.checks import Checks
from cemabench.protocol.link import LinkCounters
from cemabench.protocol.stream import Block


class Diverged(Exception):
    """Non-finite logits or parameters: the cell is reported as diverged, not as an error."""


@dataclass
class DomainResult:
    """The measurements of one method on one domain. Accuracy is online top-1 of the predictions made at arrival;
    a task with scores of its own (detection's mAP) keeps them in ``metrics``."""

    domain: str
    status: str = "ok"  # ok | diverged | error | timeout | out-of-memory | skipped
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
    metrics: dict = field(default_factory=dict)  # a task's own scores (detection: map, map50, ar100); then no accuracy
    input_sizes: list | None = None  # under an input codec: each uploaded input's encoded length (None: raw pixels)
    latencies: list | None = None  # under the time model: each sample's modelled latency in seconds (None: off)
    labels_used: int = 0  # labels the oracle annotator gave the cloud (active TTA, under a label budget)

    _SUMMED = ("seen", "correct", "unanswered", "edge_forward_samples", "cloud_forward_samples_grad",
               "cloud_forward_samples_nograd", "edge_flops", "cloud_flops", "edge_seconds", "cloud_seconds",
               "labels_used")

    def add(self, part: DomainResult, block: Block) -> None:
        """Count a further stretch of the stream (a block) toward this result."""
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.peak_memory_bytes = max(self.peak_memory_bytes, part.peak_memory_bytes)
        self.link.add(part.link)
        if part.input_sizes is not None:
            self.input_sizes = (self.input_sizes or []) + part.input_sizes
        if part.latencies is not None:
            self.latencies = (self.latencies or []) + part.latencies
        self.segments.append({"segment": block.segment, "round": block.round, "severity": block.severity,
                              "seen": part.seen, "correct": part.correct})
        for domain, (seen, correct) in part.by_domain.items():
            mine = self.by_domain.setdefault(domain, [0, 0])
            mine[0], mine[1] = mine[0] + seen, mine[1] + correct
        if part.metrics:  # a task's scores are over one block: the loop refuses settings with several per result
            if self.metrics:
                raise ValueError(f"result {self.domain!r} of a task scored by its own metrics has several blocks")
            self.metrics = dict(part.metrics)
        if part.status != "ok" and self.status == "ok":
            self.status, self.message = part.status, part.message

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy in percent: classification's score (a result that a task scores by ``metrics`` has none)."""
        return 100.0 * self.correct / self.seen if self.seen and self.status == "ok" and not self.metrics else None

    @property
    def upload_ratio(self) -> float | None:
        return 100.0 * self.link.uploaded / self.seen if self.seen and self.status == "ok" else None

    def per_sample(self, total: int) -> float | None:
        return total / self.seen if self.seen and self.status == "ok" else None

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["metrics"]  # a task's own scores are columns of the cell, like accuracy (classification has none)
        out.update(self.metrics)
        sizes, latencies = out.pop("input_sizes"), out.pop("latencies")
        if latencies is not None:  # the time model's per-sample latency, in seconds (percentiles: numpy's linear)
            out.update({f"latency_{k}": (float(f(latencies)) if latencies and self.status == "ok" else None)
                        for k, f in (("mean", np.mean), ("p50", np.median),
                                     ("p95", lambda v: np.percentile(v, 95)))})
        if sizes is not None:  # an input codec's bytes per uploaded input (p95: numpy's linear percentile)
            out.update(input_bytes_mean=float(np.mean(sizes)) if sizes else None,
                       input_bytes_p95=float(np.percentile(sizes, 95)) if sizes else None)
        out["link"].update(bytes_up=self.link.bytes_up, bytes_down=self.link.bytes_down)
        out.update(accuracy=self.accuracy, upload_ratio=self.upload_ratio,
                   bytes_up_per_sample=self.per_sample(self.link.bytes_up),
                   bytes_down_per_sample=self.per_sample(self.link.bytes_down),
                   edge_gflops_per_sample=_giga(self.per_sample(self.edge_flops)),
                   cloud_gflops_per_sample=_giga(self.per_sample(self.cloud_flops)))
        return out


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def finite(values: torch.Tensor, checks: Checks, message: str) -> torch.Tensor:
    """``values``, with a check that they are finite (read with the batch's other checks: a Diverged otherwise)."""
    checks.add(~torch.isfinite(values).all(), lambda bad: Diverged(message))
    return values


def note(result: DomainResult, has_cloud: bool, cloud_ran: bool) -> str:
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
