"""Where run units execute: in this process, in local worker processes, or as Ray tasks. Every executor hands
results back as they complete, so that the runner stores each finished unit at once.

A unit that raises (anything but KeyboardInterrupt), or whose worker dies, comes back as an error record; it never
takes the run down.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import resource
import signal
import socket
import threading
import time
import traceback
from dataclasses import asdict

import torch

from cemabench.config.limits import NO_LIMITS, Limits
from cemabench.errors import UserError, out_of_memory
from cemabench.protocol import DomainResult, hygiene, zygote
from cemabench.run.context import ContextSpec, context_for
from cemabench.tables.plan import Unit

EXECUTORS = ("local", "ray")


def error_record(unit: Unit, message: str, status: str = "error") -> dict:
    """The record of a unit that produced no results: every cell it would yield fails with ``status`` and
    ``message``."""
    return {"unit": asdict(unit), "results": [DomainResult(name, status=status, message=message, device=d).to_dict()
                                              for d, name in unit.expected]}


def execute(recipe: ContextSpec, unit: Unit) -> dict:
    """Run one unit in this process's context for ``recipe``; any failure becomes an error record."""
    try:
        return context_for(recipe).run(unit)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - SystemExit from plugin code included: the unit fails, the table goes on
        tail = "".join(traceback.format_exception(error)[-3:])
        return error_record(unit, f"{type(error).__name__}: {error}\n{tail}",
                            "out-of-memory" if out_of_memory(error) else "error")


class Executor:
    """Submit units; ``completed`` blocks until at least one finished (or ``timeout`` passed) and returns those."""

    def submit(self, unit: Unit) -> None:
        raise NotImplementedError

    def completed(self, timeout: float | None = None) -> list[tuple[Unit, dict]]:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Units submitted and not yet returned by :meth:`completed`."""
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """How many units the runner keeps submitted at once (it claims no more than this ahead)."""
        return 1

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InlineExecutor(Executor):
    """Runs each unit in this process, one at a time, when its result is asked for."""

    def __init__(self, recipe: ContextSpec):
        self.recipe, self.queue = recipe, []

    def submit(self, unit):
        self.queue.append(unit)

    def completed(self, timeout=None):
        unit = self.queue.pop(0)
        return [(unit, execute(self.recipe, unit))]

    @property
    def pending(self):
        return len(self.queue)


def _serve(conn, recipe: ContextSpec, threads: int, memory: int | None, parent: int) -> None:
    """A worker process, in a session (process group) of its own: run the units it is sent, one at a time, and send
    each record back. After a unit that left method code running (a thread, say), the worker ends: it is not clean."""
    os.setsid()  # the parent ends the whole group: processes that method code forks go with the worker
    zygote.die_with_parent()  # and where the parent ends first (killed), the worker does not wait for it forever
    if os.getppid() != parent:  # (it had ended already)
        os._exit(0)
    zygote.drop_inherited()  # the parent's line to its zygote is not this worker's (nor its method code's)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    torch.set_num_threads(threads)
    _limit_memory(memory)
    while True:
        try:
            unit = conn.recv()
        except EOFError:
            return
        if unit is None:
            return
        record = execute(recipe, unit)
        try:
            conn.send(record)
        except Exception as error:  # noqa: BLE001 - a result that cannot be sent: the unit fails alone
            conn.send(error_record(unit, f"its result could not be sent back: {type(error).__name__}: {error}"))
        if hygiene.tainted():
            os._exit(0)


def _timed_out(limits: Limits) -> str:
    return (f"the unit ran past its time limit ({limits.unit_timeout_s:g} s: --unit-timeout, or the spec's "
            f"[limits] unit_timeout) and was stopped; the time counts its offline training stage where that was not "
            f"cached yet")


POLL_S = 0.5  # how often the parent looks at its workers' processes while it waits for records


class _Worker:
    """One local worker process and the unit it runs. Its records are read by a thread of the parent, so that a
    worker that sends half a message cannot block the parent; it is ended with its whole process group."""

    def __init__(self, recipe: ContextSpec, threads: int, memory: int | None, inbox: queue.Queue):
        context = multiprocessing.get_context("fork")  # inherits this process's built context (data, models)
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, recipe, threads, memory, os.getpid()),
                                       daemon=True)
        zygote.spare(memory)  # under --isolate, a zygote ready for the worker's halves
        try:
            self.process.start()
        finally:
            zygote.forked()
        theirs.close()
        self.unit: Unit | None = None
        self.deadline = float("inf")
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue) -> None:
        while True:
            try:
                record = self.conn.recv()
            except Exception:  # noqa: BLE001 - the end of the connection, or garbage on it: the worker is done for
                inbox.put((self, None))
                return
            inbox.put((self, record))

    def run(self, unit: Unit, timeout: float | None) -> None:
        self.unit = unit
        self.deadline = time.monotonic() + timeout if timeout is not None else float("inf")
        self.conn.send(unit)

    def died(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return f"killed by {name}" + (" (by the system's out-of-memory killer?)" if name == "SIGKILL" else "")
        return f"exit code {code}"

    def stop(self) -> None:
        """End the worker and every process in its group (what method code forked and left behind)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.kill()
        self.process.join()
        self.conn.close()


