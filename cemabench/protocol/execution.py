"""How a run unit executes, as opposed to what it computes: the device (checked against this machine before any
compute), memory format, autocast, CPU threads, and the timing and memory of its steps."""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass

import torch

from cemabench.errors import UserError


@dataclass(frozen=True)
class Execution:
    """How a unit runs, as opposed to what it computes: device, memory format, and opt-in bf16 autocast."""

    device: str = "cpu"
    channels_last: bool = False
    amp: bool = False


_WARMED: list[bool] = []


def warm_allocator() -> None:
    """Raise glibc malloc's mmap threshold, once per process. A block above the threshold (128 KiB at first) is served
    with fresh pages from the system and unmapped when freed, so on the CPU every activation above it page-faults
    anew on every step until the process frees a large block (about half of a miniature edge step in a process that
    had not: 30 ms against 14 ms). Freeing one 16 MiB block raises the threshold to that size (glibc's dynamic
    threshold), so later blocks up to it are reused from the heap, whatever the process did before. Memory only: no
    number changes. The bare loops that cemabench is measured against do the same (an allocator setting, like the
    thread count)."""
    if not _WARMED:
        _WARMED.append(True)
        block = torch.empty(4 << 20)
        del block


@contextlib.contextmanager
def deterministic_threads(device: torch.device):
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


class Stopwatch:
    """Times steps without stopping the device: on CPU with ``perf_counter``; on a GPU with CUDA events recorded on
    the stream around each step and read when :meth:`take` is called (at a block's end), so that timing adds no
    host-device synchronisation per step. A GPU time is the stream's time from a step's start to its end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def run(self, fn, *args):
        if not self.cuda:
            start = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - start
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.events.append((start, end))
        return out

    def take(self) -> float:
        """The seconds timed since the last ``take``."""
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark on Linux



def _choices() -> str:
    choices = ["cpu"]
    if torch.cuda.is_available():
        choices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        choices.append("mps")
    return f"valid here: {', '.join(choices)} (cuda, cuda:N and mps where the machine has them)"


def check_device(name: str) -> str:
    """``name`` when it is a torch device this machine has, else a UserError that lists the valid choices here."""
    choices = _choices()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; {choices}") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU that torch can use; {choices}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); {choices}")
    if device.type not in ("cuda", "mps") or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: not available here; {choices}")
    return name
