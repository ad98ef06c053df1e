"""The runner's store, claims, executors and failure handling, on two-domain miniature specs."""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cemabench.cli import EXIT_INCOMPLETE, main
from cemabench.provenance import closure, code_digest, family
from cemabench.registry import load
from cemabench.run import runner
from cemabench.run.store import ResultStore, checksum
from cemabench.tables.plan import Unit
from cemabench.tables.spec import load_table
from conftest import numbers

SPEC = '''
name = "duo"
title = "two domains"
seeds = [0]

[protocol]
batch_size = 64
setting = "per-domain"

[data]
severity = 5
domains = {domains}

[data.real]
dataset = "imagenet-c"
edge = "torchvision:resnet50"
foundation = "torchvision:resnet101"

[data.miniature]
dataset = "miniature-digits-c"
edge = "mini:edge"
foundation = "mini:foundation"
options = {{ n_examples = 320 }}
{methods}
'''

def write_spec(folder: Path, methods=("bn-adapt",), domains=("fog", "contrast"), extra="") -> Path:
    entries = "".join(f'\n[[methods]]\nname = "{m}"\n' for m in methods) + extra
    path = folder / "duo.toml"
    path.write_text(SPEC.format(domains=json.dumps(list(domains)), methods=entries))
    return path


def cells(out: Path) -> list[Path]:
    return sorted((out / "cells" / "duo").glob("*.json"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture
def counted(monkeypatch):
    """The units this process computes (inline executor)."""
    ran = []
    real = runner.TableContext.run
    monkeypatch.setattr(runner.TableContext, "run", lambda self, unit: ran.append(unit.id) or real(self, unit))
    return ran


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("duo")
    spec = load_table(str(write_spec(tmp)))
    return spec, tmp / "out", runner.reproduce(spec, None, tmp / "out", jobs=1, progress=False)


def _copy(baseline, tmp_path) -> Path:
    _, out, _ = baseline
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out"


def test_records_carry_their_key_and_checksum(baseline):
    _, out, _ = baseline
    for path in cells(out):
        record = json.loads(path.read_text())
        assert record["key"] == path.stem and record["checksum"] == checksum(record)


@pytest.mark.parametrize("damage, reason", [
    (lambda p, other: p.write_text(p.read_text()[:200]), "not JSON (truncated)"),
    (lambda p, other: p.write_text("<html>nope</html>"), "not JSON"),
    (lambda p, other: p.write_text(json.dumps({"results": []})), "no key"),
    (lambda p, other: p.write_text(other.read_text()), "holds the record of another unit"),
    (lambda p, other: p.write_text(p.read_text().replace('"correct": ', '"correct": 1', 1)), "checksum mismatch"),
])
def test_a_damaged_record_is_named_and_recomputed(baseline, tmp_path, counted, capsys, damage, reason):
    spec, _, doc = baseline
    out = _copy(baseline, tmp_path)
    target, other = cells(out)
    damage(target, other)
    again = runner.reproduce(spec, None, out, jobs=1, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and target.name in warnings[0] and reason in warnings[0]
    assert len(counted) == 1 and numbers(again) == numbers(doc)
    assert json.loads(target.read_text())["checksum"] == checksum(json.loads(target.read_text()))


def test_a_record_with_a_wrong_result_list_is_recomputed(baseline, tmp_path, counted, capsys):
    spec, _, doc = baseline
    out = _copy(baseline, tmp_path)
    target = cells(out)[0]
    record = json.loads(target.read_text())
    record["results"] = []
    record["checksum"] = checksum(record)  # a consistent record that still lacks its domain
    target.write_text(json.dumps(record))
    again = runner.reproduce(spec, None, out, jobs=1, progress=False)
    assert f"{target}: results for (device, domain) [], expected" in capsys.readouterr().err
    assert len(counted) == 1 and numbers(again) == numbers(doc)


def test_a_stored_record_keeps_its_names_and_is_reused_under_the_documents_new_ones(baseline, tmp_path, counted):
    """Issue 23: the document calls the percentage of samples uploaded ``upload_percent`` (schema 3). A unit record
    keeps ``upload_ratio``, as every record stored before was written, and is reused, not computed again."""
    spec, _, _ = baseline
    out = _copy(baseline, tmp_path)
    stored = {}
    for path in cells(out):
        record = json.loads(path.read_text())
        for result in record["results"]:
            assert "upload_percent" not in result
            stored[record["unit"]["label"], result["domain"]] = result["upload_ratio"]
    doc = runner.reproduce(spec, None, out, jobs=1, progress=False)
    assert counted == [] and len(stored) == len(doc["cells"]) == 2
    assert {(c["method"], c["domain"]): c["upload_percent"] for c in doc["cells"]} == stored
    assert not any("upload_ratio" in c for c in doc["cells"])


def test_what_names_a_documents_metrics_is_no_part_of_a_units_key():
    """Renaming a metric in the document recomputes nothing: the modules that build and read documents are outside
    the code a unit's key covers (:func:`cemabench.provenance.code_digest`), for every built-in method."""
    from cemabench.provenance import PROTOCOL_ROOT
    from cemabench.registry import available

    roots = [PROTOCOL_ROOT, "cemabench.datasets.miniature", "cemabench.datasets.minidet", "cemabench.models.zoo",
             *{load("methods", name).__module__ for name in available("methods")}]
    computed = closure(roots, family("cemabench") | family("cemabench_methods"))
    assert "cemabench.protocol.scoring" in computed  # where a record's upload_ratio is written: kept as it is
    assert not [m for m in computed if m.startswith(("cemabench.run", "cemabench.report", "cemabench.tables"))]


def test_a_chain_of_matched_uploads_derives_each_rate_from_its_reference(tmp_path):
    extra = ('\n[[methods]]\nname = "random-upload"\nlabel = "random"\nmatch_uploads_of = "cema"\n'
             '\n[[methods]]\nname = "random-upload"\nlabel = "again"\nmatch_uploads_of = "random"\n')
    spec = load_table(str(write_spec(tmp_path, methods=("cema",), domains=("fog",), extra=extra)))
    doc = runner.reproduce(spec, None, tmp_path / "out", jobs=2, progress=False)
    uploaded = {c["method"]: c["link"]["uploaded"] for c in doc["cells"]}
    assert uploaded["cema"] > 0 and uploaded["random"] == uploaded["cema"] == uploaded["again"]
    options = {u.label: dict(u.options) for u in map(runner.Unit.from_dict, (json.loads(p.read_text())["unit"]
                                                                          for p in cells(tmp_path / "out")))}
    assert options["again"]["upload_ratio"] == options["random"]["upload_ratio"] > 0


def test_the_default_hook_keeps_options_and_random_upload_derives_its_rate():
    record = {"results": [{"seen": 200, "link": {"uploaded": 50}}, {"seen": 200, "link": {"uploaded": 30}}]}
    assert load("methods", "tent").derive_options({"lr": 0.1}, [record]) == {"lr": 0.1}
    assert load("methods", "random-upload").derive_options({}, [record]) == {"upload_ratio": 0.2}


def test_the_code_digest_covers_the_method_module_and_its_shared_helpers():
    assert {"cemabench_methods.cema", "cemabench_methods.common"} <= set(closure(["cemabench_methods.cema"],
                                                                                family("cemabench")))
    assert code_digest(load("methods", "cema")) != code_digest(load("methods", "tent"))


PLUGIN = '''
from cemabench_methods.source import BNAdapt


class Plug(BNAdapt):
    """BN-adapt under another name.{comment}"""

    name = "plug"
{version}
'''


def _plugin(folder: Path, comment: str = "", version: str | None = None) -> None:
    (folder / "plugmod.py").write_text(PLUGIN.format(comment=comment,
                                                     version=f'    version = "{version}"' if version else ""))
    info = folder / "plugmod-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugmod\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[cemabench.methods]\nplug = plugmod:Plug\n")
    if "plugmod" in sys.modules:  # as a new process would see the edited code
        importlib.reload(sys.modules["plugmod"])


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("plugmod", None)


def test_an_edited_method_is_recomputed_and_the_others_reused(plugin_folder, counted):
    tmp_path = plugin_folder
    _plugin(tmp_path)
    spec = load_table(str(write_spec(tmp_path, methods=("bn-adapt", "plug"), domains=("fog",))))
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert len(counted) == 2
    counted.clear()
    _plugin(tmp_path, comment=" Edited.")
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert [u[0] for u in counted] == ["plug"]
    counted.clear()
    _plugin(tmp_path, comment=" Declares a version.", version="1")
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert [u[0] for u in counted] == ["plug"]
    counted.clear()
    _plugin(tmp_path, comment=" Edited again, same version.", version="1")
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert counted == []
    _plugin(tmp_path, comment="", version="2")
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert [u[0] for u in counted] == ["plug"]


WORKER = '''
import json, sys, time
from pathlib import Path

import torch
from cemabench.run import runner
from cemabench.tables.spec import load_table

log = Path(sys.argv[3])
real = runner.TableContext.run


def run(self, unit):
    time.sleep(float(sys.argv[4]))  # long enough for the other process (or the kill) to overlap
    record = real(self, unit)
    with open(log, "a") as f:
        f.write(json.dumps([unit.label, unit.domains]) + "\\n")
    return record


runner.TableContext.run = run
torch.set_num_threads(1)
runner.reproduce(load_table(sys.argv[1]), None, Path(sys.argv[2]), jobs=1, progress=False)
'''


def _worker(tmp_path: Path, spec: Path, log: str, pause: float) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(spec), str(tmp_path / "out"), str(tmp_path / log),
                             str(pause)], stderr=subprocess.PIPE, text=True)


