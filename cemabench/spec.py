"""Table specs: one TOML file per table (data, not code), validated into a :class:`TableSpec`."""
from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from cemabench.errors import UserError
from cemabench.protocol import RESETS, Protocol

SPEC_PACKAGE = "cemabench_tables"


@dataclass(frozen=True)
class MethodEntry:
    label: str  # the leaderboard row
    name: str  # the method plugin
    options: dict = field(default_factory=dict)
    match_uploads_of: str | None = None  # label whose per-domain upload ratio this entry's upload_ratio copies


@dataclass(frozen=True)
class DataChoice:
    """Which dataset and models a table runs on: the real ones, or the embedded miniature."""

    dataset: str
    edge: str
    foundation: str
    options: dict = field(default_factory=dict)  # keyword options of the dataset factory (subset, scoring, ...)
    recorded: dict = field(default_factory=dict)  # protocol facts shown in the header (subset, preprocessing, ...)
    method_options: dict = field(default_factory=dict)  # per-label option overrides that apply to this choice only
    pairs: dict = field(default_factory=dict)  # named alternative (edge, foundation) pairs, chosen with --pair


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    source: str
    protocol: Protocol
    seeds: tuple[int, ...]
    severity: int
    domains: tuple[str, ...]
    recorded: dict
    real: DataChoice
    miniature: DataChoice | None
    methods: tuple[MethodEntry, ...]
    tolerance: float
    check_metrics: tuple[str, ...]
    reference: dict = field(default_factory=dict)  # published numbers: uploads CSV and accuracies, with sources
    origin: object = None  # the folder (a path or package resource) that files named in the spec are relative to


def available_tables() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(SPEC_PACKAGE).iterdir() if p.name.endswith(".toml"))


