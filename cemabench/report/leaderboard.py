"""Markdown leaderboards from a table's JSON document (pandas + tabulate)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cemabench.config.presets import PRESETS, preset_values
from cemabench.config.presets import source as preset_source
from cemabench.config.settings import describe
from cemabench.report.hypervolume import EVERY_ENTRY, hypervolume_frame
from cemabench.report.plots import COMMUNICATION, COMPUTATION, LABELS, LATENCY, Axis, non_dominated, plot_tradeoffs
from cemabench.report.plots import UPLOADS as PLOTTED_UPLOADS
from cemabench.run.document import current
from cemabench.tables.metrics import UPLOAD_PERCENT

MINIATURE_BANNER = ("> **{miniature}.** These numbers come from {what} that ships with cemabench. They show the code "
                    "path works and how methods rank on a small shift; never compare them with published numbers. "
                    "Pass `--data-root` for the real table.")
MINIATURES = {"classification": "the 10-class, 32-pixel digits miniature",
              "detection": "the detection miniature (one to four digits on each 64-pixel canvas)"}


def miniature_words(doc: dict) -> str:
    """What every output of a miniature document says first: EMBEDDED MINIATURE, and which real dataset it is not
    (the one it stands in for; a miniature run outside any table stands in for none)."""
    stands_for = current(doc).get("stands_for")
    return "EMBEDDED MINIATURE" + (f", NOT {stands_for.upper()}" if stands_for else "")


def miniature_banner(doc: dict) -> str:
    """The banner of a document computed on an embedded miniature: which one, and that it is not the real data."""
    task = doc["provenance"]["dataset"].get("task", "classification")
    return MINIATURE_BANNER.format(miniature=miniature_words(doc), what=MINIATURES[task])


NOTE_MARK = "†"


def _spread(values: list[float], fmt: str) -> str:
    """One value as it is; several (one per seed) as mean ± sample standard deviation (ddof=1); "-" where a value
    is missing (bytes per coded input where nothing was uploaded)."""
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    series = pd.Series(values, dtype=float)
    return f"{fmt.format(series.mean())} ± {fmt.format(series.std(ddof=1))}"


def _cell(group: pd.DataFrame, metric: str, fmt: str) -> str:
    failed = [s for s in group["status"] if s != "ok"]
    if failed:
        return failed[0]
    if group.empty:
        return "-"
    mark = NOTE_MARK if (group["note"] != "").any() else ""
    return _spread(group.sort_values("seed")[metric].tolist(), fmt) + mark


def _domain_mean(group: pd.DataFrame, metric: str, domains: list[str]) -> float:
    """One seed's mean over the domains, summed in the table's domain order."""
    values = group.set_index("domain")[metric]
    if any(values[d] is None or pd.isna(values[d]) for d in domains):
        return None
    return sum(values[d] for d in domains) / len(domains)


STATUS_RANK = ("error", "out-of-memory", "timeout", "diverged", "skipped", "ok")


@dataclass(frozen=True)
class Score:
    """A task's score as the leaderboard shows it: the cell's key, the section title, the column and axis labels."""

    key: str
    name: str
    title: str
    short: str
    axis: str


SCORES = {
    "classification": (Score("accuracy", "Accuracy", "Online top-1 accuracy (%)", "accuracy %",
                              "top-1 accuracy (%)"),),
    "detection": (Score("map", "mAP", "COCO mAP@[.5:.95] of the predictions made at arrival (%)", "mAP %",
                        "COCO mAP@[.5:.95] (%)"),
                  Score("map50", "mAP@.5", "COCO mAP@.5 (%)", "mAP@.5 %", "COCO mAP@.5 (%)"),
                  Score("ar100", "AR@100", "COCO AR@100 (%)", "AR@100 %", "COCO AR@100 (%)")),
}


UPLOADS = Score(UPLOAD_PERCENT, "Uploads", "Uploads (% of samples sent to the cloud)", "upload %",
                "uploads (% of samples)")


def scores(doc: dict) -> tuple[Score, ...]:
    """The scores of the doc's task (its dataset's provenance names a task other than classification), primary
    first."""
    return SCORES[doc["provenance"]["dataset"].get("task", "classification")]


def pooled_over_devices(cells: list[dict]) -> list[dict]:
    """One cell per (method, seed, domain): the cells of several edge devices on one domain pooled (their samples,
    correct predictions and uploads summed)."""
    pooled: dict[tuple, dict] = {}
    for cell in cells:
        key = (cell["method"], cell["seed"], cell["domain"])
        if key not in pooled:
            pooled[key] = cell
            continue
        first = pooled[key] = dict(pooled[key])
        first["seen"] += cell["seen"]
        first["correct"] += cell["correct"]
        first["link"] = {**first["link"], "uploaded": first["link"]["uploaded"] + cell["link"]["uploaded"]}
        first["labels_used"] = first.get("labels_used", 0) + cell.get("labels_used", 0)
        first["note"] = first["note"] or cell["note"]
        first["status"] = min(first["status"], cell["status"], key=STATUS_RANK.index)  # the worst one shows
        ok = first["status"] == "ok" and first["seen"]
        first["accuracy"] = 100 * first["correct"] / first["seen"] if ok else None
        first[UPLOAD_PERCENT] = 100 * first["link"]["uploaded"] / first["seen"] if ok else None
    return list(pooled.values())


def device_frame(doc: dict) -> pd.DataFrame:
    """Per method and edge device (pooled over its domains and the seeds): accuracy, uploads, samples the cloud had no
    capacity for, bytes up and down per sample, and the mean download delay; empty with one device."""
    if not any(c.get("device", 0) for c in doc["cells"]):
        return pd.DataFrame()
    rows = {}
    for label in [m["label"] for m in doc["methods"]]:
        for device in sorted({c.get("device", 0) for c in doc["cells"]}):
            cells = [c for c in doc["cells"] if c["method"] == label and c.get("device", 0) == device]
            if not cells:
                continue
            failed = [c["status"] for c in cells if c["status"] != "ok"]
            if failed:
                rows[(label, device)] = {"domains": ", ".join(dict.fromkeys(c["domain"] for c in cells)),
                                         "accuracy %": min(failed, key=STATUS_RANK.index)}
                continue
            seen = sum(c["seen"] for c in cells)
            link = {k: sum(c["link"][k] for c in cells) for k in ("uploaded", "busy", "downloads",
                                                                  "download_delay_batches")}
            up = sum(c["link"]["bytes_up"] for c in cells)
            down = sum(c["link"]["bytes_down"] for c in cells)
            rows[(label, device)] = {
                "domains": ", ".join(dict.fromkeys(c["domain"] for c in cells)),
                "accuracy %": f"{100 * sum(c['correct'] for c in cells) / seen:.1f}",
                "upload %": f"{100 * link['uploaded'] / seen:.1f}", "cloud busy (samples)": f"{link['busy']:,}",
                "bytes up / sample": f"{up / seen:,.0f}", "bytes down / sample": f"{down / seen:,.0f}",
                "download delay (batches)": (f"{link['download_delay_batches'] / link['downloads']:.2f}"
                                             if link["downloads"] else "-")}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = [f"{label} / device {device}" for label, device in frame.index]
    return frame


def result_columns(doc: dict) -> list[str]:
    """The table's result columns: its domains, or what the setting scores instead (one mixed stream)."""
    domains = doc["provenance"]["domains"]
    extra = [d for d in dict.fromkeys(c["domain"] for c in doc["cells"]) if d not in domains]
    return extra or domains


