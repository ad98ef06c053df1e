"""The README says what the code does: its plugin example is the tested file, its test command is what CI runs, and
every subcommand its Commands synopsis names exists in the CLI."""
import argparse
import re
from pathlib import Path

from cemabench.cli import build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return re.findall(r"^```([\w-]*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def _section(text: str, heading: str) -> str:
    """The text under a level-2 heading, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README has no section '## {heading}'"
    return match.group(1)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return set(actions[0].choices)


def test_readme_holds_the_plugin_example_verbatim():
    example = (ROOT / "tests" / "plugins" / "readme_example.py").read_text()
    assert ("python", example) in _code_blocks(README)


def test_readme_test_command_is_what_ci_runs():
    assert ("bash", "python -m pytest\n") in _code_blocks(README)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest" in [line.strip() for line in ci]


def test_every_subcommand_in_the_synopsis_exists():
    blocks = _code_blocks(_section(README, "Commands"))
    assert blocks, "the Commands section has no code block"
    synopsis = blocks[0][1]
    named = {m.group(1) for m in re.finditer(r"^cemabench (\S+)", synopsis, flags=re.MULTILINE)}
    assert named, "the Commands synopsis names no subcommand"
    assert named <= _subcommands(build_parser()), named - _subcommands(build_parser())
    assert named == _subcommands(build_parser())  # and the synopsis is complete


def test_the_synopsis_names_every_flag_of_each_command():
    """Issue 23: the `reproduce` synopsis lacked --devices, --device-streams and --cloud-capacity. `status` takes
    the flags of `reproduce` (except --no-progress), as its synopsis says."""
    synopsis = _code_blocks(_section(README, "Commands"))[0][1]
    parts = re.split(r"^cemabench (\S+)", synopsis, flags=re.MULTILINE)[1:]
    shown = dict(zip(parts[0::2], parts[1::2], strict=True))
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    flags = {name: {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
             for name, sub in actions.items()}
    missing = {name: sorted(f for f in flags[name] if not re.search(rf"{re.escape(f)}(?![\w-])", shown[name]))
               for name in shown if name != "status"}
    assert missing == {name: [] for name in missing}
    assert "the flags of reproduce, except --no-progress" in shown["status"]
    assert flags["status"] == flags["reproduce"] - {"--no-progress"}


def test_the_extends_example_plans_as_written(tmp_path, capsys):
    """The README's `extends` block, saved as a file, is a valid table: `status` plans it (every method, label and
    option resolves) and finds its 21 x 2 units missing, where an unknown method or a repeated label is exit 2."""
    from cemabench.cli import main

    (block,) = [body for language, body in _code_blocks(README) if language == "toml" and
                body.startswith('extends = "table2"') and 'name = "my-table"' in body]
    (tmp_path / "my-table.toml").write_text(block)
    assert main(["status", str(tmp_path / "my-table.toml"), "--out", str(tmp_path / "out")]) == 3
    out = capsys.readouterr().out
    assert "tent-lr-1e-3" in out and "my-table: 42 units: 0 done, 0 running, 0 failed, 42 missing" in out


# Why a README command is not run here, by what it asks for: each such command must still parse.
NOT_RUN_HERE = {"--data-root": "needs the dataset on disk", "--device": "needs a GPU",
                "--address": "needs a Ray cluster", "--executor": "runs on Ray (tests/test_ray.py runs Ray locally)"}


def _commands(languages: tuple[str, ...] | None = None) -> list[str]:
    """Every command in the README's code blocks (of ``languages``; default: every block but Python, TOML and the
    Commands synopsis, whose lines are grammar, ``[--flag]``, ``A|B``, tested above): continuations joined, each
    part of an ``&&`` chain on its own, comments dropped."""
    synopsis = _code_blocks(_section(README, "Commands"))[0][1]
    commands = []
    for language, body in _code_blocks(README):
        if (language in ("python", "toml") or body == synopsis if languages is None else language not in languages):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            commands += [part for part in (re.sub(r"(^|\s+)#.*$", "", p.strip()) for p in line.split("&&")) if part]
    return commands


def _readme_commands() -> list[str]:
    """Every ``cemabench`` command line in the README's command blocks."""
    return [c for c in _commands() if c.startswith("cemabench ")]


# The README's shell commands that are not cemabench's, by what each needs; none is run here.
OTHER_COMMANDS = {"pip install": "needs the network: a package index (PyPI, or torch's CPU-only index "
                                 "https://download.pytorch.org/whl/cpu, which the test machines do not reach)",
                  "python -m pytest": "the test suite this test is part of (.ci/run runs it)",
                  "python -c \"from cemabench.protocol.native import kind": "the C++ meter's build (the metered "
                  "checks here build it too, tests/test_meter.py; .ci/run runs it as an install step)"}


def test_every_readme_shell_command_is_cemabench_or_marked_by_what_it_needs():
    others = [c for c in _commands(("bash", "sh")) if not c.startswith("cemabench ")]
    assert any(c.startswith("pip install") for c in others)
    assert [c for c in others if not c.startswith(tuple(OTHER_COMMANDS))] == []


