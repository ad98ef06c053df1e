"""Method code apart from the harness (``--isolate``): each half of a run unit in a process of its own.

In the isolated mode the process that runs the loop (the stream, the labels, the link, scoring, the store) runs no
method code while a unit runs: the edge half (the :class:`~cemabench.protocol.edge.ForwardOnlyEdge`, its guard and
meter, the method's ``EdgeLogic``) runs in one process, and the cloud half (the offline training stage, the
``CloudLogic``, its meter) in another. Both are forked for the unit from a *zygote* (:mod:`cemabench.protocol.zygote`):
a process started fresh (not forked from the harness) that imported torch, the zoo's libraries and cemabench's own
protocol and models (no plugin), so a half holds no object of the harness's: no labels, no scheduler, no store, not the
other half.

What crosses is bytes. Each batch's calls, both ways (the batch, the link's upload, the downloads that arrived, the
decision, the reply, the random state), are wire messages (:mod:`cemabench.protocol.messages`,
:mod:`cemabench.protocol.wire`: JSON and raw tensor bytes, no pickle). What a wire message cannot carry goes as pickles
to a half (the models, the method's name and options; each half builds the method itself) and as ``torch.save`` bytes of
plain tensors, lists, numbers and strings back to the loop (a training stage's state), read with ``weights_only=True``,
so that no object of a plugin's class is ever unpickled in the loop's process; the decision and the reply are then read
into plain copies and validated there as in-process. One random state (Python's, NumPy's, torch's, CUDA's) is threaded
through the halves in the order the in-process loop uses it: each call carries the loop's state and brings the half's
back, so a unit's numbers are bit for bit those of the in-process run.

Each half is cut off before any method code is imported (:func:`cemabench.protocol.zygote._half`): a session of its own,
its output discarded, a mount namespace where the hidden folders are empty, no capabilities, and Landlock's rules
(:mod:`cemabench.protocol.sandbox`): it reads only code and the system's files, writes no file but /dev/null and the
GPU's nodes, opens no TCP connection and signals nothing outside itself. It then answers the loop's calls
(:mod:`cemabench.protocol.sides`). What it can still do is listed in the README.

This module is the loop's side: the halves' handles, the stand-ins of the edge and the cloud that the loop runs, and the
clean split served to a cloud half that asks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection
from types import SimpleNamespace

import numpy as np
import torch

from cemabench.config import Protocol
from cemabench.errors import ForwardOnlyViolation, HalfFailed, UserError
from cemabench.method import CloudReply, EdgeDecision, EntropyTables, MethodFacts, Upload
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import validate_decision
from cemabench.protocol.execution import Execution
from cemabench.protocol.halves import training_resources
from cemabench.protocol.messages import (
    ASK_CLEAN,
    MAX_MESSAGE,
    fields,
    pack,
    receive,
    rng_state,
    send,
    set_rng_state,
    unpack,
)
from cemabench.protocol.plain import NotPlain, owned, plain_decision, plain_reply
from cemabench.protocol.scoring import Diverged
from cemabench.protocol.training import run_training
from cemabench.protocol.zygote import METHOD_HALF, Access, fork_half


def _set_up(models, clean) -> tuple:
    """(edge, foundation, clean split) for the halves' set-up: the models as ``torch.save`` bytes, which cross inside a
    wire message as bytes and are unpickled in the half (not inside another ``torch.save``, which copies and parses
    them twice more), and what the cloud half's stand-in for the clean split needs to know (:class:`_AskedClean`).
    Where ``models`` gives copies of the same models (``Models.copies_of``, as every run does), pickled once and kept
    with them; otherwise built anew."""
    facts = None if clean is None else {"name": str(clean.name), "length": len(clean),
                                        "sample_nbytes": int(clean.sample_nbytes)}
    if not models._copies:
        return pack(models.edge()), pack(models.foundation()), facts
    kept = models._pickled
    if "edge" not in kept:
        kept["edge"], kept["foundation"] = pack(models.edge()), pack(models.foundation())
    return kept["edge"], kept["foundation"], facts


CLEAN_REQUEST_BYTES = 1 << 31  # the most float32 image bytes one request for the clean split may ask of the loop


def serve_clean(clean, request: dict, role: str) -> torch.Tensor:
    """What a half's request for the clean split asks: its images at in-range int64 indices (a tensor that owns its
    values: not a stride-0 view that a few bytes make look long), at most :data:`CLEAN_REQUEST_BYTES` of them at a
    time (the loop holds them), or its labels; anything else, or a half that has no clean split, is refused."""
    kind = request.get(ASK_CLEAN)
    if clean is None:
        raise HalfFailed(f"NotPlain: the {role} half asked for a clean split it was not given")
    if kind == "labels" and set(request) == {ASK_CLEAN}:
        return torch.as_tensor(np.asarray(clean.labels()))
    indices = request.get("indices")
    try:
        indices = owned(indices, "indices", dtype=torch.int64) if kind == "images" else None
    except NotPlain:
        indices = None
    if set(request) == {ASK_CLEAN, "indices"} and indices is not None and indices.dim() == 1:
        most = max(1, CLEAN_REQUEST_BYTES // (4 * max(1, clean.sample_nbytes)))
        if len(indices) > most:
            raise HalfFailed(f"the {role} half asked for {len(indices)} images of the clean split at once; at most "
                             f"{most} a request ({CLEAN_REQUEST_BYTES >> 30} GiB of float32 images): ask in parts")
        if len(indices) == 0 or (int(indices.min()) >= 0 and int(indices.max()) < len(clean)):
            return clean.images(indices.numpy())
    raise HalfFailed(f"NotPlain: the {role} half's request for the clean split is malformed")


# -- the harness's side ---------------------------------------------------------------------------------------------
class Half:
    """The loop's handle on one half's process."""

    def __init__(self, role: str, device: torch.device, clean=None, memory: int | None = None,
                 access: Access = METHOD_HALF):
        """``memory``: the half's data-size limit, where it is not its zygote's (a planner's); ``access``: what it
        may reach beyond a method half (:class:`~cemabench.protocol.zygote.Access`: a model builder, a dataset
        reader)."""
        self.role, self.device = role, device
        self.clean = clean  # the clean split, whose images and labels the half may ask for while it answers a call
        self.max_message = MAX_MESSAGE  # the longest reply read (a planner's answers are far shorter)
        fd, self.pid = fork_half(memory, device.type == "cpu", access)
        self.conn = Connection(fd)
        try:  # the half waits for this process's first message: its pid is still its own
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def call(self, op: str, *args) -> dict:
        try:
            send(self.conn, (op, args, rng_state(self.device)))
            reply = unpack(receive(self.conn, self.max_message), self.role)
            while isinstance(reply, dict) and ASK_CLEAN in reply:
                send(self.conn, {"value": serve_clean(self.clean, reply, self.role)})
                reply = unpack(receive(self.conn, self.max_message), self.role)
        except (EOFError, OSError, BrokenPipeError):
            raise HalfFailed(f"the {self.role} half's process ended while it ran (method code ended it, or it was "
                             f"killed)") from None
        if not isinstance(reply, dict):
            raise HalfFailed(f"NotPlain: the {self.role} half sent {type(reply).__name__}, not its reply")
        if "error" in reply:
            error = reply["error"]
            if type(error) is not dict:
                raise HalfFailed(f"NotPlain: the {self.role} half sent a malformed error")
            kinds = {"ForwardOnlyViolation": ForwardOnlyViolation, "Diverged": Diverged, "UserError": UserError}
            if error.get("kind") in kinds and type(error.get("message")) is str:
                raise kinds[error["kind"]](error["message"])
            raise HalfFailed(str(error.get("described")), str(error.get("status")), str(error.get("tail", "")))
        if "rng" in reply:
            try:
                set_rng_state(reply.pop("rng"), self.device)
            except Exception as error:  # noqa: BLE001 - whatever a forged state breaks, it is not the half's state
                raise HalfFailed(f"NotPlain: the {self.role} half sent a malformed random state "
                                 f"({type(error).__name__})") from None
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        self.kill()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def disown(self) -> None:
        """In a process forked from this handle's: close this process's copies of the line and the pidfd, leaving
        the half (the parent's) running."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def kill(self) -> None:
        """End the half's process, and this end of its line (so that a read in progress ends, even where a process
        the half forked still holds the other end)."""
        with contextlib.suppress(OSError, ValueError):
            line = socket.socket(fileno=os.dup(self.conn.fileno()))
            try:
                line.shutdown(socket.SHUT_RDWR)
            finally:
                line.close()
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if self.pidfd is not None:  # never another process that took over a reused pid
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)


def _count(value) -> int:
    """A count a half reports (FLOPs, samples): a non-negative int, nothing else."""
    if type(value) is not int or value < 0:
        raise ValueError(f"a count must be a non-negative int, got {value!r}"[:200])
    return value


def _counters(values, before: SimpleNamespace) -> tuple[int, int]:
    """The with-grad and without-grad totals a half reports: counts that never go down."""
    if type(values) is not list or len(values) != 2:
        raise ValueError(f"expected two counts, got {type(values).__name__}")
    with_grad, without_grad = (_count(v) for v in values)
    if with_grad < before.with_grad or without_grad < before.without_grad:
        raise ValueError("a running total went down")
    return with_grad, without_grad


class RemoteEdge:
    """Stands in the loop for a :class:`ForwardOnlyEdge` whose logic runs in the edge half: downloads wait for the
    next step, and the decision that comes back is read into plain copies and validated here."""

    def __init__(self, half: Half, index: int):
        self.half, self.index = half, index
        self.downloads: list = []
        self.forwards = SimpleNamespace(with_grad=0, without_grad=0)
        self.meter = ReportedMeter()  # the edge half reports each step's FLOPs

    def receive(self, download) -> None:
        self.downloads.append(download)

    def step(self, x: torch.Tensor, task, checks: Checks) -> EdgeDecision:
        downloads, self.downloads = self.downloads, []
        reply = self.half.call("step", self.index, x, downloads)
        try:
            decision = plain_decision(EdgeDecision(**reply["decision"]))
            self.meter.flops += _count(reply["flops"])
            self.forwards.with_grad, self.forwards.without_grad = _counters(reply["forwards"], self.forwards)
        except (KeyError, TypeError, ValueError) as error:
            raise HalfFailed(f"NotPlain: the edge half's reply is malformed ({error})") from None
        validate_decision(decision, len(x), task, checks)
        return decision

    def check_untouched(self, checks: Checks, by: str) -> None:
        """The cloud's code runs in another process: it cannot reach this edge's objects."""


class RemoteCloud:
    """Stands in the loop for a ``CloudLogic`` that runs in the cloud half; its FLOPs and forward passes are
    reported into the loop's stand-ins of the cloud meter and the cloud's sample counter."""

    def __init__(self, half: Half, index: int, meter: ReportedMeter, passes: SimpleNamespace):
        self.half, self.index, self.reported, self.passes = half, index, meter, passes

    def labels_wanted(self, upload: Upload):
        reply = self.half.call("wanted", self.index, fields(upload))
        try:
            self.reported.flops += _count(reply["flops"])
            self.passes.with_grad, self.passes.without_grad = _counters(reply["passes"], self.passes)
            return reply["rows"]
        except (KeyError, TypeError, ValueError) as error:
            raise HalfFailed(f"NotPlain: the cloud half's reply is malformed ({error})") from None

    def step(self, upload: Upload):
        reply = self.half.call("step", self.index, fields(upload))
        try:
            self.reported.flops += _count(reply["flops"])
            self.passes.with_grad, self.passes.without_grad = _counters(reply["passes"], self.passes)
            return plain_reply(CloudReply(**reply["reply"]))
        except (KeyError, TypeError, ValueError) as error:
            raise HalfFailed(f"NotPlain: the cloud half's reply is malformed ({error})") from None


def start(method, models, num_classes: int, clean, seed: int, execution: Execution, task, count: int,
          replicas: int, halves: list):
    """The halves of a unit in processes of their own, set up in the in-process loop's order (the training stage,
    the edges, the clouds): the training record, a builder of ``count`` edges and ``replicas`` clouds that stand in
    for them (each call builds them from source in their halves), and the stand-ins of the cloud's meter and sample
    counter. Each half started is appended to ``halves``."""
    device = torch.device(execution.device)
    entry = method.name
    if isinstance(method, MethodFacts):  # the planner's plain stand-in: this process never imported the method
        options, entry = method.options, method.entry or method.name  # its entry point's name: the class's may differ
    else:
        options = dataclasses.asdict(method.options) if dataclasses.is_dataclass(method.options) else {}
    # what the halves build the method from
    recipe = (entry, options, method.task, dataclasses.asdict(method.protocol or Protocol()))
    cloud = Half("cloud", device, clean)
    halves.append(cloud)
    edge = Half("edge", device)
    halves.append(edge)
    edge_model, foundation, clean_split = _set_up(models, clean)
    fields = dataclasses.asdict(execution)
    confined = cloud.call("cloud", recipe, fields, edge_model, foundation, clean_split, num_classes, seed)
    LAST_SANDBOX[:] = [str(confined.get("sandbox", ""))]
    _say_once(LAST_SANDBOX[0])
    resources = training_resources(models.edge, models.foundation, num_classes, clean, seed, device)
    training = run_training(method, resources, train=lambda: cloud.call("train").get("state"),  # keyed, cached here
                            fingerprints=models._fingerprints)
    cloud.call("adopt", method.artefacts)
    tables = _tables(cloud.call("tables").get("tables"))  # the method's entropy tables, computed in its half
    edge.call("edge", recipe, fields, edge_model if models._copies else pack(models.edge()), count, num_classes,
              (task.name, task.num_classes, task.scored_classes), method.artefacts)
    meter, passes = ReportedMeter(), SimpleNamespace(with_grad=0, without_grad=0)

    def build() -> tuple[list, list]:
        edge.call("build")
        built = cloud.call("build", replicas)
        passes.with_grad, passes.without_grad = _counters(built["passes"], passes)  # building's own (EATA's Fisher)
        return ([RemoteEdge(edge, i) for i in range(count)],
                [RemoteCloud(cloud, r, meter, passes) for r in range(replicas)] if built.get("has_cloud") is True
                else [None] * replicas)

    return training, build, meter, passes, tables


def _tables(fields) -> EntropyTables | None:
    """The entropy tables the cloud half read from its method: None, or three plain tensors (checked, as in-process,
    by the coder the loop builds from them)."""
    if fields is None:
        return None
    if type(fields) is not dict or set(fields) != {"frequencies", "offsets", "escape"} or not all(
            type(v) is torch.Tensor for v in fields.values()):
        raise HalfFailed("NotPlain: the cloud half's entropy tables are malformed")
    return EntropyTables(**fields)


_SAID: set = set()
LAST_SANDBOX: list[str] = []  # what confined the halves of this process's last isolated unit (sandbox's words)


def _say_once(sandboxed: str) -> None:
    """Warn once per process for each part of the halves' confinement that this machine did not give."""
    if sandboxed in _SAID:
        return
    _SAID.add(sandboxed)
    parts = sandboxed.split("; ")
    if sandboxed.startswith("none"):
        warn(f"the halves are not confined: {parts[0]}; a half can read and write any file this user can")
    for part in parts:
        if part.startswith("names not hidden"):
            warn(f"{part}: a half can tell which files exist under the data root, the results folder and the "
                  f"caches, though it reads none")
        elif part.startswith("channels open"):
            warn(f"{part}: a half can open UDP and Unix sockets (a service listening on a path) and System V "
                  f"shared memory")


def warn(words: str) -> None:
    """One line on stderr about what ``--isolate`` does not do on this run."""
    print(f"cemabench: warning: --isolate: {words} (README: Method code apart from the harness)", file=sys.stderr,
          flush=True)


def finish(halves: list) -> list[str]:
    """At a unit's end: what each half's method code left behind, in words (empty when nothing)."""
    problems = []
    for half in halves:
        left = half.call("finish").get("left")
        problems += [str(x) for x in left] if type(left) is list else [f"the {half.role} half's reply is malformed"]
    return problems


def ask(half: Half, late: threading.Event, limit: float, op: str, *args) -> dict:
    """One call, the half's process stopped (and ``late`` set) when it takes longer than ``limit`` seconds."""
    def stop():
        late.set()
        half.kill()

    timer = threading.Timer(limit, stop)
    timer.daemon = True
    timer.start()
    try:
        return half.call(op, *args)
    finally:
        timer.cancel()


SERVED_S = 600.0  # how long one call of a model builder or a dataset reader may take (a build included)


class Served:
    """A process of the harness's own that answers this process's calls (a model builder, a dataset reader), forked
    from the zygote on the first call and kept: ``role`` names its side (:data:`~cemabench.protocol.sides.SIDES`),
    ``access`` what it may reach. A process forked from this one (a ``--jobs`` worker) inherits the handle but not the
    process: it starts one of its own on its first call, leaving this one's line alone, and replays there the calls
    that built its state (:meth:`keep`). A failure is one line, ``what`` naming what was asked; a call is bounded
    (:data:`SERVED_S`). ``threads_random_state``: each call runs on this process's random state and leaves it as the
    call left it (a dataset's reads, as in-process); otherwise this process keeps its own (a model builder's, whose
    builds are seeded)."""

    role = ""
    what = ""
    threads_random_state = False

    def __init__(self, memory: int | None = None):
        self.memory, self.half, self.kept, self.owner = memory, None, [], os.getpid()

    def access(self) -> Access:
        return METHOD_HALF

    def keep(self, op: str, *args) -> dict:
        """A call that builds the process's state, made again in a process of this one's forked worker."""
        answer = self.call(op, *args)
        self.kept.append((op, args))
        return answer

    def call(self, op: str, *args) -> dict:
        late = threading.Event()
        state = None if self.threads_random_state else rng_state(torch.device("cpu"))
        try:
            if self.owner != os.getpid():  # inherited (a forked worker): the process is the parent's
                if self.half is not None:
                    self.half.disown()
                self.half, self.owner = None, os.getpid()
            if self.half is None:
                self.half = Half(self.role, torch.device("cpu"), memory=self.memory, access=self.access())
                _say_once(str(ask(self.half, late, SERVED_S, self.role).get("sandbox", "")))
                for kept, given in self.kept:
                    ask(self.half, late, SERVED_S, kept, *given)
            return ask(self.half, late, SERVED_S, op, *args)
        except (HalfFailed, ForwardOnlyViolation, Diverged) as error:  # (UserError: the plugin's own line)
            first = (str(error).splitlines() or [""])[0]
            if late.is_set():
                first = f"it did not answer within {SERVED_S:g} s, and was stopped"
            self.close()
            raise UserError(f"{self.what} (--isolate): {first}") from None
        finally:
            if state is not None:
                set_rng_state(state, torch.device("cpu"))

    def close(self) -> None:
        """End the process (in a forked worker, only this process's copy of the parent's line)."""
        if self.half is not None:
            self.half.close() if self.owner == os.getpid() else self.half.disown()
        self.half = None


def close(halves: list) -> None:
    """End the halves' processes (a unit's are never reused)."""
    while halves:
        halves.pop().close()


class ReportedMeter:
    """The loop's cloud meter in the isolated mode: it counts nothing; the cloud half reports each step's FLOPs."""

    def __init__(self):
        self.flops = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def take(self) -> int:
        flops, self.flops = self.flops, 0
        return flops
