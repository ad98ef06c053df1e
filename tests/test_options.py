"""Method options are checked before any compute, by one path: the type, finiteness for floats, and the bounds each
option declares with ``cemabench.method.option`` (which a plugin author uses the same way)."""
import dataclasses
import math
import re
from dataclasses import dataclass

import pytest

from cemabench.cli import main
from cemabench.config.bounds import Bounds
from cemabench.errors import UserError
from cemabench.method import Method, declared_bounds, option, parse_options
from cemabench.registry import load_method
from conftest import builtin_methods


@pytest.mark.parametrize("method, given, words", [
    ("tent", "momentum=5", "option 'momentum' must be a number >= 0 and < 1, got 5"),
    ("confidence-offload", "threshold=2", "option 'threshold' must be a number >= 0 and <= 1, got 2"),
    ("cema", "entropy_max=nan", "option 'entropy_max' must be a number >= 0 and <= 1, got nan"),
    ("tent", "lr=-1", "option 'lr' must be a number > 0 and <= 1, got -1"),
    ("tent", "lr=1e300", "option 'lr' must be a number > 0 and <= 1, got 1e+300"),
    ("cema", "foundation_lr=2", "option 'foundation_lr' must be a number > 0 and <= 1, got 2"),
    ("tent", "lr=nan", "option 'lr' must be a number > 0 and <= 1, got nan"),
    ("tent", "lr=inf", "option 'lr' must be a number > 0 and <= 1, got inf"),
    ("cema", "cloud_batch=0", "option 'cloud_batch' must be an integer >= 1, got 0"),
    ("eata", "fisher_batch=0", "option 'fisher_batch' must be an integer >= 1, got 0"),
    ("pseudo-label", "lr=0", "option 'lr' must be a number > 0 and <= 1, got 0"),  # keeps Tent's bounds
    ("cotta", "restore_probability=1.5", "option 'restore_probability' must be a number >= 0 and <= 1"),
    ("lame", "knn=0", "option 'knn' must be an integer >= 1, got 0"),
    ("deyo", "plpd_threshold=2", "option 'plpd_threshold' must be a number >= -1 and <= 1, got 2"),
    ("deyo", "entropy_margin=-0.5", "option 'entropy_margin' must be a number >= 0 and <= 1, got -0.5"),
    ("deyo", "patch_len=0", "option 'patch_len' must be an integer >= 1, got 0"),
    ("deyo", 'augmentation="blur"', "option 'augmentation' must be one of patch, pixel, occ, got 'blur'"),
    ("deyo", 'select_on="fog"', "option 'select_on' must be one of edge, cloud, got 'fog'"),
])
def test_an_option_out_of_its_bounds_is_one_line_and_exit_2_before_any_compute(capsys, tmp_path, method, given,
                                                                                  words):
    out = tmp_path / "r.json"
    assert main(["run", "--method", method, "--option", given, "--domains", "fog", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"method '{method}': {words}" in err and err.count("\n") == 1 and not out.exists()


def test_a_spec_with_a_negative_lr_is_refused_before_any_compute(capsys, tmp_path):
    spec = tmp_path / "neg.toml"
    spec.write_text('extends = "table2"\nname = "neg"\n[[add_methods]]\nname = "tent"\nlabel = "tent-neg"\n'
                    '[add_methods.options]\nlr = -0.001\n')
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "option 'lr' must be a number > 0 and <= 1, got -0.001" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cells").exists()


@pytest.mark.parametrize("seeds, words", [(["-1"], "got [-1]"), (["0", "0"], "got [0, 0]")])
def test_seeds_on_the_command_line_are_checked_as_in_a_spec(capsys, tmp_path, seeds, words):
    flags = [a for s in seeds for a in ("--seed", s)]
    assert main(["reproduce", "table2", *flags, "--out", str(tmp_path)]) == 2
    assert f"--seed must be a non-empty list of distinct non-negative integers, {words}" in capsys.readouterr().err


def test_a_severity_of_zero_is_not_replaced_by_the_default(capsys, tmp_path):
    assert main(["run", "--method", "source", "--domains", "fog", "--severity", "0", "--out",
                 str(tmp_path / "r.json")]) == 2
    assert "severity must be one of 1, 2, 3, 4, 5 (got 0)" in capsys.readouterr().err


@pytest.mark.parametrize("name", builtin_methods())
def test_every_built_in_default_lies_within_its_declared_bounds(name):
    cls = load_method(name)
    options = parse_options(cls.Options, {}, name)
    for f in dataclasses.fields(options):
        value, bounds = getattr(options, f.name), declared_bounds(cls.Options, f.name)
        assert value is None or all(bounds.admits(v) for v in (value if isinstance(value, tuple) else (value,)))


def test_a_plugin_declares_bounds_with_option_and_a_subclass_keeps_them():
    @dataclass
    class Base:
        rate: float = option(0.5, low=0, above=True, high=1)
        mode: str = option("a", choices=("a", "b"))
        names: tuple[str, ...] = option(("x",), choices=("x", "y"))

    @dataclass
    class Child(Base):
        rate: float = 0.25  # only the default changes

    assert parse_options(Child, {"rate": 1}, "p").rate == 1
    for values, words in [({"rate": 0}, "option 'rate' must be a number > 0 and <= 1, got 0"),
                          ({"mode": "c"}, "option 'mode' must be one of a, b, got 'c'"),
                          ({"names": ["x", "z"]}, "option 'names' must be a list of one of x, y, got ['x', 'z']"),
                          ({"rate": math.nan}, "got nan")]:
        with pytest.raises(UserError, match=re.escape(words)):
            parse_options(Child, values, "p")


def test_a_default_outside_its_own_bounds_fails_when_the_plugin_is_built():
    class Careless(Method):
        name = "careless"

        @dataclass
        class Options:
            momentum: float = option(1.5, low=0, high=1, below=True)

    with pytest.raises(UserError, match="option 'momentum' must be a number >= 0 and < 1, its default 1.5"):
        Careless()


def test_an_option_without_declared_bounds_must_still_be_finite():
    @dataclass
    class Plain:
        scale: float = 1.0

    with pytest.raises(UserError, match="option 'scale' must be a finite number, got inf"):
        parse_options(Plain, {"scale": math.inf}, "p")


@pytest.mark.parametrize("bounds, kind, phrase", [
    (Bounds(low=1), int, "an integer >= 1"),
    (Bounds(low=0, above=True), float, "a number > 0"),
    (Bounds(low=0, high=1, below=True), float, "a number >= 0 and < 1"),
    (Bounds(), float, "a finite number"),
    (Bounds(choices=("a", "b")), str, "one of a, b"),
])
def test_bounds_say_what_a_value_must_be(bounds, kind, phrase):
    assert bounds.phrase(kind) == phrase


def test_bounds_themselves_are_checked():
    with pytest.raises(ValueError, match="finite"):
        Bounds(low=math.nan)
    with pytest.raises(ValueError, match="above high"):
        Bounds(low=2, high=1)


@pytest.mark.parametrize("command", [["run", "--method", "source", "--domains", "fog"], ["reproduce", "table2"]])
def test_an_address_without_the_ray_executor_is_refused_not_ignored(capsys, tmp_path, command):
    assert main([*command, "--address", "127.0.0.1:6379", "--out", str(tmp_path / "o")]) == 2
    assert "--address 127.0.0.1:6379 is the address of a Ray cluster: add --executor ray" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["run", "--method", "source", "--domains", "fog", "--dataset-option", "subset=all"],
     "dataset 'miniature-digits-c' has no option 'subset'; valid options: n_examples"),
    (["reproduce", "table2", "--dataset-option", "n_example=100"],
     "dataset 'miniature-digits-c' has no option 'n_example'; valid options: n_examples"),
    (["run", "--method", "source", "--dataset", "cifar10-c", "--data-root", "{root}", "--edge", "cifar:Standard",
      "--foundation", "cifar:Standard",
      "--dataset-option", "foo=1"], "dataset 'cifar10-c' has no option 'foo'; valid options: n_examples"),
    (["reproduce", "table2", "--data-root", "{root}", "--dataset-option", "worker=4"],
     "dataset 'imagenet-c' has no option 'worker'; valid options: subset, subset_file, workers"),
    (["run", "--method", "source", "--dataset-option", "workers"],
     "--dataset-option takes KEY=VALUE (e.g. --dataset-option workers=8), got 'workers'"),
])
def test_an_unknown_dataset_option_is_one_line_with_the_valid_ones(capsys, tmp_path, argv, words):
    argv = [a.replace("{root}", str(tmp_path)) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_status_on_a_file_is_one_line_and_on_a_missing_folder_says_so(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert main(["status", "eccentric-clean", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; status reads the folder" in capsys.readouterr().err
    assert main(["status", "eccentric-clean", "--out", str(tmp_path / "nowhere")]) == 3
    assert "does not exist: nothing has run there yet" in capsys.readouterr().out


def test_a_path_error_is_one_line_and_exit_2(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert main(["run", "--method", "source", "--domains", "fog", "--store", str(tmp_path / "file" / "s"),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(tmp_path / "file") in err


def test_a_closed_stdout_ends_quietly_with_141():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "cemabench.cli", "list", "tables"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err


def test_ctrl_c_in_run_is_exit_130_without_a_traceback(capsys, tmp_path, monkeypatch):
    from cemabench.run import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "reproduce", interrupted)
    assert main(["run", "--method", "source", "--domains", "fog", "--out", str(tmp_path / "r.json")]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("method, given, words", [
    ("ecc-adaptive", 'edge_stage="layer9"', "the edge model has no stage 'layer9'; valid edge_stage: stem, layer1"),
    ("ecc-dynamic", 'cloud_stage="layer4"', "the cloud model has no entry stage 'layer4'; valid cloud_stage: layer1"),
    ("sar", 'frozen=["layer3", "layer9"]', "frozen pattern(s) 'layer9' name no module of the edge model; its stages: "),
    ("deyo", 'frozen=["layer9"]', "deyo: frozen pattern(s) 'layer9' name no module of the edge model; its stages: "),
])
def test_an_option_naming_what_the_models_lack_is_refused_before_any_compute(capsys, tmp_path, method, given, words):
    """Method.check_models, called with the table's source models once they are built (it was exit 3, after the
    offline training stage had started)."""
    out = tmp_path / "r.json"
    assert main(["run", "--method", method, "--option", given, "--domains", "fog", "--out", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_a_model_with_other_classes_than_the_dataset_is_refused_before_any_compute(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--method", "source", "--domains", "fog", "--edge", "tiny:edge", "--out", str(out)]) == 2
    assert ("the edge model tiny:edge gives 1000 outputs and the dataset miniature-digits-c needs 10"
            in capsys.readouterr().err) and not out.exists()


def test_another_dataset_without_its_models_is_refused_not_run_on_the_digit_networks(capsys, tmp_path):
    assert main(["run", "--method", "source", "--dataset", "cifar10-c", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "r.json")]) == 2
    assert "--dataset cifar10-c needs --edge and --foundation" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [(["sweep", "table2"], "'table2' is a table, not a sweep: run `cemabench "
                                                                 "reproduce table2`"),
                                         (["reproduce", "cema-emin"], "'cema-emin' is a sweep, not a table: run "
                                                                      "`cemabench sweep cema-emin`")])
def test_a_table_given_to_sweep_or_a_sweep_to_reproduce_points_to_the_other_command(capsys, tmp_path, argv, words):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err


def test_every_flag_of_every_command_has_help():
    from cemabench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    silent = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in commands.items()
              for a in sub._actions if a.help is None and a.dest != "help"]
    assert silent == []


def test_a_written_document_says_when_and_by_which_command(tmp_path):
    import json
    from datetime import UTC, datetime

    out = tmp_path / "r.json"
    argv = ["run", "--method", "source", "--domains", "fog", "--out", str(out)]
    assert main(argv) == 0
    written = json.loads(out.read_text())["written"]
    assert written["command"] == "cemabench " + " ".join(argv)
    assert abs((datetime.now(UTC) - datetime.fromisoformat(written["at"])).total_seconds()) < 600


def test_reproduce_prints_a_summary_that_fits_a_terminal_and_keeps_the_full_tables_in_the_file():
    import json
    from pathlib import Path

    from cemabench.report.leaderboard import render, terminal_summary

    doc = json.loads((Path(__file__).parents[1] / "leaderboards" / "table2.miniature.json").read_text())
    shown = terminal_summary(doc)
    assert max(map(len, shown.splitlines())) <= 120 < max(map(len, render(doc).splitlines()))
    assert "EMBEDDED MINIATURE, NOT IMAGENET-C" in shown
    assert all(m["label"] in shown for m in doc["methods"])


def test_the_summarys_worst_domain_reads_noted_and_several_seed_cells():
    """A cell with a note (†) or a spread over seeds (mean ± std) still has a worst domain, and a † is explained."""
    import copy
    import json
    from pathlib import Path

    from cemabench.report.leaderboard import terminal_summary

    doc = json.loads((Path(__file__).parents[1] / "leaderboards" / "multi-edge.miniature.json").read_text())
    rows = {line.split("|")[1].strip(): line for line in terminal_summary(doc).splitlines() if line.startswith("| ")}
    assert "| 68.2† (contrast) " in rows["tent"] and "| 72.3 (contrast) " in rows["cema"]  # noted, and not
    assert "† its cell has a note (the notes are listed at the end of the Markdown file)" in terminal_summary(doc)
    seeds = copy.deepcopy(doc)
    later = [{**c, "seed": 1, "accuracy": c["accuracy"] + 1.0} for c in seeds["cells"] if c["status"] == "ok"]
    seeds["cells"] += later
    seeds["seeds"] = [0, 1]
    rows = {line.split("|")[1].strip(): line for line in terminal_summary(seeds).splitlines() if line.startswith("| ")}
    assert "| 68.7† (contrast) " in rows["tent"] and "| 72.8 (contrast) " in rows["cema"]  # the seeds' mean


def test_option_types_are_checked_item_by_item_and_floats_stored_as_floats():
    @dataclass
    class Typed:
        counts: tuple[int, ...] = (1,)
        rates: tuple[float, ...] = (0.5,)
        names: tuple[str, ...] | None = None
        lr: float = 0.1

    assert parse_options(Typed, {"rates": [1], "names": ["a"], "lr": 1}, "p") == Typed((1,), (1.0,), ("a",), 1.0)
    assert isinstance(parse_options(Typed, {"lr": 1}, "p").lr, float)
    assert parse_options(Typed, {"names": [1]}, "p").names == ("1",)  # a name given as digits (a stage called 1)
    for values, words in [({"counts": [True]}, "must be a list of int"), ({"names": [1.5]}, "a list of str or null"),
                          ({"names": [True]}, "a list of str or null"),
                          ({"lr": 10**400}, "option 'lr' must be float")]:
        with pytest.raises(UserError, match=words):
            parse_options(Typed, values, "p")


def test_a_path_error_while_the_table_runs_is_exit_3_with_the_resume_hint(capsys, tmp_path, monkeypatch):
    """Issue 23: an OS error raised mid-table (here the store's disk fills after the first cell) is not bad input:
    exit 3, the finished cells kept, and how to resume."""
    import errno

    from cemabench.run.store import ResultStore as Store

    spec = tmp_path / "two.toml"
    spec.write_text('extends = "table2"\nname = "two"\nseeds = [0]\n[data]\ndomains = ["fog", "snow"]\n'
                    '[[methods]]\nname = "source"\n')
    put, calls = Store.put, []

    def fills_up(self, key, record):
        calls.append(key)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path(key)))
        return put(self, key, record)

    monkeypatch.setattr(Store, "put", fills_up)
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "out"), "--jobs", "1", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command to resume" in err and "Traceback" not in err
    assert len(list((tmp_path / "out" / "cells").rglob("*.json"))) == 1


@pytest.mark.parametrize("what", ["methods", "datasets", "models", "tables"])
@pytest.mark.parametrize("columns", [80, 120])
def test_list_fits_the_terminal_and_cuts_nothing(what, columns, capsys, monkeypatch):
    """Issue 23: `list methods` lines were 363 columns wide; wrapped, every name still appears whole."""
    from cemabench import registry

    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= columns
    if what != "tables":
        flat = out.replace(" ", "").replace("|", "").replace("\n", "")
        assert all(name in flat for name in registry.available(what))


def test_list_describes_each_plugin_by_its_whole_first_sentence():
    """Issue 23: `list datasets` and `list models` cut descriptions at the docstring's first line end."""
    from cemabench import registry
    from cemabench.cli import _about, _first_line

    class Documented:
        """A first sentence that runs
        over two lines. A second one."""

    assert _first_line(Documented) == "A first sentence that runs over two lines."
    for kind in ("datasets", "models"):
        cut = [name for name in registry.available(kind) if not _about(kind, name).endswith(".")]
        assert cut == [], kind


def test_the_ray_extra_installs_what_a_ray_address_needs():
    """Issue 23: the README's `--address ray://head:10001` needs Ray Client, which the `ray` extra did not install."""
    from importlib.metadata import requires

    assert 'ray[client]>=2.9; extra == "ray"' in requires("cemabench")


@pytest.mark.parametrize("address, words", [
    ("notanaddress", "is not a Ray address: give HOST:PORT"),
    ("127.0.0.1:9", "nothing answers at 127.0.0.1:9"),
    ("ray://127.0.0.1:9", "nothing answers at ray://127.0.0.1:9"),
])
def test_a_ray_address_that_is_wrong_or_silent_is_one_line_within_seconds(address, words, capsys, tmp_path):
    """Issue 23: a traceback for `notanaddress`; still retrying after 175 s for an address where nothing listens."""
    import time

    start = time.monotonic()
    assert main(["reproduce", "table2", "--executor", "ray", "--address", address, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and time.monotonic() - start < 20
    assert not (tmp_path / "o").exists()
