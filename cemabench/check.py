"""Compare a table's numbers with expected ones, within a tolerance in percentage points."""
from __future__ import annotations

import json
from pathlib import Path

from cemabench.errors import UserError


def load_document(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; `cemabench reproduce TABLE --out DIR` writes DIR/TABLE.json")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(doc, dict) or "cells" not in doc:
        raise UserError(f"{path} is not a cemabench table document (it has no 'cells')")
    return doc


def compare(result: dict, expected: dict, tolerance: float | None = None,
            metrics: list[str] | None = None) -> tuple[list[dict], int]:
    """Every expected number that the result misses or misses by more than the tolerance; and how many were checked."""
    tolerance = expected.get("check", {}).get("tolerance", 0.5) if tolerance is None else tolerance
    metrics = metrics or expected.get("check", {}).get("metrics", ["accuracy", "upload_ratio"])
    problems = []
    miniature = (result["provenance"]["miniature"], expected["provenance"]["miniature"])
    if miniature[0] != miniature[1]:
        problems.append({"cell": "(table)", "metric": "dataset", "expected": _kind(miniature[1]),
                         "got": _kind(miniature[0]), "difference": "different data"})
    got = {(c["method"], c["domain"], c["seed"]): c for c in result["cells"]}
    checked = 0
    for cell in expected["cells"]:
        key = (cell["method"], cell["domain"], cell["seed"])
        name = f"{key[0]} / {key[1]} / seed {key[2]}"
        other = got.pop(key, None)
        if other is None:
            problems.append({"cell": name, "metric": "(cell)", "expected": "present", "got": "missing",
                             "difference": "-"})
            continue
        if other["status"] != cell["status"]:
            problems.append({"cell": name, "metric": "status", "expected": cell["status"], "got": other["status"],
                             "difference": other["message"].splitlines()[0] if other["message"] else "-"})
            continue
        for metric in metrics:
            a, b = cell.get(metric), other.get(metric)
            checked += 1
            if a is None and b is None:
                continue
            if a is None or b is None or abs(a - b) > tolerance:
                problems.append({"cell": name, "metric": metric, "expected": a, "got": b,
                                 "difference": None if a is None or b is None else round(b - a, 3)})
    for key in got:
        problems.append({"cell": f"{key[0]} / {key[1]} / seed {key[2]}", "metric": "(cell)", "expected": "absent",
                         "got": "unexpected", "difference": "-"})
    return problems, checked


def _kind(miniature: bool) -> str:
    return "embedded miniature" if miniature else "real data"
