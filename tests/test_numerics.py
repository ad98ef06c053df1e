"""CPU numerics are pinned to AVX2 when cemabench is imported (cemabench.config.numerics), recorded in every result
and in the store key, and can be left native."""
import os
import platform
import subprocess
import sys

import pytest

from cemabench.cli import main
from cemabench.config import numerics

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _numerics(env: dict, before: str = "") -> str:
    """cpu_numerics() in a fresh process with the given environment changes (None removes a variable)."""
    environment = {k: v for k, v in os.environ.items() if k not in env and k not in numerics.PINNED}
    environment.update({k: v for k, v in env.items() if v is not None})
    code = f"{before}\nimport cemabench\nfrom cemabench.config.numerics import cpu_numerics\nprint(cpu_numerics())"
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _native() -> str:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow  # 7 s: fresh interpreters; kept out of the default tier's 5 minutes
@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 machines")
def test_importing_cemabench_pins_the_cpu_kernels_to_avx2_and_native_leaves_them():
    native = _native()
    if native not in ("AVX2", "AVX512"):
        pytest.skip(f"this machine's torch dispatches {native} kernels: nothing to pin down to AVX2")
    assert _numerics({numerics.SWITCH: None}) == "AVX2 onednn=AVX2 mkl=AVX2"
    assert _numerics({numerics.SWITCH: "native"}) == f"{native} onednn=native mkl=native"


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 machines")
def test_a_value_the_user_set_is_kept_and_recorded():
    assert _numerics({"ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT onednn=AVX2 mkl=AVX2"


def test_torch_computing_before_cemabench_is_imported_keeps_its_choice_and_says_so():
    """torch fixes its dispatch level at its first computation: what the provenance records is what ran."""
    if not X86 or _native() not in ("AVX512",):
        pytest.skip("needs a machine whose native level is above the pin")
    got = _numerics({numerics.SWITCH: None}, before="import torch; torch.ones(64).sum()")
    assert got.startswith("AVX512 ")


def test_a_switch_value_that_is_not_a_choice_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv(numerics.SWITCH, "avx512")
    assert main(["list", "tables"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CEMABENCH_CPU_NUMERICS must be one of avx2, native, got 'avx512'" in err


def test_the_cpu_numerics_are_in_the_results_provenance_and_the_store_key(monkeypatch):
    """A cell computed with other CPU kernels is not reused: its numbers may differ in the last bits, and more."""
    from cemabench.provenance import versions
    from cemabench.run import context
    from cemabench.tables.plan import Unit
    from cemabench.tables.spec import load_table

    assert versions()["cpu_numerics"] == numerics.cpu_numerics()
    table = context.TableContext(load_table("table2"), None)
    unit = Unit("source", "source", (), 0, ("fog",))
    pinned = table.unit_key(unit)
    monkeypatch.setattr(context, "cpu_numerics", lambda: "AVX512 onednn=native mkl=native")
    assert table.unit_key(unit) != pinned and table.unit_config(unit)["cpu_numerics"].startswith("AVX512")
