"""The oracle annotator of active test-time adaptation: labels of chosen uploaded samples, within a budget, to the
cloud only.

Under a protocol that grants a label budget (``label_budget`` per edge batch, ``label_budget_total`` per run unit;
each per device), the loop asks the cloud half which rows of the batch's upload it wants labelled
(``CloudLogic.labels_wanted``) before its step. The request is read here into plain integers and checked: rows of
this upload only, each once, in increasing order, within what is left of both budgets. The labels of exactly those
samples are then read from storage (:meth:`cemabench.protocol.stream.Block.labels_at`), handed to the cloud's step in
``upload.labels``, and counted in the cell (``labels_used``). No other label is read, and the whole label array read
from storage is dropped before method code runs again.
"""
from __future__ import annotations

import numpy as np
import torch

from cemabench.config import Protocol
from cemabench.method import Upload
from cemabench.protocol.plain import PLAIN_TYPES, plain
from cemabench.protocol.stream import Block

_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class LabelRequestRefused(ValueError):
    """The cloud asked the annotator for labels it may not have: beyond a budget, or of samples it was not sent."""


def asked_rows(wanted, uploaded: int) -> torch.Tensor:
    """``labels_wanted``'s rows as a plain copy of at most ``uploaded + 1`` of them: a longer request cannot be valid
    (no more than ``uploaded`` distinct rows exist), so it is neither copied whole nor, isolated, sent across."""
    if type(wanted) in PLAIN_TYPES and wanted.layout is torch.strided and not wanted.is_nested and wanted.dim() == 1:
        wanted = wanted[:uploaded + 1]
    return plain(wanted, "labels_wanted's rows")


class Annotator:
    """One device's annotator in a run unit: its budgets, and the labels it delivered so far."""

    def __init__(self, protocol: Protocol, method: str, task: str = "classification"):
        self.per_batch, self.total, self.method = protocol.label_budget, protocol.label_budget_total, method
        self.on, self.task = protocol.annotation, task
        self.used = 0

    def rows(self, wanted, uploaded: int, batch_index: int) -> np.ndarray:
        """The rows of an upload of ``uploaded`` samples that ``labels_wanted`` returned, as int64, checked; a request
        the budget or the upload does not allow is a :class:`LabelRequestRefused` naming the method."""
        if wanted is None:
            return np.empty(0, dtype=np.int64)
        rows = asked_rows(wanted, uploaded)
        who = f"method {self.method} asked the annotator at batch {batch_index}"
        if self.task != "classification" and rows.numel():
            raise LabelRequestRefused(f"{who} for labels, and a {self.task} dataset has no class label per sample to "
                                      f"give: the annotator labels classification samples only")
        if rows.dtype not in _INTEGERS or rows.dim() != 1:
            raise LabelRequestRefused(f"{who} with a {rows.dtype} tensor of shape {tuple(rows.shape)}: labels_wanted "
                                      f"returns a 1-D integer tensor of rows of the upload, or None")
        rows = rows.cpu().numpy().astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= uploaded):
            raise LabelRequestRefused(f"{who} for row {int(rows.max() if rows.max() >= uploaded else rows.min())} "
                                      f"of an upload of {uploaded} samples: only uploaded samples can be labelled")
        if len(rows) > 1 and not (np.diff(rows) > 0).all():
            raise LabelRequestRefused(f"{who} for rows that are not strictly increasing: ask for each row once, in "
                                      f"increasing order")
        if self.per_batch is not None and len(rows) > self.per_batch:
            raise LabelRequestRefused(f"{who} for {len(rows)} labels, beyond its budget of label_budget = "
                                      f"{self.per_batch} per batch")
        if self.total is not None and self.used + len(rows) > self.total:
            raise LabelRequestRefused(f"{who} for {len(rows)} labels with {self.total - self.used} left of its budget "
                                      f"of label_budget_total = {self.total} per run unit")
        return rows

    def annotate(self, upload: Upload, rows: np.ndarray, index: torch.Tensor, block: Block, block_offset: int) -> int:
        """Give ``upload`` the labels of ``rows`` of ``index`` (the upload's index as the link sent it, a copy method
        code never held: ``labels_wanted`` may write into the upload's own); ``block_offset``: where the batch starts
        in ``block``. Returns how many were delivered."""
        batch_positions = index.cpu().numpy()[rows] if len(rows) else np.empty(0, dtype=np.int64)
        labels = block.labels_at(block_offset + batch_positions)
        upload.labelled = torch.from_numpy(rows.copy())
        upload.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(upload.samples.device)
        self.used += len(rows)
        return len(rows)