def load_table(name_or_path: str) -> TableSpec:
    """A built-in table by name, or a spec file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"table spec file {path} does not exist")
        text, origin = path.read_text(), path.parent
    else:
        resource = resources.files(SPEC_PACKAGE) / f"{name_or_path}.toml"
        if not resource.is_file():
            raise UserError(f"unknown table {name_or_path!r}; available: {', '.join(available_tables())} "
                            f"(or pass the path of a .toml spec)")
        text, origin = resource.read_text(), resources.files(SPEC_PACKAGE)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"table spec {name_or_path} is not valid TOML: {error}") from error
    return replace(parse(raw, str(name_or_path)), origin=origin)


def published_uploads(spec: TableSpec) -> list[dict]:
    """The reference upload counts at the table's severity, from the CSV the spec names (method, severity,
    corruption, uploaded, total)."""
    name = spec.reference.get("uploads")
    if not name:
        return []
    rows = csv.DictReader(io.StringIO((spec.origin / name).read_text()))
    return [{"method": r["method"], "domain": r["corruption"], "uploaded": int(r["uploaded"]), "total": int(r["total"])}
            for r in rows if int(r["severity"]) == spec.severity and r["corruption"] in spec.domains]


def _take(table: dict, key: str, kind, where: str, default=...):
    if key not in table:
        if default is ...:
            raise UserError(f"{where}: missing required key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _no_extra(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; valid: {', '.join(sorted(allowed))}")


def _pairs(table: dict, where: str) -> dict[str, dict[str, str]]:
    pairs = {}
    for name, pair in _take(table, "pairs", dict, where, {}).items():
        w = f"{where} pairs.{name}"
        if not isinstance(pair, dict):
            raise UserError(f"{w}: a pair is a table with edge and foundation, got {pair!r}")
        _no_extra(pair, {"edge", "foundation"}, w)
        pairs[name] = {"edge": _take(pair, "edge", str, w), "foundation": _take(pair, "foundation", str, w)}
    return pairs


def _choice(table: dict, where: str) -> DataChoice:
    _no_extra(table, {"dataset", "edge", "foundation", "options", "method_options", "recorded", "pairs"}, where)
    return DataChoice(dataset=_take(table, "dataset", str, where), edge=_take(table, "edge", str, where),
                      foundation=_take(table, "foundation", str, where),
                      options=_take(table, "options", dict, where, {}),
                      recorded=_take(table, "recorded", dict, where, {}),
                      method_options=_take(table, "method_options", dict, where, {}),
                      pairs=_pairs(table, where))


def parse(raw: dict, where: str) -> TableSpec:
    _no_extra(raw, {"name", "title", "source", "seeds", "protocol", "data", "methods", "check", "reference"}, where)
    proto = _take(raw, "protocol", dict, where)
    _no_extra(proto, {"batch_size", "reset", "delivery_delay", "upload_budget"}, f"{where} [protocol]")
    protocol = Protocol(batch_size=_take(proto, "batch_size", int, f"{where} [protocol]"),
                        reset=_take(proto, "reset", str, f"{where} [protocol]"),
                        delivery_delay=_take(proto, "delivery_delay", int, f"{where} [protocol]", 0),
                        upload_budget=_take(proto, "upload_budget", int, f"{where} [protocol]", None))
    if protocol.reset not in RESETS:
        raise UserError(f"{where} [protocol]: reset must be one of {', '.join(RESETS)}, got {protocol.reset!r}")
    if protocol.batch_size < 1 or protocol.delivery_delay < 0:
        raise UserError(f"{where} [protocol]: batch_size must be >= 1 and delivery_delay >= 0")

    data = _take(raw, "data", dict, where)
    _no_extra(data, {"severity", "domains", "recorded", "real", "miniature"}, f"{where} [data]")
    severity = _take(data, "severity", int, f"{where} [data]")
    domains = tuple(_take(data, "domains", list, f"{where} [data]"))
    if not domains or len(set(domains)) != len(domains):
        raise UserError(f"{where} [data]: domains must be a non-empty list without repeats")

    methods, labels = [], set()
    for i, entry in enumerate(_take(raw, "methods", list, where)):
        w = f"{where} [[methods]] #{i + 1}"
        _no_extra(entry, {"name", "label", "options", "match_uploads_of"}, w)
        name = _take(entry, "name", str, w)
        label = _take(entry, "label", str, w, name)
        match = _take(entry, "match_uploads_of", str, w, None)
        if label in labels:
            raise UserError(f"{w}: label {label!r} is used twice; give one entry a different label")
        if match is not None and match not in labels:
            raise UserError(f"{w}: match_uploads_of = {match!r} must name the label of an earlier method")
        labels.add(label)
        methods.append(MethodEntry(label, name, _take(entry, "options", dict, w, {}), match))

    check = _take(raw, "check", dict, where, {})
    _no_extra(check, {"tolerance", "metrics"}, f"{where} [check]")
    real = _choice(_take(data, "real", dict, f"{where} [data]"), f"{where} [data.real]")
    mini = _take(data, "miniature", dict, f"{where} [data]", None)
    miniature = None if mini is None else _choice(mini, f"{where} [data.miniature]")
    reference = _take(raw, "reference", dict, where, {})
    _no_extra(reference, {"uploads", "uploads_source", "accuracy"}, f"{where} [reference]")
    for choice, section in ((real, "real"), (miniature, "miniature")):
        if choice is None:
            continue
        unknown = sorted(set(choice.method_options) - labels)
        if unknown:
            raise UserError(f"{where} [data.{section}.method_options]: no method labelled {', '.join(unknown)}")
    return TableSpec(
        name=_take(raw, "name", str, where), title=_take(raw, "title", str, where),
        source=_take(raw, "source", str, where, ""), protocol=protocol,
        seeds=tuple(_take(raw, "seeds", list, where, [0])), severity=severity, domains=domains,
        recorded=_take(data, "recorded", dict, f"{where} [data]", {}), real=real, miniature=miniature,
        methods=tuple(methods), tolerance=float(_take(check, "tolerance", (int, float), f"{where} [check]", 0.5)),
        check_metrics=tuple(_take(check, "metrics", list, f"{where} [check]", ["accuracy", "upload_ratio"])),
        reference=reference)
