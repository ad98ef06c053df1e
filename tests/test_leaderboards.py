"""The committed miniature leaderboards are what the code produces today, within each spec's tolerance."""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cemabench.config import result_keys, unit_groups
from cemabench.report.check import compare
from cemabench.run import runner
from cemabench.tables.spec import available_tables, load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"
COMMITTED = sorted(LEADERBOARDS.glob("*.miniature.json"))


def test_every_table_with_a_miniature_has_a_committed_leaderboard():
    with_miniature = [t for t in available_tables() if load_table(t).miniature is not None]
    assert sorted(p.name for p in COMMITTED) == sorted(f"{t}.miniature.json" for t in with_miniature)


# The slow tier checks some tables on a sample, to keep `.ci/run` under its 30 minutes (the whole slow tier took
# 1947 s on 2 cores on 2026-12-06, and CI 1801 s in all; `cemabench reproduce T` then `cemabench check` checks a whole
# table). What makes a sample sound (test_a_domain_sample_gives_the_whole_tables_cells): a per-domain unit does not
# depend on which other domains the table holds, and a unit does not depend on the other entries of its table.
# The per-domain tables on one domain per corruption family (noise, blur, weather, digital), a different one in each:
SAMPLED = {
    "table2": ("gaussian_noise", "motion_blur", "snow", "pixelate"),
    # table2's code at severity 3, on two domains (ninth session: 20 methods, 204 s for four)
    "imagenet-c-s3": ("shot_noise", "frost"),
}
# Tables checked on some of their entries (labels): each entry is its own units (and its own training, where it
# trains), so a sampled entry's cells are the committed ones. The samples keep one entry of each kind of mechanism.
SAMPLED_ENTRIES = {
    # no adaptation, norm statistics, a Fisher-regularised selection, a mean teacher with restore, a periodic
    # reset, and CEMA (603 s for all 16 on 2026-12-06; cema alone is about a fifth of it)
    "continual": ("source", "bn-adapt", "eata", "cotta", "rdumb", "cema"),
    # the raw, lossless, lossy and WebP inputs, a router with a codec, ECC-A's entropy-coded features, the split
    # point, and one trained learned bottleneck (497 s for all 18, four of five learned bottlenecks trained)
    "link-codecs": ("source", "cloud-only", "cloud-only png", "cloud-only jpeg:75", "cloud-only webp:75",
                    "confidence-offload@0.9 jpeg:75", "ecc-a:l2>l3,r2 int8+zstd", "split-point",
                    "entropic-student beta=0.16"),
    # the baselines, and SimATTA's two selections at one budget (214 s for all 8)
    "active": ("source", "tent", "simatta@20", "simatta-random@20"),
}
# link-codecs' sample under the three regimes (link-codecs trains the one learned bottleneck kept; 217 s whole, when
# it trained two more), and split-point under a second edge
SAMPLED_ENTRIES["link-regimes"] = (*SAMPLED_ENTRIES["link-codecs"], "split-point, 1 GFLOP/s edge")
# the detection pair (the same entries, the same trainings): the baselines, the hard-example router, and ECC's
# three architectures, one setting each (three of the six trainings; 410 s for both whole tables)
SAMPLED_ENTRIES["eccentric-detection"] = SAMPLED_ENTRIES["eccentric-detection-clean"] = (
    "source", "cloud-only", "hard-example-offload@0.5", "ecc-i@0.5", "ecc-a:l1>l2,r1", "ecc-d@0.5")