def test_the_cpu_only_install_pins_what_constraints_txt_pins_then_installs_the_project():
    """Issue 23: a CPU-only install line (torch's CUDA build is gigabytes), at the versions CI installs."""
    pins = dict(line.strip().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    commands = _commands(("bash",))
    (cpu,) = [i for i, c in enumerate(commands) if "https://download.pytorch.org/whl/cpu" in c]
    words = commands[cpu].split()
    assert words[:2] == ["pip", "install"] and words[words.index("--index-url") + 1].endswith("/whl/cpu")
    assert {f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"} <= set(words)
    assert commands[cpu + 1] == 'pip install -c constraints.txt -e ".[test]"'


def test_every_readme_command_parses_and_each_that_fits_here_runs(tmp_path, capsys):
    """Issue 23: each command the README shows either runs here (in a short form: `reproduce` is planned with
    `status`, which resolves every method, option and unit) or is marked by what it needs (NOT_RUN_HERE); all parse."""
    import shlex

    from cemabench.cli import main

    commands = _readme_commands()
    assert len(commands) >= 15
    ran, planned = [], []
    for line in commands:
        argv = shlex.split(line)[1:]
        if "..." in argv:  # a fragment shown inside prose ("cemabench run ... --dataset cifar10-c ...")
            continue
        build_parser().parse_args(argv)  # every command parses (argparse exits 2 on an unknown flag)
        if any(flag in argv for flag in NOT_RUN_HERE):
            continue
        if argv[0] == "reproduce":  # (--isolate's planners: tests/test_isolation.py plans a table isolated)
            argv = ["status", *[a for a in argv[1:] if a not in ("--no-progress", "--isolate")]]
            argv = [a for i, a in enumerate(argv) if a != "--jobs" and (i == 0 or argv[i - 1] != "--jobs")]
        if argv in planned:  # the same plan as a command before it (they differ in how the units would run)
            continue
        planned.append(argv)
        argv = [str(tmp_path / f"{len(ran)}-{a}") if i and argv[i - 1] == "--out" else a for i, a in enumerate(argv)]
        expected = {3} if argv[0] == "status" else {0}  # planned, nothing run: every unit missing
        assert main(argv) in expected, line
        ran.append(line)
    capsys.readouterr()
    assert len(ran) >= 3, ran  # distinct plans: reproduce table2 (its variants plan alike), run cema, run tent


def test_the_model_and_dataset_plugin_example_runs_as_written_in_both_modes(tmp_path, monkeypatch):
    """The README's model and dataset plugin, its files and entry points taken from the README as written, installed
    as a distribution (a folder on the import path with its metadata), on a data root in its layout: a table runs,
    in-process and with --isolate (where the loop imports neither plugin), to the same numbers."""
    import sys
    import tomllib

    import numpy as np

    from cemabench.run import runner
    from cemabench.tables.spec import load_table
    from conftest import numbers

    blocks = _code_blocks(README)
    package = tmp_path / "dist" / "my_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("models", "data"):
        (body,) = [b for lang, b in blocks if lang == "python" and b.startswith(f"# my_package/{name}.py")]
        (package / f"{name}.py").write_text(body)
    (points,) = [b for lang, b in blocks if lang == "toml" and '"cemabench.models"' in b and "my-zoo" in b]
    groups = tomllib.loads(points)["project"]["entry-points"]
    info = tmp_path / "dist" / "my_package-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
                                                   for group, items in groups.items()))
    rng = np.random.default_rng(0)
    for domain in ("noise", "blur"):
        folder = tmp_path / "data" / "my-shapes" / domain
        folder.mkdir(parents=True)
        np.save(folder / "images.npy", rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8))
        np.save(folder / "labels.npy", rng.integers(0, 4, 96))
    monkeypatch.syspath_prepend(str(tmp_path / "dist"))
    spec = tmp_path / "shapes.toml"
    spec.write_text('name = "shapes"\ntitle = "shapes"\n[protocol]\nbatch_size = 32\nsetting = "continual"\n[data]\n'
                    'severity = 5\ndomains = ["noise", "blur"]\n[data.real]\ndataset = "my-shapes"\n'
                    'edge = "my-zoo:small"\nfoundation = "my-zoo:large"\n[data.miniature]\n'
                    'dataset = "miniature-digits-c"\nedge = "mini:edge"\nfoundation = "mini:foundation"\n'
                    '[[methods]]\nname = "source"\n[[methods]]\nname = "tent"\n')
    table = load_table(str(spec))
    isolated = runner.reproduce(table, str(tmp_path / "data"), tmp_path / "isolated", jobs=1, progress=False,
                                isolate=True)
    assert "my_package" not in sys.modules
    inline = runner.reproduce(table, str(tmp_path / "data"), tmp_path / "inline", jobs=1, progress=False)
    assert all(c["status"] == "ok" for c in inline["cells"]), [c["message"] for c in inline["cells"]]
    assert numbers(isolated) == numbers(inline) and {c["seen"] for c in inline["cells"]} == {96}
