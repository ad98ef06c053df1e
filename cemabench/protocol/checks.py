"""Conditions computed on the device and read together: one host-device synchronisation per edge batch.

On a GPU every read of a value (``.item()``, ``bool(t)``, ``torch.equal``, a copy to the host) waits for the queue
to drain. The protocol's checks of a batch (the edge parameters' seal, the upload indices, finite logits, and the
cloud's downloads and answers of the batch before) are therefore flags computed where the data is and read in one
transfer; the first flag that is set raises its error, in the order the checks were added.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# device types whose values are read where Python runs, each check on its own: reading a CPU tensor stalls no queue.
# The flags on any other device are read together, in one transfer per device.
ON_HOST = ("cpu",)


class Checks:
    """Flags (boolean tensors, True meaning a problem) and the error each one stands for."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, Callable[[list[bool]], BaseException]]] = []

    def add(self, flag: torch.Tensor, error: Callable[[list[bool]], BaseException]) -> None:
        """Check ``flag`` (any shape) at the next :meth:`read`; when one of its elements is set, ``error`` gets the
        flag's values (a list, in order) and makes the exception to raise."""
        self._pending.append((flag, error))

    def __len__(self) -> int:
        return len(self._pending)

    def read(self) -> None:
        """Read every pending flag in one transfer per device (one synchronisation) and raise the first problem."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        by_device: dict[torch.device, list[int]] = {}
        for i, (flag, _) in enumerate(pending):
            by_device.setdefault(flag.device, []).append(i)
        values: list[list[bool]] = [[] for _ in pending]
        for device, positions in by_device.items():
            if device.type in ON_HOST:  # no queue to wait for: each flag read where it is, without a concatenation
                for i in positions:
                    values[i] = pending[i][0].reshape(-1).to(torch.bool).tolist()
                continue
            flat = torch.cat([pending[i][0].reshape(-1).to(torch.bool) for i in positions]).tolist()
            start = 0
            for i in positions:
                end = start + pending[i][0].numel()
                values[i] = flat[start:end]
                start = end
        for (_, error), bad in zip(pending, values):
            if any(bad):
                raise error(bad)