def metric_frame(doc: dict, metric: str, fmt: str = "{:.1f}") -> pd.DataFrame:
    """Methods x domains, plus the mean over domains. With one seed a cell is that seed's value; with several it is
    the mean ± sample standard deviation (ddof=1) across seeds, and the mean column is the mean ± sample standard
    deviation across seeds of each seed's mean over domains. Failed cells show their status."""
    doc = current(doc)
    cells = pd.DataFrame(pooled_over_devices(doc["cells"]))
    domains = result_columns(doc)
    rows = {}
    for label in [m["label"] for m in doc["methods"]]:
        mine = cells[cells["method"] == label] if len(cells) else cells
        row = {domain: _cell(mine[mine["domain"] == domain], metric, fmt) for domain in domains}
        complete = [group for _, group in mine.groupby("seed")
                    if (group["status"] == "ok").all() and set(group["domain"]) >= set(domains)]
        seeds = mine["seed"].nunique() if len(mine) else 0
        if complete and len(complete) == seeds:
            row["mean"] = _spread([_domain_mean(g, metric, domains) for g in complete], fmt)
        else:
            row["mean"] = "-"
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _per_sample(group: pd.DataFrame, column: str, seen: int) -> str:
    return f"{group[column].sum() / seen:.2f}" if seen else "-"


def cost_frame(doc: dict) -> pd.DataFrame:
    """What crossed the link and what the cloud computed, per method, summed over domains, averaged over seeds."""
    cells = pd.DataFrame(doc["cells"])
    seeds = max(1, len(doc["seeds"]))
    link = pd.json_normalize(cells["link"].tolist())
    cells = pd.concat([cells.drop(columns="link"), link], axis=1)
    rows = {}
    labels = labelled(doc) and "labels_used" in cells
    for label in [m["label"] for m in doc["methods"]]:
        group = cells[cells["method"] == label]
        seen = group["seen"].sum()

        rows[label] = {
            "uploaded": f"{group['uploaded'].sum() / seeds:,.0f}",
            **({"labels": f"{group['labels_used'].sum() / seeds:,.0f}"} if labels else {}),
            "upload MB": f"{group['upload_bytes'].sum() / seeds / 1e6:.2f}",
            "payload MB": f"{group['upload_payload_bytes'].sum() / seeds / 1e6:.2f}",
            "other upload kB": f"{group['upload_tensor_bytes'].sum() / seeds / 1e3:.1f}",
            "downloads": f"{group['downloads'].sum() / seeds:,.0f}",
            "download MB": f"{group['download_bytes'].sum() / seeds / 1e6:.2f}",
            "answers MB": f"{group['answer_bytes'].sum() / seeds / 1e6:.2f}",
            "edge forwards / sample": _per_sample(group, "edge_forward_samples", seen),
            "cloud train forwards / sample": _per_sample(group, "cloud_forward_samples_grad", seen),
            "cloud eval forwards / sample": _per_sample(group, "cloud_forward_samples_nograd", seen),
            "download delay (batches)": (f"{group['download_delay_batches'].sum() / group['downloads'].sum():.2f}"
                                         if group["downloads"].sum() else "-"),
            "late answers": f"{group['late_answers'].sum() / seeds:,.0f}",
        }
        if "latency_p95" in group:  # the time model's: the median over domains of each domain's percentile
            for key, name in (("latency_p50", "latency p50 (s)"), ("latency_p95", "latency p95 (s)")):
                values = group[key].dropna()
                rows[label][name] = f"{values.median():.3g}" if len(values) else "-"
        if "input_bytes_mean" in group:  # inputs through a codec: their mean encoded length, pooled over domains
            rows[label]["input B / upload"] = (f"{group['upload_bytes'].sum() / group['uploaded'].sum():,.0f}"
                                               if group["upload_bytes"].sum() else "-")
    return pd.DataFrame.from_dict(rows, orient="index")


