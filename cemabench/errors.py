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
