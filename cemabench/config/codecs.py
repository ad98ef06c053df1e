"""The grammar of an input codec, torch-free: ``raw``, ``png``, ``jpeg:Q`` or ``webp:Q`` with a quality Q in 1-100.

The encoders themselves are in :mod:`cemabench.protocol.codecs`; a spec or a flag is checked here, before any compute.
"""
from __future__ import annotations

from cemabench.errors import UserError

INPUT_CODECS = ("raw", "png", "jpeg:Q", "webp:Q")  # as a user writes them; Q is a quality in 1-100
LOSSY = ("jpeg", "webp")


def parse_input_codec(text: str) -> tuple[str, int | None]:
    """``(name, quality)`` of an input codec (quality None for raw and png); a bad one is a one-line UserError that
    lists the valid forms."""
    name, colon, quality = str(text).partition(":")
    choices = f"one of {', '.join(INPUT_CODECS)} (Q: a quality, an integer 1-100)"
    if name in ("raw", "png"):
        if colon:
            raise UserError(f"input codec {text!r}: {name} takes no quality ({choices})")
        return name, None
    if name in LOSSY:
        if not colon:
            raise UserError(f"input codec {text!r} needs a quality: {name}:Q with Q an integer 1-100, e.g. {name}:75")
        if quality.isdigit() and 1 <= int(quality) <= 100 and str(int(quality)) == quality:
            return name, int(quality)
        raise UserError(f"input codec {text!r}: the quality must be an integer 1-100 (as in {name}:75), "
                        f"got {quality!r}")
    raise UserError(f"unknown input codec {text!r}: {choices}")
