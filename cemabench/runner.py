"""Runs a table spec cell by cell, with a results store so that an interrupted run resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import cemabench
from cemabench import registry
from cemabench.errors import UserError
from cemabench.protocol import Execution, Models, run_unit, unit_groups
from cemabench.spec import DataChoice, MethodEntry, TableSpec, published_uploads

SCHEMA = 2


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's full state, so that changed weights never reuse a stored result."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    return {"cemabench": cemabench.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": metadata.version("torchvision"), "timm": metadata.version("timm"),
            "numpy": np.__version__, "platform": platform.platform()}


class ResultStore:
    """One JSON file per run unit, written atomically and named by the hash of the unit's full configuration."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if all(r["status"] == "ok" for r in record["results"]) else None

    def put(self, key: str, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, self.path(key))


@dataclass(frozen=True)
class Unit:
    """One run unit: a method entry, a seed and the domains it runs without reset."""

    label: str
    method: str
    options: tuple  # sorted (name, value) pairs
    seed: int
    domains: tuple[str, ...]


class TableContext:
    """Everything a unit needs, built lazily once per process: dataset, model prototypes, provenance."""

    def __init__(self, spec: TableSpec, data_root: str | None, execution: Execution = Execution(),
                 models: dict[str, str] | None = None, dataset_options: dict | None = None, pair: str | None = None):
        self.spec, self.data_root, self.execution = spec, data_root, execution
        choice = spec.real if data_root else spec.miniature
        if choice is None:
            raise UserError(f"table {spec.name} has no embedded-miniature version; pass --data-root")
        if pair is not None and pair not in choice.pairs:
            data = "the real data" if data_root else "the embedded miniature"
            raise UserError(f"table {spec.name} has no model pair {pair!r} on {data}; pairs: "
                            f"{', '.join(choice.pairs) or '(none)'} (or name models with --edge/--foundation)")
        self.pair = pair
        overrides = {**choice.pairs.get(pair, {}), **{k: v for k, v in (models or {}).items() if v}}
        self.choice: DataChoice = replace(choice, **overrides, options={**choice.options, **(dataset_options or {})})

    @cached_property
    def dataset(self):
        if self.choice.dataset not in registry.available("datasets"):
            raise UserError(f"table {self.spec.name} runs on the dataset {self.choice.dataset!r} when --data-root is "
                            f"given, and no installed plugin provides it (available: "
                            f"{', '.join(sorted(registry.available('datasets')))}); install one, or leave out "
                            f"--data-root to run the embedded miniature")
        factory = registry.load("datasets", self.choice.dataset)
        return factory(data_root=self.data_root, severity=self.spec.severity, domains=self.spec.domains,
                       **self.choice.options)

    @cached_property
    def prototypes(self) -> dict[str, torch.nn.Module]:
        return {"edge": registry.build_model(self.choice.edge), "foundation": registry.build_model(self.choice.foundation)}

    @cached_property
    def models(self) -> Models:
        return Models.copies_of(self.prototypes["edge"], self.prototypes["foundation"])

    @cached_property
    def provenance(self) -> dict:
        spec = self.spec
        return {
            "miniature": self.dataset.is_miniature,
            "dataset": self.dataset.provenance,
            "data_root": self.data_root,
            "models": {k: {"name": getattr(self.choice, k), "fingerprint": fingerprint(m)}
                       for k, m in self.prototypes.items()},
            "pair": self.pair,
            "protocol": asdict(spec.protocol),
            "severity": spec.severity,
            "domains": list(spec.domains),
            "dataset_options": self.choice.options,
            "execution": asdict(self.execution),
            "recorded": {**spec.recorded, **self.choice.recorded},
            "versions": versions(),
        }

    def unit_key(self, unit: Unit) -> str:
        p = self.provenance
        config = {"unit": asdict(unit), "dataset": p["dataset"], "models": p["models"], "protocol": p["protocol"],
                  "dataset_options": p["dataset_options"],
                  **{k: v for k, v in versions().items() if k in ("cemabench", "torch", "torchvision", "timm")},
                  "device": torch.device(self.execution.device).type,
                  "channels_last": self.execution.channels_last, "amp": self.execution.amp, "schema": SCHEMA}
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def run(self, unit: Unit) -> dict:
        method = registry.build_method(unit.method, dict(unit.options))
        domains = [d for d in self.dataset.domains if d.name in unit.domains]
        results = run_unit(method, domains, self.models, self.dataset.num_classes, self.dataset.clean,
                           self.spec.protocol, unit.seed, self.execution, self.dataset.scored_classes)
        return {"unit": asdict(unit), "results": [r.to_dict() for r in results]}


