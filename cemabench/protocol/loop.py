"""The online cloud-edge loop: one run unit, batch by batch, under the protocol's rules.

Per edge batch t: the edge predicts with its current parameters (that prediction is recorded at arrival), its logic
picks what to upload (raw inputs and/or per-sample payload, plus per-batch tensors), the link encodes, counts and
budgets every byte of it, the cloud runs, and whatever it sends down is applied to the edge before batch
t + 1 + delivery_delay; answers the edge awaits replace its prediction for those samples. Labels are read only after
a run unit's stream has ended, when the recorded predictions are scored. Every op of the edge and cloud steps runs
under a :class:`~cemabench.protocol.meter.ComputeMeter` that counts FLOPs and, on the edge, refuses what a
forward-only device cannot do. The rules live in this package: the link (:mod:`.link`), the edge
(:mod:`.edge`), the meter (:mod:`.meter`), the stream (:mod:`.stream`), scoring (:mod:`.scoring`) and the
offline training stage (:mod:`.training`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cemabench.config import Protocol
from cemabench.data import DomainData
from cemabench.errors import ForwardOnlyViolation, HalfFailed, UserError, describe, failure_status
from cemabench.method import CloudLogic, Method, MethodFacts, check_runnable
from cemabench.protocol import hygiene, isolation, messages
from cemabench.protocol.annotation import Annotator
from cemabench.protocol.bottleneck import EntropyCoder
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.execution import Execution, Stopwatch, deterministic_threads, peak_memory, warm_allocator
from cemabench.protocol.halves import build_clouds, build_edges, training_resources
from cemabench.protocol.link import CloudClock, Link, Vocabulary
from cemabench.protocol.meter import ComputeMeter, SampleCounter
from cemabench.protocol.plain import plain_reply
from cemabench.protocol.scoring import Diverged, DomainResult, note
from cemabench.protocol.stream import Block, DeviceStreams, derive_seed, plain
from cemabench.protocol.tasks import Task, task_for
from cemabench.protocol.training import run_training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Models:
    """Builders of fresh source models; the harness calls them anew for every run unit."""

    edge: Callable[[], nn.Module]
    foundation: Callable[[], nn.Module]
    _state: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    # built by copies_of: every call gives an equal model, so an isolated unit's halves can get the pickles made for
    # the first unit (kept here by cemabench.protocol.isolation)
    _copies: bool = field(default=False, repr=False, compare=False)
    _pickled: dict = field(default_factory=dict, repr=False, compare=False)
    # built apart (--isolate, a model plugin's: cemabench.models.builder): the models' fingerprints, which this process
    # cannot compute from a model it never unpickles (the training stage's key takes them)
    _fingerprints: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def copies_of(cls, edge: nn.Module, foundation: nn.Module) -> Models:
        return cls(edge=lambda: copy.deepcopy(edge), foundation=lambda: copy.deepcopy(foundation), _copies=True)

    def state_names(self) -> tuple[str, ...]:
        """The names of the edge model's state entries, the names that cross the link uncharged
        (:class:`~cemabench.protocol.link.Vocabulary`); built once (a build may draw random numbers: call it before
        seeding)."""
        if self._state is None:
            self._state = tuple(self.edge().state_dict())
        return self._state


class HarnessReplaced(RuntimeError):
    """The harness's code in this process is not what it was when imported."""


