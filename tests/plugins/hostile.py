"""Method plugins that misbehave in ways the protocol must turn into a clear error cell."""
import sys

import torch

from cemabench.method import CloudLogic, EdgeDecision, EdgeLogic, Method


class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(model(x))


class _ExitOnThirdBatch(EdgeLogic):
    def __init__(self):
        self.batches = 0

    def step(self, model, x):
        self.batches += 1
        if self.batches == 3:
            sys.exit(0)
        return EdgeDecision(model(x))


class ExitsOnBatch3(Method):
    """Calls sys.exit(0) in its edge step on the third batch of every run unit."""

    def edge(self, num_classes):
        return _ExitOnThirdBatch()


class _FailsWithGradInText(EdgeLogic):
    def step(self, model, x):
        raise RuntimeError("the colour gradient table of this sensor is not calibrated")


class GradInMessage(Method):
    """Its edge fails with a RuntimeError whose text contains 'grad' for a reason that has nothing to do with
    gradients; that is an error, not a forward-only violation."""

    def edge(self, num_classes):
        return _FailsWithGradInText()


class _DownloadsAnUnknownKey(CloudLogic):
    def step(self, upload):
        return {"no_such_layer.weight": torch.ones(3)}


class UnknownDownloadKey(Method):
    """Its cloud sends down a tensor under a name the edge model does not have."""

    def edge(self, num_classes):
        return _Predict()

    def cloud(self, resources):
        return _DownloadsAnUnknownKey()


class _KillsItsProcess(EdgeLogic):
    def step(self, model, x):
        import os

        os._exit(9)  # no exception to catch: the process running the unit is gone


class KillsItsProcess(Method):
    """Ends the process that runs it at its first edge batch (os._exit): only an executor that runs units in other
    processes (local workers, Ray) can turn that into an error cell."""

    def edge(self, num_classes):
        return _KillsItsProcess()


class _SleepsForever(EdgeLogic):
    def step(self, model, x):
        import time

        time.sleep(1e6)  # issue 22, finding 11: nothing bounded a unit's time, and this hung the table


class SleepsForever(Method):
    """Sleeps for 11 days in its first edge step."""

    def edge(self, num_classes):
        return _SleepsForever()


class _HoldsTooMuch(EdgeLogic):
    def step(self, model, x):
        self.held = torch.ones(2 ** 31, dtype=torch.uint8)  # 2 GiB, written, so that it is really held
        return EdgeDecision(model(x))


class HoldsTooMuch(Method):
    """Allocates 2 GiB in its edge step."""

    def edge(self, num_classes):
        return _HoldsTooMuch()


