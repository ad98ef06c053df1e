"""Conditions computed on the device and read together: one host-device synchronisation per edge batch.

On a GPU every read of a value (``.item()``, ``bool(t)``, ``torch.equal``, a copy to the host) waits for the queue
to drain. The protocol's checks of a batch (the edge parameters' seal, the upload indices, finite logits, and the
cloud's downloads and answers of the batch before) are therefore flags computed where the data is and read in one
transfer; the first flag that is set raises its error, in the order the checks were added.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class Checks:
    """Flags (0-dim boolean tensors, True meaning a problem) and the error each one stands for."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, Callable[[], BaseException]]] = []

    def add(self, flag: torch.Tensor, error: Callable[[], BaseException]) -> None:
        """Check ``flag`` at the next :meth:`read`; ``error()`` makes the exception to raise when it is set."""
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
        values = [False] * len(pending)
        for positions in by_device.values():
            flags = torch.stack([pending[i][0].reshape(()).to(torch.bool) for i in positions])
            for i, bad in zip(positions, flags.tolist()):
                values[i] = bad
        for (_, error), bad in zip(pending, values):
            if bad:
                raise error()
