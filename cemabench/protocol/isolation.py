"""Method code apart from the harness (``--isolate``): each half of a run unit in a process of its own.

In the isolated mode the process that runs the loop (the stream, the labels, the link, scoring, the store) runs no
method code while a unit runs: the edge half (the :class:`~cemabench.protocol.edge.ForwardOnlyEdge`, its guard and
meter, the method's ``EdgeLogic``) runs in one process, and the cloud half (the offline training stage, the
``CloudLogic``, its meter) in another. Both are forked for the unit from a *zygote*: a process started fresh (not
forked from the harness) that imported torch, the zoo's libraries and cemabench's own protocol, datasets and models
(no plugin: :data:`PRELOAD`), so a half holds no object of the harness's: no labels, no scheduler, no store, not the
other half.

What crosses is bytes. Each batch's calls, both ways (the batch, the link's upload, the downloads that arrived, the
decision, the reply, the random state), are wire messages (:mod:`cemabench.protocol.wire`: JSON and raw tensor
bytes, no pickle). What a wire message cannot carry goes as pickles to a half (the models, the method's name and
options; each half builds the method itself) and as ``torch.save`` bytes of plain tensors, lists, numbers and strings
back to the loop (a training stage's state), read with ``weights_only=True``, so that no object of a plugin's class is
ever unpickled in the loop's process; the decision and the reply are then read into
plain copies and validated there as in-process. One random state (Python's, NumPy's, torch's, CUDA's) is threaded
through the halves in the order the in-process loop uses it: each call carries the loop's state and brings the half's
back, so a unit's numbers are bit for bit those of the in-process run.

Each half is cut off before any method code is imported (:func:`_half`): a session of its own, its output discarded,
no capabilities, and Landlock's rules (:mod:`cemabench.protocol.sandbox`): no file written but /dev/null and the
GPU's nodes, no TCP, no signal outside itself. What it can still do (read this user's files, connect to Unix sockets
by path) is listed in the README.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import importlib
import importlib.machinery
import io
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import traceback
import warnings
import zipfile
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cemabench import provenance, registry
from cemabench.config import Protocol
from cemabench.config.paths import cache_root
from cemabench.data import sequential_batches
from cemabench.errors import ForwardOnlyViolation, HalfFailed, UserError, describe, failure_status
from cemabench.method import CloudReply, EdgeDecision, EntropyTables, MethodFacts, Upload
from cemabench.protocol import hygiene, sandbox, wire
from cemabench.protocol.annotation import asked_rows
from cemabench.protocol.checks import Checks
from cemabench.protocol.edge import ForwardOnlyEdge, validate_decision
from cemabench.protocol.execution import Execution, deterministic_threads, warm_allocator
from cemabench.protocol.halves import build_clouds, build_edges, training_resources
from cemabench.protocol.meter import ComputeMeter, SampleCounter, guard_process
from cemabench.protocol.plain import NotPlain, plain_decision, plain_reply
from cemabench.protocol.scoring import Diverged
from cemabench.protocol.tasks import task_for
from cemabench.protocol.training import run_training, train_here


# -- bytes ------------------------------------------------------------------------------------------------------------
def pack(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpickled(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)  # in a half: the harness's own bytes


def _from_loop(data: bytes):
    """In a half, a message from the loop: a wire message, or the harness's own ``torch.save`` bytes."""
    return wire.decode(data) if data[:len(wire.MAGIC)] == wire.MAGIC else _unpickled(data)


def _loaded(value):
    """In a half, a set-up value: the object the ``torch.save`` bytes of :func:`_set_up` stand for (``None``
    stays ``None``)."""
    return _unpickled(value) if type(value) is bytes else value


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


MAX_MESSAGE = 1 << 32  # bytes of one reply from a half (4 GiB: a batch of ImageNet feature maps fits many times)


def send(conn: Connection, value) -> None:
    """``value`` as a wire message where it is plain (a step's: :mod:`cemabench.protocol.wire`), else as
    ``torch.save`` bytes (set-up: the models, the method's recipe, a training stage's state)."""
    try:
        data = wire.encode(value)
    except NotPlain:
        data = pack(value)
    conn.send_bytes(data)


