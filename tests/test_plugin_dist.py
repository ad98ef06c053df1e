"""The test distribution under tests/plugins: found like an installed one; a broken plugin hides nothing else; a
method written from the plugin API alone works; the README's example is a complete plugin that runs."""
import json
from importlib.metadata import entry_points

import pytest

from cemabench import registry
from cemabench.cli import main
from cemabench.errors import UserError
from cemabench.method import Method
from conftest import write_spec


def test_the_test_distribution_is_found_through_importlib_metadata(plugins):
    found = {e.name: e for e in entry_points(group="cemabench.methods")}
    assert found["readme-example"].dist.name == "cemabench-test-plugins"
    assert found["readme-example"].value == "readme_example:UnsureEntropy"
    assert {"readme-example", "broken", "tent"} <= set(registry.available("methods"))


def test_the_test_distribution_is_gone_without_the_fixture():
    assert "readme-example" not in registry.available("methods")


def test_a_broken_plugin_is_listed_as_broken_and_the_rest_still_list(plugins, capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    listed = f"\n{out}".replace("| ", "\n").replace(" |", "\n").replace(" ", "\n")
    assert "\ntent\n" in listed and "\nreadme-example\n" in listed and "\nbare\n" in listed
    broken = [line for line in out.splitlines() if line.startswith("- ")]
    assert broken == [
        ("- broken: the method plugin 'broken' from cemabench-test-plugins 0.0.0 failed to load "
         "(broken_plugin:NeverLoads): ModuleNotFoundError: No module named 'cemabench_test_no_such_dependency'"),
        ("- edgeless: the method plugin 'edgeless' (bare.Edgeless) does not implement edge(num_classes) -> "
         "EdgeLogic, which every method needs")]
    assert "2 broken method plugin(s)" in out


@pytest.mark.parametrize("command", [["run", "--method", "broken"], ["reproduce", "SPEC"]])
def test_running_a_broken_plugin_is_one_line_naming_it_and_its_error(plugins, tmp_path, capsys, command):
    spec = write_spec(tmp_path / "broken.toml", ["source", "broken"])
    command = [spec if c == "SPEC" else c for c in command] + ["--out", str(tmp_path / "out")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'broken'" in err and "ModuleNotFoundError: No module named 'cemabench_test_no_such_dependency'" in err


def test_a_method_without_name_paper_or_mapping_gets_defaults_and_runs(plugins, capsys):
    cls = registry.load_method("bare")
    assert (cls.name, cls.paper) == ("bare", "-")
    assert set(vars(cls.mapping).values()) == {"-"}
    assert main(["run", "--method", "bare", "--domains", "fog"]) == 0
    assert "| fog  |" in capsys.readouterr().out


def test_a_method_instance_without_a_name_or_an_edge_says_so():
    class Nameless(Method):
        pass

    with pytest.raises(UserError, match="Nameless has no name"):
        Nameless()
    Nameless.name = "nameless"
    with pytest.raises(NotImplementedError, match="Nameless does not implement edge"):
        Nameless().edge(10)


def test_the_readme_example_runs_as_a_plugin(plugins, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["run", "--method", "readme-example", "--option", "threshold=0.8", "--domains", "fog",
                 "--out", str(out)]) == 0
    cell, = json.loads(out.read_text())["cells"]
    assert cell["status"] == "ok" and cell["seen"] == 1079
    assert 0 < cell["link"]["uploaded"] < cell["seen"]  # the edge selected some samples, not all
    assert cell["link"]["downloads"] > 0 and cell["cloud_forward_samples_grad"] == cell["link"]["uploaded"]
    capsys.readouterr()
    assert main(["run", "--method", "readme-example", "--option", "threshold=2"]) == 2
    assert capsys.readouterr().err == ("cemabench: error: method 'readme-example': option 'threshold' must be a number "
                                       "> 0 and <= 1, got 2\n")
