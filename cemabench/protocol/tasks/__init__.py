"""The tasks of the protocol, one module each. A dataset declares its task (``DatasetSource.task``) and a method the
tasks it supports (``Method.tasks``); the task defines what the edge predicts, what an answer costs on the link and
how a domain's stream is scored:

- :mod:`.classification`: logits, answered by logits rows, scored by top-1 accuracy;
- :mod:`.detection`: boxes, scores and labels per image, answered in a packed wire format, scored by COCO mAP.

The online loop (:mod:`cemabench.protocol.loop`) calls a task's five hooks and knows no task itself; a further task
(semantic segmentation, say) is one more module with the same hooks.
"""
from __future__ import annotations

import torch

from cemabench.errors import UserError
from cemabench.protocol.tasks.base import Task
from cemabench.protocol.tasks.classification import Classification
from cemabench.protocol.tasks.detection import Detection

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Detection)}


def task_for(name: str, num_classes: int, scored_classes: torch.Tensor | None = None) -> Task:
    """The task ``name`` for a dataset of ``num_classes`` classes (categories)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name](num_classes, scored_classes)


__all__ = ["TASKS", "Classification", "Detection", "Task", "task_for"]
