"""Sweeps over a method's options: a table spec with a ``[sweep]`` table, expanded into one method entry per grid point
(labelled like ``cema entropy_min=0.02``) and run through :func:`cemabench.run.runner.reproduce`, once per severity
(:func:`cemabench.run.runner.run_sweep`); :mod:`cemabench.report.sweep` renders it.

A sweep spec is a table spec (usually ``extends = "table2"`` with fewer domains) plus::

    [sweep]
    method = "cema"                 # the label of the table's method entry to sweep
    severities = [3, 5]             # optional; default: the table's severity
    reference = true                # optional; also run the entry unchanged, as a first row
    axis = "E_min (fraction of ln C)"   # optional; the plot's x axis
    [sweep.grid]                    # option -> values; several options make a grid (their product)
    entropy_min = [0.01, 0.02, 0.03]
    [sweep.fixed]                   # optional; options held on every grid point (not on the reference row)
    dynamic_warmup = 256

The output is OUT/NAME.md (per severity: rows = grid points, columns = domains + mean, for accuracy and upload
ratio), OUT/NAME.json (the sweep and every severity's full table document) and, for a one-option grid, OUT/NAME.png.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from cemabench.config import with_link
from cemabench.errors import UserError
from cemabench.tables.spec import MethodEntry, TableSpec, check_report_axes, parse, resolve

LINK = "link."  # a grid key that names a link field of the swept entry instead of a method option

SWEEP_KEYS = {"method", "severities", "reference", "axis", "grid", "fixed"}


@dataclass(frozen=True)
class Sweep:
    name: str
    title: str
    method: str  # label of the swept entry in the table
    grid: dict  # option -> tuple of values
    fixed: dict
    severities: tuple[int, ...]
    reference: bool
    axis: str
    table: TableSpec  # the table the sweep runs on (its ``methods`` still the parent's)

    def points(self) -> list[dict]:
        """Every grid point as {option: value}, the first option varying slowest."""
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]


def point_label(method: str, point: dict) -> str:
    return f"{method} " + ", ".join(f"{k}={v}" for k, v in point.items())


def load_sweep(name_or_path: str) -> Sweep:
    """A built-in sweep by name (reproduce/sweeps/NAME.toml) or a sweep spec file by path."""
    raw, origin = resolve(str(name_or_path), kind="sweep")
    where = f"{name_or_path} [sweep]"
    config = raw.pop("sweep", None)
    if not isinstance(config, dict):
        raise UserError(f"{name_or_path} has no [sweep] table (method, grid, ...); run a table spec with "
                        f"`cemabench reproduce`")
    extra = sorted(set(config) - SWEEP_KEYS)
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; valid: {', '.join(sorted(SWEEP_KEYS))}")
    table = replace(parse(raw, str(name_or_path)), origin=origin)
    method = config.get("method")
    labels = [m.label for m in table.methods]
    if method not in labels:
        raise UserError(f"{where}: method must be the label of one of the table's methods ({', '.join(labels)}), "
                        f"got {method!r}")
    entry = next(m for m in table.methods if m.label == method)
    if entry.match_uploads_of is not None:
        raise UserError(f"{where}: {method!r} copies the uploads of {entry.match_uploads_of!r} (match_uploads_of); "
                        f"sweeping such an entry is not supported")
    grid = config.get("grid")
    if (not isinstance(grid, dict) or not grid
            or not all(isinstance(v, list) and v and len(set(map(repr, v))) == len(v) for v in grid.values())):
        raise UserError(f"{where}: grid must map option names to non-empty lists of distinct values, got {grid!r}")
    for key, values in grid.items():  # link.FIELD: the swept entry's own link field (an input codec, say)
        if key == f"{LINK}regime" and "regime" in entry.link:
            raise UserError(f"{where}: grid {key}: {method!r} runs under regime {entry.link['regime']!r} (its own "
                            f"link, or the table's regimes); sweep the regime of an entry without one")
        if key.startswith(LINK):
            for value in values:
                try:
                    with_link(table.protocol, {**entry.link, key.removeprefix(LINK): value})
                except UserError as error:
                    raise UserError(f"{where}: grid {key}: {error}") from None
    fixed = config.get("fixed", {})
    if not isinstance(fixed, dict) or set(fixed) & set(grid) or any(k.startswith(LINK) for k in fixed):
        raise UserError(f"{where}: fixed must be a table of options not in the grid, got {fixed!r}")
    severities = config.get("severities", [table.severity])
    if (not isinstance(severities, list) or not severities or len(set(severities)) != len(severities)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in severities)):
        raise UserError(f"{where}: severities must be a non-empty list of distinct integers >= 0, got {severities!r}")
    reference = config.get("reference", False)
    axis = config.get("axis", ", ".join(grid))
    if not isinstance(reference, bool) or not isinstance(axis, str):
        raise UserError(f"{where}: reference must be true or false and axis a string")
    check_report_axes(table, str(name_or_path))
    return Sweep(name=table.name, title=table.title, method=method, grid={k: tuple(v) for k, v in grid.items()},
                 fixed=fixed, severities=tuple(severities), reference=reference, axis=axis, table=table)


def expand(sweep: Sweep, severity: int) -> TableSpec:
    """The sweep at one severity as a table spec: the reference entry (if asked) and one entry per grid point, each
    with the swept entry's options, its per-data-choice method options, the fixed options and the point's values."""
    table = sweep.table
    entry = next(m for m in table.methods if m.label == sweep.method)
    methods = [entry] if sweep.reference else []
    per_choice = {"real": dict(table.real.method_options.get(entry.label, {})),
                  "miniature": dict(table.miniature.method_options.get(entry.label, {})) if table.miniature else {}}
    overrides = {"real": {}, "miniature": {}}
    for point in sweep.points():
        label = point_label(entry.label, point)
        options = {k: v for k, v in point.items() if not k.startswith(LINK)}
        link = {**entry.link, **{k.removeprefix(LINK): v for k, v in point.items() if k.startswith(LINK)}}
        methods.append(MethodEntry(label, entry.name, {**entry.options, **sweep.fixed, **options}, link=link))
        for choice in overrides:
            if per_choice[choice]:
                overrides[choice][label] = {**per_choice[choice], **sweep.fixed, **options}

    def choice_for(choice, name):
        if choice is None:
            return None
        kept = {sweep.method: choice.method_options[sweep.method]} if (
            sweep.reference and sweep.method in choice.method_options) else {}
        return replace(choice, method_options={**kept, **overrides[name]})

    return replace(table, name=f"{sweep.name}-s{severity}", severity=severity, methods=tuple(methods),
                   title=f"{sweep.title} (severity {severity})",
                   real=choice_for(table.real, "real"), miniature=choice_for(table.miniature, "miniature"))
