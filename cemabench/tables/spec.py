"""Table specs: one TOML file per table (data, not code), validated into a :class:`TableSpec`."""
from __future__ import annotations

import copy
import csv
import io
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from cemabench.config import DEFAULT_TOLERANCE, FIELDS, Protocol, check_presets_given, with_link
from cemabench.config.limits import Limits, parse_limits
from cemabench.config.presets import PRESETS, REGIMES, preset_values
from cemabench.config.report import parse_report
from cemabench.errors import UserError
from cemabench.method import REFERENCES
from cemabench.tables.metrics import DEFAULT_CHECK, check_metrics

SPEC_PACKAGE = "cemabench_tables"


@dataclass(frozen=True)
class MethodEntry:
    label: str  # the leaderboard row
    name: str  # the method plugin
    options: dict = field(default_factory=dict)
    match_uploads_of: str | None = None  # label whose uploaded / seen this entry's upload_ratio option (0..1) copies
    reference: str | None = None  # "edge" or "cloud": a reference point (default: what the method class declares)
    link: dict = field(default_factory=dict)  # this entry's own link fields (input codec, link model, time model)


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
    tolerance: float = DEFAULT_TOLERANCE
    check_metrics: tuple[str, ...] = DEFAULT_CHECK
    reference: dict = field(default_factory=dict)  # published numbers: uploads CSV and accuracies, with sources
    origin: object = None  # the folder (a path or package resource) that files named in the spec are relative to
    limits: Limits = Limits()  # bounds on each run unit's time and memory ([limits]); they change no number
    report: dict = field(default_factory=dict)  # what the leaderboard adds ([report]: a hypervolume's reference)


SWEEP_FOLDER = "sweeps"  # built-in sweep specs: reproduce/sweeps/NAME.toml, run with `cemabench sweep NAME`


def _builtin_folder(kind: str):
    return resources.files(SPEC_PACKAGE) / SWEEP_FOLDER if kind == "sweep" else resources.files(SPEC_PACKAGE)


def available_tables() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(SPEC_PACKAGE).iterdir() if p.name.endswith(".toml"))


def available_sweeps() -> list[str]:
    folder = _builtin_folder("sweep")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")) if folder.is_dir() else []


def _read(name_or_path: str, relative_to=None, kind: str = "table") -> tuple[dict, object, str, str]:
    """The raw TOML of a built-in table or sweep (by name) or a spec file (by a path ending in .toml, relative to
    ``relative_to`` when given), with the folder its own file references are relative to, a display name and an
    identity (to detect cycles)."""
    if name_or_path.endswith(".toml"):
        if relative_to is not None and not Path(name_or_path).is_absolute():
            resource = relative_to / name_or_path
        else:
            resource = Path(name_or_path)
        if not resource.is_file():
            raise UserError(f"table spec file {resource} does not exist")
        origin = resource.parent if isinstance(resource, Path) else relative_to
        text, shown = resource.read_text(), str(resource)
        identity = str(resource.resolve()) if isinstance(resource, Path) else str(resource)
    else:
        resource = _builtin_folder(kind) / f"{name_or_path}.toml"
        if not resource.is_file():
            names = available_sweeps() if kind == "sweep" else available_tables()
            other, command = ("table", "reproduce") if kind == "sweep" else ("sweep", "sweep")
            if name_or_path in (available_tables() if kind == "sweep" else available_sweeps()):
                raise UserError(f"{name_or_path!r} is a {other}, not a {kind}: run `cemabench {command} "
                                f"{name_or_path}`")
            raise UserError(f"unknown {kind} {name_or_path!r}; available: {', '.join(names) or '(none)'} "
                            f"(or pass the path of a .toml spec)")
        text, origin, shown = resource.read_text(), _builtin_folder(kind), name_or_path
        identity = str(resource)
    try:
        return tomllib.loads(text), origin, shown, identity
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"table spec {name_or_path} is not valid TOML: {error}") from error


def merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``: tables merge key by key (recursively); any other value, lists included, is replaced
    whole. Neither argument is modified."""
    merged = copy.deepcopy(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = merge(parent[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve(name_or_path: str, relative_to=None, chain: tuple[tuple[str, str], ...] = (),
            kind: str = "table") -> tuple[dict, object]:
    """The raw spec with every ``extends`` applied (parents first), and the folder that its ``reference.uploads``
    file is relative to (the folder of the spec that names it). ``kind`` = "sweep" looks names up among the built-in
    sweeps; what a spec extends is always a table name or a path."""
    try:
        raw, origin, shown, identity = _read(name_or_path, relative_to, kind if not chain else "table")
    except UserError as error:
        if not chain:
            raise
        raise UserError(f"table spec {chain[-1][1]} extends {name_or_path!r}: {error}") from None
    if identity in [i for i, _ in chain]:
        raise UserError(f"table spec {shown} extends itself: {' -> '.join([*(s for _, s in chain), shown])}")
    if "extends" not in raw:
        if "add_methods" in raw:
            raise UserError(f"table spec {shown}: add_methods appends to the methods of the spec it extends; "
                            f"add extends = \"TABLE\" or list them under [[methods]]")
        _no_link_model_beside_regimes(raw, _table(raw, "protocol"), shown)
        return raw, origin
    parent_name = raw.pop("extends")
    if not isinstance(parent_name, str):
        raise UserError(f"table spec {shown}: extends must be a table name or a .toml path, got {parent_name!r}")
    parent, parent_origin = resolve(parent_name, origin if parent_name.endswith(".toml") else None,
                                    (*chain, (identity, shown)))
    added = raw.pop("add_methods", None)
    if added is not None:
        if "methods" in raw:
            raise UserError(f"table spec {shown}: give either methods (replaces the parent's) or add_methods "
                            f"(appends to them), not both")
        if not isinstance(added, list):
            raise UserError(f"table spec {shown}: add_methods must be a list of method tables ([[add_methods]])")
        raw["methods"] = [*parent.get("methods", []), *added]
    merged = merge(parent, raw)
    _own_link_model_wins(merged, _table(raw, "protocol"))
    _no_link_model_beside_regimes(merged, _table(raw, "protocol"), shown)
    if "methods" in raw:
        _drop_inherited_method_options(merged, raw)
    inherits_uploads = "uploads" in _table(parent, "reference") and "uploads" not in _table(raw, "reference")
    return merged, parent_origin if inherits_uploads else origin


def _own_link_model_wins(merged: dict, own: dict) -> None:
    """A child's [protocol] preset replaces the parent's numbers that it sets, and a child's number the parent's
    preset that set it, as an entry's link does (:func:`cemabench.config.override`)."""
    protocol = _table(merged, "protocol")
    for preset, (_, sets) in PRESETS.items():
        if preset in own:
            for target in sets:
                if target not in own:
                    protocol.pop(target, None)
        elif any(target in own for target in sets):
            name = protocol.pop(preset, None)
            if isinstance(name, str) and name in PRESETS[preset][0]:  # the preset's other numbers stay
                protocol.update({t: v for t, v in preset_values(preset, name).items() if t not in own})


def _no_link_model_beside_regimes(merged: dict, own: dict, shown: str) -> None:
    """A table with ``regimes`` sets the link model per regime: a link-model field in this spec's own [protocol]
    would be dropped, so it is an error (an inherited one is replaced by each regime, as documented)."""
    given = sorted(set(own) & set(REGIME_FIELDS))
    if given and merged.get("regimes"):
        raise UserError(f"table spec {shown} [protocol] sets {', '.join(given)}, but the table has regimes = "
                        f"{merged['regimes']!r}, which set the link model per regime; drop {', '.join(given)}, or "
                        f"set regimes = [] for one link model")


def _drop_inherited_method_options(merged: dict, child: dict) -> None:
    """A child that replaces the method list drops the parent's per-label method options of the labels it no longer
    has (its own method options still have to name one of its methods)."""
    methods = merged["methods"] if isinstance(merged["methods"], list) else []
    labels = {m.get("label", m.get("name")) for m in methods if isinstance(m, dict)}
    for section in ("real", "miniature"):
        options = _table(_table(_table(merged, "data"), section), "method_options")
        own = _table(_table(_table(child, "data"), section), "method_options")
        for label in [k for k in options if k not in labels and k not in own]:
            del options[label]


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    return value if isinstance(value, dict) else {}


