"""The committed miniature leaderboards are what the code produces today, within each spec's tolerance."""
import json
from pathlib import Path

import pytest

from cemabench import runner
from cemabench.check import compare
from cemabench.spec import load_table

LEADERBOARDS = Path(__file__).parent.parent / "leaderboards"
COMMITTED = sorted(LEADERBOARDS.glob("*.miniature.json"))


def test_every_table_with_a_miniature_has_a_committed_leaderboard():
    assert [p.name for p in COMMITTED] == ["imagenet-c-s3.miniature.json", "table2.miniature.json"]


@pytest.mark.slow
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name.split(".")[0])
def test_miniature_table_matches_the_committed_leaderboard(tmp_path, path):
    expected = json.loads(path.read_text())
    doc = runner.reproduce(load_table(expected["table"]), None, tmp_path, progress=False)
    problems, checked = compare(doc, expected)
    assert checked == 2 * len(expected["cells"]) == 2 * 14 * 15
    assert problems == []