def _options(entry: MethodEntry, choice: DataChoice) -> dict:
    merged = {**entry.options, **choice.method_options.get(entry.label, {})}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def plan(spec: TableSpec, choice: DataChoice, seeds: tuple[int, ...], references: dict | None = None) -> list[Unit]:
    """The run units of a table; entries that match another's uploads need ``references`` (label, seed, domains)."""
    units = []
    for entry in spec.methods:
        for seed in seeds:
            for domains in unit_groups(spec.protocol.reset, spec.domains):
                options = _options(entry, choice)
                if entry.match_uploads_of is not None:
                    if references is None:
                        continue
                    options["upload_ratio"] = references[(entry.match_uploads_of, seed, domains)]
                units.append(Unit(entry.label, entry.name, tuple(sorted(options.items())), seed, domains))
    return units


def _upload_ratio(record: dict) -> float:
    seen = sum(r["seen"] for r in record["results"])
    return sum(r["link"]["uploaded"] for r in record["results"]) / seen if seen else 0.0


_worker_context: TableContext | None = None


def _init_worker(threads: int, *context_args) -> None:
    global _worker_context
    torch.set_num_threads(threads)
    _worker_context = TableContext(*context_args)


def _run_in_worker(unit: Unit) -> dict:
    return _worker_context.run(unit)


def reproduce(spec: TableSpec, data_root: str | None, out: Path, seeds: tuple[int, ...] | None = None,
              jobs: int = 1, execution: Execution = Execution(), progress: bool = True,
              models: dict[str, str] | None = None, dataset_options: dict | None = None,
              pair: str | None = None) -> dict:
    """Run (or resume) every unit of a table and return the table's JSON document. ``pair`` picks one of the spec's
    named model pairs; ``models`` (edge, foundation) and ``dataset_options`` override the spec's choices."""
    if data_root is not None and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root} is not a directory; point it at the folder that holds "
                        f"the dataset, or leave it out to run the embedded miniature")
    context_args = (spec, data_root, execution, models, dataset_options, pair)
    context = TableContext(*context_args)
    seeds = tuple(seeds or spec.seeds)
    store = ResultStore(Path(out) / "cells" / spec.name)
    for entry in spec.methods:
        registry.build_method(entry.name, {**_options(entry, context.choice),
                                           **({"upload_ratio": 0.0} if entry.match_uploads_of else {})})
    context.provenance  # builds dataset and models up front, so that data and model errors come before any run
    records: dict[Unit, dict] = {}

    def run_all(units: list[Unit], bar) -> None:
        todo = []
        for unit in units:
            cached = store.get(context.unit_key(unit))
            if cached is not None:
                records[unit] = cached
                bar.update(1)
            else:
                todo.append(unit)
        if jobs > 1 and len(todo) > 1:
            threads = max(1, torch.get_num_threads() // jobs)
            with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(threads, *context_args)) as pool:
                for unit, record in zip(todo, pool.map(_run_in_worker, todo)):
                    _finish(unit, record, bar)
        else:
            for unit in todo:
                bar.set_postfix_str(f"{unit.label} / {','.join(unit.domains)[:30]} / seed {unit.seed}")
                _finish(unit, context.run(unit), bar)

    def _finish(unit: Unit, record: dict, bar) -> None:
        records[unit] = record
        store.put(context.unit_key(unit), record)
        bar.update(1)

    first = plan(spec, context.choice, seeds)
    total = len(spec.methods) * len(seeds) * len(unit_groups(spec.protocol.reset, spec.domains))
    with tqdm(total=total, desc=f"{spec.name} ({'miniature' if context.dataset.is_miniature else 'real data'})",
              unit="cell", disable=not progress, file=sys.stderr) as bar:
        run_all(first, bar)
        references = {(u.label, u.seed, u.domains): _upload_ratio(r) for u, r in records.items()}
        run_all([u for u in plan(spec, context.choice, seeds, references) if u not in records], bar)
    return table_document(spec, context, seeds, records)


def table_document(spec: TableSpec, context: TableContext, seeds: tuple[int, ...], records: dict) -> dict:
    cells = []
    for unit, record in records.items():
        for result in record["results"]:
            cells.append({"method": unit.label, "seed": unit.seed, **result})
    order = {e.label: i for i, e in enumerate(spec.methods)}
    cells.sort(key=lambda c: (order[c["method"]], c["seed"], spec.domains.index(c["domain"])))
    methods = []
    for entry in spec.methods:
        cls = registry.load("methods", entry.name)
        methods.append({"label": entry.label, "name": entry.name, "paper": cls.paper,
                        "options": _options(entry, context.choice), "match_uploads_of": entry.match_uploads_of})
    return {"schema": SCHEMA, "table": spec.name, "title": spec.title, "source": spec.source,
            "real_dataset": spec.real.dataset, "seeds": list(seeds),
            "provenance": {**context.provenance, "device": context.execution.device},
            "reference": {**spec.reference, "published_uploads": published_uploads(spec)},
            "check": {"tolerance": spec.tolerance, "metrics": list(spec.check_metrics)},
            "methods": methods, "cells": cells}
