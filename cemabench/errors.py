"""Errors that the CLI reports as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class ForwardOnlyViolation(RuntimeError):
    """A method tried to train or edit the edge model outside a download from the cloud."""


class MeterBlind(RuntimeError):
    """Code under the C++ meter ran ops where it cannot see them whole (behind ``__torch_dispatch__``, or under a
    ``torch.func`` transform); the Python meter can (``CEMABENCH_METER=python``)."""
