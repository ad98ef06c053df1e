"""What a run unit needs (dataset, models) and what identifies its result: its full configuration and the code
that computes it (:func:`cemabench.provenance.code_digest`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cemabench import registry
from cemabench.config import CCC, device_domains, parse_setting, with_link
from cemabench.config.numerics import cpu_numerics
from cemabench.datasets.reader import Reader
from cemabench.datasets.reader import own as own_dataset
from cemabench.errors import UserError
from cemabench.method import check_clean
from cemabench.models.builder import Builder, BuiltApart, apart, build, look, own
from cemabench.protocol import Execution, Models, ccc, native, run_unit, zygote
from cemabench.protocol.codecs import library_versions, payload_versions
from cemabench.protocol.planner import planner_for
from cemabench.protocol.stream import Block, DeviceStreams, build_blocks
from cemabench.protocol.tasks.detection import original_frame
from cemabench.provenance import fingerprint, versions
from cemabench.tables.plan import Unit
from cemabench.tables.spec import DataChoice, TableSpec

SCHEMA = 4  # of a stored record; 4: the code digest covers every module the computation imports


class TableContext:
    """Everything a unit needs, built lazily once per process: dataset, model prototypes, provenance."""

    def __init__(self, spec: TableSpec, data_root: str | None, execution: Execution = Execution(),
                 models: dict[str, str] | None = None, dataset_options: dict | None = None, pair: str | None = None,
                 weights: str | None = None, predictions: str | None = None, isolate: bool = False):
        self.spec, self.data_root, self.execution, self.weights = spec, data_root, execution, weights
        self.isolate = isolate  # each unit's halves in processes of their own (no part of a unit's key)
        zygote.hide(data_root)  # from the halves, wherever it lies
        self.predictions = predictions  # where units write their predictions (detection: COCO results JSON)
        choice = spec.real if data_root else spec.miniature
        if choice is None:
            raise UserError(f"table {spec.name} has no embedded-miniature version; pass --data-root")
        if pair is not None and pair not in choice.pairs:
            data = "the real data" if data_root else "the embedded miniature"
            other = spec.miniature if data_root else spec.real
            elsewhere = (f"; with {'the embedded miniature (no --data-root)' if data_root else '--data-root'}: "
                         f"{', '.join(other.pairs)}") if other is not None and other.pairs else ""
            raise UserError(f"table {spec.name} has no model pair {pair!r} on {data}; pairs: "
                            f"{', '.join(choice.pairs) or '(none)'}{elsewhere} (or name models with --edge/"
                            f"--foundation)")
        self.pair = pair
        overrides = {**choice.pairs.get(pair, {}), **{k: v for k, v in (models or {}).items() if v}}
        self.choice: DataChoice = replace(choice, **overrides, options={**choice.options, **(dataset_options or {})})
        self._about: dict[str, dict] = {}
        self._facts: dict[tuple, object] = {}  # isolated: the planner's MethodFacts, by (method, options)
        self._datasets: dict[int, object] = {}
        self._ccc: dict[tuple, object] = {}  # the ccc setting's generated streams, by seed and stream fields
        self._calibration = None
        self.memory: int | None = None  # the planners' data-size limit (a unit's, --unit-memory): set before they start

    @cached_property
    def dataset(self):
        return self.dataset_at(self.spec.severity)

    def dataset_at(self, severity: int):
        """The dataset at a severity (the spec's, or each of 1..5 for the gradual setting), built once."""
        if severity in self._datasets:
            return self._datasets[severity]
        if self.choice.dataset not in registry.available("datasets"):
            raise UserError(f"table {self.spec.name} runs on the dataset {self.choice.dataset!r} when --data-root is "
                            f"given, and no installed plugin provides it (available: "
                            f"{', '.join(sorted(registry.available('datasets')))}); install one, or leave out "
                            f"--data-root to run the embedded miniature")
        if self.isolate and not own_dataset(self.choice.dataset):  # a plugin's: built and read in its own process
            built = self.reader.build(self.choice.options, severity, self.spec.domains)
        else:
            factory = registry.dataset_factory(self.choice.dataset, self.choice.options)
            with registry.seeded(), registry.plugin_errors("datasets", self.choice.dataset):
                built = factory(data_root=self.data_root, severity=severity, domains=self.spec.domains,
                                **self.choice.options)
        if severity != self.spec.severity and built.provenance.get("severity") != severity:
            raise UserError(f"setting {self.spec.protocol.setting} runs every domain at severities 1 to 5, and the "
                            f"dataset {self.choice.dataset} has no severities; choose another setting")
        if "dataset" not in built.provenance:  # (what the table's header names; a plugin may leave it out)
            built = replace(built, provenance={"dataset": built.name, **built.provenance})
        self._datasets[severity] = built
        return built

    @cached_property
    def reader(self) -> Reader:
        return Reader(self.choice.dataset, self.data_root)  # (no unit's memory limit: the loop's work, done apart)

    @cached_property
    def prototypes(self) -> dict[str, torch.nn.Module | BuiltApart]:
        """The source models, built in this process; under ``--isolate`` a model plugin's in a builder process
        (:mod:`cemabench.models.builder`), which this process holds as bytes and never unpickles; each with its random
        state seeded (:func:`cemabench.models.builder.build`)."""
        built = {}
        for role in ("edge", "foundation"):
            name = getattr(self.choice, role)
            built[role] = (self.builder.build(role, name, self.weights) if self.isolate and not own(name)
                           else build(name, self.weights))
        return built

    @cached_property
    def builder(self) -> Builder:
        return Builder([getattr(self.choice, role) for role in ("edge", "foundation")
                        if not own(getattr(self.choice, role))], self.weights)  # (as the reader: no limit)

    @cached_property
    def models(self) -> Models:
        edge, foundation = self.prototypes["edge"], self.prototypes["foundation"]
        if not isinstance(edge, BuiltApart) and not isinstance(foundation, BuiltApart):
            return Models.copies_of(edge, foundation)
        return apart(edge, foundation)

    @cached_property
    def provenance(self) -> dict:
        spec = self.spec
        return {
            "miniature": self.dataset.is_miniature,
            # a task other than classification is part of what the data is (the leaderboard scores by it)
            "dataset": {**self.dataset.provenance, **({"task": self.dataset.task}
                                                      if self.dataset.task != "classification" else {})},
            "data_root": self.data_root,
            "models": {k: {"name": getattr(self.choice, k),
                           "fingerprint": m.fingerprint if isinstance(m, BuiltApart) else fingerprint(m)}
                       for k, m in self.prototypes.items()},
            "pair": self.pair,
            "protocol": asdict(spec.protocol),
            "severity": spec.severity,
            "domains": list(spec.domains),
            "dataset_options": self.choice.options,
            "execution": asdict(self.execution),
            "recorded": {**spec.recorded, **self.choice.recorded},
            "versions": {**versions(), "meter": native.kind(), **payload_versions(),
                         **library_versions(spec.protocol.input_codec)},
        }

    @cached_property
    def planner(self):
        """Who asks the methods' classes (:mod:`cemabench.protocol.planner`): this process, or under ``--isolate`` a
        planner process of its own, so that this one imports no method plugin, under a unit's memory limit."""
        return planner_for(self.isolate, self.memory)

    def about(self, method: str) -> dict:
        """A method's paper and reference point, and the digest of the code that computes its units here (once per
        context): the method's own, and every harness and plugin module that the method, the protocol, the dataset's
        factory and the models import (:func:`cemabench.provenance.code_digest`)."""
        if method not in self._about:
            zoos = [getattr(self.choice, k).partition(":")[0] for k in self.prototypes]
            self._about[method] = self.planner.about(method, self.choice.dataset, list(self.prototypes.values()), zoos)
        return self._about[method]

    def code(self, method: str) -> dict[str, str]:
        return self.about(method)["code"]

    def unit_config(self, unit: Unit) -> dict:
        """Everything a unit's numbers depend on: the unit, data, models, protocol, versions, device and code."""
        p = self.provenance
        return {"unit": asdict(unit), "dataset": p["dataset"], "models": p["models"], "protocol": p["protocol"],
                "dataset_options": p["dataset_options"],
                **{k: v for k, v in versions().items() if k in ("cemabench", "torch", "torchvision", "timm")},
                # the link's byte counts depend on them: the input codec's and the payload's entropy coder
                **library_versions(with_link(self.spec.protocol, unit.link).input_codec), **payload_versions(),
                **({"cpu_numerics": cpu_numerics()} if torch.device(self.execution.device).type == "cpu" else {}),
                "device": torch.device(self.execution.device).type,
                "channels_last": self.execution.channels_last, "amp": self.execution.amp,
                "code": self.code(unit.method), "schema": SCHEMA}

    def unit_key(self, unit: Unit) -> str:
        config = self.unit_config(unit)
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def check_stream(self) -> None:
        """The ccc setting generates its stream from the dataset's own corruptions: a dataset without a generator is
        the user's error, before any compute."""
        if parse_setting(self.spec.protocol.setting)[0] == CCC and self.dataset.corruptor is None:
            raise UserError(f"setting ccc generates its stream with the dataset's own corruption generator, and "
                            f"{self.dataset.name} has none here (imagenet-c has one with the dataset option source="
                            f"generated, from ROOT/imagenet/val; the ccc table sets it): leave out --data-root to run "
                            f"it on the embedded miniature")

    def ccc_block(self, seed: int, protocol) -> Block:
        """The ccc setting's stream for ``seed``: one block, in its generated order (built once per process)."""
        key = (seed, protocol.ccc_difficulty, protocol.ccc_speed, protocol.ccc_length)
        if key not in self._ccc:
            if self._calibration is None:
                self._calibration = ccc.Calibration(self.dataset.corruptor, self.prototypes["edge"])
            domain, _ = ccc.build(self.dataset.corruptor, self.prototypes["edge"], self.spec.domains, seed,
                                  protocol.ccc_difficulty, protocol.ccc_speed, protocol.ccc_length, self._calibration)
            self._ccc[key] = Block(CCC, CCC, (domain,), np.arange(len(domain)))
        return self._ccc[key]

    def check_classes(self) -> None:
        """Each model answers in the dataset's classes: as many outputs as it has classes, or, where only some classes
        are scored (ImageNet-R's 200 of ImageNet's 1000), an output for each scored class. One image of the first
        domain goes through each model in eval mode without autograd; the models' modes are left as they were."""
        data = self.dataset
        try:
            image = data.domains[0].images(np.arange(1))
        except Exception:  # noqa: BLE001 - an unreadable image fails its cell, with its path, when the unit reads it
            return
        for role, model in self.prototypes.items():
            detector, outputs = model.look(image) if isinstance(model, BuiltApart) else look(model, image)
            if detector != (data.task == "detection"):
                given = "a detector (boxes per image)" if detector else "a classifier (logits)"
                raise UserError(f"the {role} model {getattr(self.choice, role)} is {given}, and the dataset "
                                f"{data.name} is a {data.task} dataset: choose a "
                                f"{'detector' if data.task == 'detection' else 'classifier'} (--{role})")
            if detector:
                continue
            scored = data.scored_classes
            if (outputs > int(scored.max())) if scored is not None else outputs == data.num_classes:
                continue
            need = (f"at least {int(scored.max()) + 1} (its scored classes)" if scored is not None
                    else f"{data.num_classes}")
            raise UserError(f"the {role} model {getattr(self.choice, role)} gives {outputs} outputs and the dataset "
                            f"{data.name} needs {need}: choose a model trained on its classes (--{role})")

    def prediction_files(self, unit: Unit) -> list[Path]:
        """Where ``--save-predictions`` puts a unit's predictions: one COCO results JSON per cell,
        DIR/<table>/<label>/seed<seed>/<domain>[.device<d>].json."""
        folder = Path(self.predictions) / self.spec.name / unit.label.replace("/", "_") / f"seed{unit.seed}"
        return [folder / (f"{name}.json" if device == 0 else f"{name}.device{device}.json")
                for device, name in unit.expected]

    def write_ground_truth(self) -> Path:
        """Beside the predictions, each domain's ground truth in the original images' pixels (the scored images, in
        sample order), DIR/<table>/ground_truth/<domain>.json; returns the table's folder."""
        folder = Path(self.predictions) / self.spec.name
        by_name = {d.name: d for d in self.dataset.domains}
        for name in self.spec.domains:
            path = folder / "ground_truth" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(original_frame(by_name[name].ground_truth())))
        return folder

    def _writer(self, unit: Unit):
        files = dict(zip(unit.expected, self.prediction_files(unit), strict=True))

        def write(device: int, result: str, predictions: list[dict]) -> None:
            path = files[(device, result)]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(predictions))
            os.replace(tmp, path)

        return write

    def facts(self, method: str, options: tuple, protocol):
        """Isolated: what ``method`` is with ``options`` (sorted pairs) under ``protocol``, as its planner process says
        (:class:`~cemabench.method.MethodFacts`), asked once per method, options and protocol (the models cross to it);
        a unit's own copy, in which the loop sets the task and the artefacts."""
        key = (method, json.dumps(options, default=str), json.dumps(dataclasses.asdict(protocol), default=str))
        if key not in self._facts:
            self._facts[key] = self.planner.facts(method, dict(options), protocol, self.dataset.task,
                                                  self.prototypes["edge"], self.prototypes["foundation"],
                                                  self.dataset.clean_missing())
        return dataclasses.replace(self._facts[key])

    def run(self, unit: Unit) -> dict:
        p = with_link(self.spec.protocol, unit.link)  # the entry's own link fields, if any
        if self.isolate:  # the planner's plain facts: the halves build the method, this process never imports it
            method = self.facts(unit.method, unit.options, p)
        else:
            method = registry.build_method(unit.method, dict(unit.options))
            check_clean(method, self.dataset.clean_missing())  # a derived entry's is checked here, with the hint

        def blocks(names):
            by_name = {d.name: d for d in self.dataset.domains}
            return build_blocks(p.setting, [by_name[n] for n in names], unit.seed, rounds=p.rounds,
                                concentration=p.concentration,
                                at_severity=lambda s: [{d.name: d for d in self.dataset_at(s).domains}[n]
                                                       for n in names])

        if parse_setting(p.setting)[0] == CCC:
            stream = [self.ccc_block(unit.seed, p)]
        elif p.devices == 1:
            stream = blocks(unit.domains)
        else:
            stream = DeviceStreams([blocks(names) for names in device_domains(unit.domains, p.devices,
                                                                              p.device_streams)])
        results = run_unit(method, stream, self.models, self.dataset.num_classes, self.dataset.clean, p, unit.seed,
                           self.execution, self.dataset.scored_classes, self.dataset.task,
                           None if self.predictions is None else self._writer(unit), isolate=self.isolate)
        # whether method code ran apart from this process: an --isolate run takes no record computed in-process
        return {"unit": asdict(unit), "results": [r.to_dict() for r in results], "isolated": self.isolate}


