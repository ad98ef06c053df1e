"""Issue 22, scope 4: with ``--isolate`` each unit's edge half and cloud half run in processes of their own, forked
from a clean zygote, with only bytes between them and the loop. The numbers are those of the in-process run, cell by
cell; what a hostile plugin reached in-process (the scheduler, the other half) is not in its process."""
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from cemabench.cli import main
from cemabench.errors import HalfFailed, UserError
from cemabench.report.leaderboard import render
from cemabench.run import runner
from cemabench.tables.spec import load_table
from conftest import builtin_methods, granted_labels, numbers, small_options, write_spec

MINIATURE = ("miniature-digits-c", "mini:edge", "mini:foundation")


def _spec(folder, methods, domains=("fog",), protocol="", dataset=MINIATURE, batch_size=64, images=320):
    """A miniature table of ``methods`` (each with the test's small options) over ``domains`` (their first
    ``images`` images)."""
    lines = ['name = "iso"', 'title = "isolation"', "[protocol]", f"batch_size = {batch_size}",
             protocol or 'setting = "per-domain"', "[data]", "severity = 5",
             "domains = [" + ", ".join(f'"{d}"' for d in domains) + "]"]
    for section in ("miniature", "real"):
        lines += [f"[data.{section}]", f'dataset = "{dataset[0]}"', f'edge = "{dataset[1]}"',
                  f'foundation = "{dataset[2]}"'] + ([f"options = {{ n_examples = {images} }}"] if images else [])
    for name in methods:
        options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in small_options(name).items())
        labels = ", ".join(f"{k} = {v}" for k, v in granted_labels(name).items())  # active TTA: a label budget
        lines += (["[[methods]]", f'name = "{name}"'] + ([f"options = {{ {options} }}"] if options else [])
                  + ([f"link = {{ {labels} }}"] if labels else []))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "iso.toml").write_text("\n".join(lines) + "\n")
    return load_table(str(folder / "iso.toml"))


def _both(spec, tmp_path, **options):
    inline = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False, **options)
    isolated = runner.reproduce(spec, None, tmp_path / "isolated", jobs=1, progress=False, isolate=True, **options)
    return inline, isolated


def test_isolated_halves_give_the_in_process_numbers(tmp_path):
    """Tent: every sample up, a replica trained in the cloud, its norm parameters down. Every built-in method (CoTTA's
    random augmentation in the cloud among them: the random state threaded through both halves), several edges and
    detection: the slow tier."""
    inline, isolated = _both(_spec(tmp_path, ["tent"]), tmp_path)
    assert all(c["status"] == "ok" for c in inline["cells"])
    assert numbers(isolated) == numbers(inline)
    for key in ("edge_flops", "cloud_flops"):
        assert [c[key] for c in isolated["cells"]] == [c[key] for c in inline["cells"]]


@pytest.mark.slow
def test_several_edges_on_one_cloud_give_the_in_process_numbers(tmp_path):
    edges = _spec(tmp_path / "edges", ["tent"], domains=("fog", "snow"), protocol='setting = "continual"\ndevices = 2')
    inline, isolated = _both(edges, tmp_path / "edges")
    assert len(inline["cells"]) == 2 and numbers(isolated) == numbers(inline)


@pytest.mark.slow
def test_detection_gives_the_in_process_numbers_isolated(tmp_path):
    detection = _spec(tmp_path, ["cloud-only", "hard-example-offload"], batch_size=16, images=None,
                      dataset=("miniature-digits-det-c", "minidet:edge", "minidet:cloud"))
    inline, isolated = _both(detection, tmp_path)
    assert all(c["status"] == "ok" for c in inline["cells"])
    scores = [[(c["map"], c["map50"], c["ar100"]) for c in doc["cells"]] for doc in (inline, isolated)]
    assert scores[0] == scores[1]
    assert numbers(isolated) == numbers(inline)


@pytest.mark.slow
def test_every_built_in_method_gives_the_in_process_numbers_isolated(tmp_path):
    """On fog's first 320 images (five batches; the whole domain took 330 s for both modes)."""
    inline, isolated = _both(_spec(tmp_path, builtin_methods(), images=320), tmp_path)
    assert {c["seen"] for c in inline["cells"]} == {320}
    assert all(c["status"] == "ok" for c in inline["cells"]), [c["message"] for c in inline["cells"]]
    assert numbers(isolated) == numbers(inline)
    for key in ("edge_flops", "cloud_flops"):
        assert [c[key] for c in isolated["cells"]] == [c[key] for c in inline["cells"]]


def _cell(tmp_path, methods, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp_path / "small.toml", methods)
    main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1", *flags])
    return {c["method"]: c for c in json.loads((tmp_path / "out" / "small.json").read_text())["cells"]}


def test_a_plugin_that_forges_records_through_the_scheduler_finds_none_isolated(plugins, tmp_path):
    """Issue 22, finding 6: in-process, a plugin found the scheduler through the garbage collector and stored a
    perfect record under the key of a unit still queued, which the table then took as computed (README: what a plugin
    can still do in-process). Isolated, its half holds no scheduler: ``source`` is computed."""
    forged = _cell(tmp_path / "inline", ["forges-records", "source"])
    assert forged["source"]["accuracy"] == 100.0  # the hole, in-process
    honest = _cell(tmp_path / "isolated", ["forges-records", "source"], "--isolate")
    assert honest["forges-records"]["status"] == "ok" and honest["source"]["status"] == "ok"
    assert honest["source"]["accuracy"] == honest["forges-records"]["accuracy"] < 100.0  # both the edge alone


def test_a_cloud_that_reaches_into_the_edge_finds_none_isolated(plugins, tmp_path):
    """Issue 22, finding 12: in-process, a cloud found the edge through the garbage collector and moved its BatchNorm
    statistics (caught, the cell fails). Isolated, the cloud's process holds no edge: nothing moves, and the cell is
    the edge alone's."""
    cells = _cell(tmp_path, ["source", "reaches-into-the-edge"], "--isolate")
    assert cells["reaches-into-the-edge"]["status"] == "ok"
    assert cells["reaches-into-the-edge"]["accuracy"] == cells["source"]["accuracy"]


def test_a_half_that_ends_its_process_fails_its_cells_and_the_run_goes_on(plugins, tmp_path):
    """In one job with no worker process, an edge that calls os._exit ends its half's process, not the run."""
    cells = _cell(tmp_path, ["kills-its-process", "source"], "--isolate")
    assert cells["kills-its-process"]["status"] == "error"
    assert "the edge half's process ended while it ran" in cells["kills-its-process"]["message"]
    assert cells["source"]["status"] == "ok"


@pytest.mark.parametrize("method, words", [
    ("two-faced", "EdgeLogic.step must return an EdgeDecision (not a subclass)"),
    ("exits-on-batch-3", "SystemExit: method code called sys.exit(0); a method must not end the process"),
    # issue 22: what the link does not charge carries nothing (tests/plugins/channels.py, test_hostile.py)
    ("names-smuggler", "a unit may use at most 16 words of its own, of at most 64 characters each"),
    ("shape-smuggler", "has no values (shape (0, "),
    ("order-smuggler", "EdgeDecision.upload must hold distinct indices in [0, 64) in increasing order"),
])
def test_what_a_half_refuses_reads_as_in_process(plugins, tmp_path, method, words):
    inline = _cell(tmp_path / "inline", [method])[method]
    isolated = _cell(tmp_path / "isolated", [method], "--isolate")[method]
    assert isolated["status"] == inline["status"] == "error"
    assert words in inline["message"] and words in isolated["message"]
    assert isolated["message"].splitlines()[0] == inline["message"].splitlines()[0]


