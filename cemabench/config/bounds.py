"""Declared bounds of a value: the one check behind protocol fields and method options.

A protocol field declares its bounds in its :class:`~cemabench.config.fields.Rule`; a method's ``Options`` field
declares them with :func:`cemabench.method.option`. Either way a bad value is refused before any compute, with a
sentence that says what the value must be (:meth:`Bounds.phrase`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def coerce(value, kind: type):
    """``value`` as a ``kind`` (``int``, ``float``, ``str``, ``bool`` or ``NoneType``), or a ValueError: a bool is not a
    number, an int is a float when a float is wanted (and one too large for a float is refused), and an int is its
    digits when a str is wanted (a stage named ``1``, as ``--option cloud_stage=1`` reads it)."""
    if kind is type(None):
        if value is None:
            return None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                pass
    elif kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{value!r} is not a {kind.__name__}")


@dataclass(frozen=True)
class Bounds:
    """``low`` and ``high`` are inclusive unless ``above`` / ``below`` make them strict; ``choices`` lists the only
    values allowed (for a tuple-valued option: the values each item may take)."""

    low: float | None = None
    above: bool = False
    high: float | None = None
    below: bool = False
    choices: tuple = ()

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"bound {name} must be a finite number, got {value!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"bound low {self.low} is above high {self.high}")

    def admits(self, value) -> bool:
        """Whether ``value`` (already of the right type) lies within the bounds; a float must also be finite."""
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.above else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.below else value <= self.high)

    def phrase(self, kind: type) -> str:
        """What a value must be, e.g. 'a number > 0', 'an integer >= 1', 'a number >= 0 and < 1', 'one of a, b'."""
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        text = {int: "an integer", float: "a finite number", str: "a string"}.get(kind, "a value")
        limits = ([f"{'>' if self.above else '>='} {self.low:g}"] if self.low is not None else []) + \
                 ([f"{'<' if self.below else '<='} {self.high:g}"] if self.high is not None else [])
        if kind is float and limits:
            text = "a number"  # the limits say it is finite
        return " ".join([text, " and ".join(limits)]).strip()
