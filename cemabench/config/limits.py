"""Bounds on one run unit: its wall-clock time and its process's memory. They do not change what a unit computes,
so they are no part of its key; a unit that exceeds one ends with status ``timeout`` or ``out-of-memory`` and a note,
and the rest of the table completes. A later run recomputes it (a failed record is never reused)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from cemabench.errors import UserError

_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_BYTES = {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


@dataclass(frozen=True)
class Limits:
    unit_timeout_s: float | None = None  # wall-clock seconds from the unit's start in its worker
    unit_memory_bytes: int | None = None  # the worker process's data memory (RLIMIT_DATA), torch's own included

    @property
    def any(self) -> bool:
        return self.unit_timeout_s is not None or self.unit_memory_bytes is not None

    def over(self, other: Limits) -> Limits:
        """These limits, with ``other``'s where these set none (the command line over the spec)."""
        return Limits(self.unit_timeout_s if self.unit_timeout_s is not None else other.unit_timeout_s,
                      self.unit_memory_bytes if self.unit_memory_bytes is not None else other.unit_memory_bytes)


NO_LIMITS = Limits()


def duration(value, where: str) -> float:
    """Seconds from a number or a string such as ``90``, ``90s``, ``30m``, ``2h`` or ``1d``; positive."""
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h|d)?", text)
    if isinstance(value, bool) or not match or float(match.group(1)) <= 0:
        raise UserError(f"{where} must be a positive duration such as 90, 90s, 30m or 2h, got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2) or ""]


def size(value, where: str) -> int:
    """Bytes from a string with a binary unit such as ``512M``, ``16G`` or ``16GiB``; positive."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt])(?:i?b)?", str(value).strip().lower())
    if isinstance(value, bool) or not match or float(match.group(1)) <= 0:
        raise UserError(f"{where} must be a positive size with its unit, such as 512M, 16G or 1T (binary units), "
                        f"got {value!r}")
    return int(float(match.group(1)) * _BYTES[match.group(2)])


def parse_limits(table: dict, where: str) -> Limits:
    """A spec's ``[limits]`` table: ``unit_timeout`` (a duration) and ``unit_memory`` (a size)."""
    extra = sorted(set(table) - {"unit_timeout", "unit_memory"})
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; valid: unit_memory, unit_timeout")
    return Limits(None if "unit_timeout" not in table else duration(table["unit_timeout"], f"{where} unit_timeout"),
                  None if "unit_memory" not in table else size(table["unit_memory"], f"{where} unit_memory"))