@pytest.mark.slow  # 11 s; kept out of the default tier's 5 minutes
def test_a_plugin_that_poisons_another_methods_artefact_cannot_write_it_isolated(plugins, tmp_path, monkeypatch):
    """Issue 22, finding 7: a plugin's training stage computed ecc-independent's training key and wrote a corrupted
    artefact under it; in-process, ecc-independent then loaded it (``cached``), ok and wrong. Isolated, the cloud half
    may write no file (Landlock): the write is refused, and ecc-independent trains its own artefact."""
    _landlock(1)
    victim = small_options("ecc-independent")
    monkeypatch.setenv("CEMABENCH_TEST_VICTIM", json.dumps(victim))
    spec = tmp_path / "poison.toml"
    spec.write_text(Path(write_spec(tmp_path / "base.toml", ["poisons-an-artefact"])).read_text()
                    + '[[methods]]\nname = "ecc-independent"\noptions = { '
                    + ", ".join(f"{k} = {json.dumps(v)}" for k, v in victim.items()) + " }\n")
    cells = {}
    for mode, flags in (("inline", []), ("isolated", ["--isolate"])):
        monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path / mode / "cache"))
        main(["reproduce", str(spec), "--out", str(tmp_path / mode), "--no-progress", "--jobs", "1", *flags])
        cells[mode] = {c["method"]: c for c in json.loads((tmp_path / mode / "small.json").read_text())["cells"]}
    poisoned, honest = cells["inline"]["ecc-independent"], cells["isolated"]["ecc-independent"]
    # the hole, in-process: a zeroed edge is unsure of every sample, and ecc-independent uploads them all, silently
    assert poisoned["status"] == "ok" and poisoned["training"]["cached"] and poisoned["upload_percent"] == 100.0
    assert honest["status"] == "ok" and not honest["training"]["cached"] and honest["upload_percent"] < 90
    refused = cells["isolated"]["poisons-an-artefact"]
    assert refused["status"] == "error" and "Permission denied" in refused["message"]


def test_a_half_cannot_write_files(plugins, tmp_path):
    """Issue 22, finding 1: in-process, a plugin rewrote the miniature's cached label files (the harness no longer
    reads labels from that cache). Isolated, the write itself is refused: a half may write /dev/null (and a GPU's
    device files) and nothing else."""
    _landlock(1)
    cells = _cell(tmp_path, ["rewrites-labels"], "--isolate")
    assert cells["rewrites-labels"]["status"] == "error"
    assert "Permission denied" in cells["rewrites-labels"]["message"]


@pytest.mark.parametrize("path", ["absolute", "relative"])
def test_a_half_cannot_tell_which_files_exist_under_a_hidden_folder(plugins, tmp_path, monkeypatch, path):
    """Landlock does not confine ``stat``: a half that reads no file of the data root could still test which file
    names exist there (an ImageNet-C folder's class of each image). A half sees the data root, the results folder and
    the caches as empty folders (a mount namespace of its own), where the kernel lets it have one; and its working
    directory is /, not the folder the run started in (a hostile review: run from inside --out, relative names still
    reached the folder under the tmpfs)."""
    from cemabench.protocol import isolation, zygote

    secret = tmp_path / "isolated" / "out" / "records" / "n01440764" / "ILSVRC2012_val_00000293.json"
    secret.parent.mkdir(parents=True)
    secret.write_text("{}\n")
    if path == "relative":  # the halves' zygote starts there too, as a run's first isolated unit starts it
        monkeypatch.chdir(tmp_path / "isolated" / "out")
        if os.getpid() in zygote._ZYGOTES:
            zygote._stop_zygote()
    monkeypatch.setenv("CEMABENCH_TEST_PRIVY_PATH", str(secret.relative_to(tmp_path / "isolated" / "out"))
                       if path == "relative" else str(secret))
    cells = {}
    for mode, flags in (("isolated", ["--isolate"]), ("inline", [])):
        (tmp_path / mode).mkdir(exist_ok=True)
        spec = Path(write_spec(tmp_path / mode / "base.toml", []))
        spec.write_text(spec.read_text() + '[[methods]]\nname = "escapes"\noptions = { how = "stat" }\n')
        main(["reproduce", str(spec), "--out", str(tmp_path / mode / "out"), "--no-progress", "--jobs", "1", *flags])
        (cells[mode],) = json.loads((tmp_path / mode / "out" / "small.json").read_text())["cells"]
    assert cells["inline"]["status"] == "error" and "found" in cells["inline"]["message"]  # in-process: no boundary
    if "names not hidden" in isolation.LAST_SANDBOX[0]:
        pytest.skip(f"this kernel gives no mount namespace here: {isolation.LAST_SANDBOX[0]}")
    assert cells["isolated"]["status"] == "ok", cells["isolated"]["message"]


def test_a_half_that_replaces_the_meter_in_its_process_fails_its_cell(plugins, tmp_path):
    """The meter and the guard run in the half, beside the method's code: the record of the harness's code is read
    after every step there, and a replaced function fails the cell (the half ends with the unit, the patch with it)."""
    cells = _cell(tmp_path, ["zeroes-its-flops", "source"], "--isolate")
    assert cells["zeroes-its-flops"]["status"] == "error"
    assert "method code replaced cemabench's own code in its half" in cells["zeroes-its-flops"]["message"]
    assert "ComputeMeter.take" in cells["zeroes-its-flops"]["message"]
    assert cells["source"]["status"] == "ok" and cells["source"]["edge_flops"] > 0


def _landlock(version: int) -> None:
    from cemabench.protocol import sandbox

    if sandbox.abi() < version:
        pytest.skip(f"this kernel's Landlock is older than ABI {version}")


