"""The run units of a table and their dependencies (an entry that matches another's uploads waits for its units)."""
from __future__ import annotations

from dataclasses import dataclass

from cemabench.config import with_link
from cemabench.config.settings import device_domains, result_keys, unit_groups
from cemabench.tables.spec import DataChoice, MethodEntry, TableSpec

UnitId = tuple[str, int, tuple[str, ...]]  # (label, seed, domains)


@dataclass(frozen=True)
class Unit:
    """One run unit with its final options: a method entry, a seed and the domains it runs without reset."""

    label: str
    method: str
    options: tuple  # sorted (name, value) pairs
    seed: int
    domains: tuple[str, ...]
    results: tuple[tuple[int, str], ...] = ()  # the (device, result) cells it yields, in order (stream.result_keys)
    link: tuple = ()  # sorted (field, value) pairs: the entry's own link fields (MethodEntry.link)

    @property
    def id(self) -> UnitId:
        return self.label, self.seed, self.domains

    @property
    def expected(self) -> tuple[tuple[int, str], ...]:
        return self.results or tuple((0, d) for d in self.domains)

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        return cls(d["label"], d["method"], tuple(tuple(_frozen(x) for x in kv) for kv in d["options"]), d["seed"],
                   tuple(d["domains"]), tuple((int(i), str(n)) for i, n in d.get("results", ())),
                   tuple(tuple(kv) for kv in d.get("link", ())))


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Task:
    """A unit before its dependencies ran: base options, and the units whose records derive the final options."""

    label: str
    method: str
    options: tuple
    seed: int
    domains: tuple[str, ...]
    needs: tuple[UnitId, ...] = ()
    results: tuple[tuple[int, str], ...] = ()
    link: tuple = ()

    @property
    def id(self) -> UnitId:
        return self.label, self.seed, self.domains

    def resolve(self, references: list[dict], planner) -> Unit:
        """The unit, with options derived by the method's ``derive_options`` hook from its references' records (asked
        through ``planner``: :mod:`cemabench.protocol.planner`)."""
        options = dict(self.options)
        if self.needs:
            options = planner.derive(self.method, options, references)
        return Unit(self.label, self.method, tuple(sorted(options.items())), self.seed, self.domains, self.results,
                    self.link)


def entry_options(entry: MethodEntry, choice: DataChoice) -> dict:
    merged = {**entry.options, **choice.method_options.get(entry.label, {})}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def check_options(spec: TableSpec, choice: DataChoice, planner) -> None:
    """Every entry's options and protocol, before any compute: the method runs under the table's protocol, and its
    options are fully validated, or (for entries whose options are derived from other units) checked for names and
    types. ``planner`` asks each method's class (:mod:`cemabench.protocol.planner`)."""
    for entry in spec.methods:
        planner.check(entry.name, entry_options(entry, choice), with_link(spec.protocol, entry.link), None,
                      entry.match_uploads_of is not None)


def check_models(spec: TableSpec, choice: DataChoice, edge, foundation, task: str, planner,
                 clean_missing: str | None = None) -> None:
    """Every entry against the table's source models (:meth:`Method.check_models`, the method's ``task`` set to the
    dataset's) and, where the dataset has no clean split (``clean_missing``), its need of one, before any compute;
    entries whose options are derived from other units are checked when their unit is built."""
    for entry in spec.methods:
        if entry.match_uploads_of is None:
            planner.check_models(entry.name, entry_options(entry, choice), task, edge, foundation, clean_missing)


def plan(spec: TableSpec, choice: DataChoice, seeds: tuple[int, ...]) -> list[Task]:
    """The tasks of a table, each after the tasks it needs (a spec names only earlier labels as references)."""
    device_domains(spec.domains, spec.protocol.devices, spec.protocol.device_streams)  # can every device have a stream
    tasks = []
    for entry in spec.methods:
        for seed in seeds:
            for domains in unit_groups(spec.protocol.setting, spec.domains):
                needs = ((entry.match_uploads_of, seed, tuple(domains)),) if entry.match_uploads_of else ()
                tasks.append(Task(entry.label, entry.name, tuple(sorted(entry_options(entry, choice).items())), seed,
                                  tuple(domains), needs, result_keys(spec.protocol, domains),
                                  tuple(sorted(entry.link.items()))))
    return tasks
