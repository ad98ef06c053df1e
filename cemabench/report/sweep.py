"""A sweep's document as a person reads it: per severity, the accuracy and uploads (% of samples) tables (rows = grid
points), and for a one-option numeric grid a plot against the swept option."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cemabench.report.leaderboard import (
    data_line,
    metric_frame,
    miniature_banner,
    miniature_words,
    presets_section,
    protocol_line,
    setting_line,
)
from cemabench.run.document import current
from cemabench.tables.metrics import UPLOAD_PERCENT
from cemabench.tables.sweep import point_label

UPLOADS = (UPLOAD_PERCENT, "uploads (% of samples sent to the cloud)")


def _current(doc: dict) -> dict:
    """The sweep with each severity's table document of today's schema (see :func:`cemabench.run.document.current`)."""
    return {**doc, "tables": {s: current(t, f"the sweep's severity-{s} table") for s, t in doc["tables"].items()}}


def _row_name(point: dict) -> str:
    if point["options"] is None:
        return "(entry as in the table)"
    return ", ".join(f"{k} = {v}" for k, v in point["options"].items())


def render_sweep(doc: dict) -> str:
    """The sweep as Markdown: the setup once, then per severity the accuracy and uploads tables."""
    doc = _current(doc)
    first = next(iter(doc["tables"].values()))
    p = first["provenance"]
    lines = [f"# {doc['sweep']}: {doc['title']}", ""]
    if p["miniature"]:
        lines += [miniature_banner(first), ""]
    names = {pt["label"]: _row_name(pt) for pt in doc["points"]}
    reference = next((m for m in first["methods"] if m["label"] == doc["method"]), None)
    lines += [
        f"- **Swept**: `{doc['method']}` over {', '.join(f'{k} in {v}' for k, v in doc['grid'].items())}"
        + (f"; held on every point: {', '.join(f'{k}={v}' for k, v in doc['fixed'].items())}" if doc["fixed"] else ""),
        f"- **Severities**: {', '.join(map(str, doc['severities']))}; **domains**: {', '.join(p['domains'])}",
        f"- **Data**: {data_line(first)}",
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
        for metric, title in (("accuracy", "online top-1 accuracy (%)"), UPLOADS):
            frame = metric_frame(table, metric).rename(index=names)
            frame.index.name = ", ".join(doc["grid"])
            lines += [f"## Severity {severity}: {title}", "", frame.to_markdown(), ""]
    lines += presets_section(first)  # the protocol line sends the reader to the presets' sources
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
    """Accuracy and uploads (% of samples) against the swept option, one line per severity, the reference row dashed;
    only for a grid over one numeric option. Returns whether a plot was written."""
    if len(doc["grid"]) != 1:
        return False
    option, values = next(iter(doc["grid"].items()))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = _current(doc)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, ylabel in ((axes[0], "accuracy", "online top-1 accuracy (%)"),
                               (axes[1], UPLOAD_PERCENT, "uploads (% of samples)")):
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
    data = miniature_words(first) if first["provenance"]["miniature"] else first["provenance"]["dataset"]["dataset"]
    figure.suptitle(f"{doc['sweep']}: mean over {len(first['provenance']['domains'])} domain(s), {data}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