FOUR = ("fog", "contrast", "snow", "frost")


@pytest.mark.slow  # 11 s on a clean clone; kept out of the default tier's 5 minutes
def test_two_processes_share_the_units_and_compute_each_once(tmp_path):
    spec = write_spec(tmp_path, domains=FOUR)
    workers = [_worker(tmp_path, spec, f"log{i}", 1.5) for i in range(2)]
    assert all(w.wait(timeout=120) == 0 for w in workers), [w.stderr.read() for w in workers]
    logs = [(tmp_path / f"log{i}").read_text().splitlines() if (tmp_path / f"log{i}").exists() else []
            for i in range(2)]
    computed = sorted(json.loads(line)[1][0] for log in logs for line in log)
    assert computed == sorted(FOUR) and all(logs)  # every unit once, and both processes took some
    assert not list((tmp_path / "out" / "cells" / "duo").glob("*.claim"))


def test_a_killed_run_resumes_without_recomputing_or_corrupting(tmp_path, counted):
    spec_path = write_spec(tmp_path, domains=FOUR)
    worker = _worker(tmp_path, spec_path, "log", 0.5)
    deadline = time.time() + 120
    while len(cells(tmp_path / "out")) < 2 and time.time() < deadline and worker.poll() is None:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    finished = {p.name for p in cells(tmp_path / "out")}
    assert 2 <= len(finished) < 4
    spec = load_table(str(spec_path))
    store = ResultStore(tmp_path / "out" / "cells" / "duo")
    resumed = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    assert len(counted) == 4 - len(finished)  # the dead run's claim was taken over; nothing finished ran again
    for path in cells(tmp_path / "out"):
        record = json.loads(path.read_text())
        assert store.problem(path.stem, Unit.from_dict(record["unit"]).expected) == (record, None)
    uninterrupted = runner.reproduce(spec, None, tmp_path / "fresh", jobs=1, progress=False)
    assert numbers(resumed) == numbers(uninterrupted)


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    a, b = ResultStore(tmp_path), ResultStore(tmp_path)
    assert a.claim("k") and not b.claim("k") and b.live_owner("k")["pid"] == os.getpid()
    a.release("k")
    assert b.claim("k")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / "d.claim").write_text(json.dumps({"pid": int(dead.stdout), "host": a.host, "time": 0, "owner": "x"}))
    assert a.live_owner("d") is None and a.claim("d")
    (tmp_path / "h.claim").write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0, "owner": "x"}))
    assert not a.claim("h")
    os.utime(tmp_path / "h.claim", (0, 0))  # older than the timeout for other hosts
    assert a.claim("h") and json.loads((tmp_path / "h.claim").read_text())["owner"] == a.owner


