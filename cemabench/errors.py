"""Errors that the CLI reports as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class ForwardOnlyViolation(RuntimeError):
    """A method tried to train or edit the edge model outside a download from the cloud."""


class MeterBlind(RuntimeError):
    """Code under the C++ meter ran ops where it cannot see them whole (behind ``__torch_dispatch__``, or under a
    ``torch.func`` transform); the Python meter can (``CEMABENCH_METER=python``)."""


def out_of_memory(error: BaseException) -> bool:
    """Whether an error says the process ran out of memory: Python's ``MemoryError``, torch's ``OutOfMemoryError``
    (CUDA), or its CPU allocator's failure, which torch raises as a plain ``RuntimeError``."""
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ == "OutOfMemoryError" and type(error).__module__.split(".")[0] == "torch":
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


class HalfFailed(RuntimeError):
    """Method code in a half's own process (``--isolate``) failed, or the process ended: the cell's ``status``, its
    message as the in-process loop words it (``described``), and the tail of the half's traceback."""

    def __init__(self, described: str, status: str = "error", tail: str = ""):
        """``described``: the cell's message; ``status``: its status; ``tail``: the half's traceback's tail."""
        super().__init__(described)
        self.described, self.status, self.tail = described, status, tail


def describe(error: BaseException) -> str:
    """How a cell's message names the error that ended it."""
    if isinstance(error, HalfFailed):
        return error.described
    if isinstance(error, SystemExit):
        return f"SystemExit: method code called sys.exit({error.code!r}); a method must not end the process"
    return f"{type(error).__name__}: {error}"


def failure_status(error: BaseException) -> str:
    """The status of a cell that ``error`` ended."""
    if isinstance(error, HalfFailed):  # what its half said, where that is a failure (never "ok": a cell that failed
        return error.status if error.status in FAILURES else "error"  # must not score the prefix it reached)
    return "out-of-memory" if out_of_memory(error) else "error"


FAILURES = ("error", "out-of-memory")  # the statuses an error that ends a cell may give it