def unpack(data: bytes, role: str):
    """What a half sent: plain tensors, lists, dicts, numbers and strings only: a wire message, or ``torch.save``
    bytes read with ``weights_only`` (without the classes added to its list of allowed ones), in uncompressed records
    (no small message that expands in memory)."""
    try:
        if data[:len(wire.MAGIC)] == wire.MAGIC:
            return wire.decode(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
        if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > len(data):
            raise ValueError("compressed records")
        extra = torch.serialization.get_safe_globals()  # classes added to torch's allowed ones (torch adds some of
        torch.serialization.clear_safe_globals()        # its own as it imports; import-time plugin code could too)
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        finally:
            torch.serialization.add_safe_globals(extra)
    except Exception as error:  # noqa: BLE001 - anything else is refused, whatever it is
        raise HalfFailed(f"NotPlain: the {role} half sent what is not plain data ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})"[:500]) from None


def rng_state(device: torch.device) -> dict:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # the words as a tensor: raw bytes on the wire, where 625 numbers in its JSON header took 0.3 ms to read
    python = torch.from_numpy(np.fromiter(words, dtype=np.int64, count=len(words)))
    state = {"python": [version, python, gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def replaying(state: dict, device: torch.device, build):
    """``build()`` in the random state ``state`` (halves built as at a unit's start); the state it found is put
    back, so that what draws after it draws as it would have."""
    now = rng_state(device)
    set_rng_state(state, device)
    try:
        return build()
    finally:
        set_rng_state(now, device)


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# -- the zygote: a clean process that forks the halves ---------------------------------------------------------------
BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
        "from cemabench.protocol.isolation import zygote; zygote(int(sys.argv[2]))")
# imported by the zygote, so that each half does not import them for itself: torch.optim's first optimizer imports
# torch._dynamo (1.4 s here); torchvision and timm hold the zoo's model classes; the planner's module and the built-in
# models' (harness code, none a plugin's); and SciPy's optimisers, which ECCENTRIC's and Entropic Student's modules
# import (0.2 s in each half of each of their units: a library, not a plugin). No dataset's: a half reads no data
# (the cloud half asks the loop for the clean split's images, :class:`_AskedClean`)
PRELOAD = ("torch._dynamo", "torchvision", "timm", "scipy.optimize", "cemabench.protocol.planner",
           *(f"cemabench.models.{m}" for m in ("mini", "minidet", "zoo", "cifar")))
SANDBOX = ""  # in a half: what confines it (cemabench.protocol.sandbox)
# the device files a half may open for writing and use ioctls on: /dev/null, and NVIDIA's GPU nodes where there are
DEVICES = tuple(sorted(str(p) for p in Path("/dev").glob("nvidia*") if not p.is_dir()))
# what the halves forked from now on may not read, should it lie where they read (an import path folder, say): the
# data roots and results folders this process uses (:func:`hide`); the cache root always
HIDDEN: set[str] = set()
# the pid that started it -> (process, connection, lock): a worker forked from that process starts its own
_ZYGOTES: dict[int, tuple] = {}


def hide(path) -> None:
    """Keep ``path`` (a data root, a results folder) from every half forked from now on, wherever it lies."""
    if path is not None:
        HIDDEN.add(os.path.abspath(path))


def drop_inherited() -> None:
    """In a process forked from one that started a zygote (a local worker): close this copy of that zygote's line, so
    that method code run here cannot write into it (and leave the zygote reading a message that never ends)."""
    for pid in [p for p in _ZYGOTES if p != os.getpid()]:
        with contextlib.suppress(OSError):
            _ZYGOTES.pop(pid)[1].close()


def _zygote_connection() -> tuple:
    entry = _ZYGOTES.get(os.getpid())
    if entry is not None and entry[0].poll() is None:
        return entry
    drop_inherited()
    if entry is not None:
        _stop_zygote()
    ours, theirs = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-c", BOOT, json.dumps(sys.path), str(theirs.fileno())],
                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    entry = _ZYGOTES[os.getpid()] = (process, Connection(ours.detach()), threading.Lock())
    return entry


def _stop_zygote() -> None:
    process, conn, _ = _ZYGOTES.pop(os.getpid())
    with contextlib.suppress(OSError):
        conn.close()
    process.kill()
    process.wait()


def _limited() -> bool:
    """Whether this process runs under a data-size limit (``--unit-memory``)."""
    return resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY


HANDSHAKE_S = 120.0  # how long a zygote may take to fork a half (the first request waits for its imports)


def _fork_half() -> tuple[int, int]:
    """A new half's socket and pid, from this process's zygote; a zygote that does not answer (stuck, stopped) is
    replaced once."""
    why = ""
    for _ in range(2):
        process, conn, lock = _zygote_connection()
        with lock:
            try:
                conn.send((list(sys.path), dict(os.environ), sorted(HIDDEN)))
                if conn.poll(HANDSHAKE_S):
                    return reduction.recv_handle(conn), conn.recv()
                why = f"did not answer within {HANDSHAKE_S:g} s"
            except (EOFError, OSError) as error:
                try:
                    code = process.wait(5)
                except subprocess.TimeoutExpired:
                    why = f"broke its line to this process ({error})"
                else:
                    ended = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    why = f"ended before it answered ({ended}; under --unit-memory it may have had too little memory)"
        _stop_zygote()
    raise HalfFailed(f"the zygote that forks the halves {why}, twice",
                     "out-of-memory" if "ended" in why and _limited() else "error")


def zygote(fd: int) -> None:
    """The zygote's main loop: for each request, fork a half and hand the harness its end of a fresh socket."""
    from cemabench.protocol import native

    for name in PRELOAD:  # what the first unit of every half would otherwise import for itself (no plugin code)
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their deprecation notices, once per zygote, say nothing about the run
            importlib.import_module(name)
    native.meter_module()
    for kind in registry.GROUPS:  # the plugins' entry points (names and modules: nothing imported), read once here
        registry.available(kind)  # rather than in every half (10 ms a half)
    provenance.warm()  # the harness's sources, parsed once for every planner's code digests
    sandbox.readable(sys.path, [])  # what the modules loaded here make readable, known once to every half
    warm_allocator()  # for every half forked from here

    conn = Connection(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the system reaps the halves
    while True:
        try:
            path, environ, hidden = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            conn.close()
            ours.close()
            _half(Connection(theirs.detach()), path, environ, hidden)
        theirs.close()
        reduction.send_handle(conn, ours.fileno(), pid)
        conn.send(pid)
        ours.close()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux: the half ends when the zygote does
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _half(conn: Connection, path: list[str], environ: dict, hidden: list[str]) -> None:
    """A half's process: cut off (its own session, no terminal, its output discarded, a mount namespace where the
    hidden folders are empty, its working directory /, no capabilities, confined by Landlock) before any method code
    is imported, set up from the harness's requests, then answering its steps; never returns."""
    global SANDBOX
    _LINE[:] = [conn]
    os.setsid()  # no controlling terminal (nothing to type into), and a process group of its own
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the harness's stdout may be a results file (`cemabench run > table.md`)
        os.dup2(null, fd)
    os.close(null)
    sys.path[:] = [entry or os.getcwd() for entry in path]  # "" is the working directory, which is left below
    os.environ.clear()
    os.environ.update(environ)
    importlib.invalidate_caches()
    # each import path folder's listing read now, for its modules and its distributions' entry points (importlib's
    # caches, kept while the folder is unchanged): of a folder that is not Python's own only the code stays readable
    importlib.machinery.PathFinder.find_spec("cemabench-lists-the-import-path")
    registry.entry_points_of_all()
    hidden = [str(cache_root()), *hidden]
    readable = sandbox.readable(sys.path, hidden)
    try:  # (as root, before the capabilities go)
        names = sandbox.hide(hidden, readable)
    except OSError as error:
        names = f"names not hidden ({error})"
    os.chdir("/")  # a working directory inside a hidden folder would still show its names (relative to it)
    with contextlib.suppress(OSError):  # a failure here must not skip the confinement below
        sandbox.drop_capabilities()
    try:
        SANDBOX = f"{sandbox.confine([os.devnull, *DEVICES], readable)}; {names}"
    except OSError as error:
        SANDBOX = f"none (refused: {error})"
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _die_with_parent()
    side = None
    while True:
        try:
            data = conn.recv_bytes()
            op, args, rng = _from_loop(data)
        except (EOFError, OSError):
            os._exit(0)
        try:
            if op in SIDES:  # set-up: the method's module is imported here (no random state crosses back)
                side = SIDES[op](*args)
                if side.replaced:
                    raise RuntimeError(f"cemabench's own code was replaced in this process (by a plugin, at "
                                       f"import?): {', '.join(side.replaced[:5])}")
                reply = {"sandbox": SANDBOX}
            else:
                set_rng_state(rng, side.device)
                reply = getattr(side, op)(*args)
                replaced = hygiene.replaced_harness_code()  # the meter and the guard run beside the method's code
                if replaced:
                    raise RuntimeError(f"method code replaced cemabench's own code in its half: "
                                       f"{', '.join(replaced[:5])}")
                reply["rng"] = rng_state(side.device)
        except KeyboardInterrupt:
            os._exit(1)
        except BaseException as error:  # noqa: BLE001 - method code's failure, sys.exit() included, goes to the loop
            reply = {"error": _error(error)}
        try:
            send(conn, reply)
        except Exception as error:  # noqa: BLE001 - what cannot be packed fails the cell, by name
            conn.send_bytes(pack({"error": _error(NotPlain(f"its reply could not be sent: {error}"))}))


def _error(error: BaseException) -> dict:
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


SIDES: dict = {}  # set-up op -> the side it builds


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
        prototype = _loaded(prototype)  # before the method's module is imported, as a pickled argument was
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
        return {"decision": _fields(decision), "flops": edge.meter.take(),
                "forwards": [edge.forwards.with_grad, edge.forwards.without_grad]}


class _CloudSide(_Side):
    def __init__(self, method, execution, edge, foundation, clean, num_classes, seed):
        edge, foundation = _loaded(edge), _loaded(foundation)  # (as the edge side's)
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
        return {"reply": _fields(reply), "flops": self.meter.take(),
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
        send(_LINE[0], request)
        data = _LINE[0].recv_bytes()
        return _from_loop(data)["value"]


ASK_CLEAN = "ask-clean"  # the key of a cloud half's request for the clean split, in place of its reply
_LINE: list = []  # in a half: its line to the loop


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
    if kind == "images" and set(request) == {ASK_CLEAN, "indices"} and type(indices) is torch.Tensor and (
            indices.dtype == torch.int64 and indices.dim() == 1 and indices.is_contiguous()
            and indices.storage_offset() == 0 and indices.untyped_storage().nbytes() == 8 * len(indices)):
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

    def __init__(self, role: str, device: torch.device, clean=None):
        self.role, self.device = role, device
        self.clean = clean  # the clean split, whose images and labels the half may ask for while it answers a call
        self.max_message = MAX_MESSAGE  # the longest reply read (a planner's answers are far shorter)
        fd, self.pid = _fork_half()
        self.conn = Connection(fd)
        try:  # the half waits for this process's first message: its pid is still its own
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def call(self, op: str, *args) -> dict:
        try:
            send(self.conn, (op, args, rng_state(self.device)))
            reply = unpack(self.conn.recv_bytes(self.max_message), self.role)
            while isinstance(reply, dict) and ASK_CLEAN in reply:
                send(self.conn, {"value": serve_clean(self.clean, reply, self.role)})
                reply = unpack(self.conn.recv_bytes(self.max_message), self.role)
        except (EOFError, OSError, BrokenPipeError):
            raise HalfFailed(f"the {self.role} half's process ended while it ran (method code ended it, or it was "
                             f"killed)") from None
        if not isinstance(reply, dict):
            raise HalfFailed(f"NotPlain: the {self.role} half sent {type(reply).__name__}, not its reply")
        if "error" in reply:
            error = reply["error"]
            kinds = {"ForwardOnlyViolation": ForwardOnlyViolation, "Diverged": Diverged, "UserError": UserError}
            if error.get("kind") in kinds:
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
        reply = self.half.call("wanted", self.index, _fields(upload))
        try:
            self.reported.flops += _count(reply["flops"])
            self.passes.with_grad, self.passes.without_grad = _counters(reply["passes"], self.passes)
            return reply["rows"]
        except (KeyError, TypeError, ValueError) as error:
            raise HalfFailed(f"NotPlain: the cloud half's reply is malformed ({error})") from None

    def step(self, upload: Upload):
        reply = self.half.call("step", self.index, _fields(upload))
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
    training = run_training(method, resources, train=lambda: cloud.call("train").get("state"))  # keyed, cached here
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
    if sandboxed in _SAID:
        return
    _SAID.add(sandboxed)
    if sandboxed.startswith("none"):
        print(f"cemabench: warning: --isolate: the halves are not confined: {sandboxed}; a half can read and write "
              f"any file this user can (README: Method code apart from the harness)", file=sys.stderr, flush=True)
    elif "names not hidden" in sandboxed:
        print(f"cemabench: warning: --isolate: {sandboxed.partition('; ')[2]}: a half can tell which files exist "
              f"under the data root, the results folder and the caches, though it reads none (README: Method code "
              f"apart from the harness)", file=sys.stderr, flush=True)


def finish(halves: list) -> list[str]:
    """At a unit's end: what each half's method code left behind, in words (empty when nothing)."""
    problems = []
    for half in halves:
        left = half.call("finish").get("left")
        problems += [str(x) for x in left] if type(left) is list else [f"the {half.role} half's reply is malformed"]
    return problems


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


SIDES.update(edge=_EdgeSide, cloud=_CloudSide)
