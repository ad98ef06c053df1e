"""Runs a table spec unit by unit: plan (units and their dependencies), store (checked records, claims), executor
(inline, local processes or Ray). An interrupted run, or a second process into the same folder, resumes from or
shares the store; a code change recomputes what it affects."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from cemabench.config import with_link
from cemabench.config.limits import NO_LIMITS, Limits
from cemabench.config.settings import MIXED, parse_setting, severities_needed
from cemabench.errors import UserError
from cemabench.protocol import Execution, isolation, zygote
from cemabench.run.context import ContextSpec, TableContext, context_for, forget
from cemabench.run.document import DOC_SCHEMA, cell
from cemabench.run.executors import Executor, error_record, make_executor
from cemabench.run.store import ResultStore, failed
from cemabench.tables.plan import Task, Unit, UnitId, check_models, check_options, entry_options, plan
from cemabench.tables.spec import TableSpec, published_uploads
from cemabench.tables.sweep import Sweep, expand, point_label

POLL_S = 0.5  # how often to look at units another process is computing


def default_jobs() -> int:
    """Both cores of a small machine by default (at most 2: more processes than that rarely pay on a CPU)."""
    return max(1, min(2, os.cpu_count() or 1))


def store_for(out: Path, spec: TableSpec) -> ResultStore:
    return ResultStore(Path(out) / "cells" / spec.name)


def prepare(spec: TableSpec, data_root: str | None, execution: Execution = Execution(),
            models: dict[str, str] | None = None, dataset_options: dict | None = None, pair: str | None = None,
            weights: str | None = None, predictions: str | None = None, isolate: bool = False,
            memory: int | None = None) -> tuple[ContextSpec, TableContext]:
    """The context recipe and this process's context, with data, models and options checked before any compute;
    ``memory``: a unit's data-size limit, which the planners run under too (isolated)."""
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a directory; point it at the folder that holds "
                        f"the dataset, or leave it out to run the embedded miniature")
    if weights is not None and not Path(weights).is_dir():
        raise UserError(f"the weights folder {weights} (--weights) is not a directory")
    recipe = ContextSpec(spec, data_root, execution, models, dataset_options, pair, weights, predictions, isolate)
    context = context_for(recipe)
    context.memory = memory
    kept = zygote.withheld() if isolate else []
    if kept:
        names = "s or values say they hold credentials" if len(kept) > 1 else " or value says it holds a credential"
        isolation.warn(f"the halves do not get the environment variable{'s' if len(kept) > 1 else ''} "
                       f"{', '.join(kept)}, whose name{names}")
    if predictions is not None and context.dataset.task != "detection":
        raise UserError(f"--save-predictions writes detections in COCO's results format; {context.dataset.name} is a "
                        f"{context.dataset.task} dataset")
    check_options(spec, context.choice, context.planner)
    base, modifiers = parse_setting(spec.protocol.setting)
    if context.dataset.task != "classification" and (base in ("gradual", MIXED) or spec.protocol.rounds > 1
                                                     or "correlated" in modifiers):
        raise UserError(f"the {context.dataset.task} task scores each domain over one stretch of its stream, and has "
                        f"no class label per sample to order it by; setting {spec.protocol.setting!r} with rounds = "
                        f"{spec.protocol.rounds} needs one of those: use per-domain, or continual with one round")
    for entry in spec.methods:  # a method on a task it does not declare, or options for another task: one line
        context.planner.check(entry.name, entry_options(entry, context.choice), with_link(spec.protocol, entry.link),
                              context.dataset.task, entry.match_uploads_of is not None)
    _ = context.provenance  # builds dataset and models up front, so that data and model errors come before any run
    context.check_classes()
    context.check_stream()
    check_models(spec, context.choice, context.prototypes["edge"], context.prototypes["foundation"],
                 context.dataset.task, context.planner, context.dataset.clean_missing())
    if isolate:  # what a planner says of its method (paper, reference point, code) is checked before any compute too
        for entry in spec.methods:
            context.about(entry.name)
    for severity in severities_needed(spec.protocol.setting):  # the gradual setting's other severities, likewise
        context.dataset_at(severity)
    return recipe, context