@pytest.mark.parametrize("how, version, words", [
    ("shared-memory", 1, "Permission denied"),  # no side channel to the other half or the next unit
    ("signal", 1, "Operation not permitted"),  # the zygote, the loop, any process outside the half (seccomp)
    ("tcp", 1, "Operation not permitted"),  # a Ray head, a local service (no socket; and Landlock ABI 4: no TCP)
    ("unix-socket", 1, "Operation not permitted"),  # a service listening on a path (a Docker daemon's)
    ("udp", 1, "Operation not permitted"),  # a datagram out
    ("proc", 1, "Permission denied"),  # another process's /proc folder (a command line rewritten: a channel)
    ("sysv-shm", 1, "Operation not permitted"),  # a side channel to the other half, or the next unit (the host's IPC)
    ("posix-queue", 1, "Operation not permitted"),  # the same, through the host's POSIX message queues
    ("file-lock", 1, "Operation not permitted"),  # the same, through locks on a file both halves read
    ("sigio", 1, "Operation not permitted"),  # a signal to the zygote through a descriptor's owner
    ("inotify", 1, "Operation not permitted"),  # the files the edge read, seen by the cloud half: the batch, 0 bytes
    ("socket-pair", 1, "Operation not permitted"),  # abstract names, listed by the other half; datagrams to a path
    ("lease", 1, "Operation not permitted"),  # a bit in /proc/locks for the other half
    ("nice", 1, "Operation not permitted"),  # the zygote's priority, which every later half inherits
    ("shared-mapping", 1, "Operation not permitted"),  # a futex both halves see: 64 bits a step in a review
    ("namespace", 1, "Operation not permitted"),  # capabilities set as bits; a network namespace's kernel memory
    ("shared-page", 1, "Operation not permitted"),  # the C library's gconv cache, mapped shared by the zygote
    ("prlimit", 1, "Operation not permitted"),  # the zygote's limits, or the loop's: a unit sabotaged the others
    ("terminal", 1, "Permission denied"),  # no device but null, zero, random and the GPU's (and no terminal)
    ("read-file", 1, "Permission denied"),  # a dataset's labels, the results folder
    ("read-cache", 1, "Permission denied"),  # the corrupted images, the training artefacts
])
def test_a_half_reaches_nothing_outside_itself(plugins, tmp_path, monkeypatch, how, version, words):
    """A hostile review of --isolate: each way out, refused by the kernel, fails the cell; the run goes on."""
    _landlock(version)
    secret = tmp_path / "data" / "labels.txt"  # as a data root is: outside the code and Python's folders
    secret.parent.mkdir()
    secret.write_text("n01440764\n")
    monkeypatch.setenv("CEMABENCH_TEST_PRIVY_PATH", str(secret))
    listening = socket.socket(socket.AF_UNIX)  # a local service on a path, which the half must not reach
    listening.bind(str(tmp_path / "service.sock"))
    listening.listen(1)
    monkeypatch.setenv("CEMABENCH_TEST_SOCKET", str(tmp_path / "service.sock"))
    spec = Path(write_spec(tmp_path / "base.toml", []))
    spec.write_text(spec.read_text() + f'[[methods]]\nname = "escapes"\noptions = {{ how = "{how}" }}\n')
    main(["reproduce", str(spec), "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1", "--isolate"])
    listening.close()
    (cell,) = json.loads((tmp_path / "out" / "small.json").read_text())["cells"]
    assert cell["status"] == "error" and words in cell["message"]


def test_a_half_gets_no_environment_variable_named_as_a_credential(plugins, tmp_path, monkeypatch, capsys):
    """A half cannot send a secret anywhere, but its error message is printed in the table, which users publish: a
    plugin printed the loop's HF_TOKEN there. The halves get the loop's environment less the variables whose names
    say they hold credentials or whose values are one in its issuer's form, from the zygote on (a process's first
    environment stays in its memory: a half read it in /proc/self/environ), and the run names them in one line before
    any compute. Nor do they get any variable outside those that torch, CUDA, OpenMP, Python and the locale read: a
    list of names misses some (a review's plugin printed DB_PW), and a secret may have no known form (BUILD_NOTE)."""
    from cemabench.protocol import zygote

    if os.getpid() in zygote._ZYGOTES:  # the zygote starts here, with the variables set, as a run's first one would
        zygote._stop_zygote()
    monkeypatch.setenv("HF_TOKEN", "hf_not-a-real-token")
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:not-a-real-password@db/results")
    monkeypatch.setenv("MY_HUB", "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")  # a token in its issuer's form
    monkeypatch.setenv("DB_PW", "hunter2-not-a-real")  # named as none of the names before said (a review's)
    monkeypatch.setenv("BUILD_NOTE", "not-a-real-secret of no known form")  # not a variable the halves get
    monkeypatch.setenv("CEMABENCH_TEST_KEYBOARD", "kept")
    monkeypatch.setenv("TORCH_HUB_TOKEN", "not-a-real-token")  # a variable compute reads, named as a credential
    monkeypatch.setenv("PYENV_HOOK_PATH", "/opt/pyenv/hooks")  # named as one (CI's machine has it), but no half gets it
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cells = {}
    for mode, flags in (("isolated", ["--isolate"]), ("inline", [])):
        (tmp_path / mode).mkdir()
        spec = Path(write_spec(tmp_path / mode / "base.toml", []))
        spec.write_text(spec.read_text() + '[[methods]]\nname = "escapes"\noptions = { how = "environment" }\n')
        main(["reproduce", str(spec), "--out", str(tmp_path / mode / "out"), "--no-progress", "--jobs", "1", *flags])
        (cells[mode],) = json.loads((tmp_path / mode / "out" / "small.json").read_text())["cells"]
    assert cells["inline"]["status"] == "error" and "hf_not-a-real-token" in cells["inline"]["message"]
    assert "hf_notarealtoken" in cells["inline"]["message"]
    assert cells["isolated"]["status"] == "ok", cells["isolated"]["message"]
    said = [line for line in capsys.readouterr().err.splitlines() if "environment variable" in line]
    assert len(said) == 1 and "TORCH_HUB_TOKEN" in said[0]  # what compute would read and the halves do not get
    # the rest are no half's either way (not variables compute reads): naming them is noise, and broke CI's one line
    assert not any(name in said[0] for name in ("HF_TOKEN", "WANDB_API_KEY", "DATABASE_URL", "MY_HUB", "DB_PW",
                                                "PYENV_HOOK_PATH", "KEYBOARD", "TOKENIZERS", "BUILD_NOTE"))


@pytest.mark.parametrize("isolate", [[], ["--isolate"]], ids=["in-process", "isolated"])
def test_an_error_cannot_name_its_cell_ok(plugins, tmp_path, isolate):
    """A hostile review of --isolate: an error whose status said "ok" made the cell ok, scored over the batches
    before it. A cell that an error ended is an error (or out-of-memory), whatever the error says."""
    cells = _cell(tmp_path, ["claims-ok"], *isolate)
    assert cells["claims-ok"]["status"] == "error" and "all is well" in cells["claims-ok"]["message"]


def test_a_thread_left_running_in_a_half_fails_the_unit(plugins, tmp_path):
    """In-process, a thread left running fails the unit (it could go on computing, uncounted); isolated, the half is
    asked at the unit's end, before it is ended."""
    cells = _cell(tmp_path, ["leaves-a-thread"], "--isolate")
    assert cells["leaves-a-thread"]["status"] == "error"
    assert "left 1 thread(s) running in its half (saboteur)" in cells["leaves-a-thread"]["message"]


def test_an_edge_thread_that_trains_between_the_steps_is_refused_isolated(plugins, tmp_path):
    """A thread the edge's ``configure`` started trains a hidden model while the cloud step runs, when no guard is
    entered, and the edge predicts with it. In-process its backward passes are not seen (README: what a plugin can
    still do in-process); in an isolated edge half no backward or optimizer kernel may run at any time, on any thread,
    and the next step fails the cell."""
    inline = _cell(tmp_path / "inline", ["trains-between-steps"])["trains-between-steps"]
    assert inline["status"] == "ok"  # the hole, in-process
    cell = _cell(tmp_path / "isolated", ["trains-between-steps"], "--isolate")["trains-between-steps"]
    assert cell["status"] == "error" and "a backward kernel (aten::" in cell["message"]
    assert "during the life of the edge's half" in cell["message"]