def breakdown_frame(doc: dict, key: str) -> pd.DataFrame:
    """Accuracy (%) per round, per severity step (pooled over domains) or per domain inside a mixed stream, from
    the cells' ``segments`` / ``by_domain``; empty when no cell has that breakdown. Seeds as in :func:`metric_frame`."""
    rows = {}
    for label in [m["label"] for m in doc["methods"]]:
        per_seed: dict[int, dict] = {}
        for cell in doc["cells"]:
            if cell["method"] != label or cell["status"] != "ok":
                continue
            counts = per_seed.setdefault(cell["seed"], {})
            if key == "domain":
                parts = [(d, seen, correct) for d, (seen, correct) in cell.get("by_domain", {}).items()]
            else:
                parts = [(s[key], s["seen"], s["correct"]) for s in cell.get("segments", []) if s.get(key) is not None]
            for name, seen, correct in parts:
                total = counts.setdefault(name, [0, 0])
                total[0], total[1] = total[0] + seen, total[1] + correct
        names = sorted({n for c in per_seed.values() for n in c}, key=lambda n: (isinstance(n, str), n))
        if names:
            rows[label] = {n: _spread([100 * c[n][1] / c[n][0] for _, c in sorted(per_seed.items()) if c.get(n)],
                                      "{:.1f}") for n in names}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    if key != "domain":
        frame.columns = [f"{key} {c}" for c in frame.columns]
    return frame


_BREAKDOWNS = (("round", "## Accuracy per round (%)", "Pooled over the domains of each repetition of the stream."),
               ("severity", "## Accuracy per severity (%)", "Pooled over the domains and over both ramps (up and "
                "down) of each severity step."),
               ("domain", "## Accuracy per domain inside the mixed stream (%)", "The samples of each domain, scored "
                "where they fell in the one shuffled stream."))


def _breakdown_sections(doc: dict) -> list[str]:
    lines = []
    devices = device_frame(doc)
    if not devices.empty:
        lines += ["## Per edge device", "", "Several edge devices share one cloud; each row pools one device's domains "
                  "and the seeds. Cloud busy: uploads the cloud had no capacity for in their step.", "",
                  devices.to_markdown(), ""]
    for key, title, what in _BREAKDOWNS:
        frame = breakdown_frame(doc, key)
        if key == "round" and frame.shape[1] < 2:
            continue
        if not frame.empty:
            lines += [title, "", what, "", frame.to_markdown(), ""]
    return lines


def efficiency_points(doc: dict) -> pd.DataFrame:
    """One operating point per method (pooled over domains and seeds; methods with a failed cell are left out):
    the task's primary score (accuracy, or mAP averaged over the domains), percentage of samples uploaded, bytes up
    and down per sample, edge and cloud GFLOPs per sample."""
    doc = current(doc)
    rows = []
    score = scores(doc)[0].key
    plugin = {m["label"]: m["name"] for m in doc["methods"]}
    reference = {m["label"]: m.get("reference") for m in doc["methods"]}  # declared by the method or the spec
    energy = (doc.get("report") or {}).get("energy")  # the spec's linear energy model, if any
    for label in plugin:
        cells = [c for c in doc["cells"] if c["method"] == label]
        if not cells or any(c["status"] != "ok" for c in cells):
            continue
        seen = sum(c["seen"] for c in cells)
        total = {k: sum(c.get(k) or 0 for c in cells) for k in ("correct", "edge_flops", "cloud_flops")}
        # classification pools the samples; a task scored per domain (mAP) averages its domains' scores
        value = (100 * total["correct"] / seen if score == "accuracy"
                 else sum(c[score] for c in cells) / len(cells))
        up = sum(c["link"].get("bytes_up", c["link"]["upload_bytes"] + c["link"]["upload_tensor_bytes"]) for c in cells)
        down = sum(c["link"].get("bytes_down", c["link"]["download_bytes"] + c["link"]["answer_bytes"]) for c in cells)
        rows.append({"method": label, "family": plugin[label], "reference": reference[label] is not None,
                     "reference_kind": reference[label],
                     score: value,
                     UPLOAD_PERCENT: 100 * sum(c["link"]["uploaded"] for c in cells) / seen,
                     "bytes_up_per_sample": up / seen, "bytes_down_per_sample": down / seen,
                     "bytes_per_sample": (up + down) / seen,
                     "edge_gflops_per_sample": total["edge_flops"] / seen / 1e9,
                     "cloud_gflops_per_sample": total["cloud_flops"] / seen / 1e9,
                     "gflops_per_sample": (total["edge_flops"] + total["cloud_flops"]) / seen / 1e9,
                     "labels_per_1000": 1000 * sum(c.get("labels_used", 0) for c in cells) / seen,
                     **_energy(energy, total, up, down, seen),
                     # under the time model: the median over domains of each domain's median latency
                     **({"latency_p50": float(np.median([c["latency_p50"] for c in cells]))}
                        if all(c.get("latency_p50") is not None for c in cells) else {})})
    points = pd.DataFrame(rows)
    if len(points):
        points["pareto"] = non_dominated(points, {score: "max", "bytes_per_sample": "min",
                                                  "gflops_per_sample": "min"})
    return points


