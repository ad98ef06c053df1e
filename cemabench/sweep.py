"""Sweeps over a method's options: a table spec with a ``[sweep]`` table, expanded into one method entry per grid point
(labelled like ``cema entropy_min=0.02``) and run through :func:`cemabench.runner.reproduce`, once per severity.

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
from pathlib import Path

import pandas as pd

from cemabench.errors import UserError
from cemabench.leaderboard import protocol_line, setting_line
from cemabench.spec import MethodEntry, TableSpec, parse, resolve

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
    fixed = config.get("fixed", {})
    if not isinstance(fixed, dict) or set(fixed) & set(grid):
        raise UserError(f"{where}: fixed must be a table of options not in the grid, got {fixed!r}")
    severities = config.get("severities", [table.severity])
    if (not isinstance(severities, list) or not severities or len(set(severities)) != len(severities)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in severities)):
        raise UserError(f"{where}: severities must be a non-empty list of distinct integers >= 0, got {severities!r}")
    reference = config.get("reference", False)
    axis = config.get("axis", ", ".join(grid))
    if not isinstance(reference, bool) or not isinstance(axis, str):
        raise UserError(f"{where}: reference must be true or false and axis a string")
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
        methods.append(MethodEntry(label, entry.name, {**entry.options, **sweep.fixed, **point}))
        for choice in overrides:
            if per_choice[choice]:
                overrides[choice][label] = {**per_choice[choice], **sweep.fixed, **point}

    def choice_for(choice, name):
        if choice is None:
            return None
        kept = {sweep.method: choice.method_options[sweep.method]} if (
            sweep.reference and sweep.method in choice.method_options) else {}
        return replace(choice, method_options={**kept, **overrides[name]})

    return replace(table, name=f"{sweep.name}-s{severity}", severity=severity, methods=tuple(methods),
                   title=f"{sweep.title} (severity {severity})",
                   real=choice_for(table.real, "real"), miniature=choice_for(table.miniature, "miniature"))


def run_sweep(sweep: Sweep, data_root: str | None, out: Path, seeds: tuple[int, ...] | None = None, jobs: int = 1,
              progress: bool = True, **reproduce_options) -> dict:
    """Run (or resume, from the same results store) every severity of the sweep; the sweep's JSON document."""
    from cemabench.runner import reproduce

    tables = {}
    for severity in sweep.severities:
        tables[str(severity)] = reproduce(expand(sweep, severity), data_root, out, seeds=seeds, jobs=jobs,
                                          progress=progress, **reproduce_options)
    points = ([{"label": sweep.method, "options": None}] if sweep.reference else []) + [
        {"label": point_label(sweep.method, p), "options": p} for p in sweep.points()]
    return {"sweep": sweep.name, "title": sweep.title, "method": sweep.method,
            "grid": {k: list(v) for k, v in sweep.grid.items()}, "fixed": sweep.fixed, "axis": sweep.axis,
            "severities": list(sweep.severities), "points": points, "tables": tables}


def _row_name(point: dict) -> str:
    if point["options"] is None:
        return "(entry as in the table)"
    return ", ".join(f"{k} = {v}" for k, v in point["options"].items())