class Scheduler:
    """Runs tasks through an executor in dependency order; each unit is taken from the store when a valid ok record
    is there, computed when this process claims it, or waited for while another live process computes it."""

    def __init__(self, context: TableContext, store: ResultStore, executor: Executor, bar):
        self.context, self.store, self.executor, self.bar = context, store, executor, bar
        self.records: dict[UnitId, dict] = {}
        self.units: dict[UnitId, Unit] = {}
        self.keys: dict[UnitId, str] = {}
        self.queue: list[Unit] = []  # to claim and submit when the executor has a free slot
        self.waiting: set[UnitId] = set()
        self.running: set[UnitId] = set()
        self.before: dict[UnitId, int | None] = {}  # a waited-for unit's file when the wait began
        self.first: dict[tuple, UnitId] = {}  # per group of units that may share a training stage, the first submitted

    def _finish(self, unit: Unit, record: dict, store: bool = True) -> None:
        if store:
            record = self.store.put(self.keys[unit.id], record)
            self.store.release(self.keys[unit.id])
        self.records[unit.id] = record
        self.running.discard(unit.id)
        self.waiting.discard(unit.id)
        self.bar.update(1)

    def _start(self, task: Task) -> None:
        refs = [self.records[n] for n in task.needs]
        bad = [n for n, r in zip(task.needs, refs) if failed(r)]
        try:
            unit = task.resolve(refs, self.context.planner) if not bad else None
        except UserError as error:
            unit, bad = None, [f"options could not be derived: {error}"]
        if unit is None:
            unit = Unit(task.label, task.method, task.options, task.seed, task.domains, link=task.link)
            why = "; ".join(x if isinstance(x, str) else f"reference unit {x[0]} / seed {x[1]} failed" for x in bad)
            self.units[unit.id] = unit
            self._finish(unit, error_record(unit, why), store=False)
            return
        self.units[unit.id] = unit
        self.keys[unit.id] = key = self.context.unit_key(unit)
        record = self.store.get(key, unit.expected)
        if self._reusable(unit, record):
            self._finish(unit, record, store=False)
        else:
            self.queue.append(unit)

    def _reusable(self, unit: Unit, record: dict | None) -> bool:
        """A stored record stands for its unit when it is ok, was computed isolated where this run is (``--isolate``
        trusts no record computed in the process that ran method code), and, where predictions are to be saved, its
        files are there (else the unit runs again to write them)."""
        if record is None or failed(record):
            return False
        if self.context.isolate and record.get("isolated") is not True:  # computed beside method code: not trusted
            return False
        return self.context.predictions is None or all(f.is_file() for f in self.context.prediction_files(unit))

    def _fill(self) -> None:
        """Claim and submit queued units while the executor has free slots (claiming only what can run now leaves
        the rest to other processes sharing the store)."""
        while self.queue and self.executor.pending < self.executor.capacity:
            self._take(self._next())

    @staticmethod
    def _group(unit: Unit) -> tuple[str, int]:
        """The units that may share one offline training stage, if their method has one: its key is the method, the
        options that training reads and the seed (with the table's data and models). Entries of one method that
        differ only in online options (ECC-I at two thresholds) share it, and this process cannot tell the options
        apart without importing the method, so a group is a method and a seed."""
        return unit.method, unit.seed

    def _next(self) -> Unit:
        """The first queued unit that would not wait for a running one: while the first unit of a group runs (and
        trains its method, where the method has a training stage, under the artefact cache's lock), the others of
        the group would only wait on that lock, so units of other groups go first where there are any. Only the
        order changes: every unit's numbers depend on its own seed alone."""
        for i, unit in enumerate(self.queue):
            first = self.first.setdefault(self._group(unit), unit.id)
            if first == unit.id or first not in self.running:
                return self.queue.pop(i)
        return self.queue.pop(0)

    def _take(self, unit: Unit) -> None:
        key = self.keys[unit.id]
        if self.store.claim(key):
            record, _ = self.store.problem(key, unit.expected)  # finished by another process since we looked?
            if self._reusable(unit, record):
                self.store.release(key)
                self._finish(unit, record, store=False)
                return
            self.waiting.discard(unit.id)
            self.running.add(unit.id)
            self.bar.set_postfix_str(f"{unit.label} / {','.join(unit.domains)[:30]} / seed {unit.seed}")
            self.executor.submit(unit)
        elif unit.id not in self.waiting:
            self.waiting.add(unit.id)
            self.before[unit.id] = self._mtime(key)

    def _mtime(self, key: str) -> int | None:
        try:
            return self.store.path(key).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _poll_waiting(self) -> None:
        for uid in list(self.waiting):
            unit, key = self.units[uid], self.keys[uid]
            if self.store.live_owner(key) is not None:
                continue
            record, _ = self.store.problem(key, unit.expected)
            fresh = record is not None and (not failed(record) or self._mtime(key) != self.before[uid])
            self.waiting.discard(uid)
            if fresh:
                self._finish(unit, record, store=False)  # the other process's result, failed or not
            else:
                self.queue.append(unit)  # its owner died or gave up: this process takes it over

    def run(self, tasks: list[Task]) -> dict[UnitId, dict]:
        todo = list(tasks)
        try:
            while todo or self.queue or self.executor.pending or self.waiting:
                ready = [t for t in todo if all(n in self.records for n in t.needs)]
                if todo and not ready and not self.queue and not self.executor.pending and not self.waiting:
                    raise RuntimeError(f"units wait on units that are not planned: {[t.id for t in todo]}")
                for task in ready:
                    todo.remove(task)
                    self._start(task)
                self._fill()
                if self.executor.pending:
                    for unit, record in self.executor.completed(timeout=POLL_S if self.waiting else None):
                        self._finish(unit, record)
                elif self.waiting:
                    time.sleep(POLL_S)
                if self.waiting:
                    self._poll_waiting()
        finally:
            for uid in self.running:
                self.store.release(self.keys[uid])
        return self.records


