"""The table document's schema: how a unit's stored results become the document's cells, and how a document written
by an earlier cemabench is read (:func:`current`, one step per schema version).

Schema 3 (this one) renamed two things. A cell's percentage of samples uploaded is ``upload_percent`` (it was
``upload_ratio``, although it runs from 0 to 100). The document names the dataset that ran (``dataset``) and, on an
embedded miniature, the real dataset it stands in for (``stands_for``; null on real data); it had ``real_dataset``,
which named the real dataset also on a miniature run.

The results store is not migrated: a stored unit record keeps the names its results were written with (its
``upload_ratio``), because the module that writes them, the protocol's scoring, is part of every unit's key; renaming
there would compute every stored unit again. :func:`cell` renames when the document is built. For the same reason
``cemabench.config.DEFAULT_METRICS`` keeps its old value and is no longer read (every unit's computation imports
``cemabench.config``); what ``check`` compares is in :mod:`cemabench.tables.metrics`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

from cemabench.errors import UserError
from cemabench.tables.metrics import RENAMED

DOC_SCHEMA = 3
OLDEST = 1  # the first documents; every document cemabench wrote names its schema


def _renamed_in(schema: int) -> dict[str, str]:
    return {old: new for old, (new, when, _) in RENAMED.items() if when == schema}


def cell(label: str, seed: int, result: dict) -> dict:
    """A document cell from one of a stored unit record's results: its row and seed, its metrics by today's names."""
    names = {old: new for old, (new, _, _) in RENAMED.items()}
    return {"method": label, "seed": seed, **{names.get(k, k): v for k, v in result.items()}}


def _ran(doc: dict, real: str | None) -> str | None:
    """The registered name of the dataset an older document ran: its real dataset on real data; on a miniature, the
    name its provenance gives before the parenthesis (``miniature-digits-c (EMBEDDED MINIATURE)``)."""
    provenance = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    if not provenance.get("miniature"):
        return real
    dataset = provenance.get("dataset")
    named = dataset.get("dataset") if isinstance(dataset, dict) else None
    return named.split(" (")[0] if isinstance(named, str) else real


def _to_3(doc: dict, where: str) -> dict:
    renamed = _renamed_in(3)
    for i, item in enumerate(doc.get("cells") or []):
        if not isinstance(item, dict):
            continue  # validation names it
        for old, new in renamed.items():
            if old in item and new in item:
                raise UserError(f"{where}: cell #{i + 1} has both {old!r} and {new!r}; a document of schema "
                                f"{doc.get('schema', OLDEST)} has only {old!r}")
            if old in item:
                item[new] = item.pop(old)
    check = doc.get("check")
    if isinstance(check, dict) and isinstance(check.get("metrics"), list):
        check["metrics"] = [renamed.get(m, m) for m in check["metrics"]]
    real = doc.pop("real_dataset", None)
    ran = _ran(doc, real)
    doc["dataset"] = ran
    doc["stands_for"] = real if real != ran else None
    return doc


# schema N: the step that turns a document of schema N - 1 (or older: 1 and 2 differ in nothing it touches) into one
# of schema N
STEPS: dict[int, Callable[[dict, str], dict]] = {3: _to_3}


def current(doc: dict, where: str = "the table document") -> dict:
    """``doc`` as a document of today's schema: itself when it is one; otherwise an upgraded copy (``doc`` is left as
    it is). A document without a schema is taken as one of the first. One line when the schema is not a number
    cemabench knows (a document from a newer cemabench)."""
    if not isinstance(doc, dict):
        return doc  # validation names what it is
    schema = doc.get("schema", OLDEST)
    if schema == DOC_SCHEMA:
        return doc
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < OLDEST:
        raise UserError(f"{where} is not a cemabench table document: its schema is {schema!r}, not a version number")
    if schema > DOC_SCHEMA:
        raise UserError(f"{where} is a table document of schema {schema}, written by a newer cemabench; this one "
                        f"reads schemas up to {DOC_SCHEMA}: upgrade cemabench to read it")
    doc = copy.deepcopy(doc)
    for step in range(schema + 1, DOC_SCHEMA + 1):
        if step in STEPS:
            doc = STEPS[step](doc, where)
        doc["schema"] = step
    return doc
