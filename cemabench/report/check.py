"""Compare a table's numbers with expected ones, within a tolerance in percentage points.

What is compared, per (method, domain) of the expected document:

* the cells of every seed must be present in the result (and the result may have no cell the expected one lacks),
  and both documents must have run the same seeds;
* each seed's status must be the same (``ok``, ``diverged``, ...);
* for every checked metric (the expected document's ``check.metrics``, by default accuracy and upload_percent), the
  **mean over seeds** of the result must be within the tolerance of the mean over seeds of the expected document
  (with one seed, that seed's value). A metric that is null on both sides (e.g. the accuracy of a failed cell) is
  skipped; null on one side only is a problem. When the expected document has several seeds, each problem also
  shows the expected sample standard deviation (ddof=1) across seeds, to judge the difference against.

Both documents are read as documents of today's schema: one written by an earlier cemabench is upgraded first
(:func:`cemabench.run.document.current`), so a committed or archived result is checked as it was written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from cemabench.config import DEFAULT_TOLERANCE
from cemabench.errors import UserError
from cemabench.run.document import current
from cemabench.tables.metrics import DEFAULT_CHECK, check_metrics


def check_tolerance(tolerance, where: str = "--tol") -> float:
    """A tolerance is a finite number of percentage points, >= 0."""
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance)
            or tolerance < 0):
        raise UserError(f"{where} must be a finite number of percentage points >= 0, got {tolerance!r}")
    return float(tolerance)


def _number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def validate_document(doc, path) -> dict:
    """The parts of a table document that ``check`` reads, with one line naming the first thing that is wrong."""
    def wrong(problem: str) -> UserError:
        return UserError(f"{path} is not a cemabench table document: {problem}")

    if not isinstance(doc, dict):
        raise wrong(f"the top level is a {type(doc).__name__}, not an object")
    doc = current(doc, str(path))
    if not isinstance(doc.get("provenance"), dict) or not isinstance(doc["provenance"].get("miniature"), bool):
        raise wrong("it has no 'provenance' object with a true/false 'miniature' (`cemabench reproduce` writes one)")
    if not isinstance(doc.get("cells"), list):
        raise wrong("it has no 'cells' list")
    check = doc.get("check", {})
    if not isinstance(check, dict):
        raise wrong("'check' is not an object")
    if "tolerance" in check:
        check_tolerance(check["tolerance"], f"{path}: check.tolerance")
    metrics = check_metrics(check.get("metrics", list(DEFAULT_CHECK)), f"{path}: check")
    for i, cell in enumerate(doc["cells"]):
        if not isinstance(cell, dict):
            raise wrong(f"cell #{i + 1} is not an object")
        for key, kind in (("method", str), ("domain", str), ("status", str)):
            if not isinstance(cell.get(key), kind):
                raise wrong(f"cell #{i + 1} has no {kind.__name__} {key!r} (got {cell.get(key)!r})")
        if not isinstance(cell.get("seed"), int) or isinstance(cell["seed"], bool):
            raise wrong(f"cell #{i + 1} has no integer 'seed' (got {cell.get('seed')!r})")
        if not isinstance(cell.get("message", ""), str):
            raise wrong(f"cell #{i + 1} has a 'message' that is not text")
        for metric in {*DEFAULT_CHECK, *metrics}:
            if not _number(cell.get(metric)):
                raise wrong(f"cell #{i + 1} ({cell['method']} / {cell['domain']}) has {metric} = "
                            f"{cell[metric]!r}, not a number")
    return doc


def load_document(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; `cemabench reproduce TABLE --out DIR` writes DIR/TABLE.json")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    return validate_document(doc, path)


def _by_pair(doc: dict) -> dict[tuple, dict[int, dict]]:
    """(method, domain) -> seed -> cell, in the document's order; (method, domain, device) where several edge
    devices yield a cell for one domain."""
    pairs: dict[tuple, dict[int, dict]] = {}
    for cell in doc["cells"]:
        device = cell.get("device", 0)
        pairs.setdefault((cell["method"], cell["domain"], *((device,) if device else ())), {})[cell["seed"]] = cell
    return pairs


def _measures(expected: dict, result: dict) -> dict[str, tuple]:
    """What a table measures, where both documents record it: its severity, stream setting and models. A difference
    is named first, before the hundreds of numbers it moves (a severity-3 table against a severity-5 one)."""
    def read(doc: dict) -> dict:
        p = doc.get("provenance", {})
        return {"severity": p.get("severity"), "setting": p.get("protocol", {}).get("setting"),
                "models": {k: v.get("name") for k, v in p.get("models", {}).items()} or None}

    want, have = read(expected), read(result)
    return {k: (want[k], have[k]) for k in want if want[k] is not None and have[k] is not None}


def _seeds(doc: dict) -> list[int]:
    return sorted({c["seed"] for c in doc["cells"]})


def compare(result: dict, expected: dict, tolerance: float | None = None,
            metrics: list[str] | None = None) -> tuple[list[dict], int]:
    """Every expected number that the result misses or misses by more than the tolerance (see the module docstring),
    and how many (method, domain, metric) means were checked."""
    result, expected = current(result, "the result"), current(expected, "the expected document")
    if tolerance is None:
        tolerance = expected.get("check", {}).get("tolerance", DEFAULT_TOLERANCE)
    tolerance = check_tolerance(tolerance)
    metrics = check_metrics(metrics or expected.get("check", {}).get("metrics", list(DEFAULT_CHECK)), "check")
    several = len(_seeds(expected)) > 1
    problems = []

    def problem(cell: str, metric: str, want, got, difference, std=None) -> None:
        problems.append({"cell": cell, "metric": metric, "expected": want, "got": got, "difference": difference,
                         **({"expected std (ddof=1)": std} if several else {})})

    miniature = (result["provenance"]["miniature"], expected["provenance"]["miniature"])
    if miniature[0] != miniature[1]:
        problem("(table)", "dataset", _kind(miniature[1]), _kind(miniature[0]), "different data")
    for what, (want, have) in _measures(expected, result).items():
        if want != have:
            problem("(table)", what, want, have, "the two tables measure different things")
    if _seeds(result) != _seeds(expected):
        problem("(table)", "seeds", _seeds(expected), _seeds(result), "different seeds: means are not comparable")
    got = _by_pair(result)
    checked = 0
    for pair, want in _by_pair(expected).items():
        method, domain = pair[0], " / device ".join(map(str, pair[1:]))
        name = f"{method} / {domain}" + ("" if several else f" / seed {next(iter(want))}")
        other = got.pop(pair, {})
        missing = sorted(set(want) - set(other))
        extra = sorted(set(other) - set(want))
        for seed in missing:
            problem(f"{method} / {domain} / seed {seed}", "(cell)", "present", "missing", "-")
        for seed in extra:
            problem(f"{method} / {domain} / seed {seed}", "(cell)", "absent", "unexpected", "-")
        if missing or extra:
            continue
        statuses = [(seed, want[seed], other[seed]) for seed in want if want[seed]["status"] != other[seed]["status"]]
        for seed, a, b in statuses:
            problem(f"{method} / {domain} / seed {seed}", "status", a["status"], b["status"],
                    b["message"].splitlines()[0] if b.get("message") else "-")
        if statuses:
            continue
        for metric in metrics:
            a = [want[s].get(metric) for s in sorted(want)]
            b = [other[s].get(metric) for s in sorted(want)]
            checked += 1
            if all(v is None for v in a) and all(v is None for v in b):
                continue
            std = round(pd.Series(a, dtype=float).std(ddof=1), 3) if several and None not in a else None
            if None in a or None in b:
                problem(name, metric, _mean(a), _mean(b), None, std)
                continue
            mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
            if abs(mean_a - mean_b) > tolerance:
                problem(name, metric, round(mean_a, 3), round(mean_b, 3), round(mean_b - mean_a, 3), std)
    for pair, cells in got.items():
        for seed in cells:
            problem(f"{pair[0]} / {' / device '.join(map(str, pair[1:]))} / seed {seed}", "(cell)", "absent",
                    "unexpected", "-")
    return problems, checked


def _mean(values: list) -> float | None:
    return None if None in values else round(sum(values) / len(values), 3)


def _kind(miniature: bool) -> str:
    return "embedded miniature" if miniature else "real data"