def test_method_code_in_a_worker_cannot_jam_the_parents_zygote(plugins, tmp_path, monkeypatch):
    """A worker forked from a process that had started a zygote held a copy of its line: `half-a-message` wrote a
    header there whose body never came, and the zygote waited for it while every later isolated unit of the process
    waited for the zygote (found by the default tier, which hung). A worker now closes that copy first; a zygote that
    does not answer is replaced."""
    from cemabench.protocol import zygote as zygotes

    zygote = zygotes._zygote_connection()[0]
    spec = write_spec(tmp_path / "small.toml", ["half-a-message", "source"])
    main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1", "--unit-timeout", "4s"])
    monkeypatch.setattr(zygotes, "HANDSHAKE_S", 20.0)
    fd, pid = zygotes.fork_half()  # answered by the same zygote, not a replacement
    assert zygotes._zygote_connection()[0] is zygote and pid > 0
    os.close(fd)
    os.kill(pid, signal.SIGKILL)


def test_an_isolated_run_takes_no_record_computed_in_process(tmp_path):
    """A record stores whether its unit ran isolated: rerun with --isolate, a table computes again what an in-process
    run stored (method code there could have written it), and serves what an isolated run stored."""
    spec = _spec(tmp_path, ["source"])
    first = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)
    record = next((tmp_path / "out" / "cells" / "iso").glob("*.json"))
    assert json.loads(record.read_text())["isolated"] is False
    again = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    assert json.loads(record.read_text())["isolated"] is True and numbers(again) == numbers(first)
    assert "isolated" not in first and again["isolated"] is True  # the table says so, and its Markdown
    assert "- **Isolation**: every unit's edge and cloud halves ran" in render(again)
    assert "Isolation" not in render(first)
    stamp = record.stat().st_mtime_ns
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)  # an in-process run takes either
    assert record.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one local Ray at a time under pytest-xdist
def test_isolated_halves_under_ray_give_the_in_process_numbers(tmp_path, local_ray):
    """Under Ray, the unit's task is the loop's process: it starts its own zygote, whose halves are its children."""
    spec = _spec(tmp_path, ["tent"])
    inline = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)
    isolated = runner.reproduce(spec, None, tmp_path / "ray", executor="ray", progress=False, isolate=True)
    assert isolated["isolated"] is True and numbers(isolated) == numbers(inline)



@pytest.fixture
def no_method_class_here(monkeypatch):
    """Fails the test if this process (the loop's) asks the registry for a method's class or builds one: isolated,
    the planner processes and the halves do that, in processes of their own."""
    from cemabench import registry

    asked = []
    load, load_method, build_method = registry.load, registry.load_method, registry.build_method

    def guarded_load(kind, name, *args, **kwargs):
        if kind == "methods":
            asked.append(name)
        return load(kind, name, *args, **kwargs)

    monkeypatch.setattr(registry, "load", guarded_load)
    monkeypatch.setattr(registry, "load_method", lambda name, *a, **k: asked.append(name) or load_method(name, *a, **k))
    monkeypatch.setattr(registry, "build_method", lambda name, *a, **k: asked.append(name) or build_method(name, *a,
                                                                                                           **k))
    return asked


def test_the_loops_process_asks_no_method_class_isolated(tmp_path, no_method_class_here):
    """Issue 22, scope 4: isolated, the methods' classes are asked in planner processes of their own (options,
    protocol, task, models, derived options, code digests) and a unit's halves build the method, so the process that
    holds the labels, the link, scoring and the store neither imports nor asks a method's class (here tent, and
    random-upload, whose options derive from tent's records at run time). What the planners answer is what this
    process's classes answer."""
    spec = _spec(tmp_path, ["tent"])
    text = (tmp_path / "iso.toml").read_text() + '[[methods]]\nname = "random-upload"\nmatch_uploads_of = "tent"\n'
    (tmp_path / "iso.toml").write_text(text)
    spec = load_table(str(tmp_path / "iso.toml"))
    no_method_class_here.clear()  # writing the spec asked for the test's small options
    isolated = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    assert [c["status"] for c in isolated["cells"]] == ["ok", "ok"] and no_method_class_here == []
    assert isolated["cells"][1]["upload_percent"] == isolated["cells"][0]["upload_percent"]  # derived, apart
    recipe, context = runner.prepare(spec, None)  # the same questions, asked in this process
    try:
        assert [{k: m[k] for k in ("paper", "reference", "code")} for m in isolated["methods"]] == [
            context.about(name) for name in ("tent", "random-upload")]
    finally:
        runner.forget(recipe)


