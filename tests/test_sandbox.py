"""What Landlock leaves an isolated half to read (cemabench/protocol/sandbox.py): the system's files, Python's, the
importable code, and nothing beneath a hidden folder even where it lies inside one of those."""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys

import pytest

from cemabench.protocol import sandbox


def _beneath(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def _layout(tmp_path):
    code = tmp_path / "code"  # a folder on the import path (a project's root, run with python -m)
    (code / "sandbox_probe").mkdir(parents=True)
    (code / "sandbox_probe" / "__init__.py").write_text("ANSWER = 42\n")
    (code / "notes.txt").write_text("readable\n")
    (code / "data" / "val").mkdir(parents=True)  # a data root inside it, hidden
    (code / "data" / "val" / "labels.txt").write_text("secret\n")
    (code / "back").symlink_to(code)  # a link back up: walked once
    (code / "shortcut").symlink_to(code / "data")  # a link into the hidden folder: not followed into a rule
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("secret\n")
    return code


def test_what_is_readable_holds_no_hidden_folder_nor_one_that_contains_it(tmp_path):
    code = _layout(tmp_path)
    hidden = str(code / "data")
    rules = sandbox.readable([*sys.path, str(code)], [hidden])
    assert str(code / "sandbox_probe") in rules and str(code / "notes.txt") in rules
    for path in rules:
        assert not _beneath(path, hidden) and not _beneath(hidden, path), path
    assert not any(_beneath(str(tmp_path / "elsewhere"), path) for path in rules)
    assert any(_beneath(sys.base_prefix, os.path.realpath(path)) or _beneath(os.path.realpath(sys.base_prefix), path)
               for path in rules)


def _in_a_confined_child(code, hidden: str) -> dict:
    """Fork, confine the child as a half is (its import path listed first), and say what it could do."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = {}
        try:
            sys.path.insert(0, str(code))
            importlib.invalidate_caches()
            importlib.machinery.PathFinder.find_spec("cemabench-lists-the-import-path")
            out["sandbox"] = sandbox.confine([os.devnull], sandbox.readable(sys.path, [hidden]))
            out["import"] = importlib.import_module("sandbox_probe").ANSWER
            for name, act in (("notes", lambda: (code / "notes.txt").read_text()),
                              ("labels", lambda: (code / "data" / "val" / "labels.txt").read_text()),
                              ("through a link", lambda: (code / "shortcut" / "val" / "labels.txt").read_text()),
                              ("list the root", lambda: os.listdir(code)),
                              ("list the data", lambda: os.listdir(code / "data")),
                              ("elsewhere", lambda: (code.parent / "elsewhere" / "secret.txt").read_text())):
                try:
                    act()
                    out[name] = "read"
                except OSError as error:
                    out[name] = type(error).__name__
        except BaseException as error:  # noqa: BLE001 - said to the parent
            out["error"] = repr(error)
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return said


def test_a_confined_process_reads_the_code_and_nothing_hidden_or_elsewhere(tmp_path):
    if sandbox.abi() < 1:
        pytest.skip("this kernel has no Landlock")
    code = _layout(tmp_path)
    said = _in_a_confined_child(code, str(code / "data"))
    assert "error" not in said, said
    assert said["sandbox"].endswith("reads confined")
    assert said["import"] == 42 and said["notes"] == "read"  # a module of the folder, listed before confining
    for name in ("labels", "through a link", "list the root", "list the data", "elsewhere"):
        assert said[name] == "PermissionError", (name, said)