def terminal_summary(doc: dict) -> str:
    """A per-method summary that fits a terminal (the full tables are in the Markdown file): the mean accuracy and
    percentage of samples uploaded over domains (as in the Markdown's mean column), the worst domain, and bytes and
    GFLOPs per sample."""
    doc = current(doc)
    score = scores(doc)[0]
    accuracy, uploads = metric_frame(doc, score.key), metric_frame(doc, UPLOAD_PERCENT)
    points = efficiency_points(doc)  # empty when no method finished every cell
    points = points.set_index("method") if len(points) else points
    rows = {}
    for label in accuracy.index:
        shown = accuracy.loc[label].drop("mean")
        values = shown.map(_leading_number)
        worst = (f"{values.min():.1f}{NOTE_MARK if NOTE_MARK in shown[values.idxmin()] else ''} ({values.idxmin()})"
                 if values.notna().any() else "-")
        point = points.loc[label] if label in points.index else None
        rows[label] = {score.short: accuracy.loc[label, "mean"], "upload %": uploads.loc[label, "mean"],
                       "worst domain": worst,
                       "KiB up+down / sample": f"{point['bytes_per_sample'] / 1024:.2f}" if point is not None else "-",
                       "GFLOPs / sample": f"{point['gflops_per_sample']:.3f}" if point is not None else "-"}
    lines = [f"{doc['table']}: {doc['title']}"]
    if doc["provenance"]["miniature"]:
        lines += [f"{miniature_words(doc)}: never compare with published numbers"]
    legend = ([f"{NOTE_MARK} its cell has a note (the notes are listed at the end of the Markdown file)", ""]
              if any(c.get("note") for c in doc["cells"]) else [])
    return "\n".join([*lines, "", pd.DataFrame.from_dict(rows, orient="index").to_markdown(), "", *legend,
                      *_failed_cells(doc)])


def _leading_number(shown: str) -> float:
    """A rendered cell's value (the seeds' mean, without its spread or note mark); NaN for a status or '-'."""
    return pd.to_numeric(str(shown).replace(NOTE_MARK, "").split(" ± ")[0], errors="coerce")


def labelled(doc: dict) -> bool:
    """Whether a table granted the cloud labels (active TTA): its protocol or an entry's link sets a label budget, or a
    cell used labels."""
    grants = [doc["provenance"]["protocol"], *(m.get("link") or {} for m in doc["methods"])]
    return (any(g.get(k) is not None for g in grants for k in ("label_budget", "label_budget_total"))
            or any(c.get("labels_used") for c in doc["cells"]))


LABELS_TITLE = "Labels the cloud asked the oracle annotator for (active TTA; counts per domain)"


RUN_COSTS = (("bytes_up_per_sample", "bytes up", "{:,.1f}"), ("bytes_down_per_sample", "bytes down", "{:,.1f}"),
             ("edge_gflops_per_sample", "edge GFLOPs", "{:.4g}"), ("cloud_gflops_per_sample", "cloud GFLOPs", "{:.4g}"))


def run_summary(doc: dict) -> str:
    """What `cemabench run` prints for its one method: on a miniature, that it is one; the method with its options,
    the data, severity, setting, protocol and models; each score per domain; and what each † in them means."""
    doc = current(doc)
    p = doc["provenance"]
    (method,) = doc["methods"]
    lines = [f"# {miniature_words(doc)}: numbers for checking the code path, not for comparison", ""] \
        if p["miniature"] else []
    own = f"; its own link: {options_text(method['link'])}" if method.get("link") else ""  # over the protocol below
    lines += [f"{method['label']} ({options_text(method['options'])}{own}) on {p['dataset']['dataset']}, severity "
              f"{severity_text(p)}; {setting_line(p['protocol'])}; {protocol_line(p['protocol'])}; edge "
              f"{p['models']['edge']['name']}, cloud {p['models']['foundation']['name']}", ""]
    for score in (*scores(doc), UPLOADS):
        lines += [f"{score.title}:", metric_frame(doc, score.key).T.to_markdown(), ""]
    costs = pd.concat([metric_frame(doc, key, fmt).set_axis([name]) for key, name, fmt in RUN_COSTS])
    lines += ["Cost per sample, over every sample seen (bytes up: inputs, payload and per-batch tensors; bytes down: "
              "downloads and answers; the FLOPs counted on each side; mean: over the domains):", costs.T.to_markdown(),
              ""]
    if labelled(doc):
        lines += [f"{LABELS_TITLE}:", metric_frame(doc, "labels_used", "{:,.0f}").T.to_markdown(), ""]
    if any("latency_p95" in c for c in doc["cells"]):  # the time model's per-sample latency
        for key, what in (("latency_p50", "median"), ("latency_p95", "95th percentile")):
            lines += [f"Modelled latency per sample (s), {what}:", metric_frame(doc, key, "{:.3g}").T.to_markdown(), ""]
    if p["protocol"].get("input_codec", "raw") != "raw":  # what an uploaded input cost through the codec
        for key, what in (("input_bytes_mean", "mean"), ("input_bytes_p95", "95th percentile")):
            lines += [f"Bytes per uploaded input as {p['protocol']['input_codec']}, {what}:",
                      metric_frame(doc, key, "{:.0f}").T.to_markdown(), ""]
    lines += presets_section(doc)  # the protocol line sends the reader to the presets' sources
    several = len(doc["seeds"]) > 1
    lines += [f"{NOTE_MARK} {c['domain']}" + (f" / seed {c['seed']}" if several else "") + f": {c['note']}"
              for c in doc["cells"] if c["status"] == "ok" and c["note"]]
    return "\n".join(lines).rstrip("\n") + "\n"