@dataclass(frozen=True)
class ContextSpec:
    """The picklable recipe of a :class:`TableContext`: what a worker process (local or Ray) builds its context from,
    once per process (``token`` tells recipes apart in a worker's cache)."""

    spec: TableSpec
    data_root: str | None = None
    execution: Execution = Execution()
    models: dict | None = None
    dataset_options: dict | None = None
    pair: str | None = None
    weights: str | None = None
    predictions: str | None = None
    isolate: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def build(self) -> TableContext:
        return TableContext(self.spec, self.data_root, self.execution, self.models, self.dataset_options, self.pair,
                            self.weights, self.predictions, self.isolate)


_CONTEXTS: dict[str, TableContext] = {}
KEEP_CONTEXTS = 2


def context_for(recipe: ContextSpec) -> TableContext:
    """This process's context for a recipe, built on first use (dataset and models once per worker)."""
    if recipe.token not in _CONTEXTS:
        while len(_CONTEXTS) >= KEEP_CONTEXTS:  # a long-lived (Ray) worker keeps the latest tables' contexts only
            _close(_CONTEXTS.pop(next(iter(_CONTEXTS))))
        _CONTEXTS[recipe.token] = recipe.build()
    return _CONTEXTS[recipe.token]


def forget(recipe: ContextSpec) -> None:
    """Drop this process's context for a recipe (the runner's own, once its table is done), and end its planner."""
    context = _CONTEXTS.pop(recipe.token, None)
    if context is not None:
        _close(context)


def _close(context: TableContext) -> None:
    """End a context's planner, model builder and dataset reader processes (``--isolate``), if it started any."""
    if "planner" in context.__dict__:
        context.planner.close()
    for started in ("builder", "reader"):
        if started in context.__dict__:
            context.__dict__[started].close()
