"""The per-cell metrics a table document holds and ``check`` compares, and the names that changed.

``check`` holds a metric to a tolerance in percentage points, so the metrics it compares are percentages: online
top-1 accuracy, the percentage of samples uploaded, and detection's COCO scores. A name that changed is an error
that names its new one wherever a person writes it (a spec's ``[check] metrics``, ``compare(metrics=...)``); a
document written under the old name is upgraded, by its schema, in :mod:`cemabench.run.document`.
"""
from __future__ import annotations

from cemabench.config import TASK_METRICS
from cemabench.errors import UserError

ACCURACY = "accuracy"
UPLOAD_PERCENT = "upload_percent"  # samples uploaded, in percent of samples seen (0 to 100)
CHECKABLE = (ACCURACY, UPLOAD_PERCENT, *TASK_METRICS)
DEFAULT_CHECK = (ACCURACY, UPLOAD_PERCENT)  # what `check` compares when a document names nothing

# old name -> (new name, the table-document schema that renamed it, why)
RENAMED = {"upload_ratio": (UPLOAD_PERCENT, 3, "it holds a percentage of samples (0 to 100), not a ratio")}


def check_metrics(metrics, where: str) -> tuple[str, ...]:
    """``metrics`` as a tuple of checkable metric names, or one line naming the first that is not one (an old name
    with its new one: no name stands in for another)."""
    if not isinstance(metrics, (list, tuple)) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{where}: metrics must be a non-empty list of metric names, got {metrics!r}")
    for metric in metrics:
        if metric in RENAMED:
            new, schema, why = RENAMED[metric]
            raise UserError(f"{where}: the metric {metric!r} is now called {new!r} ({why}; renamed in table "
                            f"documents of schema {schema}): write {new!r}")
        if metric not in CHECKABLE:
            raise UserError(f"{where}: unknown metric {metric!r}; check compares percentages: "
                            f"{', '.join(CHECKABLE)}")
    if len(set(metrics)) != len(metrics):
        raise UserError(f"{where}: metrics names a metric twice: {', '.join(metrics)}")
    return tuple(metrics)