def run_unit(method: Method, stream: Sequence[DomainData | Block] | DeviceStreams, models: Models, num_classes: int,
             clean: DomainData | None, protocol: Protocol, seed: int, execution: Execution = Execution(),
             scored_classes: torch.Tensor | None = None, task: str = "classification",
             predictions: Callable[[int, str, list], None] | None = None, isolate: bool = False
             ) -> list[DomainResult]:
    """Run one method over a stream (see :func:`_run_unit`), on CPU with one intra-op thread so that its numbers are
    the same on every machine and under every executor. The process-wide torch state the unit found is the state it
    leaves (:mod:`cemabench.protocol.hygiene`): what method code changed is put back, and the unit fails naming it.
    ``predictions(device, result, rows)`` receives each scored result's predictions, where the task exports them
    (detection: COCO's results format)."""
    if torch.is_inference_mode_enabled():
        raise HarnessReplaced("this process is in inference mode (left entered by earlier method code?); no unit runs "
                              "here until it is restarted")
    warm_allocator()
    replaced = hygiene.replaced_harness_code()
    if replaced:
        raise HarnessReplaced(f"cemabench's own code was replaced in this process (by a plugin?): "
                              f"{', '.join(replaced[:5])}; no unit runs here until it is restarted")
    if hygiene.tainted():
        raise HarnessReplaced(f"an earlier unit's method code left threads running in this process "
                              f"({hygiene.tainted()}); no unit runs here until it is restarted")
    running = hygiene.threads()
    with deterministic_threads(torch.device(execution.device)):
        before = hygiene.snapshot()
        try:
            scoring = task_for(task, num_classes, scored_classes)
            scoring.predictions = predictions
            results = _run_unit(method, stream, models, num_classes, clean, protocol, seed, execution, scoring,
                                 isolate)
        finally:
            changed = hygiene.restore(before)
    replaced = hygiene.replaced_harness_code()  # by the method's own code, while it ran
    if replaced:
        changed.append(f"replaced cemabench's own code: {', '.join(replaced[:5])}")
    left = hygiene.threads_left(running)
    if left:
        changed.append(f"left {len(left)} thread(s) running ({', '.join(left[:3])}), which could change later units: "
                       f"this process runs no more units")
    if changed:
        message = ("method code changed process-wide torch state, which would change the cells computed after it in "
                   "this process (put back): " + "; ".join(changed))
        for result in results:
            result.status = "error"
            result.message = message + (f". Before that: {result.message}" if result.message else "")
    return results


def _run_unit(method: Method, stream: Sequence[DomainData | Block] | DeviceStreams, models: Models, num_classes: int,
              clean: DomainData | None, protocol: Protocol, seed: int, execution: Execution, task: Task,
              isolate: bool = False) -> list[DomainResult]:
    """Run one method over a stream with no reset in between; a failure ends the unit, not the caller.

    The stream is a list of blocks (:mod:`cemabench.protocol.stream` builds them for a setting; a plain domain stands
    for itself in its per-domain order), or one such list per edge device
    (:class:`~cemabench.protocol.stream.DeviceStreams`): the devices then step in lockstep (batch t of every device,
    the device order rotating with t) and share one cloud, which keeps one replica per device or one shared
    (``Method.cloud_replicas``) and accepts at most ``protocol.cloud_capacity`` uploaded samples per step over all
    devices. One result per device and distinct
    ``Block.result``, in the order they first appear. Predictions are recorded at arrival and scored against the
    labels, read only after their block ended, by the ``task`` (:mod:`cemabench.protocol.tasks`)."""
    if not isinstance(method, MethodFacts):  # facts come from a planner that made these checks in its own process
        # a protocol or task it cannot run on, or a clean split it needs and lacks: the user's error
        check_runnable(method, protocol, task.name, None if clean is not None else "the dataset has none")
    elif not isolate:
        raise TypeError("a method given as MethodFacts runs only isolated (its halves build the method)")
    method.task, method.protocol = task.name, dataclasses.replace(protocol)  # a copy: the link reads its own
    device = torch.device(execution.device)
    streams = stream.streams if isinstance(stream, DeviceStreams) else [stream]
    streams = [[b if isinstance(b, Block) else plain(b, seed) for b in s] for s in streams]
    names = list(dict.fromkeys(s.name for blocks in streams for b in blocks for s in b.sources))
    state = models.state_names()
    seed_everything(derive_seed(seed, method.name, *names))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {(d, b.result): DomainResult(b.result, device=d) for d, blocks in enumerate(streams) for b in blocks}
    if task.name != "classification" and sum(len(blocks) for blocks in streams) != len(results):
        raise UserError(f"the {task.name} task scores each result over one stretch of the stream; setting "
                        f"{protocol.setting!r} with rounds = {protocol.rounds} gives some results several: use "
                        f"per-domain, or continual with one round")
    depths = hygiene.mode_depths()  # what every edge and cloud step must leave entered
    replicas = 1 if method.cloud_replicas == "shared" else len(streams)
    halves: list = []  # isolated: the halves' processes, ended with the unit
    try:
        try:
            setup = isolation.start if isolate else _in_process
            training, build, cloud_meter, cloud_passes, tables = setup(
                method, models, num_classes, clean, seed, execution, task, len(streams), replicas, halves)
            source = messages.rng_state(device)  # the random state the halves are built in: a reset's too
            coder = None if tables is None else EntropyCoder(tables)  # read once, before the stream (bottleneck)
            edges, clouds = build()
        except (UserError, KeyboardInterrupt):
            raise
        except BaseException as error:  # noqa: B036 - a plugin's sys.exit() must end its cell, not the table
            first, *rest = results.values()
            first.status, first.message = failure_status(error), f"setup failed: {describe(error)}"
            _skip(rest)
            return list(results.values())
        for result in results.values():
            result.training = training
        out = _stream(method, streams, results, edges, clouds, cloud_meter, cloud_passes, protocol, execution, task,
                      depths, replicas, state, lambda: messages.replaying(source, device, build), coder)
        left = isolation.finish(halves) if halves and all(r.status == "ok" for r in out) else []
        for result in out if left else ():  # in-process, run_unit checks the same of its own process
            result.status, result.message = "error", "method code " + "; ".join(left) + ", which could go on computing"
        return out
    finally:
        isolation.close(halves)