def _uncounted(size: int) -> dict:
    """The ways to memory that a data-size limit (RLIMIT_DATA) does not count, each taking ``size`` bytes and
    writing them (a hostile review held 3 GiB under --unit-memory 2G with the first)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

    def mapped(address, start: int = 0) -> None:
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        ctypes.memset(address + start, 1, size - start)

    def shared() -> None:
        mmap.mmap(-1, size).write(b"\1" * size)  # MAP_SHARED | MAP_ANONYMOUS: shared memory, not data

    def memfd() -> None:
        fd = os.memfd_create("held")
        os.write(fd, b"\1" * size)  # pages of a file of its own, in no mapping

    def grows_down() -> None:
        mapped(libc.mmap(None, size, 3, 0x22 | 0x100, -1, 0))  # MAP_GROWSDOWN: counted as a stack

    def stack_grown() -> None:
        with open("/proc/self/maps") as maps:
            start, end = next((int(a, 16), int(b, 16)) for a, b in (line.split()[0].split("-") for line in maps
                                                                     if "[stack]" in line))
        mapped(libc.mremap(start, end - start, size, 1, None), end - start)  # MREMAP_MAYMOVE

    def forked() -> None:
        pid = os.fork()  # a process of its own, with a limit of its own
        if pid == 0:
            bytearray(b"\1" * size)
            os._exit(0)
        os.waitpid(pid, 0)

    def made_read_only() -> None:
        for _ in range(4):  # written, then read-only: no longer counted as data, still held
            address = libc.mmap(None, size, 3, 0x22, -1, 0)
            mapped(address)
            if libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(size), 1) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def page_tables() -> None:
        span = 64 * size  # read-only and never written: no data, but a page table for every 2 MiB read
        address = libc.mmap(None, span, 1, 0x22 | 0x4000, -1, 0)  # MAP_NORESERVE
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        ctypes.string_at(address, 1)

    def given_to_a_pipe() -> None:
        huge = 2 << 20  # one huge page's worth, each kept whole by a pipe (a review held 7 GiB under 1G, page by page)
        address = libc.mmap(None, huge, 3, 0x22, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        ctypes.memset(address, 1, huge)
        read, write = os.pipe()
        iov = (ctypes.c_void_p * 2)(address, 4096)
        if libc.vmsplice(write, iov, 1, 0) < 0:  # the pipe keeps the page after the mapping is gone
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(huge))

    return {"shared memory": shared, "a memfd": memfd, "a mapping that grows down": grows_down,
            "the stack grown": stack_grown, "a new process": forked, "memory made read-only": made_read_only,
            "a mapping read only": page_tables, "pages given to a pipe": given_to_a_pipe}


class _HoldsOutsideItsLimit(EdgeLogic):
    def step(self, model, x):
        held = []
        for name, take in _uncounted(64 << 20).items():
            if name in ("memory made read-only", "a mapping read only"):  # counted by an isolated CPU half's address
                continue  # space limit, which these 64 MiB are within (tests/test_sandbox.py, at a small limit)
            try:
                take()
                held.append(name)
            except OSError:
                pass
        raise RuntimeError(f"held outside the limit: {', '.join(held) or 'nothing'}")


class HoldsOutsideItsLimit(Method):
    """Takes memory in each way that RLIMIT_DATA does not count, in its first edge step, and says which it got."""

    def edge(self, num_classes):
        return _HoldsOutsideItsLimit()


class PlansTooMuch(Method):
    """Allocates 2 GiB when asked whether it runs under a protocol (where it is planned)."""

    @classmethod
    def check_protocol(cls, protocol) -> None:
        cls.held = torch.ones(2 ** 31, dtype=torch.uint8)

    def edge(self, num_classes):
        return _Predict()


class _IgnoresAlarms(EdgeLogic):
    def step(self, model, x):
        import signal
        import time

        for name in ("SIGALRM", "SIGTERM", "SIGINT", "SIGVTALRM", "SIGPROF"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        while True:  # busy, in Python, with every catchable signal ignored
            time.monotonic()


class IgnoresSignals(Method):
    """Ignores every signal a process can ignore and spins in its first edge step."""

    def edge(self, num_classes):
        return _IgnoresAlarms()


class _HalfAMessage(EdgeLogic):
    def step(self, model, x):
        import os
        import socket
        import stat
        import struct
        import time

        for fd in range(3, 256):  # every Unix socket this process holds, the worker's line to its parent among them
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    socket.socket(fileno=os.dup(fd)).send(struct.pack("!i", 1 << 20))  # a header, and no body
            except OSError:
                pass
        time.sleep(1e6)


class HalfAMessage(Method):
    """Sends the parent the start of a message that never ends, then sleeps: a parent that reads it blocks."""

    def edge(self, num_classes):
        return _HalfAMessage()


class _ForksThenDies(EdgeLogic):
    def step(self, model, x):
        import os
        import time

        child = os.fork()
        if child == 0:
            time.sleep(3600)  # holds the worker's pipes open
            os._exit(0)
        with open(os.environ["CEMABENCH_TEST_CHILD_PID"], "w") as f:
            f.write(str(child))
        os._exit(7)


class ForksThenDies(Method):
    """Forks a child that sleeps for an hour, then ends its own process with exit code 7."""

    def edge(self, num_classes):
        return _ForksThenDies()


class _LeavesAThread(CloudLogic):
    def step(self, upload):
        import threading
        import time

        if not hasattr(self, "thread"):
            self.thread = threading.Thread(target=time.sleep, args=(1e6,), daemon=True, name="saboteur")
            self.thread.start()


class LeavesAThread(Method):
    """Its cloud starts a thread that outlives the unit (where it could change the units after it)."""

    def edge(self, num_classes):
        return _Predict()

    def cloud(self, resources):
        return _LeavesAThread()


class _TrainsBetweenSteps(EdgeLogic):
    """Starts a thread in ``configure`` that trains a hidden copy of the edge model (kept in a closure, out of the
    seal's reach) on each batch while the edge's guard is not entered, and predicts with that copy."""

    def configure(self, model):
        import copy
        import queue
        import threading
        import time

        with torch.inference_mode(False):
            hidden = copy.deepcopy(model).requires_grad_(True)
            optimizer = torch.optim.SGD(hidden.parameters(), lr=0.01)
        self.batches = queue.Queue()

        def train():
            wait = 60.0  # for the first batch, however long the unit's set-up takes on a loaded machine
            while True:
                try:  # then ends once no batch came for a second: within the grace a unit's threads get to finish
                    x = self.batches.get(timeout=wait)
                except queue.Empty:
                    return
                wait = 1.0
                time.sleep(0.05)  # once the step has returned
                with torch.inference_mode(False), torch.enable_grad():
                    optimizer.zero_grad()
                    (-hidden(x.clone()).softmax(1).max(1).values.mean()).backward()
                    optimizer.step()

        threading.Thread(target=train, daemon=True, name="trainer").start()
        self.predict = lambda x: hidden(x)
        return model

    def step(self, model, x):
        self.batches.put(x)  # trained on while the cloud step runs
        return EdgeDecision(self.predict(x), upload=torch.tensor([0]))


class _WaitsForTheTrainer(CloudLogic):
    def step(self, upload):
        import time

        time.sleep(0.3)  # long enough for the edge's thread to train on the batch (a cloud step's own time, isolated)


class TrainsBetweenSteps(Method):
    """A forward-only edge that trains a hidden model between its steps, in a thread its ``configure`` started."""

    def edge(self, num_classes):
        return _TrainsBetweenSteps()

    def cloud(self, resources):
        return _WaitsForTheTrainer()