def _relative(value: float, reference: float | None) -> str:
    return "-" if reference is None or reference == 0 else f"{value / reference:.2f}"


def _energy(energy: dict | None, total: dict, up: float, down: float, seen: int) -> dict:
    """Joules per sample under the spec's linear energy model (``[report.energy]``): the edge's counted FLOPs and
    the bytes it sent and received, the cloud's counted FLOPs; nothing without one."""
    if not energy:
        return {}
    edge = (total["edge_flops"] * energy["edge_joules_per_flop"] + up * energy["edge_joules_per_byte_up"]
            + down * energy["edge_joules_per_byte_down"]) / seen
    cloud = total["cloud_flops"] * energy["cloud_joules_per_flop"] / seen
    return {"edge_joules_per_sample": edge, "cloud_joules_per_sample": cloud, "joules_per_sample": edge + cloud}


def efficiency_frame(doc: dict) -> pd.DataFrame:
    """Accuracy, communication and computation per sample side by side, and each relative to the cloud reference
    (the entry that declares ``reference = "cloud"``: everything in the cloud)."""
    points = efficiency_points(doc)
    if points.empty:
        return points
    score = scores(doc)[0]
    cloud = points[points["reference_kind"] == "cloud"]
    ref = cloud.iloc[0] if len(cloud) else None
    versus = ref["method"] if ref is not None else "the cloud reference"
    rows = {}
    for _, p in points.iterrows():
        rows[p["method"]] = {
            score.short: f"{p[score.key]:.1f}", "upload %": f"{p[UPLOAD_PERCENT]:.1f}",
            "bytes up / sample": f"{p['bytes_up_per_sample']:,.0f}",
            "bytes down / sample": f"{p['bytes_down_per_sample']:,.0f}",
            "edge GFLOPs / sample": f"{p['edge_gflops_per_sample']:.4f}",
            "cloud GFLOPs / sample": f"{p['cloud_gflops_per_sample']:.4f}",
            **({"edge mJ / sample": f"{1e3 * p['edge_joules_per_sample']:.4g}",
                "cloud mJ / sample": f"{1e3 * p['cloud_joules_per_sample']:.4g}"}
               if "edge_joules_per_sample" in p else {}),
            f"{score.name.lower() if score.key == 'accuracy' else score.name} vs {versus}": _relative(
                p[score.key], None if ref is None else ref[score.key]),
            f"bytes vs {versus}": _relative(p["bytes_per_sample"], None if ref is None else ref["bytes_per_sample"]),
            f"cloud FLOPs vs {versus}": _relative(p["cloud_gflops_per_sample"],
                                                  None if ref is None else ref["cloud_gflops_per_sample"]),
            "non-dominated": "●" if p["pareto"] else "",
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def sweeps(labels: list[str], families: list[str]) -> tuple[list[str], list[str]]:
    """Each entry's sweep and its point label: one sweep per label without its trailing "@value" (a knob's
    values: ``hard-example-offload:ibt@0.5`` and ``@0.8``), or else per plugin; a point is labelled with what its
    label adds to its sweep's name ("@0.5"). A label ending in `` [REGIME]``, a link regime's name (a table's
    ``regimes``), belongs to that regime's own sweep; other brackets are part of the label."""
    regime = "|".join(map(re.escape, PRESETS["regime"][0]))  # a trailing " [REGIME]", a regime's name: its own group
    groups = [re.search(rf" \[(?:{regime})\]$", m) for m in labels]
    group = [g.group(0) if g else "" for g in groups]
    heads = [m[:len(m) - len(g)] for m, g in zip(labels, group, strict=True)]
    series = [re.sub(r"@[^@]*$", "", m) if "@" in m else f for m, f in zip(heads, families, strict=True)]
    points = [m[len(s):] if m.startswith(s) and m != s else m for m, s in zip(heads, series, strict=True)]
    return [s + g for s, g in zip(series, group, strict=True)], points


def write_tradeoff_plot(doc: dict, path) -> bool:
    """Accuracy against communication and computation per sample, one point per method (PNG); False when no
    method finished."""
    doc = current(doc)
    points = efficiency_points(doc)
    if points.empty:
        return False
    # one line per plugin: the entries of one method at several knob values are its sweep
    title = f"{doc['table']}: {doc['title']}"
    if doc["provenance"]["miniature"]:
        title = f"{miniature_words(doc)}\n{title}"
    missing = len(doc["methods"]) - len(points)
    if missing:
        title += f"\n(not shown: {missing} method(s) with failed cells; see the Markdown's Failed cells)"
    series, label = sweeps(list(points["method"]), list(points["family"]))
    score = scores(doc)[0]
    timed = "latency_p50" in points and points["latency_p50"].notna().all()  # the time model ran: a latency panel
    panels = (COMMUNICATION, COMPUTATION, LATENCY) if timed else (COMMUNICATION, COMPUTATION)
    if labelled(doc):  # active TTA: accuracy against the labels used and the samples uploaded first
        panels = (LABELS, PLOTTED_UPLOADS, *panels)
    plot_tradeoffs(points.assign(method=series, label=label), path, title=title, accuracy=Axis(score.key, score.axis),
                   panels=panels)
    return True


def _reference_sections(doc: dict) -> list[str]:
    """Our numbers beside the published ones the spec records; nothing to compare on the miniature."""
    reference = doc.get("reference", {})
    proto = doc["provenance"]["protocol"]
    if doc["provenance"]["miniature"] or not reference:
        return []
    if proto.get("setting", "per-domain") != "per-domain" or proto.get("devices", 1) > 1:
        return ["## Published numbers", "", "Not shown: they were measured per domain on one edge, and this table's "
                "stream setting or devices differ.", ""]
    lines = []
    published = {(r["method"], r["domain"]): r for r in reference.get("published_uploads", [])}
    rows = []
    for cell in doc["cells"]:
        r = published.get((cell["method"], cell["domain"]))
        if r is None or cell["status"] != "ok" or not cell["seen"]:
            continue
        mine, theirs = 100 * cell["link"]["uploaded"] / cell["seen"], 100 * r["uploaded"] / r["total"]
        rows.append({"method": r["method"], "corruption": r["domain"], "seed": cell["seed"],
                     "uploaded (ours)": cell["link"]["uploaded"], "seen (ours)": cell["seen"],
                     "ratio % (ours)": f"{mine:.1f}",
                     "uploaded (published)": r["uploaded"], "of (published)": r["total"],
                     "ratio % (published)": f"{theirs:.1f}", "difference (pp)": f"{mine - theirs:+.1f}"})
    if rows:
        lines += ["## Uploads against the authors' published counts", "",
                  f"Published counts: {reference.get('uploads_source', reference.get('uploads'))}.", "",
                  pd.DataFrame(rows).to_markdown(index=False), ""]
    accuracy = reference.get("accuracy", [])
    lines += ["## Published accuracies", ""]
    if accuracy:
        lines += [pd.DataFrame(accuracy).to_markdown(index=False), ""]
    else:
        lines += ["None recorded yet: add `[[reference.accuracy]]` entries (method, domain, accuracy, source) to "
                  "the spec when a source is at hand.", ""]
    return lines


def _compact(value) -> str:
    """Per-domain counts collapse to a range when they differ, to one number when they agree."""
    if isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values()):
        low, high = min(value.values()), max(value.values())
        return f"{low:,}" if low == high else f"{low:,} to {high:,}"
    return str(value)