class ProcessExecutor(Executor):
    """Local worker processes (``--jobs N``), forked from this process with its context built. Each runs one unit at
    a time under the unit limits (:class:`~cemabench.config.limits.Limits`): a unit that runs past its time is
    killed with its worker's process group, and one whose worker dies fails alone; either way a fresh worker takes
    the next unit."""

    def __init__(self, recipe: ContextSpec, jobs: int, limits: Limits = NO_LIMITS):
        self.recipe, self.jobs, self.limits = recipe, jobs, limits
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.workers: list[_Worker] = []
        self.queue: list[Unit] = []
        self.inbox: queue.Queue = queue.Queue()

    def _fill(self) -> None:
        while self.queue:
            for gone in [w for w in self.workers if w.unit is None and not w.process.is_alive()]:
                self._replace(gone)  # it ended between units (after a unit that left method code running, say)
            idle = next((w for w in self.workers if w.unit is None), None)
            if idle is None:
                if len(self.workers) == self.jobs:
                    return
                idle = _Worker(self.recipe, self.threads, self.limits.unit_memory_bytes, self.inbox)
                self.workers.append(idle)
            idle.run(self.queue.pop(0), self.limits.unit_timeout_s)

    @property
    def capacity(self):
        return self.jobs

    def submit(self, unit):
        self.queue.append(unit)
        self._fill()

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self.workers.remove(worker)

    def _fail(self, worker: _Worker, message: str, status: str = "error") -> tuple[Unit, dict]:
        unit = worker.unit
        self._replace(worker)
        return unit, error_record(unit, message, status)

    def completed(self, timeout=None):
        until = None if timeout is None else time.monotonic() + timeout
        out: list[tuple[Unit, dict]] = []
        while not out and any(w.unit is not None for w in self.workers):
            first = min(w.deadline for w in self.workers if w.unit is not None) - time.monotonic()
            try:
                worker, record = self.inbox.get(timeout=max(0.0, min(POLL_S, first)))
            except queue.Empty:
                worker = None
            if worker is not None and worker in self.workers and worker.unit is not None:
                if record is None:  # its connection ended: the worker died, or wrote what is no record
                    out.append(self._fail(worker, f"worker process died while running this unit: {worker.died()}"))
                elif time.monotonic() >= worker.deadline:  # it finished, but past its time
                    out.append(self._fail(worker, _timed_out(self.limits), "timeout"))
                else:
                    out.append((worker.unit, record))
                    worker.unit = None
            for busy in [w for w in self.workers if w.unit is not None]:  # a death that left the pipe open
                if not busy.process.is_alive():                          # (a forked child holds it), or a deadline
                    out.append(self._fail(busy, f"worker process died while running this unit: {busy.died()}"))
                elif time.monotonic() >= busy.deadline:
                    out.append(self._fail(busy, _timed_out(self.limits), "timeout"))
            if until is not None and time.monotonic() >= until:
                break
        self._fill()
        return out

    @property
    def pending(self):
        return len(self.queue) + sum(w.unit is not None for w in self.workers)

    def close(self):
        for worker in self.workers:
            if worker.unit is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
                worker.process.join(5)
            worker.stop()
        self.workers.clear()
        self.queue.clear()


def _ray():
    try:
        import ray
    except ImportError as error:
        raise UserError("--executor ray needs Ray: pip install 'cemabench[ray]'") from error
    return ray


def _limit_memory(memory: int | None) -> None:
    if memory is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))


