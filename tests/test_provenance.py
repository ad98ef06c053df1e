"""One provenance policy: a unit's stored result and its method's trained artefacts are keyed by every module of
cemabench and of the method's distribution that the computation imports (function-level imports included), or by
the method's declared version."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cemabench.method import Method, MethodFacts, TrainingResources
from cemabench.protocol.training import training_key
from cemabench.provenance import PROTOCOL_ROOT, closure, code_digest, family
from cemabench.run.context import TableContext
from cemabench.tables.plan import Unit
from cemabench.tables.spec import load_table

ROOT = Path(__file__).parent.parent


def test_the_closure_follows_function_level_imports_into_the_harness_and_the_methods():
    scope = family("cemabench")
    found = set(closure(["cemabench_methods.eccentric"], scope))
    # eccentric imports the split models and the min-norm solver at module level, and the split models import the
    # registry, which imports the plugin API
    assert {"cemabench_methods.eccentric", "cemabench_methods.pareto", "cemabench_methods.offload",
            "cemabench.models.split", "cemabench.registry", "cemabench.method"} <= found
    protocol = set(closure([PROTOCOL_ROOT], scope))
    assert {"cemabench.protocol.training", "cemabench.provenance", "cemabench.protocol.meter",
            "cemabench.config.fields", "cemabench"} <= protocol
    assert not any(m.startswith(("cemabench.run", "cemabench.report", "cemabench.cli")) for m in protocol)
    assert not any(m.startswith("cemabench_methods") for m in protocol)  # the harness knows no method


def test_a_function_level_import_is_followed(tmp_path, monkeypatch):
    (tmp_path / "lazy_pkg").mkdir()
    (tmp_path / "lazy_pkg" / "__init__.py").write_text("")
    (tmp_path / "lazy_pkg" / "a.py").write_text("def f():\n    from .b import g\n    return g()\n")
    (tmp_path / "lazy_pkg" / "b.py").write_text("from lazy_pkg import c  # noqa\n\n\ndef g():\n    return 1\n")
    (tmp_path / "lazy_pkg" / "c.py").write_text("X = 1\n")
    (tmp_path / "lazy_pkg" / "unused.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(closure(["lazy_pkg.a"], {"lazy_pkg"})) == {"lazy_pkg", "lazy_pkg.a", "lazy_pkg.b", "lazy_pkg.c"}


def test_a_modules_companion_files_are_part_of_its_source(tmp_path, monkeypatch):
    """The C++ meter's source is no Python module: cemabench.protocol.native names it in ``__companions__``, and an
    edit to it changes the digest of every computation that imports the protocol."""
    import os

    from cemabench.provenance import digest

    (tmp_path / "twin_pkg").mkdir()
    (tmp_path / "twin_pkg" / "__init__.py").write_text("")
    (tmp_path / "twin_pkg" / "a.py").write_text('__companions__ = ("kernel.cpp",)\n')
    kernel = tmp_path / "twin_pkg" / "kernel.cpp"
    kernel.write_text("int f() { return 1; }\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = digest(closure(["twin_pkg.a"], {"twin_pkg"}))
    kernel.write_text("int f() { return 2; }\n")
    os.utime(kernel, ns=(kernel.stat().st_atime_ns, kernel.stat().st_mtime_ns + 1_000_000))
    assert digest(closure(["twin_pkg.a"], {"twin_pkg"})) != before
    assert b"native_meter.cpp" in closure([PROTOCOL_ROOT], {"cemabench"})["cemabench.protocol.native"]


def test_the_unit_key_carries_the_code_digest_of_method_protocol_data_and_models():
    spec = load_table("table2")
    context = TableContext(spec, None)
    unit = Unit("cema", "cema", (), 0, ("fog",))
    code = context.unit_config(unit)["code"]
    assert code["method"].startswith("source:") and code == context.code("cema")
    assert code != context.code("tent") and code["harness"] == context.code("tent")["harness"]


class _Versioned(Method):
    name = "versioned"
    version = "7"

    def train(self, resources):
        return {}


def test_a_declared_version_keys_results_and_artefacts():
    digest = code_digest(_Versioned)
    assert digest["method"] == "version:7"
    context = TableContext(load_table("table2"), None)
    resources = TrainingResources(num_classes=10, edge=context.models.edge, foundation=context.models.foundation,
                                  clean=context.dataset.clean)
    key = training_key(_Versioned(), resources)

    class Bumped(_Versioned):
        version = "8"

    Bumped.__module__ = _Versioned.__module__
    assert code_digest(Bumped)["method"] == "version:8"
    assert training_key(Bumped(), resources) != key
    assert training_key(_Versioned(), resources) == key  # deterministic


SCRIPT = textwrap.dedent('''
    import json, sys
    from dataclasses import replace
    from pathlib import Path

    from cemabench import registry
    from cemabench.method import TrainingResources
    from cemabench.protocol.training import training_key
    from cemabench.run.context import TableContext
    from cemabench.tables.plan import Unit, plan
    from cemabench.tables.spec import load_table

    assert registry.load_method("ecc-dynamic").__module__ == "cemabench_methods.eccentric"
    assert Path(sys.modules["cemabench_methods.eccentric"].__file__).is_relative_to(sys.argv[1]), "not the copy"
    spec = load_table("eccentric")
    spec = replace(spec, domains=spec.domains[:1])  # a unit's keys: its own domain's data, not the others'
    LABELS = ("source", "ecc-a:l1>l2,r1", "ecc-d@0.5", "ecc-d-learned@0.5", "cema")

    def keys():
        context = TableContext(spec, None)
        resources = TrainingResources(num_classes=10, edge=context.models.edge,
                                      foundation=context.models.foundation, clean=context.dataset.clean)
        out = {}
        for task in plan(spec, context.choice, (0,)):
            if task.label in LABELS and task.domains == (spec.domains[0],):
                unit = Unit(task.label, task.method, task.options, task.seed, task.domains, task.results)
                method = registry.build_method(task.method, dict(task.options))
                trained = type(method).train is not type(method).__mro__[-2].train
                out[task.label] = [context.unit_key(unit),
                                   training_key(method, resources) if trained else None]
        return out

    steps = {"base": keys()}
    for name, path in (("split", "cemabench/models/split.py"), ("pareto", "cemabench_methods/pareto.py"),
                       ("leaderboard", "cemabench/report/leaderboard.py")):
        file = Path(sys.argv[1]) / path
        file.write_text(file.read_text() + "\\n# edited\\n")
        steps[name] = keys()
    print(json.dumps(steps))
''')


@pytest.mark.slow  # 82 s with every domain of the table generated, cold; kept out of the default tier's 5 minutes
def test_editing_split_or_the_solver_recomputes_and_retrains_what_they_compute(tmp_path):
    """In a scratch copy: an edit to cemabench/models/split.py changes the result keys and the artefact keys of
    the ECC units (and of no other); one to methods/pareto.py changes those of ECC-D (whose ``pareto = true`` entry
    trains with it) and ECC-A; one to the leaderboard renderer changes nothing."""
    shutil.copytree(ROOT / "cemabench", tmp_path / "cemabench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "methods", tmp_path / "cemabench_methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "run.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    base, split, pareto, leaderboard = (steps[k] for k in ("base", "split", "pareto", "leaderboard"))
    ecc = ("ecc-a:l1>l2,r1", "ecc-d@0.5", "ecc-d-learned@0.5")
    for label in ecc:  # both the stored result and the trained artefact are stale after split.py changed
        assert split[label][0] != base[label][0] and split[label][1] != base[label][1], label
        assert pareto[label][0] != split[label][0] and pareto[label][1] != split[label][1], label
    for label in ("source", "cema"):  # they never import split.py or the solver
        assert split[label] == base[label] and pareto[label] == base[label], label
    assert leaderboard == pareto  # rendering computes no number



def test_isolated_a_method_that_names_itself_as_another_keys_its_artefacts_apart():
    """Isolated, a unit's halves build the entry point the loop asked the planner about, and the planner says the
    method's name and code digest: a plugin ("forger") that says it is tent, with tent's options and digest, must not
    get tent's training key, under which its own train() would be cached for tent's units (issue 22, finding 7)."""
    context = TableContext(load_table("table2"), None)
    resources = TrainingResources(num_classes=10, edge=context.models.edge, foundation=context.models.foundation,
                                  clean=context.dataset.clean)
    said = {"name": "tent", "options": {"lr": 0.001}, "online_options": (), "cloud_replicas": "per-device",
            "trains": True, "training_code": {"method": "digest of tent"}}
    honest = training_key(MethodFacts(**said, entry="tent"), resources)
    assert training_key(MethodFacts(**said), resources) == honest  # a stand-in built otherwise: no entry to bind
    assert training_key(MethodFacts(**said, entry="forger"), resources) != honest