def test_a_plugin_that_patches_the_harness_at_import_never_runs_in_the_loops_process(tmp_path, monkeypatch,
                                                                                       no_method_class_here):
    """Issue 22, finding 9, isolated: the plugin that switches the guard off when imported is imported only in its
    planner process, which finds the harness's code replaced: the table is refused before any compute, naming the
    method, and the loop's process is untouched (its harness code as imported, and no trace of the module)."""
    import sys

    from cemabench.protocol import hygiene

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins_patching"))
    monkeypatch.delitem(sys.modules, "patcher", raising=False)
    spec = write_spec(tmp_path / "small.toml", ["source", "patches-the-guard"])
    with pytest.raises(UserError) as refused:
        runner.reproduce(load_table(spec), None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    message = str(refused.value)
    assert message.startswith("method patches-the-guard could not be planned in its own process (--isolate)")
    assert "replaced cemabench's own code" in message and "ForwardOnlyEdge._changed" in message
    assert "patcher" not in sys.modules and hygiene.replaced_harness_code() == [] and no_method_class_here == []
    assert not (tmp_path / "out" / "cells").exists() or not list((tmp_path / "out" / "cells").rglob("*.json"))


def test_a_planner_that_never_answers_is_stopped_naming_its_method(plugins, tmp_path, monkeypatch):
    """A plugin whose class hangs when asked (here check_protocol) in its planner is stopped after PLANNER_S, and the
    table is refused before any compute in one line that names it (no planner had a bound)."""
    from cemabench.protocol import planner

    monkeypatch.setattr(planner, "PLANNER_S", 1.0)
    with pytest.raises(UserError, match=r"method planner-sleeps could not be planned in its own process \(--isolate\):"
                                        r" it did not answer within 1 s"):
        runner.reproduce(_spec(tmp_path, ["source", "planner-sleeps"]), None, tmp_path / "out", jobs=1,
                         progress=False, isolate=True)
    assert not (tmp_path / "out" / "cells").exists() or not any((tmp_path / "out" / "cells").rglob("*.json"))


@pytest.mark.parametrize("method, words", [
    ("forges-its-random-state", "method forges-its-random-state could not be planned in its own process (--isolate): "
                                "NotPlain: the planner half sent a malformed random state"),
    ("changes-its-reference", "method changes-its-reference's planner sent a malformed paper or reference point")])
def test_a_planners_malformed_answer_is_one_line_before_compute(plugins, tmp_path, method, words):
    """What a planner sends is checked as plain data of its kind: a forged random state (which the loop's own state
    would have been set from) or a reference point that is no reference point refuses the table in one line, before
    any compute, where they were a TypeError's traceback and a list in the table document."""
    with pytest.raises(UserError) as refused:
        runner.reproduce(_spec(tmp_path, ["source", method]), None, tmp_path / "out", jobs=1, progress=False,
                         isolate=True)
    assert str(refused.value).startswith(words) and "\n" not in str(refused.value)
    assert not any((tmp_path / "out").rglob("*.json"))


def test_a_class_named_otherwise_than_its_entry_point_runs_isolated_as_in_process(plugins, tmp_path):
    """The README: a method's name defaults to its entry point's. A class that names itself otherwise ran in-process
    and failed isolated (its halves looked up its class's name among the entry points): the halves build what the
    loop asked the planner about."""
    inline, isolated = _both(_spec(tmp_path, ["named-otherwise"]), tmp_path)
    assert [c["status"] for c in isolated["cells"]] == ["ok"]
    assert numbers(isolated) == numbers(inline)


def test_a_workers_context_that_makes_room_ends_its_planners(tmp_path):
    """A long-lived (Ray) worker keeps its latest tables' contexts only; one it drops ends its planner processes
    (each holds a method's module imported), which were left running for the worker's life."""
    from cemabench.run import context as contexts

    spec = _spec(tmp_path, ["source"])
    first = contexts.context_for(contexts.ContextSpec(spec, isolate=True))
    first.planner.check("source", {}, spec.protocol, None, False)  # starts source's planner
    pid = first.planner.halves["source"].pid
    try:
        for _ in range(contexts.KEEP_CONTEXTS):  # later tables' contexts push the first out
            contexts.context_for(contexts.ContextSpec(spec, isolate=True))
        assert first not in contexts._CONTEXTS.values()
        for _ in range(100):  # the planner's process is gone (killed, then reaped by the system)
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
    finally:
        first.planner.close()
        contexts._CONTEXTS.clear()


def test_a_built_methods_own_protocol_check_refuses_the_table_before_compute_in_both_modes(tmp_path):
    """The plan checks the built method's protocol (with its options known: cola's principals within the devices),
    so a table whose options the protocol cannot hold is refused in one line before any compute, in process and
    isolated alike. Isolated, the planner once checked only the class: cola with more principals than devices ran,
    clamped, and its cells read ok; in process its cells failed only once they ran."""
    _spec(tmp_path, ["cola"], domains=("fog", "snow"), protocol='setting = "continual"\ndevices = 2')
    text = (tmp_path / "iso.toml").read_text().replace('name = "cola"', 'name = "cola"\noptions = { principals = 3 }')
    (tmp_path / "iso.toml").write_text(text)
    words = "method cola: option 'principals' must be at most the protocol's devices (2), got 3"
    for isolate in (False, True):
        with pytest.raises(UserError) as refused:
            runner.reproduce(load_table(str(tmp_path / "iso.toml")), None, tmp_path / f"out{isolate}", jobs=1,
                             progress=False, isolate=isolate)
        assert words in str(refused.value)
        assert not list((tmp_path / f"out{isolate}").rglob("*.json"))



def test_status_isolated_imports_no_method_plugin_and_reads_records_as_reproduce_does(tmp_path, monkeypatch):
    """`status --isolate` (the command `reproduce --isolate` suggests for an incomplete table) asked the methods'
    classes in its own process, importing every method plugin beside the results store; and it called done a record
    computed in-process, which `reproduce --isolate` computes again."""
    import sys

    spec = _spec(tmp_path, ["source"])
    runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False)  # in-process: a record not isolated
    assert [r["state"] for r in runner.status(spec, None, tmp_path / "out")] == ["done"]
    monkeypatch.delitem(sys.modules, "cemabench_methods.source")  # put back afterwards, as it was
    rows = runner.status(spec, None, tmp_path / "out", isolate=True)
    assert "cemabench_methods.source" not in sys.modules
    assert [(r["state"], r["detail"]) for r in rows] == [("missing",
                                                          "computed in-process: --isolate computes it again")]