def load_table(name_or_path: str) -> TableSpec:
    """A built-in table by name, or a spec file by path; ``extends`` chains are resolved first."""
    raw, origin = resolve(str(name_or_path))
    if "sweep" in raw:
        raise UserError(f"{name_or_path} is a sweep spec (it has a [sweep] table); run it with `cemabench sweep "
                        f"{name_or_path}`")
    spec = parse(raw, str(name_or_path))
    own, _, shown, _ = _read(str(name_or_path))
    if "extends" in own and "name" not in own:  # it would write, and title, its cells as its parent's table
        raise UserError(f"table spec {shown} extends {own['extends']!r} but has no name of its own: add "
                        f"name = \"...\" (without it, its files would be written and titled as {spec.name!r})")
    return replace(spec, origin=origin)


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


REGIME_FIELDS = ("regime", "bandwidth", "bandwidth_down", "latency")


def _under_regimes(entries: list, regimes: list, where: str) -> list:
    """Every method entry once under each named link regime (``regimes = [...]``), regime by regime: labelled
    ``LABEL [REGIME]``, with the regime in its own link (a table's leaderboard then groups each sweep per regime)."""
    if not regimes:
        return entries
    unknown = [r for r in regimes if not isinstance(r, str) or r not in REGIMES]
    if unknown or len(set(regimes)) != len(regimes):
        raise UserError(f"{where}: regimes must be distinct names of link regimes; valid: {', '.join(REGIMES)}, "
                        f"got {regimes!r}")
    out = []
    for regime in regimes:
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise UserError(f"{where} [[methods]] #{i + 1} must be a table")
            if not isinstance(entry.get("link", {}), dict):
                raise UserError(f"{where} [[methods]] #{i + 1}: 'link' must be a table such as link = "
                                f"{{ input_codec = \"png\" }}, got {entry['link']!r}")
            own = sorted(set(entry.get("link", {})) & set(REGIME_FIELDS))
            if own:
                raise UserError(f"{where} [[methods]] #{i + 1} sets {', '.join(own)} in its link: a table with "
                                f"regimes sets the link model per regime")
            label = entry.get("label", entry.get("name"))
            if isinstance(label, str) and any(label.endswith(f" [{r}]") for r in REGIMES):
                raise UserError(f"{where} [[methods]] #{i + 1}: label {label!r} ends in a regime's name; a table with "
                                f"regimes adds ' [REGIME]' to each label itself (valid: a label without it)")
            match = entry.get("match_uploads_of")
            out.append({**entry, "label": f"{label} [{regime}]", "link": {**entry.get("link", {}), "regime": regime},
                        **({"match_uploads_of": f"{match} [{regime}]"} if isinstance(match, str) else {})})
    return out


def check_report_axes(spec: TableSpec, where: str) -> None:
    """A hypervolume against latency needs an entry under the time model: only there is a latency modelled (the
    table's protocol as the command line left it, and each entry's own link)."""
    if "latency_p50" not in spec.report.get("hypervolume", {}):
        return
    protocols = [with_link(spec.protocol, m.link) for m in spec.methods]
    if not any(p.edge_flops_per_s is not None or p.cloud_flops_per_s is not None for p in protocols):
        raise UserError(f"{where} [report.hypervolume] latency_p50: no entry runs under the time model, so none has "
                        f"a modelled latency; set edge_flops_per_s and/or cloud_flops_per_s (or edge_device, "
                        f"cloud_device) in [protocol] or on the command line, or drop latency_p50")


