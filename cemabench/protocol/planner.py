"""What the harness asks of a method's class, in this process or, under ``--isolate``, in a process of its own.

Before and around a table's run the harness asks each method's class what it declares and whether it can run: its
options (parsed and validated), its protocol (``check_protocol``), its task and label use, its models
(``check_models``), the options it derives from other units (``derive_options``), and the code that its units and its
training depend on. :class:`LocalPlanner` asks the class in this process. :class:`IsolatedPlanner` asks it in a
*planner* process, forked from the zygote and confined as the halves are (:mod:`cemabench.protocol.isolation`), so that
under ``--isolate`` the loop's process (labels, link, scoring, store, artefact cache) never imports a method plugin's
module, nor runs its import-time code. What comes back is plain data, read with ``weights_only``: errors as one-line
:class:`~cemabench.errors.UserError`, derived options, and a unit's :class:`~cemabench.method.MethodFacts`, which
stands for the method in the loop while the halves build the method itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import torch
from torch import nn

from cemabench import registry
from cemabench.config import Protocol
from cemabench.errors import HalfFailed, UserError
from cemabench.method import (
    REFERENCES,
    MethodFacts,
    check_clean,
    check_declared,
    check_labels,
    check_runnable,
    check_task,
    parse_options,
)
from cemabench.protocol import hygiene
from cemabench.protocol.isolation import Half, ask
from cemabench.protocol.messages import pack, rng_state, set_rng_state
from cemabench.protocol.sides import SIDES, loaded
from cemabench.protocol.training import trains
from cemabench.protocol.zygote import zygote_data
from cemabench.provenance import code_digest


# -- the questions, answered where the method's class is imported -------------------------------------------------
def check_entry(name: str, options: dict, protocol: Protocol, task: str | None, derived: bool) -> None:
    """An entry's method under a protocol (and, given, a dataset's task), before any compute: its declarations, its
    protocol, its label use, its task, and its options (fully validated, or for options derived from other units at
    run time, checked for names and types)."""
    cls = registry.load_method(name)
    cls.check_protocol(protocol)
    check_declared(cls)
    check_labels(cls, protocol)
    if derived:
        parse_options(cls.Options, options, f"method {name!r}")
        if task is not None:
            check_task(cls, task)
        return
    method = registry.build_method(name, options)
    method.check_protocol(protocol)  # the built method's own check, which may read its options
    if task is not None:
        check_task(method, task)


def check_entry_models(name: str, options: dict, task: str, edge: nn.Module, foundation: nn.Module,
                       clean_missing: str | None = None) -> None:
    """:meth:`Method.check_models` against the table's source models, the method's ``task`` set to the dataset's,
    then its need of the clean split the dataset lacks (``clean_missing``, as :func:`check_clean` reads it): what the
    models cannot do is said first, before the user is sent to fetch a training split."""
    method = registry.build_method(name, options)
    method.task = task
    method.check_models(edge, foundation)
    check_clean(method, clean_missing)


def derive(name: str, options: dict, references: list[dict]) -> dict:
    return registry.load("methods", name).derive_options(options, references)


def about(name: str, dataset: str, models: list[nn.Module], zoos: list[str]) -> dict:
    """What a table document says of a method, and the digest of the code its units depend on: the method's own and
    every harness and plugin module that the method, the dataset's factory, the models and their zoos' loaders
    (``zoos``: the models' registry names, ``mini`` of ``mini:edge``) import."""
    cls = registry.load_method(name)
    return {"paper": cls.paper, "reference": cls.reference,
            "code": code_digest(cls, registry.load("datasets", dataset), *models,
                                *[registry.load("models", zoo) for zoo in zoos])}


def facts(name: str, options: dict, protocol: Protocol, task: str, edge: nn.Module, foundation: nn.Module,
          clean_missing: str | None = None) -> MethodFacts:
    """The plain stand-in of a built method (:class:`MethodFacts`), with the digest of its training's code, after the
    checks that a unit makes of the method it runs in-process (:func:`cemabench.protocol.loop.run_unit`), in its
    order: the built method's protocol (a method's own check may read its options), declarations, task, labels and
    its need of a clean split."""
    method = registry.build_method(name, options)
    check_runnable(method, protocol, task, clean_missing)
    cls = type(method)
    values = dataclasses.asdict(method.options) if dataclasses.is_dataclass(method.options) else {}
    return MethodFacts(name=method.name, options=values, online_options=tuple(cls.online_options),
                       cloud_replicas=cls.cloud_replicas, trains=trains(method),
                       training_code=code_digest(cls, edge, foundation))


class LocalPlanner:
    """The method's class asked in this process (the in-process mode): the questions above, as they are."""

    check, check_models = staticmethod(check_entry), staticmethod(check_entry_models)
    derive, about, facts = staticmethod(derive), staticmethod(about), staticmethod(facts)

    def close(self) -> None:
        pass


class _PlannerSide:
    """The planner process's side: each question answered with the method's class imported here, never in the loop's
    process."""

    device = torch.device("cpu")

    def __init__(self):
        self.replaced = hygiene.replaced_harness_code()

    def check(self, name, options, protocol, task, derived) -> dict:
        check_entry(name, options, Protocol(**protocol), task, derived)
        return {}

    def check_models(self, name, options, task, edge, foundation, clean_missing) -> dict:
        check_entry_models(name, options, task, loaded(edge), loaded(foundation), clean_missing)
        return {}

    def derive(self, name, options, references) -> dict:
        return {"options": derive(name, options, references)}

    def about(self, name, dataset, models, zoos) -> dict:
        return about(name, dataset, [loaded(m) for m in models], zoos)

    def facts(self, name, options, protocol, task, edge, foundation, clean_missing) -> dict:
        return dataclasses.asdict(facts(name, options, Protocol(**protocol), task, loaded(edge), loaded(foundation),
                                        clean_missing))


SIDES["planner"] = _PlannerSide
PLANNER_S = 300.0  # how long one question may take in a planner (importing the method's module included)
PLANNER_MESSAGE = 1 << 26  # the longest answer read from a planner (64 MiB: a code digest is a few kB)


class IsolatedPlanner:
    """Each method's class asked in a planner process of its own (``--isolate``): one per method, started on its
    first question and kept for the table, so that one plugin's import-time code reaches neither this process nor
    another method's answers; each answer is read back as plain data."""

    def __init__(self, memory: int | None = None):
        self.memory = memory  # each planner's data-size limit, as a unit's halves have (--unit-memory)
        self.halves: dict[str, Half] = {}
        self.pid = os.getpid()
        self._packed: dict[int, tuple] = {}  # id -> (model, its torch.save bytes)

    def _bytes(self, model: nn.Module) -> bytes:
        """A model as the ``torch.save`` bytes that every planner is sent (pickled once per table, not once per
        question and planner: a ResNet-101 is 170 MB), kept with the model (so that its id stays its own); a model
        built apart (:class:`cemabench.models.builder.BuiltApart`) is its bytes already."""
        if type(getattr(model, "pickled", None)) is bytes and not isinstance(model, nn.Module):
            return model.pickled
        if id(model) not in self._packed:
            self._packed[id(model)] = (model, pack(model))
        return self._packed[id(model)][1]

    def _call(self, name: str, op: str, *args) -> dict:
        if self.pid != os.getpid():  # a forked worker (--jobs): its parent's planners are not its own to talk to
            for half in self.halves.values():
                with contextlib.suppress(OSError):
                    half.conn.close()
            self.halves, self.pid = {}, os.getpid()
        late = threading.Event()
        try:
            if name not in self.halves:
                half = self.halves[name] = Half("planner", torch.device("cpu"), memory=self.memory)
                half.max_message = PLANNER_MESSAGE
                ask(half, late, PLANNER_S, "planner")
            half = self.halves[name]
            state = rng_state(half.device)  # an answer carries the planner's random state: the loop keeps its own
            try:
                return ask(half, late, PLANNER_S, op, *args)
            finally:
                set_rng_state(state, half.device)
        except HalfFailed as error:  # a plugin that cannot be asked (it replaced the harness's code at import, say)
            first = (str(error).splitlines() or [""])[0]
            if late.is_set():
                first = f"it did not answer within {PLANNER_S:g} s, and was stopped"
            elif self.memory is not None and (error.status == "out-of-memory" or "process ended" in first):
                held = zygote_data()
                first = (f"it ran out of memory under a unit's limit ({self.memory / 2 ** 30:.3g} GiB, --unit-memory"
                         + (f"; a planner holds {held / 2 ** 30:.2g} GiB before any method code runs, and a unit's "
                            f"halves as much" if held else "") + f"): {first}")
            with contextlib.suppress(KeyError):  # a planner that failed once is asked nothing more
                self.halves.pop(name).close()
            raise UserError(f"method {name} could not be planned in its own process (--isolate): {first}") from None

    def check(self, name: str, options: dict, protocol: Protocol, task: str | None, derived: bool) -> None:
        self._call(name, "check", name, options, dataclasses.asdict(protocol), task, derived)

    def check_models(self, name: str, options: dict, task: str, edge: nn.Module, foundation: nn.Module,
                     clean_missing: str | None = None) -> None:
        self._call(name, "check_models", name, options, task, self._bytes(edge), self._bytes(foundation),
                   clean_missing)

    def derive(self, name: str, options: dict, references: list[dict]) -> dict:
        options = self._call(name, "derive", name, options, references).get("options")
        if type(options) is not dict or not all(type(k) is str for k in options):
            raise UserError(f"method {name}'s derive_options returned {type(options).__name__}, not a dict of options")
        return options

    def about(self, name: str, dataset: str, models: list[nn.Module], zoos: list[str]) -> dict:
        answer = self._call(name, "about", name, dataset, [self._bytes(m) for m in models], zoos)
        code = answer.get("code")
        if type(code) is not dict or not all(type(k) is str and type(v) is str for k, v in code.items()):
            raise UserError(f"method {name}'s planner sent a malformed code digest")
        paper, reference = answer.get("paper"), answer.get("reference")
        plain = reference is None or type(reference) is str and reference in REFERENCES
        if not (paper is None or type(paper) is str) or not plain:
            raise UserError(f"method {name}'s planner sent a malformed paper or reference point")
        return {"paper": paper, "reference": reference, "code": code}

    def facts(self, name: str, options: dict, protocol: Protocol, task: str, edge: nn.Module, foundation: nn.Module,
              clean_missing: str | None = None) -> MethodFacts:
        try:
            facts = MethodFacts.read(self._call(name, "facts", name, options, dataclasses.asdict(protocol), task,
                                                self._bytes(edge), self._bytes(foundation), clean_missing))
        except ValueError as error:
            raise UserError(f"method {name}: {error}") from None
        return dataclasses.replace(facts, entry=name)  # the halves build what was asked about, whatever it says

    def close(self) -> None:
        while self.halves:
            self.halves.popitem()[1].close()
        self._packed.clear()


def planner_for(isolate: bool, memory: int | None = None) -> LocalPlanner | IsolatedPlanner:
    """``memory``: the planner processes' data-size limit (a unit's, ``--unit-memory``; isolated only)."""
    return IsolatedPlanner(memory) if isolate else LocalPlanner()