def test_a_local_worker_adopts_a_zygote_forked_from_its_parents_under_its_memory_limit():
    """A worker forked by the local executor (--jobs) gets a zygote forked from its parent's (which imported
    everything already), not one it must start afresh (3-4 s before its first unit): its halves come from that one,
    which runs under the worker's memory limit and ends when the worker does."""
    import select

    import torch

    from cemabench.protocol import isolation, zygote

    isolation.Half("planner", torch.device("cpu")).close()  # this process's zygote, as planning starts it
    zygote.spare(1 << 40)
    (spare,) = zygote._SPARE
    for _ in range(100):  # (it sets the limit before it reads its first request, while this process goes on)
        limits = Path(f"/proc/{spare[0].pid}/limits").read_text().splitlines()
        if any(line.startswith("Max data size") and str(1 << 40) in line for line in limits):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the worker's zygote runs without its memory limit: {limits}")
    watch = os.pidfd_open(spare[0].pid)
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            zygote.drop_inherited()
            adopted = zygote._ZYGOTES.get(os.getpid())
            half = isolation.Half("planner", torch.device("cpu"))
            parent = int(Path(f"/proc/{half.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            half.close()
            code = 0 if adopted is not None and adopted[0].pid == spare[0].pid == parent else 3
        finally:
            os._exit(code)
    zygote.forked()
    assert not zygote._SPARE
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert select.select([watch], [], [], 30)[0], "the worker's zygote outlived the worker"
    os.close(watch)


def test_the_zygote_preloads_harness_code_and_libraries_only():
    """What the zygote imports before it forks is in every half: torch, the zoo's libraries, SciPy's optimisers and
    cemabench's own modules, never a method's (cemabench_methods is a plugin distribution's door like any other)."""
    from cemabench.protocol import zygote

    for name in zygote.PRELOAD:
        assert name.split(".")[0] in ("torch", "torchvision", "timm", "scipy", "cemabench"), name
        assert not name.startswith(("cemabench.tables", "cemabench.run", "cemabench.report")), name


def test_the_models_are_pickled_once_per_run_for_the_halves_and_the_clean_split_never():
    """Every unit's halves get the same models: where Models gives copies of one pair (as every run builds it), they
    are pickled for the first unit and the bytes are sent again; other builders are called anew. Of the clean split
    the cloud half gets its name and sizes only (it asks the loop for images and labels)."""

    import torch

    from cemabench.datasets import miniature
    from cemabench.protocol import Models, isolation, sides
    from conftest import TinyNet

    clean = miniature.dataset(domains=["fog"]).clean
    models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
    first = isolation._set_up(models, clean)
    assert all(a is b for a, b in zip(isolation._set_up(models, clean)[:2], first[:2], strict=True))  # the same
    assert first[2] == {"name": clean.name, "length": len(clean), "sample_nbytes": clean.sample_nbytes}
    assert isolation._set_up(models, None)[2] is None
    edge = sides.loaded(first[0])  # what a half unpickles
    assert type(edge) is TinyNet and all(torch.equal(a, b) for a, b in zip(edge.state_dict().values(),
                                                                            models.edge().state_dict().values()))
    calls = []
    built = Models(edge=lambda: calls.append("edge") or TinyNet(), foundation=lambda: calls.append("f") or TinyNet())
    isolation._set_up(built, None)
    isolation._set_up(built, None)
    assert calls == ["edge", "f", "edge", "f"]


def test_the_loop_serves_a_cloud_half_the_clean_split_and_nothing_else():
    """The cloud half reads no dataset file: it asks the loop for the clean split's images and labels. A request
    for anything else, out of range, or from a half without a clean split fails its cell by name."""
    import numpy as np

    from cemabench.datasets import miniature
    from cemabench.protocol import isolation
    from cemabench.protocol.isolation import serve_clean
    from cemabench.protocol.messages import ASK_CLEAN

    clean = miniature.dataset(domains=["fog"]).clean
    indices = torch.tensor([3, 0, 7])
    assert torch.equal(serve_clean(clean, {ASK_CLEAN: "images", "indices": indices}, "cloud"),
                       clean.images(np.array([3, 0, 7])))
    assert np.array_equal(serve_clean(clean, {ASK_CLEAN: "labels"}, "cloud").numpy(), clean.labels())
    for request in ({ASK_CLEAN: "images", "indices": torch.tensor([len(clean)])},
                    {ASK_CLEAN: "images", "indices": torch.tensor([-1])},
                    {ASK_CLEAN: "images", "indices": torch.tensor([[0]])},
                    {ASK_CLEAN: "images", "indices": torch.tensor([0.0])},
                    {ASK_CLEAN: "images", "indices": [0]},
                    {ASK_CLEAN: "images", "indices": torch.zeros(1, dtype=torch.int64).expand(10 ** 9)},  # 8 bytes
                    {ASK_CLEAN: "images", "indices": torch.arange(4)[1:]},
                    {ASK_CLEAN: "test-labels"},
                    {ASK_CLEAN: "labels", "domain": "fog"}):
        with pytest.raises(HalfFailed, match="request for the clean split is malformed"):
            serve_clean(clean, request, "cloud")
    most = isolation.CLEAN_REQUEST_BYTES // (4 * clean.sample_nbytes)  # what the loop holds for one request is bounded
    with pytest.raises(HalfFailed, match=f"asked for {most + 1} images of the clean split at once; at most {most} "):
        serve_clean(clean, {ASK_CLEAN: "images", "indices": torch.zeros(most + 1, dtype=torch.int64)}, "cloud")
    with pytest.raises(HalfFailed, match="asked for a clean split it was not given"):
        serve_clean(None, {ASK_CLEAN: "labels"}, "edge")


def test_a_plugin_whose_folder_joins_the_import_path_after_the_zygote_started_runs_isolated(tmp_path, monkeypatch):
    """A half reads only the code of an import path folder that is not Python's own (tests/plugins here), so it
    cannot list the folder: it reads the folder's modules and entry points before it is confined (found when the
    default tier's worker had started its zygote before a test added the plugins' folder: every method unknown)."""
    from conftest import PLUGINS

    assert _cell(tmp_path / "before", ["source"], "--isolate")["source"]["status"] == "ok"  # the zygote is up
    monkeypatch.syspath_prepend(str(PLUGINS))
    try:
        cell = _cell(tmp_path / "after", ["readme-example"], "--isolate")["readme-example"]
    finally:
        for name, module in list(sys.modules.items()):
            if PLUGINS in Path(getattr(module, "__file__", None) or "/").parents:
                del sys.modules[name]
    assert cell["status"] == "ok", cell["message"]


FRESH = ("miniature-digits-c", "plugin-zoo:fresh-edge", "plugin-zoo:fresh-foundation")
DIGITS = ("plugin-digits", "mini:edge", "mini:foundation")


@pytest.mark.parametrize("dataset, plugin", [(FRESH, "model_zoo"),
                                             (DIGITS, "dataset_zoo")])
def test_a_plugin_built_or_read_apart_gives_the_in_process_numbers(plugins, tmp_path, dataset, plugin):
    """--isolate builds a model plugin's models in a builder process, and builds and reads a dataset plugin in a
    reader process; the loop's process never imports either, and holds the models as bytes and the dataset as plain
    facts and stand-ins for its domains. The model plugin's weights are drawn from torch's random state (every build
    is seeded), Tent adapts them and ECC-I trains an artefact on them (its key takes the builder's fingerprint of
    their state); the dataset's stream, every batch, the clean split a cloud trains on and every label cross from
    its reader. Two local workers, forked from this process, each start a builder or reader of their own. Every number
    is the in-process run's."""
    spec = _spec(tmp_path, ["tent", "ecc-independent"], dataset=dataset)
    isolated = runner.reproduce(spec, None, tmp_path / "isolated", jobs=2, progress=False, isolate=True)
    assert plugin not in sys.modules  # never imported here
    inline = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)
    assert all(c["status"] == "ok" for c in inline["cells"]), [c["message"] for c in inline["cells"]]
    assert numbers(isolated) == numbers(inline)
    for key in ("edge_flops", "cloud_flops"):
        assert [c[key] for c in isolated["cells"]] == [c[key] for c in inline["cells"]]
    if dataset == FRESH:
        plain = runner.reproduce(_spec(tmp_path / "own", ["tent"]), None, tmp_path / "own", jobs=1, progress=False)
        assert numbers(plain)[0]["correct"] != numbers(inline)[0]["correct"]  # the noise moved the weights


@pytest.mark.parametrize("dataset, plugin", [(FRESH, "model_zoo"), (DIGITS, "dataset_zoo")])
def test_the_ccc_setting_calibrates_and_generates_apart_as_in_process(plugins, tmp_path, dataset, plugin):
    """The ccc setting calibrates its stream on the source edge model's predictions and corrupts the dataset's clean
    test images with its own generator, from a seeded generator: a model built apart predicts in its builder, a
    dataset read apart corrupts in its reader (the generator's state threaded through), also from a local worker
    forked from this process, and the stream (so every number) is the in-process run's."""
    spec = _spec(tmp_path, ["source"], domains=("fog", "contrast"), dataset=dataset, images=None,
                 protocol='setting = "ccc"\nccc_difficulty = 40.0\nccc_speed = 50\nccc_length = 256')
    isolated = runner.reproduce(spec, None, tmp_path / "isolated", jobs=2, progress=False, isolate=True)
    assert plugin not in sys.modules
    inline = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)
    assert [c["seen"] for c in inline["cells"]] == [256] and numbers(isolated) == numbers(inline)


def test_a_model_plugin_built_apart_reads_no_cached_data(plugins, tmp_path):
    """A model plugin's loader ran in the loop's process under --isolate too, where the test images that cemabench
    caches lie readable (a model could learn the test stream before it starts), and the store is written. Its builder
    reads only code, the system's files, the weights and the zoos' caches: cemabench's cache is hidden from it, and
    it writes nothing. Its model names what its loader read."""
    peeking = ("miniature-digits-c", "peeking-zoo:edge", "mini:foundation")
    isolated = runner.reproduce(_spec(tmp_path / "isolated", ["source"], dataset=peeking), None,
                                tmp_path / "isolated", jobs=1, progress=False, isolate=True)
    assert [c["status"] for c in isolated["cells"]] == ["ok"], [c["message"] for c in isolated["cells"]]
    inline = runner.reproduce(_spec(tmp_path / "inline", ["source"], dataset=peeking), None, tmp_path / "inline",
                              jobs=1, progress=False)
    assert "cached data files" in inline["cells"][0]["message"]  # the hole, in the loop's process


