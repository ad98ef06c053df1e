import os
import subprocess
import sys
import textwrap

import pytest

from cemabench import registry
from cemabench.datasets.miniature import splits
from conftest import builtin_methods

PLUGIN = '''
import torch
from dataclasses import dataclass
from cemabench.method import CloudEdgeMapping, EdgeDecision, EdgeLogic, Method


class _Edge(EdgeLogic):
    def __init__(self, label):
        self.label = label

    def step(self, model, x):
        logits = torch.zeros(len(x), 10)
        logits[:, self.label] = 1.0
        return EdgeDecision(logits)


class Constant(Method):
    """Always predicts one class."""

    name = "constant"
    paper = "Nobody, 2026"
    mapping = CloudEdgeMapping(selection="edge only", uploads="none", cloud="nothing", download="none")

    @dataclass
    class Options:
        label: int = 0

    def edge(self, num_classes):
        return _Edge(self.options.label)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "toy-cemabench-plugin"
version = "1.2.3"

[project.entry-points."cemabench.methods"]
constant = "toy_plugin:Constant"

[tool.setuptools]
packages = ["toy_plugin"]
'''


def test_builtin_methods_come_through_the_entry_point_group():
    found = registry.available("methods")
    assert builtin_methods() and set(builtin_methods()) <= set(found)
    assert all(found[n].dist.name == "cemabench" and found[n].value.startswith("cemabench_methods.")
               for n in builtin_methods())


@pytest.mark.slow  # 12 s: pip builds and installs a distribution; kept out of the default tier's 5 minutes
def test_a_separately_installed_distribution_is_listed_and_runs(tmp_path):
    src = tmp_path / "src"
    (src / "toy_plugin").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "toy_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cemabench.cli", *args], env=env, capture_output=True, text=True)

    listing = cli("list", "methods")
    assert listing.returncode == 0
    listed = f"\n{listing.stdout}".replace("| ", "\n").replace(" |", "\n").replace(" ", "\n")
    assert "\nconstant\n" in listed and "toy-cemabench-plugin" in listing.stdout and "\ncema\n" in listed
    run = cli("run", "--method", "constant", "--option", "label=3", "--domains", "fog")
    assert run.returncode == 0, run.stderr
    threes = (splits()["test"][1] == 3).mean() * 100
    assert f"| fog  | {threes:10.1f} |" in run.stdout


def test_the_entry_points_are_read_again_when_a_distribution_changes_in_place(tmp_path, monkeypatch):
    """The registry keeps a group's entry points while the import path holds the same distributions; a distribution
    installed beside the others, or an ``entry_points.txt`` rewritten in place (an editable or legacy develop
    install), is seen at the next lookup, as a fresh process would see it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "cache-probe" not in registry.available("methods")
    info = tmp_path / "probe-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[cemabench.methods]\ncache-probe = probe:One\n")
    assert registry.available("methods")["cache-probe"].value == "probe:One"
    (info / "entry_points.txt").write_text("[cemabench.methods]\ncache-probe = probe:Two\nprobe-2 = probe:Two\n")
    found = registry.available("methods")
    assert found["cache-probe"].value == "probe:Two" and "probe-2" in found
