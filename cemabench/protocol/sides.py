"""What runs in an isolated half's process (:mod:`cemabench.protocol.isolation`): the edge's or the cloud's side of a
unit, built there from the method's name and options, answering the loop's calls.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import traceback

import numpy as np
import torch

from cemabench import registry
from cemabench.config import Protocol
from cemabench.data import sequential_batches
from cemabench.errors import ForwardOnlyViolation, UserError, describe, failure_status
from cemabench.method import EntropyTables, Upload
from cemabench.protocol import hygiene, wire
from cemabench.protocol.annotation import asked_rows
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.execution import Execution, deterministic_threads
from cemabench.protocol.halves import build_clouds, build_edges, training_resources
from cemabench.protocol.messages import ASK_CLEAN, fields, receive, send
from cemabench.protocol.meter import ComputeMeter, SampleCounter, guard_process
from cemabench.protocol.plain import plain_reply
from cemabench.protocol.scoring import Diverged
from cemabench.protocol.tasks import task_for
from cemabench.protocol.training import train_here


def unpickled(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)  # in a half: the harness's own bytes


def from_loop(data: bytes):
    """In a half, a message from the loop: a wire message, or the harness's own ``torch.save`` bytes."""
    return wire.decode(data) if data[:len(wire.MAGIC)] == wire.MAGIC else unpickled(data)


def loaded(value):
    """In a half, a set-up value: the object the ``torch.save`` bytes of :func:`_set_up` stand for (``None``
    stays ``None``)."""
    return unpickled(value) if type(value) is bytes else value


def error_reply(error: BaseException) -> dict:
    if isinstance(error, SystemExit):
        kind = "SystemExit"
    elif isinstance(error, (ForwardOnlyViolation, Diverged, UserError)):
        kind = type(error).__name__
    else:
        kind = "other"
    return {"kind": kind, "message": str(error), "described": describe(error),
            "status": failure_status(error),
            "tail": "" if kind in ("SystemExit", "ForwardOnlyViolation") else
            "".join(traceback.format_exception(error)[-3:])}




class _Side:
    """What both halves share: the device, the threads and numerics of a unit, the harness's code as imported."""

    def __init__(self, method: tuple, execution: dict):
        name, options, task, protocol = method  # built here: the loop's process never pickles a plugin's object
        execution = Execution(**execution)
        self.method = registry.build_method(name, options)
        self.method.task, self.method.protocol = task, Protocol(**protocol)
        self.device = torch.device(execution.device)
        self.memory_format = torch.channels_last if execution.channels_last else torch.preserve_format
        self.amp = execution.amp
        self.threads = deterministic_threads(self.device)
        self.threads.__enter__()  # for the process's life: it runs this one unit
        self.replaced = hygiene.replaced_harness_code()  # the method's module is imported by now
        self.depths = hygiene.mode_depths()
        self.running = hygiene.threads()

    def finish(self) -> dict:
        """What the unit's method code left running in this half (threads that could go on computing, uncounted)."""
        left = hygiene.threads_left(self.running)
        return {"left": [f"left {len(left)} thread(s) running in its half ({', '.join(left[:3])})"] if left else []}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()


class _EdgeSide(_Side):
    def __init__(self, method, execution, prototype, count, num_classes, task, artefacts):
        prototype = loaded(prototype)  # before the method's module is imported, as a pickled argument was
        # from here on no backward or optimizer kernel may run in this process, on any thread, in a step or between
        # steps (a thread the method's code started, training a hidden model while the cloud step runs)
        self.outside, self.seen = guard_process(), 0
        super().__init__(method, execution)
        self.method.artefacts = artefacts
        self.task = task_for(*task)
        self.prototype, self.count, self.num_classes = prototype, count, num_classes
        self.edges: list[ForwardOnlyEdge] = []

    def refused(self) -> str | None:
        """What the process guard refused since it was last asked, or None."""
        if self.outside is None or self.outside.refusals == self.seen:
            return None
        message, self.seen = self.outside.refusal(self.seen), self.outside.refusals
        return (f"the edge is forward-only, but {message} (a thread its code started, or its code outside the "
                f"edge step?). Train a replica in the method's CloudLogic and send the new parameters down instead.")

    def _check(self) -> None:
        refused = self.refused()
        if refused:
            raise ForwardOnlyViolation(refused)

    def build(self) -> dict:
        self._check()
        self.edges = build_edges(self.method, lambda: copy.deepcopy(self.prototype), self.num_classes, self.count,
                                 self.device, self.memory_format)
        for edge in self.edges:  # the cloud's code runs in another process: it cannot reach this edge's buffers
            edge.watch_buffers = False
        self._check()
        return {}

    def finish(self) -> dict:
        reply = super().finish()
        refused = self.refused()
        return {"left": reply["left"] + [refused]} if refused else reply

    def step(self, index: int, x: torch.Tensor, downloads: list) -> dict:
        self._check()
        edge = self.edges[index]
        for download in downloads:
            edge.receive(download)
        checks = Checks()
        with self.autocast():
            decision = edge.step(x.to(self.device, memory_format=self.memory_format), self.task, checks)
        hygiene.check_modes(self.depths, "the edge step")
        checks.read()
        self._check()
        return {"decision": fields(decision), "flops": edge.meter.take(),
                "forwards": [edge.forwards.with_grad, edge.forwards.without_grad]}


