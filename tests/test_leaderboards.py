"""The committed miniature leaderboards are what the code produces today, within each spec's tolerance."""
import json
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


# The two 15-domain per-domain tables are checked on one domain per corruption family (noise, blur, weather,
# digital), a different one in each table: the six whole tables took 2815 s in CI (2 cores, AVX2); here (2 cores,
# AVX-512, 2026-12-05) the whole slow tier with these samples took 463 s (`.ci/run` about 12 minutes in all).
# A per-domain unit does not depend on which other domains the table holds
# (test_a_domain_sample_gives_the_whole_tables_cells), so a sampled cell is the committed cell. `cemabench reproduce
# T` then `cemabench check` checks a whole table.
SAMPLED = {
    "table2": ("gaussian_noise", "motion_blur", "snow", "pixelate"),
    # table2's code at severity 3: two domains (ninth session: 20 methods, 204 s for four, `.ci/run` near its limit)
    "imagenet-c-s3": ("shot_noise", "frost"),
}


def _sample(spec, expected):
    """The spec and the expected document restricted to the table's sampled domains (all of them if not sampled)."""
    domains = SAMPLED.get(spec.name, spec.domains)
    if domains == spec.domains:  # the whole table: every cell, also those of a stream that is no single domain (ccc)
        return spec, expected
    assert set(domains) <= set(spec.domains) and spec.protocol.setting == "per-domain", spec.name  # one unit a domain
    cells = [c for c in expected["cells"] if c["domain"] in domains]
    return replace(spec, domains=tuple(d for d in spec.domains if d in domains)), {**expected, "cells": cells}


def _results(spec) -> int:
    """The cells a method has per seed: one per domain, or one for a stream that mixes them (mixed-domains, ccc)."""
    return sum(len(result_keys(spec.protocol, g)) for g in unit_groups(spec.protocol.setting, spec.domains))


# The two detection tables train the same ECC models: on one worker the second finds them in its cache (ninth
# session, on two workers: 326 s and 253 s; on one, the second took 44 s)
SHARE_TRAININGS = {"eccentric-detection": "detection-trainings", "eccentric-detection-clean": "detection-trainings"}
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