def _sample(spec, expected):
    """The spec and the expected document restricted to the table's sampled domains and entries (all of them if not
    sampled)."""
    domains = SAMPLED.get(spec.name, spec.domains)
    entries = SAMPLED_ENTRIES.get(spec.name)
    if entries is not None:  # an entry under a link regime is labelled "LABEL [REGIME]"
        kept = {m.label for m in spec.methods if re.sub(r" \[[a-z0-9-]+\]$", "", m.label) in entries}
        assert set(entries) <= {re.sub(r" \[[a-z0-9-]+\]$", "", label) for label in kept}, spec.name
        assert all(m.match_uploads_of is None for m in spec.methods if m.label in kept), spec.name  # self-contained
        spec = replace(spec, methods=tuple(m for m in spec.methods if m.label in kept))
        expected = {**expected, "cells": [c for c in expected["cells"] if c["method"] in kept]}
    if domains == spec.domains:  # the whole table: every cell, also those of a stream that is no single domain (ccc)
        return spec, expected
    assert set(domains) <= set(spec.domains) and spec.protocol.setting == "per-domain", spec.name  # one unit a domain
    cells = [c for c in expected["cells"] if c["domain"] in domains]
    return replace(spec, domains=tuple(d for d in spec.domains if d in domains)), {**expected, "cells": cells}


def _results(spec) -> int:
    """The cells a method has per seed: one per domain, or one for a stream that mixes them (mixed-domains, ccc)."""
    return sum(len(result_keys(spec.protocol, g)) for g in unit_groups(spec.protocol.setting, spec.domains))


# Tables that train the same models run on one worker, where the later ones find them in its cache (ninth session:
# the two detection tables took 326 s and 253 s on two workers; on one, the second took 44 s)
SHARE_TRAININGS = {"eccentric-detection": "detection-trainings", "eccentric-detection-clean": "detection-trainings",
                   # likewise the classification ECC tables and the link tables' learned bottlenecks (tenth session:
                   # link-regimes took 217 s, training what another worker had trained)
                   **dict.fromkeys(("eccentric", "eccentric-clean", "link-codecs", "link-regimes"), "ecc-trainings")}
TABLES = [pytest.param(path, marks=[pytest.mark.xdist_group(SHARE_TRAININGS[path.name.split(".")[0]])]
                       if path.name.split(".")[0] in SHARE_TRAININGS else []) for path in COMMITTED]


@pytest.mark.slow
@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name.split(".")[0])
def test_miniature_table_matches_the_committed_leaderboard(tmp_path, path):
    expected = json.loads(path.read_text())
    spec = load_table(expected["table"])
    assert len(expected["cells"]) == len(spec.methods) * _results(spec) * len(spec.seeds)
    spec, expected = _sample(spec, expected)
    doc = runner.reproduce(spec, None, tmp_path, progress=False)
    problems, checked = compare(doc, expected)
    assert checked == len(expected["check"]["metrics"]) * len(spec.methods) * _results(spec)  # means over seeds
    assert problems == []


def test_a_domain_sample_gives_the_whole_tables_cells(tmp_path):
    """What makes the sampled check sound: a per-domain unit is the same whichever domains its table holds (here the
    `tent` entry of table2, which adapts and so depends on its stream's order, on one sampled domain against its
    committed cell, to the last count)."""
    spec = load_table("table2")
    entry = next(e for e in spec.methods if e.name == "tent")
    expected = json.loads((LEADERBOARDS / "table2.miniature.json").read_text())
    spec, expected = _sample(replace(spec, methods=(entry,)), expected)
    spec = replace(spec, domains=spec.domains[-1:])
    doc = runner.reproduce(spec, None, tmp_path, progress=False)
    want = {(c["method"], c["domain"]): c for c in expected["cells"]}
    got = [(c["method"], c["domain"], c["correct"], c["seen"]) for c in doc["cells"]]
    assert got == [(m, d, want[m, d]["correct"], want[m, d]["seen"]) for m, d, *_ in got]


def test_a_table_of_the_clean_stream_shows_no_severity():
    doc = json.loads((LEADERBOARDS / "eccentric-clean.miniature.json").read_text())
    from cemabench.report.leaderboard import render

    assert "- **Severity**: none (the clean stream); **domains in order**: clean" in render(doc)
