"""What the online loop asks of a task (:class:`Task`); the tasks themselves are the sibling modules."""
from __future__ import annotations

from typing import Any

import torch

from cemabench.method import EdgeDecision, Upload
from cemabench.protocol.checks import Checks
from cemabench.protocol.link import Link
from cemabench.protocol.scoring import DomainResult
from cemabench.protocol.stream import Block


class Task:
    """What the loop asks of a task, per batch and per block. ``num_classes``: the dataset's classes (categories)."""

    name: str = ""

    def __init__(self, num_classes: int, scored_classes: torch.Tensor | None = None):
        self.num_classes, self.scored_classes = num_classes, scored_classes
        self.predictions = None  # (device, result, rows) -> None: where a task that exports predictions sends them

    def check(self, decision: EdgeDecision, batch: int) -> None:
        """Raise ValueError when the decision's prediction is not this task's, for a batch of ``batch`` samples."""
        raise NotImplementedError

    def own(self, decision: EdgeDecision, checks: Checks, batch_index: int) -> Any:
        """The edge's own prediction for the batch, as the harness keeps it (None when it awaits every answer)."""
        raise NotImplementedError

    def answered(self, own: Any, batch: int, upload: Upload, answers: Any, link: Link, batch_index: int,
                 checks: Checks) -> Any:
        """The prediction once the cloud's answers for the uploaded samples replace the edge's own; the link
        charges the answers' bytes, and late ones do not count."""
        raise NotImplementedError

    def record(self, prediction: Any, batch: int) -> Any:
        """What is recorded at arrival for the batch (on its device: no synchronisation)."""
        raise NotImplementedError

    def score(self, result: DomainResult, block: Block, records: list) -> None:
        """Score a block's records against its ground truth, read from storage only now."""
        raise NotImplementedError