def _ray_execute(recipe: ContextSpec, unit: Unit, memory: int | None = None) -> dict:
    """A Ray task: the worker process keeps its context (dataset, models) across the tasks it runs."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    _limit_memory(memory)
    return execute(recipe, unit)


class RayExecutor(Executor):
    """Each unit a Ray task with the resources it declares (1 CPU, or 1 GPU when the device is CUDA); results
    come back with ``ray.wait`` as they complete. Joins a running Ray (``address``, or one this process started),
    else starts a local one with ``num_cpus``."""

    def __init__(self, recipe: ContextSpec, address: str | None = None, num_cpus: int | None = None,
                 limits: Limits = NO_LIMITS):
        ray = self.ray = _ray()
        self.limits = limits
        self.started = False
        if not ray.is_initialized():
            if address:
                try:
                    ray.init(address=address, log_to_driver=False)
                except ConnectionError as error:  # Ray's client gives up after 30 s; its GCS client, later
                    raise UserError(f"could not join the Ray cluster at {address}: {error}") from None
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            self.started = True
        self.gpu = gpu = torch.device(recipe.execution.device).type == "cuda"
        self.task = ray.remote(_ray_execute).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)
        self.recipe = ray.put(recipe)
        self.slots = max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)))  # units at once
        self.refs: dict = {}
        self.deadlines: dict = {}

    @property
    def capacity(self):
        # one unit queued behind each running one: Ray hands it to the worker the moment a slot frees, instead of
        # after a round trip through this process (ray.wait, the store, the next submit). Under a time limit, none
        # is queued: a unit's time then runs from its submission, which is about its start
        return self.slots if self.limits.unit_timeout_s is not None else 2 * self.slots

    def submit(self, unit):
        ref = self.task.remote(self.recipe, unit, self.limits.unit_memory_bytes)
        self.refs[ref] = unit
        if self.limits.unit_timeout_s is not None:
            self.deadlines[ref] = time.monotonic() + self.limits.unit_timeout_s

    def completed(self, timeout=None):
        if self.deadlines:
            wake = min(self.deadlines.values()) - time.monotonic()
            timeout = max(0.0, wake if timeout is None else min(timeout, wake))
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        out = []
        for ref in [r for r, t in self.deadlines.items() if r not in ready and time.monotonic() >= t]:
            self.ray.cancel(ref, force=True)  # ends the worker process running it
            del self.deadlines[ref]
            unit = self.refs.pop(ref)
            out.append((unit, error_record(unit, _timed_out(self.limits), "timeout")))
        for ref in ready:
            self.deadlines.pop(ref, None)
            unit = self.refs.pop(ref)
            try:
                out.append((unit, self.ray.get(ref)))
            except self.ray.exceptions.RayError as error:  # worker died, task cancelled, ...
                out.append((unit, error_record(unit, f"Ray task failed: {type(error).__name__}: "
                                                     f"{str(error).strip().splitlines()[0]}")))
        return out

    @property
    def pending(self):
        return len(self.refs)

    def close(self):
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """One line, before any compute, when ``--address`` is no Ray address or nothing answers there within
    ``timeout`` seconds (Ray itself retries for minutes); ``auto`` is Ray's own lookup and is left to it."""
    if address == "auto":
        return
    match = re.fullmatch(r"(ray://)?\[?([^\[\]]+?)\]?:(\d+)", address)
    if not match:
        raise UserError(f"--address {address!r} is not a Ray address: give HOST:PORT (the head's GCS, port 6379 by "
                        f"default), ray://HOST:PORT (Ray Client, 10001 by default) or auto")
    if match.group(1):
        try:
            import grpc  # noqa: F401 - what Ray Client needs: pip install 'cemabench[ray]'
        except ImportError:
            raise UserError(f"--address {address} needs Ray Client (grpcio): pip install 'cemabench[ray]'") from None
    try:
        socket.create_connection((match.group(2), int(match.group(3))), timeout=timeout).close()
    except OSError as error:
        raise UserError(f"nothing answers at {address} ({error.strerror or error}, within {timeout:.0f} s): start "
                        f"Ray there (`ray start --head`) or check the address") from None


def make_executor(recipe: ContextSpec, kind: str = "local", jobs: int = 1, address: str | None = None,
                  limits: Limits = NO_LIMITS) -> Executor:
    """Units run in this process (one job, no limits), in local worker processes, or as Ray tasks; a unit under a
    time or memory limit always runs in a process of its own, which can be stopped."""
    if kind not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "ray":
        return RayExecutor(recipe, address, num_cpus=None if address else jobs, limits=limits)
    return ProcessExecutor(recipe, jobs, limits) if jobs > 1 or limits.any else InlineExecutor(recipe)