def _failing(monkeypatch, domain, error):
    real = runner.TableContext.run

    def run(self, unit):
        if domain in unit.domains:
            raise error
        return real(self, unit)

    monkeypatch.setattr(runner.TableContext, "run", run)


@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit(0)])
def test_a_failing_unit_is_recorded_shown_and_recomputed_next_time(tmp_path, monkeypatch, capsys, error):
    spec_path, out = write_spec(tmp_path), tmp_path / "out"
    _failing(monkeypatch, "fog", error)
    code = main(["reproduce", str(spec_path), "--out", str(out), "--jobs", "1", "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == EXIT_INCOMPLETE and "the table is incomplete: 1 cell(s)" in err
    assert "## Failed cells" in stdout and f"bn-adapt / fog / seed 0: **error**: {type(error).__name__}" in stdout
    assert main(["status", str(spec_path), "--out", str(out)]) == EXIT_INCOMPLETE
    stdout = capsys.readouterr().out
    assert "| failed " in stdout and f"fog: error: {type(error).__name__}" in stdout
    assert "duo: 2 units: 1 done, 0 running, 1 failed, 0 missing" in stdout
    monkeypatch.undo()
    assert main(["reproduce", str(spec_path), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0


def test_status_shows_missing_and_running_units(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    assert main(["status", str(spec_path), "--out", str(tmp_path / "out")]) == EXIT_INCOMPLETE
    assert "duo: 2 units: 0 done, 0 running, 0 failed, 2 missing" in capsys.readouterr().out
    spec = load_table(str(spec_path))
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    first = cells(tmp_path / "out")[0]
    first.unlink()
    ResultStore(first.parent).claim(first.stem)  # held by this (live) process
    assert main(["status", str(spec_path), "--out", str(tmp_path / "out")]) == EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert f"running | pid {os.getpid()} on" in re.sub(" +", " ", out)
    assert "1 done, 1 running, 0 failed, 0 missing" in out


def test_a_dead_worker_process_fails_only_its_unit(baseline, tmp_path, monkeypatch):
    spec, _, doc = baseline
    real = runner.TableContext.run
    monkeypatch.setattr(runner.TableContext, "run",
                        lambda self, unit: os._exit(9) if "fog" in unit.domains else real(self, unit))
    broken = runner.reproduce(spec, None, tmp_path / "out", jobs=2, progress=False)
    by = {c["domain"]: c for c in broken["cells"]}
    assert by["fog"]["status"] == "error" and "worker process died" in by["fog"]["message"]
    assert numbers({"cells": [by["contrast"]]}) == [n for n in numbers(doc) if n["domain"] == "contrast"]


@pytest.mark.slow  # 13 s with Ray's start; the slow tier's Ray checks (isolated, hostile) are of the same kind
@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest-xdist
def test_ray_gives_the_inline_numbers(baseline, tmp_path, local_ray):
    spec, _, doc = baseline
    assert numbers(runner.reproduce(spec, None, tmp_path / "out", executor="ray", progress=False)) == numbers(doc)


def test_run_with_a_table_gives_the_tables_number_and_says_how_it_was_made(tmp_path, capsys):
    expected = json.loads((Path(__file__).parents[1] / "leaderboards" / "table2.miniature.json").read_text())
    cell = next(c for c in expected["cells"] if c["method"] == "cema" and c["domain"] == "fog")
    code = main(["run", "--method", "cema", "--domains", "fog", "--table", "table2", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and f"{cell['accuracy']:.1f}" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [c["accuracy"] for c in doc["cells"]] == [cell["accuracy"]]
    assert doc["methods"][0]["options"] == {"redundancy_margin": 0.5} and doc["methods"][0]["code"]["method"]
    p = doc["provenance"]
    assert p["protocol"]["batch_size"] == 64 and p["device"] == "cpu" and p["models"]["edge"]["fingerprint"]
    assert p["dataset"]["dataset"].startswith("miniature-digits-c") and p["versions"]["torch"]
    assert (doc["dataset"], doc["stands_for"]) == ("miniature-digits-c", "imagenet-c")
    assert "# EMBEDDED MINIATURE, NOT IMAGENET-C: numbers for checking" in out  # the table's real dataset, named
    assert "cema (redundancy_margin=0.5) on miniature-digits-c" in out  # the table's options, which differ from cema's


def test_the_weights_folder_is_a_parameter_of_the_context_with_the_environment_as_fallback(tmp_path, monkeypatch):
    from cemabench.models import zoo
    from cemabench.run import context

    monkeypatch.setenv("CEMABENCH_WEIGHTS", str(tmp_path))
    (tmp_path / "mine").mkdir()
    seen = []
    monkeypatch.setattr(context.registry, "build_model", lambda name: seen.append(zoo.weights_dir()))
    spec = load_table(str(write_spec(tmp_path)))
    assert len(context.ContextSpec(spec, weights=str(tmp_path / "mine")).build().prototypes) == 2
    assert len(context.ContextSpec(spec).build().prototypes) == 2
    assert seen == [tmp_path / "mine"] * 2 + [tmp_path] * 2


def test_a_local_worker_ends_when_the_process_that_forked_it_is_killed(tmp_path):
    """A hostile review: after the harness's process was killed (SIGTERM, SIGKILL), its --jobs workers waited for it
    forever (each held a copy of its end of their line, so no end of file came). A worker now ends with it."""
    code = ("import os, queue, signal; from cemabench.run.executors import _Worker; "
            "w = _Worker(None, 1, None, queue.Queue()); print(w.process.pid, flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    with open(tmp_path / "pid", "w") as said:  # (a file: a pipe would stay open as long as the worker)
        subprocess.run([sys.executable, "-c", code], stdout=said, timeout=120)
    worker = int((tmp_path / "pid").read_text().split()[0])
    for _ in range(300):
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # ended, not yet reaped by whoever took it over
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the worker outlived the process that forked it by 30 s")