def options_text(options: dict) -> str:
    """A method's options in one line; a list option reads as the run gave it (a tuple: JSON has only lists, so a
    document rendered from its file reads as the one rendered when it ran)."""
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in sorted(options.items())) or "defaults"


def setting_line(proto: dict) -> str:
    """The stream setting's definition (documents written before settings existed say ``reset`` instead)."""
    legacy = {"per_domain": "per-domain"}.get(proto.get("reset"), proto.get("reset"))
    return describe(proto.get("setting", legacy), proto.get("rounds", 1), proto.get("concentration", 0.1), proto)


def protocol_line(proto: dict) -> str:
    """Batch size, delay, budgets and the link model, in one line."""
    text = (f"edge batch {proto['batch_size']}, delivery delay {proto['delivery_delay']}, upload budget "
            f"{proto['upload_budget'] or 'none'}")
    if proto.get("upload_budget_bytes") is not None:
        text += f", byte budget {proto['upload_budget_bytes']:,}"
    if proto.get("label_budget") is not None or proto.get("label_budget_total") is not None:
        limits = [f"{proto[k]:,} per {what}" for k, what in (("label_budget", "batch"),
                                                             ("label_budget_total", "run unit"))
                  if proto.get(k) is not None]
        text += (f", label budget {' and '.join(limits)} (an oracle annotator's labels of uploaded samples, to the "
                 f"cloud)")
    if proto.get("edge_flops_per_s") is not None or proto.get("cloud_flops_per_s") is not None:
        rates = [f"{proto[k]:g} FLOP/s" if proto[k] is not None else "no compute time"
                 for k in ("edge_flops_per_s", "cloud_flops_per_s")]
        text += (f"; time model: edge {rates[0]}, cloud {rates[1]} (one step at a time; edges sharing it in the "
                 f"loop's device order)" + ("" if _link_model(proto) else
                                             f", one batch every {proto['batch_interval']:g} s"))
    if proto.get("input_codec", "raw") != "raw":
        text += f", inputs sent as {proto['input_codec']} (Pillow; charged at their encoded length)"
    if _link_model(proto):
        bandwidth = f"{proto['bandwidth']:g} bytes/s" if proto["bandwidth"] else "unlimited bandwidth"
        if proto.get("bandwidth_down"):
            bandwidth = f"{bandwidth} up, {proto['bandwidth_down']:g} bytes/s down"
        text += (f"; link {bandwidth}, latency {proto['latency']:g} s, one batch every {proto['batch_interval']:g} s, "
                 f"answer deadline "
                 f"{'none' if proto['answer_deadline'] is None else str(proto['answer_deadline']) + ' s'}")
    presets = [f"{k.replace('_', ' ')} `{proto[k]}`" for k in ("regime", "edge_device", "cloud_device") if proto.get(k)]
    if presets:
        text += f" ({', '.join(presets)}: named presets, their sources under Presets)"
    if proto.get("reset_every") is not None:
        text += (f"; **periodic reset every {proto['reset_every']:,} batches** (the halves rebuilt from source, the "
                 f"counts going on)")
    if proto.get("devices", 1) > 1:
        streams = {"partition": "each its own domains", "rotate": "each all domains, in its own rotated order"}
        text += (f"; **{proto['devices']} edge devices on one cloud** ({streams[proto['device_streams']]}; in "
                 f"lockstep, the device order rotating every step), cloud capacity "
                 f"{proto['cloud_capacity'] if proto['cloud_capacity'] is not None else 'unlimited'} uploaded samples "
                 f"per step over all devices")
    return text