def _in_process(method: Method, models: Models, num_classes: int, clean: DomainData | None, seed: int,
                execution: Execution, task: Task, count: int, replicas: int, halves: list):
    """The halves in this process: the training stage's record, a builder of ``count`` forward-only edges and
    ``replicas`` clouds from source (called at the unit's start and at each periodic reset), and the cloud's meter
    and sample counter."""
    device = torch.device(execution.device)
    memory_format = torch.channels_last if execution.channels_last else torch.preserve_format
    cloud_passes, cloud_meter = SampleCounter(), ComputeMeter()
    training = run_training(method, training_resources(models.edge, models.foundation, num_classes, clean, seed,
                                                       device))

    def build() -> tuple[list, list]:
        return (build_edges(method, models.edge, num_classes, count, device, memory_format),
                build_clouds(method, models.edge, models.foundation, clean, num_classes, replicas, device,
                             memory_format, cloud_passes, cloud_meter))

    return training, build, cloud_meter, cloud_passes, method.entropy_tables()


def _stream(method: Method, streams: list, results: dict, edges: list, clouds: list, cloud_meter, cloud_passes,
            protocol: Protocol, execution: Execution, task: Task, depths: tuple, replicas: int,
            state: tuple[str, ...] = (), rebuild: Callable[[], tuple[list, list]] | None = None,
            coder: EntropyCoder | None = None) -> list[DomainResult]:
    """The online stream of a unit whose halves are set up: every device's blocks, batch by batch; ``state`` names
    the edge model's state entries (the names that cross the link, :class:`~cemabench.protocol.link.Vocabulary`).
    Under ``protocol.reset_every`` = N, before every N-th step (step t being batch t of every device) ``rebuild``
    gives fresh halves, built as at the unit's start, which replace every device's; downloads in flight are
    dropped, and the counts go on."""
    device = torch.device(execution.device)
    memory_format = torch.channels_last if execution.channels_last else torch.preserve_format
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if execution.amp else contextlib.nullcontext
    clock = CloudClock()  # the time model's: edges that share the cloud queue for it
    devices = [_EdgeDevice(d, edges[d], clouds[d % replicas], blocks,
                       Link(protocol.upload_budget, protocol.delivery_delay, protocol.upload_budget_bytes, protocol,
                            clock, Vocabulary(state), coder), device, task, Annotator(protocol, method.name,
                                                                                      task.name))
               for d, blocks in enumerate(streams)]
    has_cloud = clouds[0] is not None
    _watch_buffers(devices, clouds)
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
                if not active and step and protocol.reset_every and step % protocol.reset_every == 0:
                    edges, clouds = rebuild()
                    for each in devices:
                        each.reset(edges[each.index], clouds[each.index % replicas])
                    _watch_buffers(devices, clouds)
                active = True
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                result, link, batch_index = dev.result, dev.link, dev.batch_index
                for download in link.arrived(batch_index):
                    dev.edge.receive(download)
                checks = Checks()  # this batch's: read with the next batch, or at the block's end
                with autocast():
                    decision = dev.edge_time.run(dev.edge.step, x, task, checks)
                hygiene.check_modes(depths, "the edge step")
                flops = dev.edge.meter.take()
                result.edge_flops += flops
                link.edge_step(batch_index, flops)
                scored = task.own(decision, checks, batch_index)
                # the one synchronisation per batch: the previous batch's checks (its seal, indices and logits, its
                # cloud reply's downloads and answers), read once this batch's edge step is queued, so that the
                # device never waits for the host
                dev.checks.read()
                dev.checks = checks
                upload = link.send_up(x, decision, dev.sample_nbytes, batch_index, dev.stream_position, capacity,
                                      dev.index)
                if capacity is not None:
                    capacity -= len(upload)
                if dev.cloud is not None:
                    passes = (cloud_passes.with_grad, cloud_passes.without_grad)
                    ask = getattr(dev.cloud, "labels_wanted", None)  # a CloudLogic's; duck-typed halves may lack it
                    if dev.annotator.on and ask is not None:  # active TTA: the labels it asks for, first
                        index = upload.index.clone()  # the link's, which labels_wanted cannot write into
                        with autocast(), cloud_meter:
                            wanted = dev.cloud_time.run(ask, upload)
                        hygiene.check_modes(depths, "the cloud's labels_wanted")
                        rows = dev.annotator.rows(wanted, len(index), batch_index)
                        if len(rows):  # the index's own checks (range, order) come before any label of it is read
                            checks.read()
                        result.labels_used += dev.annotator.annotate(upload, rows, index, dev.block, dev.block_offset)
                    with autocast(), cloud_meter:
                        reply = dev.cloud_time.run(dev.cloud.step, upload)
                    hygiene.check_modes(depths, "the cloud step")
                    for other in devices:  # the cloud's code can reach any edge's objects in this process
                        other.edge.check_untouched(checks, "the cloud step")
                    flops = cloud_meter.take()
                    result.cloud_flops += flops
                    link.cloud_step(flops)
                    result.cloud_forward_samples_grad += cloud_passes.with_grad - passes[0]
                    result.cloud_forward_samples_nograd += cloud_passes.without_grad - passes[1]
                    dev.cloud_ran = dev.cloud_ran or len(upload) > 0 or bool(upload.tensors)
                    reply = plain_reply(reply)  # read once, into plain copies
                    if decision.await_answers:
                        scored = task.answered(scored, len(x), upload, reply.answers, link, batch_index, checks)
                    if reply.download:  # checked with the next batch's checks, before its predictions count
                        flags = [torch.isfinite(t).all() for t in reply.download.values() if t.is_floating_point()]
                        if flags:
                            message = f"the cloud sent non-finite parameters at batch {batch_index} of the unit"
                            checks.add(~torch.stack([f.to(flags[0].device) for f in flags]).all(),
                                       lambda bad, message=message: Diverged(message))
                        link.send_down(reply.download, batch_index)
                elif decision.await_answers:
                    raise ValueError("the edge awaits answers, but the method has no cloud to answer")
                dev.predicted.append(task.record(scored, len(x)))  # rows no one answered: no prediction at all
                link.finish_batch(len(x), decision.logits is not None or decision.detections is not None)
                dev.batch_index += 1
                dev.stream_position += len(x)
                dev.block_offset += len(x)
            if not active:
                break
            step += 1
        failed = None
    except Diverged as error:
        failed.result.status, failed.result.message = "diverged", str(error)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: B036 - a plugin's sys.exit() must end its cell, not the table
        failed.result.status = failure_status(error)
        failed.result.message = describe(error)
        if isinstance(error, HalfFailed):  # the tail of the half's own traceback
            failed.result.message += "\n" + error.tail if error.tail else ""
        elif not isinstance(error, (SystemExit, ForwardOnlyViolation)):
            failed.result.message += "\n" + "".join(traceback.format_exception(error)[-3:])
    if failed is not None:
        reason = (f"device {failed.index} failed, which ended the run unit" if len(devices) > 1
                  else "an earlier domain of this run unit failed")
        for dev in devices:
            if dev is not failed and dev.result is not None and dev.result.status == "ok":
                dev.result.status, dev.result.message = "skipped", reason
            dev.finish(results, check=False)
            for block in dev.blocks:  # what the unit did not reach: a result partly run (rounds) is not complete
                result = results[(dev.index, block.result)]
                if result.status == "ok":
                    result.status, result.message = "skipped", reason
    for result in results.values():
        if result.segments:  # it ran
            ran = any(dev.ran.get(result.domain) for dev in devices if dev.index == result.device)
            result.note = note(result, has_cloud, ran)
        if len(result.segments) == 1 and result.segments[0]["segment"] == result.domain:
            result.segments = []  # a result made of one plain block needs no breakdown
    return list(results.values())


