"""The committed miniature leaderboards are what the code produces today, within each spec's tolerance."""
import json
from pathlib import Path

import pytest

from cemabench.report.check import compare
from cemabench.run import runner
from cemabench.tables.spec import available_tables, load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"
COMMITTED = sorted(LEADERBOARDS.glob("*.miniature.json"))


def test_every_table_with_a_miniature_has_a_committed_leaderboard():
    with_miniature = [t for t in available_tables() if load_table(t).miniature is not None]
    assert sorted(p.name for p in COMMITTED) == sorted(f"{t}.miniature.json" for t in with_miniature)


@pytest.mark.slow
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name.split(".")[0])
def test_miniature_table_matches_the_committed_leaderboard(tmp_path, path):
    expected = json.loads(path.read_text())
    spec = load_table(expected["table"])
    doc = runner.reproduce(spec, None, tmp_path, progress=False)
    problems, checked = compare(doc, expected)
    assert len(expected["cells"]) == len(spec.methods) * len(spec.domains) * len(spec.seeds)
    assert checked == len(expected["check"]["metrics"]) * len(spec.methods) * len(spec.domains)  # means over seeds
    assert problems == []
