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