def test_a_model_plugins_failure_to_build_is_one_line_before_compute_isolated(plugins, tmp_path, capsys):
    """A model that cannot be built in its builder is one line naming it, exit 2, before any compute, as
    in-process."""
    spec = write_spec(tmp_path / "small.toml", ["source"])
    said = []
    for flags in (["--isolate"], []):
        assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1", *flags,
                     "--edge", "plugin-zoo:no-such-net"]) == 2
        said.append(capsys.readouterr().err.strip().splitlines())
    assert said[0] == said[1] and len(said[0]) == 1 and "no-such-net" in said[0][0], said
    assert not (tmp_path / "out").exists()



def test_a_detection_dataset_plugin_read_apart_scores_as_in_process(plugins, tmp_path):
    boxes = _spec(tmp_path, ["cloud-only"], batch_size=16, images=None,
                  dataset=("plugin-boxes", "minidet:edge", "minidet:cloud"))
    inline, isolated = _both(boxes, tmp_path)
    assert "dataset_zoo" in sys.modules  # (the in-process run's)
    assert all(c["status"] == "ok" for c in inline["cells"])
    assert [(c["map"], c["map50"]) for c in isolated["cells"]] == [(c["map"], c["map50"]) for c in inline["cells"]]


def test_a_dataset_plugin_read_apart_writes_nowhere_but_its_own_cache(plugins, tmp_path):
    """In the loop's process a dataset plugin's factory could write where cemabench keeps its trained artefacts
    (finding 7: a poisoned artefact). Its reader writes only a cache of its own."""
    from dataset_zoo import MARK

    from cemabench.config.paths import cache_root

    mark = cache_root() / "artefacts" / MARK
    mark.parent.mkdir(parents=True, exist_ok=True)
    spec = _spec(tmp_path, ["source"], dataset=("writing-digits", "mini:edge", "mini:foundation"))
    sys.modules.pop("dataset_zoo")
    isolated = runner.reproduce(spec, None, tmp_path / "isolated", jobs=1, progress=False, isolate=True)
    assert [c["status"] for c in isolated["cells"]] == ["ok"] and not mark.exists()
    try:
        runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)
        assert mark.exists()  # the hole, in the loop's process
    finally:
        mark.unlink(missing_ok=True)


def test_a_dataset_plugins_failure_is_one_line_before_compute_isolated(plugins, tmp_path, capsys):
    """A dataset option its factory does not take is one line naming the valid ones, exit 2, as in-process."""
    spec = _spec(tmp_path, ["source"], dataset=DIGITS, images=None)
    said = []
    for flags in (["--isolate"], []):
        assert main(["reproduce", str(tmp_path / "iso.toml"), "--out", str(tmp_path / "out"), "--no-progress",
                     "--jobs", "1", *flags, "--dataset-option", "n_examples=0"]) == 2
        said.append(capsys.readouterr().err.strip().splitlines())
    assert said[0] == said[1] and len(said[0]) == 1 and "n_examples" in said[0][0], said
    assert spec.name == "iso" and not (tmp_path / "out").exists()


def test_run_on_a_dataset_plugin_takes_its_domains_from_its_reader_isolated(plugins, capsys):
    """`cemabench run --dataset D` reads D's default domains from its factory (or a build of it): under --isolate a
    plugin's are asked in a reader process, and the loop's process never imports it."""
    assert main(["run", "--method", "source", "--dataset", "plugin-digits", "--isolate",
                 "--dataset-option", "n_examples=64"]) == 0
    assert "dataset_zoo" not in sys.modules
    out = capsys.readouterr().out
    assert all(name in out for name in ("gaussian_noise", "fog", "jpeg_compression")), out


def test_a_distribution_that_calls_itself_cemabench_is_still_built_apart(plugins, tmp_path, monkeypatch):
    """Whether a model or dataset is cemabench's own is read from where its code lies, not from its distribution's
    name, which any can claim (helper-37: a plugin whose METADATA said Name: cemabench was built in the loop's process,
    where its loader read the cached data)."""
    from cemabench import registry

    folder = tmp_path / "spoof"
    (folder / "spoof-0.0.0.dist-info").mkdir(parents=True)
    (folder / "spoof-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cemabench\nVersion: 9.9.9\n")
    (folder / "spoof-0.0.0.dist-info" / "entry_points.txt").write_text(
        "[cemabench.models]\nspoofed-zoo = model_zoo:peeking_model\n")
    monkeypatch.syspath_prepend(str(folder))
    assert registry.available("models")["spoofed-zoo"].dist.name == "cemabench"
    assert not registry.own("models", "spoofed-zoo") and registry.own("models", "mini")
    doc = runner.reproduce(_spec(tmp_path, ["source"], dataset=("miniature-digits-c", "spoofed-zoo:edge",
                                                                "mini:foundation")), None, tmp_path / "out", jobs=1,
                           progress=False, isolate=True)
    assert [c["status"] for c in doc["cells"]] == ["ok"], [c["message"] for c in doc["cells"]]  # it read nothing
    assert "model_zoo" not in sys.modules


def test_a_model_plugins_fingerprint_is_the_same_in_every_run_and_mode(plugins, tmp_path):
    """A model built apart was keyed by the sha256 of its bytes: a module pickles the names of its unsaved buffers as
    a set, in the hash seed's order, so each zygote (a fresh hash seed) gave other bytes, and its training artefacts
    were never reused (helper-37); nor did its units key as in-process (helper-39). Its builder takes the fingerprint
    of its state, as the loop does of a model built in-process."""
    from cemabench.protocol import zygote

    spec = _spec(tmp_path, ["ecc-independent"], dataset=("miniature-digits-c", "buffered-zoo:edge", "mini:foundation"))
    docs = []
    for run in ("first", "second"):
        if os.getpid() in zygote._ZYGOTES:
            zygote._stop_zygote()  # a new zygote, as a new run starts
        docs.append(runner.reproduce(spec, None, tmp_path / run, jobs=1, progress=False, isolate=True))
    docs.append(runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False))
    prints = [doc["provenance"]["models"]["edge"]["fingerprint"] for doc in docs]
    assert prints[0] == prints[1] == prints[2]
    assert [c["training"]["cached"] for doc in docs[1:] for c in doc["cells"]] == [True, True]


@pytest.mark.parametrize("name, words", [("error-int", "malformed error"), ("error-kind", "could not be built"),
                                         ("sleeping", "did not answer within 2 s")])
