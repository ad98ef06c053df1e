"""Errors that the CLI reports as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class ForwardOnlyViolation(RuntimeError):
    """A method tried to train or edit the edge model outside a download from the cloud."""