def _watch_buffers(devices: list, clouds: list) -> None:
    """Every edge's buffers are checked after each cloud step (any device's cloud can reach any edge in this
    process), so each edge snapshots them after its steps where any replica has a cloud; where none has, nothing is
    checked against them."""
    watch = any(cloud is not None for cloud in clouds)
    for dev in devices:
        dev.edge.watch_buffers = watch


class _EdgeDevice:
    """One edge device of a run unit: its forward-only edge, its link, its cloud (or its share of one), its stream
    of blocks and where it is in it."""

    def __init__(self, index: int, edge: ForwardOnlyEdge, cloud: CloudLogic | None, blocks: list[Block], link: Link,
                 device: torch.device, task: Task, annotator: Annotator):
        self.index, self.edge, self.cloud, self.link, self.device, self.task = index, edge, cloud, link, device, task
        self.annotator = annotator  # active TTA's labels for this device's cloud, within its budget
        self.blocks = iter(blocks)
        self.block: Block | None = None
        self.result: DomainResult | None = None  # the current block's counts
        self.batches = iter(())
        self.batch_index = 0
        self.stream_position = 0
        self.block_offset = 0  # where the next batch starts in the current block
        self.ran: dict[str, bool] = {}  # whether the cloud had anything to work on, per result
        self.predicted: list[torch.Tensor] = []
        self.sample_nbytes = 0
        self.cloud_ran = False
        self.edge_before = 0
        self.checks = Checks()  # the last batch's checks: read with the next batch, or at the block's end
        self.edge_time, self.cloud_time = Stopwatch(device), Stopwatch(device)

    def reset(self, edge: ForwardOnlyEdge, cloud: CloudLogic | None) -> None:
        """Go on with fresh halves (a periodic reset): what is in flight to the old edge is dropped, and the block's
        count of edge forwards goes on from the old edge's."""
        self.edge_before -= self.edge.forwards.with_grad + self.edge.forwards.without_grad
        self.edge, self.cloud = edge, cloud
        self.link.drop_in_flight()

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
            self.predicted, self.cloud_ran, self.block_offset = [], False, 0
            self.edge_before = self.edge.forwards.with_grad + self.edge.forwards.without_grad
            self.sample_nbytes = self.block.sample_nbytes
            self.batches = self.block.batches(batch_size, pin_memory=pin_memory)

    def finish(self, results: dict, check: bool = True) -> None:
        """Score the current block and count it toward its result. The checks of its last batch's cloud reply are
        read first (``check``; a failure leaves the block current, for the caller to mark and finish); after a
        failure they are dropped, and a score that fails again is left out (a dataset's labels that cannot be read:
        the block counts, failed, toward its result, which was an empty "ok" before)."""
        if self.block is None:
            return
        if check:
            self.checks.read()
        self.checks = Checks()
        block, result = self.block, self.result
        result.edge_seconds += self.edge_time.take()
        result.cloud_seconds += self.cloud_time.take()
        try:
            self.task.score(result, block, self.predicted)
        except Exception:
            if check:  # the block stays current: the caller marks its result failed, then finishes it unchecked
                raise
        self.block = None
        result.link, result.input_sizes, result.latencies = self.link.next_domain()
        result.edge_forward_samples = self.edge.forwards.with_grad + self.edge.forwards.without_grad - self.edge_before
        result.peak_memory_bytes = peak_memory(self.device)
        results[(self.index, block.result)].add(result, block)
        self.ran[block.result] = self.ran.get(block.result, False) or self.cloud_ran


def _skip(results) -> None:
    for result in results:
        result.status, result.message = "skipped", "an earlier domain of this run unit failed"

