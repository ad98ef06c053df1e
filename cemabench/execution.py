"""Where a run executes: checking a device name against what this machine has, before any compute."""
from __future__ import annotations

import torch

from cemabench.errors import UserError


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