def render_sweep(doc: dict) -> str:
    """The sweep as Markdown: the setup once, then per severity the accuracy and upload-ratio tables."""
    from cemabench.leaderboard import MINIATURE_BANNER, metric_frame

    first = next(iter(doc["tables"].values()))
    p = first["provenance"]
    lines = [f"# {doc['sweep']}: {doc['title']}", ""]
    if p["miniature"]:
        lines += [MINIATURE_BANNER.format(dataset=first["real_dataset"].upper()), ""]
    names = {pt["label"]: _row_name(pt) for pt in doc["points"]}
    reference = next((m for m in first["methods"] if m["label"] == doc["method"]), None)
    lines += [
        f"- **Swept**: `{doc['method']}` over {', '.join(f'{k} in {v}' for k, v in doc['grid'].items())}"
        + (f"; held on every point: {', '.join(f'{k}={v}' for k, v in doc['fixed'].items())}" if doc["fixed"] else ""),
        f"- **Severities**: {', '.join(map(str, doc['severities']))}; **domains**: {', '.join(p['domains'])}",
        f"- **Data**: {p['dataset']['dataset']}" + (f" from `{p['data_root']}`" if p["data_root"] else ""),
        "- **Models**: " + ", ".join(f"{k} `{v['name']}` ({v['fingerprint']})" for k, v in p["models"].items()),
        f"- **Setting**: {setting_line(p['protocol'])}",
        f"- **Protocol**: {protocol_line(p['protocol'])}",
        f"- **Seeds**: {', '.join(map(str, first['seeds']))}"
        + (" (cells: mean ± sample standard deviation, ddof=1, across seeds)" if len(first["seeds"]) > 1 else ""),
    ]
    if reference is not None:
        options = ", ".join(f"{k}={v}" for k, v in sorted(reference["options"].items())) or "defaults"
        lines += [f"- **Reference row**: `{doc['method']}` as in the table ({options})"]
    lines += ["- **Versions**: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if k != "platform"), ""]
    for severity, table in doc["tables"].items():
        for metric, title in (("accuracy", "online top-1 accuracy (%)"),
                              ("upload_ratio", "upload ratio (% of samples sent to the cloud)")):
            frame = metric_frame(table, metric).rename(index=names)
            frame.index.name = ", ".join(doc["grid"])
            lines += [f"## Severity {severity}: {title}", "", frame.to_markdown(), ""]
    failed = [(s, c) for s, t in doc["tables"].items() for c in t["cells"] if c["status"] not in ("ok", "skipped")]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- severity {s}: {c['method']} / {c['domain']} / seed {c['seed']}: **{c['status']}**: "
                  f"{c['message'].splitlines()[0] if c['message'] else ''}" for s, c in failed]
        lines += [""]
    return "\n".join(lines)


def sweep_means(table: dict, metric: str) -> dict[str, float | None]:
    """Per method label: the mean over seeds of each seed's mean over the table's domains (None if a cell failed)."""
    cells = pd.DataFrame(table["cells"])
    domains = table["provenance"]["domains"]
    means = {}
    for label, group in cells.groupby("method", sort=False):
        if not (group["status"] == "ok").all():
            means[label] = None
            continue
        per_seed = [g.set_index("domain")[metric].loc[domains].mean() for _, g in group.groupby("seed")]
        means[label] = sum(per_seed) / len(per_seed)
    return means


def plot_sweep(doc: dict, path: Path) -> bool:
    """Accuracy and upload ratio against the swept option, one line per severity, the reference row dashed; only for
    a grid over one numeric option. Returns whether a plot was written."""
    if len(doc["grid"]) != 1:
        return False
    option, values = next(iter(doc["grid"].items()))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, ylabel in ((axes[0], "accuracy", "online top-1 accuracy (%)"),
                               (axes[1], "upload_ratio", "upload ratio (% of samples)")):
        for severity, table in doc["tables"].items():
            means = sweep_means(table, metric)
            ys = [means.get(point_label(doc["method"], {option: v})) for v in values]
            line, = ax.plot(values, [float("nan") if y is None else y for y in ys], marker="o",
                            label=f"severity {severity}")
            if means.get(doc["method"]) is not None and any(pt["options"] is None for pt in doc["points"]):
                ax.axhline(means[doc["method"]], linestyle="--", color=line.get_color(),
                           label=f"severity {severity}: {doc['method']} as in the table")
        ax.set_xlabel(doc["axis"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    first = next(iter(doc["tables"].values()))
    data = "embedded miniature" if first["provenance"]["miniature"] else first["provenance"]["dataset"]["dataset"]
    figure.suptitle(f"{doc['sweep']}: mean over {len(first['provenance']['domains'])} domain(s), {data}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