def reproduce(spec: TableSpec, data_root: str | None, out: Path, seeds: tuple[int, ...] | None = None,
              jobs: int | None = None, execution: Execution = Execution(), progress: bool = True,
              models: dict[str, str] | None = None, dataset_options: dict | None = None,
              pair: str | None = None, executor: str = "local", address: str | None = None,
              weights: str | None = None, limits: Limits = NO_LIMITS, predictions: str | None = None,
              isolate: bool = False) -> dict:
    """Run (or resume) every unit of a table and return the table's JSON document. ``pair`` picks one of the spec's
    named model pairs; ``models`` (edge, foundation) and ``dataset_options`` override the spec's choices; ``jobs``
    local processes (default: both cores) or ``executor="ray"`` (``address`` of a cluster) run the units, each
    within ``limits`` (over the spec's own). ``predictions``: a folder for each cell's predictions (detection),
    where a unit whose files are missing is computed again even when its record is stored. ``isolate``: each unit's
    edge and cloud halves run in processes of their own (:mod:`cemabench.protocol.isolation`); the numbers are the
    same, so a stored record serves either mode."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    limits = limits.over(spec.limits)
    recipe, context = prepare(spec, data_root, execution, models, dataset_options, pair, weights, predictions, isolate,
                              limits.unit_memory_bytes)
    seeds = tuple(seeds or spec.seeds)
    tasks = plan(spec, context.choice, seeds)
    store = store_for(out, spec)
    zygote.hide(out)  # the results folder, from the halves, wherever it lies
    if isolate:  # each unit's method asked of its planner here, once: the workers forked from here start no planner
        for task in tasks:
            if not task.needs:  # (options derived from other units are known when the unit runs)
                with contextlib.suppress(UserError):  # the unit itself fails with it, as it would have
                    context.facts(task.method, task.options, with_link(spec.protocol, task.link))
    desc = f"{spec.name} ({'miniature' if context.dataset.is_miniature else 'real data'})"
    try:
        with make_executor(recipe, executor, min(jobs, len(tasks)), address, limits) as pool, \
                tqdm(total=len(tasks), desc=desc, unit="cell", disable=not progress, file=sys.stderr) as bar:
            scheduler = Scheduler(context, store, pool, bar)
            records = scheduler.run(tasks)
        if predictions is not None:
            print(f"wrote predictions under {context.write_ground_truth()}/ (METHOD/seedN/DOMAIN.json, COCO's results "
                  f"format, boxes in the original images' pixels) and each domain's ground truth under its "
                  f"ground_truth/", file=sys.stderr)
    finally:
        forget(recipe)
    return table_document(spec, context, seeds, {scheduler.units[t.id]: records[t.id] for t in tasks})


def status(spec: TableSpec, data_root: str | None, out: Path, seeds: tuple[int, ...] | None = None,
           execution: Execution = Execution(), models: dict[str, str] | None = None,
           dataset_options: dict | None = None, pair: str | None = None, weights: str | None = None,
           isolate: bool = False) -> list[dict]:
    """Each unit of a table in ``out``: done, running (claimed by a live owner), failed (with its error's first
    line) or missing; the keys are those ``reproduce`` with the same arguments would use. ``isolate``: the methods'
    classes are asked in planner processes, as ``reproduce --isolate`` asks them (this process imports none)."""
    recipe, context = prepare(spec, data_root, execution, models, dataset_options, pair, weights, isolate=isolate,
                              memory=spec.limits.unit_memory_bytes)
    try:
        return _status_rows(spec, context, out, seeds)
    finally:
        forget(recipe)


def _status_rows(spec: TableSpec, context: TableContext, out: Path, seeds: tuple[int, ...] | None) -> list[dict]:
    store = ResultStore(store_for(out, spec).root, warn=lambda line: None)
    records: dict[UnitId, dict] = {}
    rows = []
    for task in plan(spec, context.choice, tuple(seeds or spec.seeds)):
        row = {"method": task.label, "seed": task.seed, "domains": ", ".join(task.domains)}
        refs = [records.get(n) for n in task.needs]
        if any(r is None or failed(r) for r in refs):
            rows.append({**row, "state": "missing", "detail": "waits on " + ", ".join(n[0] for n in task.needs),
                         "file": ""})
            continue
        try:
            unit = task.resolve(refs, context.planner)
        except UserError as error:
            rows.append({**row, "state": "failed", "detail": str(error), "file": ""})
            continue
        key = context.unit_key(unit)
        record, problem = store.problem(key, unit.expected)
        owner = store.live_owner(key)
        if owner is not None:
            state, detail = "running", f"pid {owner.get('pid')} on {owner.get('host')}"
        elif record is None:
            state, detail = "missing", f"unusable file: {problem}" if problem else ""
        elif failed(record):
            bad = next(r for r in record["results"] if r.get("status") != "ok")
            message = (bad.get("message") or "").strip()
            first = message.splitlines()[0] if message else ""
            state, detail = "failed", f"{bad['domain']}: {bad.get('status')}: {first}"
        elif context.isolate and record.get("isolated") is not True:  # as reproduce --isolate reads it
            state, detail = "missing", "computed in-process: --isolate computes it again"
        else:
            state, detail = "done", ""
        if record is not None and state == "done":
            records[task.id] = record
        rows.append({**row, "state": state, "detail": detail, "file": store.path(key).name})
    return rows


def table_document(spec: TableSpec, context: TableContext, seeds: tuple[int, ...], records: dict) -> dict:
    """The table's JSON document (schema :data:`cemabench.run.document.DOC_SCHEMA`; the store's records have their
    own, in :mod:`cemabench.run.context`)."""
    cells = [cell(unit.label, unit.seed, result) for unit, record in records.items() for result in record["results"]]
    order = {e.label: i for i, e in enumerate(spec.methods)}
    rank = {d: i for i, d in enumerate(spec.domains)}  # a result that is no single domain (mixed-domains) comes last
    cells.sort(key=lambda c: (order[c["method"]], c["seed"], rank.get(c["domain"], len(rank))))
    methods = []
    for entry in spec.methods:
        about = context.about(entry.name)
        methods.append({"label": entry.label, "name": entry.name, "paper": about["paper"],
                        # an entry with its own link (an input codec, say) is a variant, not the class's reference point
                        "reference": entry.reference or (None if entry.link else about["reference"]),
                        "options": entry_options(entry, context.choice), "match_uploads_of": entry.match_uploads_of,
                        **({"link": entry.link} if entry.link else {}),
                        "code": about["code"]})
    ran = context.choice.dataset  # what ran, and on a miniature the real dataset it stands in for (none on real data)
    stands_for = spec.real.dataset if context.dataset.is_miniature and spec.real.dataset != ran else None
    return {"schema": DOC_SCHEMA, "table": spec.name, "title": spec.title, "source": spec.source,
            "dataset": ran, "stands_for": stands_for, "seeds": list(seeds),
            "provenance": {**context.provenance, "device": context.execution.device},
            "reference": {**spec.reference, "published_uploads": published_uploads(spec)},
            "check": {"tolerance": spec.tolerance, "metrics": list(spec.check_metrics)},
            "methods": methods, "cells": cells,
            **({"report": spec.report} if spec.report else {}),  # what the leaderboard adds ([report])
            # every unit's method code ran apart from the loop (--isolate); absent when any ran in-process
            **({"isolated": True} if records and all(r.get("isolated") is True for r in records.values()) else {})}


def run_sweep(sweep: Sweep, data_root: str | None, out: Path, seeds: tuple[int, ...] | None = None, jobs: int = 1,
              progress: bool = True, **reproduce_options) -> dict:
    """Run (or resume, from the same results store) every severity of the sweep; the sweep's JSON document."""
    tables = {}
    for severity in sweep.severities:
        tables[str(severity)] = reproduce(expand(sweep, severity), data_root, out, seeds=seeds, jobs=jobs,
                                          progress=progress, **reproduce_options)
    points = ([{"label": sweep.method, "options": None}] if sweep.reference else []) + [
        {"label": point_label(sweep.method, p), "options": p} for p in sweep.points()]
    return {"sweep": sweep.name, "title": sweep.title, "method": sweep.method,
            "grid": {k: list(v) for k, v in sweep.grid.items()}, "fixed": sweep.fixed, "axis": sweep.axis,
            "severities": list(sweep.severities), "points": points, "tables": tables}