class _CloudSide(_Side):
    def __init__(self, method, execution, edge, foundation, clean, num_classes, seed):
        edge, foundation = loaded(edge), loaded(foundation)  # (as the edge side's)
        super().__init__(method, execution)
        self.edge_prototype, self.foundation_prototype = edge, foundation
        self.clean = None if clean is None else _AskedClean(**clean)
        self.num_classes, self.seed = num_classes, seed
        self.passes, self.meter = SampleCounter(), ComputeMeter()
        self.clouds: list = []

    def _edge(self):
        return copy.deepcopy(self.edge_prototype)

    def _foundation(self):
        return copy.deepcopy(self.foundation_prototype)

    def train(self) -> dict:
        """The training stage's computation; the loop's process keys, caches and checks what it returns."""
        resources = training_resources(self._edge, self._foundation, self.num_classes, self.clean, self.seed,
                                       self.device)
        return {"state": train_here(self.method, resources)}

    def adopt(self, artefacts) -> dict:
        self.method.artefacts = artefacts
        return {}

    def tables(self) -> dict:
        """The method's entropy tables (a learned bottleneck's), read once after its training, as plain tensors."""
        tables = self.method.entropy_tables()
        if tables is None:
            return {"tables": None}
        if not isinstance(tables, EntropyTables):
            raise TypeError(f"entropy_tables() returned {type(tables).__name__}, not EntropyTables or None")
        return {"tables": {f.name: getattr(tables, f.name) for f in dataclasses.fields(EntropyTables)}}

    def build(self, replicas: int) -> dict:
        self.clouds = build_clouds(self.method, self._edge, self._foundation, self.clean, self.num_classes, replicas,
                                   self.device, self.memory_format, self.passes, self.meter)
        return {"has_cloud": self.clouds[0] is not None, "passes": [self.passes.with_grad, self.passes.without_grad]}

    def wanted(self, index: int, upload: dict) -> dict:
        """Active TTA: the rows whose labels the cloud asks for (the loop checks them against the budget)."""
        ask = getattr(self.clouds[index], "labels_wanted", None)  # a CloudLogic's; duck-typed halves may lack it
        uploaded = len(Upload(**upload))
        with self.autocast(), self.meter:
            rows = None if ask is None else ask(Upload(**upload))
        hygiene.check_modes(self.depths, "the cloud's labels_wanted")
        return {"rows": None if rows is None else asked_rows(rows, uploaded), "flops": self.meter.take(),
                "passes": [self.passes.with_grad, self.passes.without_grad]}

    def step(self, index: int, upload: dict) -> dict:
        with self.autocast(), self.meter:
            reply = self.clouds[index].step(Upload(**upload))
        hygiene.check_modes(self.depths, "the cloud step")
        reply = plain_reply(reply)
        return {"reply": fields(reply), "flops": self.meter.take(),
                "passes": [self.passes.with_grad, self.passes.without_grad]}


class _AskedClean:
    """The clean split in the cloud half (a :class:`~cemabench.data.DomainData`): its images and labels are read by
    the loop's process, which holds the dataset, and cross as bytes when the method asks for them. So the half reads
    no dataset file (its sandbox lets it read none) and runs no dataset plugin's code."""

    def __init__(self, name: str, length: int, sample_nbytes: int):
        self.name, self.length, self.sample_nbytes = name, length, sample_nbytes

    def __len__(self) -> int:
        return self.length

    def images(self, indices) -> torch.Tensor:
        return self._ask({ASK_CLEAN: "images", "indices": torch.as_tensor(np.asarray(indices), dtype=torch.int64)})

    def labels(self) -> np.ndarray:
        return self._ask({ASK_CLEAN: "labels"}).numpy()

    def batches(self, order, batch_size: int, pin_memory: bool = False):
        return sequential_batches(self, order, batch_size, pin_memory)

    @staticmethod
    def _ask(request: dict):
        send(LINE[0], request)
        data = receive(LINE[0])
        return from_loop(data)["value"]


LINE: list = []  # in a half: its line to the loop

SIDES: dict = {"edge": _EdgeSide, "cloud": _CloudSide}  # set-up op -> the side it builds (a planner adds its own)
