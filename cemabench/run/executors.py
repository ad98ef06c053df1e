"""Where run units execute: in this process, in local worker processes, or as Ray tasks. Every executor hands
results back as they complete, so that the runner stores each finished unit at once.

A unit that raises (anything but KeyboardInterrupt), or whose worker dies, comes back as an error record; it never
takes the run down.
"""
from __future__ import annotations

import os
import re
import socket
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict

import torch

from cemabench.errors import UserError
from cemabench.protocol import DomainResult
from cemabench.run.context import ContextSpec, context_for
from cemabench.tables.plan import Unit

EXECUTORS = ("local", "ray")


def error_record(unit: Unit, message: str) -> dict:
    """The record of a unit that produced no results: every cell it would yield an error with ``message``."""
    return {"unit": asdict(unit), "results": [DomainResult(name, status="error", message=message, device=d).to_dict()
                                              for d, name in unit.expected]}


def execute(recipe: ContextSpec, unit: Unit) -> dict:
    """Run one unit in this process's context for ``recipe``; any failure becomes an error record."""
    try:
        return context_for(recipe).run(unit)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - SystemExit from plugin code included: the unit fails, the table goes on
        tail = "".join(traceback.format_exception(error)[-3:])
        return error_record(unit, f"{type(error).__name__}: {error}\n{tail}")


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


def _init_process(threads: int) -> None:
    torch.set_num_threads(threads)


class ProcessExecutor(Executor):
    """Local worker processes (``--jobs N``); each builds its context once from the recipe. When a worker dies, the
    units that were in flight are rerun one at a time in a fresh pool: the one that kills its worker alone is
    recorded as an error, the others complete."""

    def __init__(self, recipe: ContextSpec, jobs: int):
        self.recipe, self.jobs = recipe, jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.futures: dict[Future, Unit] = {}
        self.queue: list[Unit] = []
        self.suspects: list[Unit] = []
        self.solo: Unit | None = None
        self.pool = self._pool()

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.jobs, initializer=_init_process, initargs=(self.threads,))

    def _fill(self) -> None:
        if self.suspects:
            if not self.futures:
                self.solo = self.suspects.pop(0)
                self.futures[self.pool.submit(execute, self.recipe, self.solo)] = self.solo
            return
        while self.queue and len(self.futures) < self.jobs:
            unit = self.queue.pop(0)
            self.futures[self.pool.submit(execute, self.recipe, unit)] = unit

    @property
    def capacity(self):
        return self.jobs

    def submit(self, unit):
        self.queue.append(unit)
        self._fill()

    def completed(self, timeout=None):
        done, _ = wait(self.futures, timeout=timeout, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for future in done:
            unit = self.futures.pop(future)
            try:
                out.append((unit, future.result()))
            except BrokenProcessPool as error:
                broken = True
                if unit == self.solo:
                    out.append((unit, error_record(unit, f"worker process died while running this unit: {error}")))
                else:
                    self.suspects.append(unit)
            except Exception as error:  # noqa: BLE001 - e.g. a result that cannot be unpickled: the unit fails alone
                out.append((unit, error_record(unit, f"{type(error).__name__}: {error}")))
            if unit == self.solo:
                self.solo = None
        if broken:
            self.suspects += list(self.futures.values())
            self.futures.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool()
        self._fill()
        return out

    @property
    def pending(self):
        return len(self.futures) + len(self.queue) + len(self.suspects)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ray():
    try:
        import ray
    except ImportError as error:
        raise UserError("--executor ray needs Ray: pip install 'cemabench[ray]'") from error
    return ray


def _ray_execute(recipe: ContextSpec, unit: Unit) -> dict:
    """A Ray task: the worker process keeps its context (dataset, models) across the tasks it runs."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    return execute(recipe, unit)


class RayExecutor(Executor):
    """Each unit a Ray task with the resources it declares (1 CPU, or 1 GPU when the device is CUDA); results
    come back with ``ray.wait`` as they complete. Joins a running Ray (``address``, or one this process started),
    else starts a local one with ``num_cpus``."""

    def __init__(self, recipe: ContextSpec, address: str | None = None, num_cpus: int | None = None):
        ray = self.ray = _ray()
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

    @property
    def capacity(self):
        # one unit queued behind each running one: Ray hands it to the worker the moment a slot frees, instead of
        # after a round trip through this process (ray.wait, the store, the next submit)
        return 2 * self.slots

    def submit(self, unit):
        self.refs[self.task.remote(self.recipe, unit)] = unit

    def completed(self, timeout=None):
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
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


def make_executor(recipe: ContextSpec, kind: str = "local", jobs: int = 1, address: str | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "ray":
        return RayExecutor(recipe, address, num_cpus=None if address else jobs)
    return ProcessExecutor(recipe, jobs) if jobs > 1 else InlineExecutor(recipe)