def severity_text(provenance: dict) -> str:
    """The severity of a table's stream in words: the clean domain has none."""
    domains, severity = set(provenance["domains"]), provenance["severity"]
    if domains == {"clean"}:
        return "none (the clean stream)"
    return f"{severity} (the clean domain: none)" if "clean" in domains else str(severity)


def data_line(doc: dict) -> str:
    """The dataset that ran, where it was read from, and on a miniature the real dataset it stands in for."""
    p = doc["provenance"]
    return (f"{p['dataset']['dataset']}" + (f" from `{p['data_root']}`" if p["data_root"] else "")
            + (f", standing in for {doc['stands_for']}" if doc.get("stands_for") else ""))


def render(doc: dict) -> str:
    """The table's Markdown: the header (data, severity, setting, protocol, models, seeds, versions), the scores per
    method and domain, efficiency, link and cloud compute, methods, published numbers, notes and failed cells."""
    doc = current(doc)
    p = doc["provenance"]
    proto = p["protocol"]
    lines = [f"# {doc['table']}: {doc['title']}", ""]
    if p["miniature"]:
        lines += [miniature_banner(doc), ""]
    lines += [
        f"- **Data**: {data_line(doc)}"
        + "".join(f"; {k.replace('_', ' ')}: {_compact(v)}" for k, v in p["dataset"].items() if k != "dataset"),
        f"- **Severity**: {severity_text(p)}; "
        f"**domains in order**: {', '.join(p['domains'])}",
        f"- **Setting**: {setting_line(proto)}",
        f"- **Protocol**: {protocol_line(proto)}{_regimes_note(doc)}",
        "- **Models**: " + (f"pair `{p['pair']}`: " if p.get("pair") else "")
        + ", ".join(f"{k} `{v['name']}` ({v['fingerprint']})" for k, v in p["models"].items()),
        f"- **Seeds**: {', '.join(map(str, doc['seeds']))}"
        + (" (each cell: mean ± sample standard deviation, ddof=1, across seeds; the mean column: the same over each "
           "seed's mean over domains)" if len(doc["seeds"]) > 1 else ""),
    ]
    lines += [f"- **{k.replace('_', ' ').capitalize()}**: {v}" for k, v in p["recorded"].items()]
    v = p["versions"]
    libraries = ", ".join(f"{name} {v[name]}" for name in ("cemabench", "torch", "torchvision", "timm", "numpy",
                                                           "python") if name in v)
    lines += [f"- **Versions**: {libraries}; device {p['device']}"
              + (", channels-last" if p["execution"]["channels_last"] else "")
              + (", bf16 autocast" if p["execution"]["amp"] else ", fp32 (no autocast)")
              + (f"; CPU kernels {v['cpu_numerics']}" if "cpu_numerics" in v and p["device"] == "cpu" else "")
              + (f"; {v['meter']} meter" if "meter" in v else "")]
    if doc.get("isolated"):
        lines += ["- **Isolation**: every unit's edge and cloud halves ran in processes of their own (`--isolate`)"]
    if doc.get("source"):
        lines += [f"- **Source**: {doc['source']}"]
    lines += [""]
    for score in scores(doc):
        lines += [f"## {score.title}", "", metric_frame(doc, score.key).to_markdown(), ""]
    lines += [f"## {UPLOADS.title}", "", metric_frame(doc, UPLOADS.key).to_markdown(), ""]
    if labelled(doc):
        lines += [f"## {LABELS_TITLE}", "", metric_frame(doc, "labels_used", "{:,.0f}").to_markdown(), ""]
    lines += [*_breakdown_sections(doc),
              f"## {scores(doc)[0].name}, communication and computation per sample",
              "", ("Pooled over domains and seeds" if scores(doc)[0].key == "accuracy" else
                   f"{scores(doc)[0].name}: the mean over domains, each scored over its whole stream; the rest pooled "
                   f"over domains and seeds") + ". FLOPs are counted by what executed (torch.utils.flop_counter): "
              "edge = everything the edge step ran, cloud = forward and backward of everything the cloud step ran. "
              "Bytes are what crossed the link (inputs, payload, tensors up; parameters and answers down). "
              "Non-dominated: no other method is at least as accurate with no more bytes and no more FLOPs.", "",
              *_energy_line(doc),
              efficiency_frame(doc).to_markdown(), "",
              *_hypervolume_section(doc),
              "## Link and cloud compute (totals over all domains)", "",
              "Upload: raw inputs (upload MB), per-sample payload rows such as features (payload MB) and per-batch "
              "tensors (other upload kB); their sum is what bytes up / sample counts.", "",
              cost_frame(doc).to_markdown(), "",
              "## Methods", ""]
    methods = pd.DataFrame([{"method": m["label"], "plugin": m["name"], "paper": m["paper"],
                             "options": options_text(m["options"])
                             + (f"; upload ratio matched to {m['match_uploads_of']}" if m["match_uploads_of"] else "")
                             + (f"; its own link: {options_text(m['link'])}" if m.get("link") else "")}
                            for m in doc["methods"]]).set_index("method")
    lines += [methods.to_markdown(), ""]
    lines += presets_section(doc)
    lines += _reference_sections(doc)
    noted = [c for c in doc["cells"] if c["status"] == "ok" and c["note"]]
    if noted:
        lines += ["## Notes", ""]
        lines += [f"- {NOTE_MARK} {c['method']} / {c['domain']} / seed {c['seed']}: {c['note']}" for c in noted]
        lines += [""]
    return "\n".join(lines + _failed_cells(doc))


