"""The committed miniature leaderboard is what the code produces today, within the spec's tolerance."""
import json
from pathlib import Path

import pytest

from cemabench import runner
from cemabench.check import compare
from cemabench.spec import load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"


@pytest.mark.slow
def test_miniature_table2_matches_the_committed_leaderboard(tmp_path):
    expected = json.loads((LEADERBOARDS / "table2.miniature.json").read_text())
    doc = runner.reproduce(load_table("table2"), None, tmp_path, progress=False)
    problems, checked = compare(doc, expected)
    assert checked == 2 * len(expected["cells"]) == 2 * 14 * 15
    assert problems == []