def test_a_builder_that_forges_its_reply_or_never_answers_is_one_line(plugins, tmp_path, monkeypatch, capsys, name,
                                                                      words):
    """A builder's forged reply (an error that is not an error record, one without its message) was a traceback in
    the loop, and a builder that never answered hung the run (helper-37): each is one line, exit 2, before any
    compute; a call is bounded as a planner's question is."""
    from cemabench.protocol import isolation

    monkeypatch.setattr(isolation, "SERVED_S", 2.0)
    edge = "sleeping-zoo:edge" if name == "sleeping" else f"forging-zoo:{name}"
    spec = write_spec(tmp_path / "small.toml", ["source"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--no-progress", "--jobs", "1", "--isolate",
                 "--edge", edge]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_a_builders_sparse_predictions_fail_the_ccc_cell_naming_them(plugins, tmp_path):
    spec = _spec(tmp_path, ["source"], domains=("fog", "contrast"), images=None,
                 dataset=("miniature-digits-c", "forging-zoo:sparse-edge", "mini:foundation"),
                 protocol='setting = "ccc"\nccc_difficulty = 40.0\nccc_speed = 50\nccc_length = 256')
    doc = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    assert "predictions, from its builder, is malformed" in doc["cells"][0]["message"], doc["cells"][0]["message"]


def _dataset_spec(folder, dataset, options="", methods=("source",), protocol=""):
    """``_spec`` on a dataset plugin with ``options`` (TOML inline-table fields) for its factory."""
    spec = _spec(folder, list(methods), dataset=(dataset, "mini:edge", "mini:foundation"), images=None,
                 protocol=protocol)
    path = folder / "iso.toml"
    if options:
        path.write_text(path.read_text().replace(f'dataset = "{dataset}"', f'dataset = "{dataset}"\noptions = '
                                                                            f'{{ {options} }}'))
        spec = load_table(str(path))
    return spec


@pytest.mark.parametrize("name", ["..", "x/../../artefacts"])
def test_a_dataset_named_as_a_path_writes_nowhere_but_its_own_cache(plugins, tmp_path, monkeypatch, name):
    """The reader's own cache is CACHE/datasets/NAME: a plugin named ``..`` or ``x/../../artefacts`` had the cache's
    parent or the artefacts as its writable folder (the first with its confinement refused, and so none: it wrote
    cemabench's source), helper-38. The name is made one safe path component."""
    from dataset_zoo import MARK

    from cemabench.config.paths import cache_root

    folder = tmp_path / "named"
    (folder / "named-0.0.0.dist-info").mkdir(parents=True)
    (folder / "named-0.0.0.dist-info" / "entry_points.txt").write_text(
        f"[cemabench.datasets]\n{name} = dataset_zoo:writing_digits\n")
    monkeypatch.syspath_prepend(str(folder))
    mark = cache_root() / "artefacts" / MARK
    mark.parent.mkdir(parents=True, exist_ok=True)
    spec = _spec(tmp_path, ["source"], dataset=(name, "mini:edge", "mini:foundation"))
    doc = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    assert [c["status"] for c in doc["cells"]] == ["ok"] and not mark.exists()
    assert not (cache_root() / "artefacts" / "artefacts").exists()


def test_a_half_whose_confinement_is_refused_runs_no_plugin_code(tmp_path):
    """Where the kernel has Landlock and refuses a half's rules (a writable folder that is not there), the half runs
    nothing: before, it went on unconfined (helper-38's reader wrote cemabench's source that way)."""
    from cemabench.protocol import sandbox
    from cemabench.protocol.isolation import Half
    from cemabench.protocol.zygote import Access

    if not sandbox.abi():
        pytest.skip("this kernel has no Landlock")
    half = Half("reader", torch.device("cpu"), access=Access(writes=(str(tmp_path / "missing"),)))
    try:
        with pytest.raises(HalfFailed, match="confinement could not be applied"):
            half.call("reader")
    finally:
        half.close()


@pytest.mark.parametrize("how, words", [("huge-images", "images of domain fog, from its reader, is malformed"),
                                        ("huge-labels", "labels of domain fog, from its reader, is malformed")])
def test_a_readers_view_that_stands_for_gigabytes_is_refused(plugins, tmp_path, how, words):
    """A reader's reply of a few bytes that stands for gigabytes (one value expanded) made the loop allocate 5.7 GB
    (helper-38), and a label array of 2**36 recorded the cell as ok with nothing seen: the loop takes only tensors
    that own exactly their bytes, of the size the domain says."""
    spec = _dataset_spec(tmp_path, "forging-digits", f'how = "{how}", n_examples = 128')
    doc = runner.reproduce(spec, None, tmp_path / "out", jobs=1, progress=False, isolate=True)
    (cell,) = doc["cells"]
    assert cell["status"] == "error" and words in cell["message"], cell["message"]
    # in-process the plugin's labels fail otherwise (it has no line to forge on): a score that fails fails its cell,
    # which was an empty "ok" (nothing seen) that the report then divided by
    (cell,) = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)["cells"]
    assert cell["status"] == "error" and (how == "huge-images" or "IndexError" in cell["message"]), cell["message"]


def test_a_readers_provenance_nested_past_the_parser_is_one_line(plugins, tmp_path, capsys):
    _dataset_spec(tmp_path, "forging-digits", 'how = "deep-provenance"')
    assert main(["reproduce", str(tmp_path / "iso.toml"), "--out", str(tmp_path / "out"), "--no-progress", "--jobs",
                 "1", "--isolate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "provenance, from its reader, is malformed" in err[0], err


def test_a_dataset_drawn_at_random_while_built_gives_the_same_numbers_every_run(plugins, tmp_path):
    """A factory that draws from NumPy's global generator while it is built took other images each run and in each
    worker (helper-38): every dataset is built under one seed, in the loop's process or its reader."""
    import numpy as np

    spec = _dataset_spec(tmp_path, "random-digits")
    inline = runner.reproduce(spec, None, tmp_path / "inline", jobs=1, progress=False)
    np.random.rand(7)  # whatever ran before
    again = runner.reproduce(spec, None, tmp_path / "again", jobs=1, progress=False)
    isolated = runner.reproduce(spec, None, tmp_path / "isolated", jobs=2, progress=False, isolate=True)
    assert numbers(inline) == numbers(again) == numbers(isolated)


@pytest.mark.parametrize("isolate", [False, True])
def test_a_dataset_plugin_whose_provenance_leaves_out_its_name_renders(plugins, tmp_path, isolate):
    """The table's header names the dataset from its provenance, which a plugin may leave out: a KeyError traceback
    in the report (helper-38). It takes the dataset's name."""
    doc = runner.reproduce(_dataset_spec(tmp_path, "unnamed-digits", "n_examples = 64"), None, tmp_path / "out",
                           jobs=1, progress=False, isolate=isolate)
    assert doc["provenance"]["dataset"]["dataset"] == "miniature-digits-c"
    assert "miniature-digits-c" in render(doc)


@pytest.mark.parametrize("dataset, words", [
    (("failing-digits", "mini:edge", "mini:foundation"),
     "the dataset plugin 'failing-digits' failed: ValueError: failing-digits reads its files from --data-root DIR"),
    (("miniature-digits-c", "failing-zoo:edge", "mini:foundation"),
     "the model plugin 'failing-zoo' failed: RuntimeError: failing-zoo has no weights for edge here")])
def test_a_plugin_that_fails_to_build_is_the_same_one_line_in_both_modes(plugins, tmp_path, capsys, dataset, words):
    """A dataset factory's or a model loader's own exception was a traceback in-process and one line isolated
    (helper-39): it is the same one line naming the plugin in both, exit 2, before any compute."""
    _spec(tmp_path, ["source"], dataset=dataset)
    said = []
    for flags in ([], ["--isolate"]):
        assert main(["reproduce", str(tmp_path / "iso.toml"), "--out", str(tmp_path / "out"), "--no-progress",
                     "--jobs", "1", *flags]) == 2
        said.append(capsys.readouterr().err.strip().splitlines())
    assert said[0] == said[1] == [f"cemabench: error: {words}"], said