def _energy_line(doc: dict) -> list[str]:
    """What the energy columns assume (the spec's ``[report.energy]``); nothing without it."""
    energy = (doc.get("report") or {}).get("energy")
    if not energy:
        return []
    return [f"Energy (mJ per sample) from the spec's linear model (`[report.energy]`), not a measurement: edge "
            f"{energy['edge_joules_per_flop']:g} J per counted FLOP + {energy['edge_joules_per_byte_up']:g} J per byte "
            f"sent + {energy['edge_joules_per_byte_down']:g} J per byte received; cloud "
            f"{energy['cloud_joules_per_flop']:g} J per counted FLOP.", ""]


def _regimes_note(doc: dict) -> str:
    """Where the link model is each entry's own regime (a spec's ``regimes``), the protocol line says so: the table's
    own protocol then has none."""
    regimes = [m.get("link", {}).get("regime") for m in doc["methods"]]
    if not regimes or None in regimes or _link_model(doc["provenance"]["protocol"]):
        return ""
    return (f"; link: each entry under its own regime, {', '.join(dict.fromkeys(regimes))} (its label ends in "
            f"[REGIME]; their numbers under Presets)")


def presets_section(doc: dict) -> list[str]:
    """Each named preset that the table or an entry's own link used, with what it sets and its source."""
    used = {}
    for fields in (doc["provenance"]["protocol"], *(m.get("link", {}) for m in doc["methods"])):
        for field in PRESETS:
            if fields.get(field):
                used[field, fields[field]] = None
    lines = []
    for field, name in used:
        if name not in PRESETS[field][0]:  # a document from a cemabench with other presets
            lines.append(f"- {field.replace('_', ' ')} `{name}`: not a preset of this cemabench")
            continue
        sets = ", ".join(f"{k} {v:g}" for k, v in preset_values(field, name).items())
        lines.append(f"- {field.replace('_', ' ')} `{name}` ({sets}): {preset_source(field, name)}")
    return ["## Presets", "", *lines, ""] if lines else []


def _link_model(proto: dict) -> bool:
    """Whether transfers take time (a bandwidth, either direction's, or a latency)."""
    return bool(proto.get("bandwidth") or proto.get("bandwidth_down") or proto.get("latency"))


def _hypervolume_section(doc: dict) -> list[str]:
    """Per sweep and cost axis, the trade-off hypervolume against the spec's reference point (none without one)."""
    reference = (doc.get("report") or {}).get("hypervolume")
    points = efficiency_points(doc) if reference else pd.DataFrame()
    if points.empty:
        return []
    score = scores(doc)[0]
    series, _ = sweeps(list(points["method"]), list(points["family"]))
    name = score.name if score.key != "accuracy" else "accuracy"
    return ["## Trade-off hypervolume", "",
            f"Per sweep (one method's entries: a label up to its trailing \"@value\", or else the plugin), and for "
            f"every entry together: the share (%) of the box from no cost to the reference cost and from {name} "
            f"{reference['score']:g} % to 100 % that the sweep's points dominate, for each cost on its own (the "
            f"two-objective hypervolume). 100 would be a perfect score at no cost; 0, no point inside the box. The "
            f"reference point is the spec's `[report.hypervolume]`; entries with a failed cell are left out (and "
            f"counted beside their sweep's points).", "",
            _with_failed(hypervolume_frame(points, series, reference, score.key), doc, set(points["method"]))
            .to_markdown(), ""]


def _with_failed(frame: pd.DataFrame, doc: dict, kept: set) -> pd.DataFrame:
    """The hypervolume frame with each sweep's entries left out for a failed cell counted beside its points (a sweep
    that lost a point covers less), and a sweep that lost every entry as a row of its own."""
    labels = [m["label"] for m in doc["methods"]]
    every, _ = sweeps(labels, [m["name"] for m in doc["methods"]])
    lost = Counter(s for s, label in zip(every, labels, strict=True) if label not in kept)
    if not lost:
        return frame
    frame = frame.astype(object)
    for name, n in [*lost.items(), (EVERY_ENTRY, sum(lost.values()))]:
        if name not in frame.index:
            frame.loc[name] = ["-"] * len(frame.columns)
            frame.loc[name, "points"] = 0
        frame.loc[name, "points"] = f"{frame.loc[name, 'points']} ({n} failed, left out)"
    return frame.loc[[*dict.fromkeys([*every, EVERY_ENTRY])]]


def _failed_cells(doc: dict) -> list[str]:
    """A section listing each failed cell with the first line of its message (none when every cell is ok)."""
    failures = [c for c in doc["cells"] if c["status"] not in ("ok", "skipped")]
    if not failures:
        return []
    return ["## Failed cells", "", *(f"- {c['method']} / {c['domain']} / seed {c['seed']}: **{c['status']}**: "
                                     f"{c['message'].splitlines()[0]}" for c in failures), ""]