def check_seeds(seeds, where: str) -> tuple[int, ...]:
    """Seeds are a non-empty list of distinct non-negative integers."""
    if (not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise UserError(f"{where} must be a non-empty list of distinct non-negative integers, got {list(seeds)!r}")
    return tuple(seeds)


def parse(raw: dict, where: str) -> TableSpec:
    _no_extra(raw, {"name", "title", "source", "seeds", "protocol", "data", "methods", "check", "reference", "limits",
                    "report", "regimes"},
              where)
    proto = _take(raw, "protocol", dict, where)
    if "reset" in proto:
        raise UserError(f"{where} [protocol]: reset was replaced by setting (reset = \"per_domain\" is setting = "
                        f"\"per-domain\", \"continual\" is \"continual\")")
    _no_extra(proto, set(FIELDS), f"{where} [protocol]")
    if raw.get("regimes"):  # each entry's regime sets its link model: the table has none of its own
        proto = {k: v for k, v in proto.items() if k not in REGIME_FIELDS}
    values = {**proto, "batch_size": _take(proto, "batch_size", object, f"{where} [protocol]")}  # required
    try:
        check_presets_given(values)
        protocol = Protocol(**values)
    except UserError as error:
        raise UserError(f"{where} [protocol]: {error}") from None

    data = _take(raw, "data", dict, where)
    _no_extra(data, {"severity", "domains", "recorded", "real", "miniature"}, f"{where} [data]")
    severity = _take(data, "severity", int, f"{where} [data]")
    domains = tuple(_take(data, "domains", list, f"{where} [data]"))
    if not domains or len(set(domains)) != len(domains):
        raise UserError(f"{where} [data]: domains must be a non-empty list without repeats")

    methods, labels = [], {}
    entries = _under_regimes(_take(raw, "methods", list, where), _take(raw, "regimes", list, where, []), where)
    for i, entry in enumerate(entries):
        w = f"{where} [[methods]] #{i + 1}"
        _no_extra(entry, {"name", "label", "options", "match_uploads_of", "reference", "link"}, w)
        name = _take(entry, "name", str, w)
        label = _take(entry, "label", str, w, name)
        match = _take(entry, "match_uploads_of", str, w, None)
        if label in labels:
            raise UserError(f"{w}: label {label!r} is used twice (methods #{labels[label]} and #{i + 1}, counting an "
                            f"extended spec's methods first, then [[add_methods]]); give one entry a different label, "
                            f"e.g. label = \"{label}-2\"")
        if match is not None and match not in labels:
            raise UserError(f"{w}: match_uploads_of = {match!r} must name the label of an earlier method")
        labels[label] = i + 1
        reference = _take(entry, "reference", str, w, None)
        if reference is not None and reference not in REFERENCES:
            raise UserError(f"{w}: reference must be {' or '.join(map(repr, REFERENCES))}, got {reference!r}")
        link = _take(entry, "link", dict, w, {})
        try:
            with_link(protocol, link)
        except UserError as error:
            raise UserError(f"{w}: {error}") from None
        methods.append(MethodEntry(label, name, _take(entry, "options", dict, w, {}), match, reference, link))

    check = _take(raw, "check", dict, where, {})
    _no_extra(check, {"tolerance", "metrics"}, f"{where} [check]")
    real = _choice(_take(data, "real", dict, f"{where} [data]"), f"{where} [data.real]")
    mini = _take(data, "miniature", dict, f"{where} [data]", None)
    miniature = None if mini is None else _choice(mini, f"{where} [data.miniature]")
    reference = _take(raw, "reference", dict, where, {})
    _no_extra(reference, {"uploads", "uploads_source", "accuracy"}, f"{where} [reference]")
    regimes = raw.get("regimes") or []
    if regimes:  # a label's method options are each of its regime entries' (a parent's, keyed by the plain label)
        real, miniature = (None if c is None else replace(c, method_options={
            k: o for key, options in c.method_options.items()
            for k, o in ([(key, options)] if key in labels else [(f"{key} [{r}]", options) for r in regimes])})
            for c in (real, miniature))
    for choice, section in ((real, "real"), (miniature, "miniature")):
        if choice is None:
            continue
        unknown = sorted(set(choice.method_options) - set(labels))
        if unknown:
            raise UserError(f"{where} [data.{section}.method_options]: no method labelled {', '.join(unknown)}")
    return TableSpec(
        name=_take(raw, "name", str, where), title=_take(raw, "title", str, where),
        source=_take(raw, "source", str, where, ""), protocol=protocol,
        seeds=check_seeds(_take(raw, "seeds", list, where, [0]), f"{where}: seeds"), severity=severity, domains=domains,
        recorded=_take(data, "recorded", dict, f"{where} [data]", {}), real=real, miniature=miniature,
        methods=tuple(methods),
        tolerance=float(_take(check, "tolerance", (int, float), f"{where} [check]", DEFAULT_TOLERANCE)),
        check_metrics=check_metrics(_take(check, "metrics", list, f"{where} [check]", list(DEFAULT_CHECK)),
                                    f"{where} [check]"),
        reference=reference, limits=parse_limits(_take(raw, "limits", dict, where, {}), f"{where} [limits]"),
        report=parse_report(_take(raw, "report", dict, where, {}), f"{where} [report]"))
