"""The architecture as written down (README: Architecture; pyproject's [tool.importlinter]) is the one the code has:
the import contracts hold, and they do fail on a cycle or a layer breach introduced in a scratch copy."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache"]


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "COLUMNS": "200"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([*LINT, str(cwd / "pyproject.toml")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.fixture
def scratch(tmp_path):
    """A copy of the harness and the built-in methods, importable from ``tmp_path`` ahead of the installed ones."""
    shutil.copytree(ROOT / "cemabench", tmp_path / "cemabench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "methods", tmp_path / "cemabench_methods", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_cycle_through_a_function_level_import_breaks_the_contract(scratch):
    assert _lint(scratch, scratch).returncode == 0  # the copy itself is clean (and it is the copy that is read)
    _append(scratch / "cemabench" / "protocol" / "link.py",
            "\n\ndef _later():\n    from cemabench.protocol.loop import run_unit\n\n    return run_unit\n")
    done = _lint(scratch, scratch)
    assert done.returncode != 0
    assert "No cycles between modules or packages, at any depth BROKEN" in done.stdout
    assert ".link -> .loop" in done.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(scratch):
    _append(scratch / "cemabench" / "config" / "fields.py", "\nif False:\n    import cemabench.run.store  # noqa\n")
    done = _lint(scratch, scratch)
    assert done.returncode != 0
    assert "Layers: each part of the harness imports only the parts below it BROKEN" in done.stdout
    assert "cemabench.config.fields -> cemabench.run.store" in done.stdout


def test_the_harness_importing_a_builtin_method_breaks_the_contract(scratch):
    _append(scratch / "cemabench" / "report" / "leaderboard.py", "\nimport cemabench_methods.source  # noqa\n")
    done = _lint(scratch, scratch)
    assert done.returncode != 0
    assert "nothing in cemabench imports the built-in methods BROKEN" in done.stdout
    assert "cemabench.report.leaderboard -> cemabench_methods.source" in done.stdout


def test_the_config_layer_and_the_old_paths_import_no_torch():
    """Specs are data: the protocol's fields and the setting grammar load without the engine."""
    code = ("import sys, cemabench.config, cemabench.config.paths\n"
            "from cemabench.config import Protocol\nProtocol(batch_size=8, setting='continual', rounds=2)\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_moved_module_paths_still_import_with_a_deprecation_warning():
    import warnings

    for old in ("cemabench.spec", "cemabench.stream", "cemabench.zoo"):  # as a fresh process imports them
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from cemabench.spec import load_table
        from cemabench.stream import build_blocks, parse_setting
        from cemabench.zoo import Normalized, torchvision_model
    from cemabench.config.settings import parse_setting as settings_parse
    from cemabench.models.layers import Normalized as LayersNormalized
    from cemabench.models.zoo import torchvision_model as zoo_torchvision
    from cemabench.protocol.stream import build_blocks as stream_build
    from cemabench.tables.spec import load_table as spec_load

    assert (load_table, parse_setting, build_blocks) == (spec_load, settings_parse, stream_build)
    assert (Normalized, torchvision_model) == (LayersNormalized, zoo_torchvision)
    moved = {str(w.message).split(" moved")[0] for w in caught if issubclass(w.category, DeprecationWarning)}
    assert {"cemabench.spec", "cemabench.stream", "cemabench.zoo"} <= moved
    with pytest.raises(ImportError):
        from cemabench.spec import no_such_name  # noqa: F401
