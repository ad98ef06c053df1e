"""The ``cemabench`` command: list, run, reproduce, check."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import sys
import textwrap
import tomllib
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from cemabench import registry
from cemabench.config import DEFAULT_TOLERANCE, FIELDS, numerics, override, with_link
from cemabench.config.fields import kind
from cemabench.errors import UserError
from cemabench.protocol import native
from cemabench.protocol.execution import check_device
from cemabench.tables.spec import check_seeds

EXIT_CHECK_FAILED = 1  # check: a number out of tolerance
EXIT_USER_ERROR = 2  # bad input, before any compute
EXIT_INCOMPLETE = 3  # run/reproduce/status: some unit failed (error, diverged, worker died) or is not done
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), in every command
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (128 + SIGPIPE, what a shell reports for `yes | head`)
MINIATURE = "miniature-digits-c"  # run's dataset when none is named (the embedded miniature)
# run's models when none are named: the miniatures' own (other datasets need --edge and --foundation)
DEFAULT_MODELS = {MINIATURE: ("mini:edge", "mini:foundation"),
                  "miniature-digits-det-c": ("minidet:edge", "minidet:cloud")}
PATH_ERRORS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EEXIST, errno.EROFS)


def _first_line(obj) -> str:
    """The first sentence of an object's docstring (its first paragraph, up to a full stop, on one line)."""
    text = (getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0]
    text = " ".join(text.split())
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start() + 1] if end else text


def _about(kind: str, name: str) -> str:
    """The first docstring line of a plugin, or BROKEN and why it does not load."""
    try:
        return _first_line(registry.load(kind, name))
    except UserError as error:
        return f"BROKEN: {error}"


def cmd_list(args) -> int:
    if args.what == "methods":
        rows, broken = [], []
        for name, entry in sorted(registry.available("methods").items()):
            source = entry.dist.name if entry.dist else "?"
            try:
                cls = registry.load_method(name)
            except UserError as error:  # one broken plugin must not hide the others
                broken.append(f"- {name}: {error}")
                rows.append({"method": name, "paper": "BROKEN (see below)", "from": source})
                continue
            m = cls.mapping
            rows.append({"method": name, "tasks": ", ".join(cls.tasks), "paper": cls.paper, "selection": m.selection,
                         "uploads": m.uploads, "cloud": m.cloud, "download": m.download, "from": source})
        _print_rows(rows)
        if broken:
            print(f"\n{len(broken)} broken method plugin(s), which cannot run until fixed:\n" + "\n".join(broken))
    elif args.what == "tables":
        from cemabench.tables.spec import available_tables, load_table

        rows = [{"table": n, "title": (s := load_table(n)).title, "methods": len(s.methods), "domains": len(s.domains),
                 "setting": s.protocol.setting, "models (real data)": f"{s.real.edge} / {s.real.foundation}",
                 "--pair": ", ".join(s.real.pairs)}
                for n in available_tables()]
        _print_rows(rows)
        _list_sweeps()
    else:
        rows = [{args.what[:-1]: name, "from": entry.dist.name if entry.dist else "?", "entry point": entry.value,
                 "about": _about(args.what, name)}
                for name, entry in sorted(registry.available(args.what).items())]
        _print_rows(rows)
    return 0


def _print_rows(rows: list[dict]) -> None:
    """Rows as a Markdown table where it fits the terminal (120 columns when not one), else one block per row (its
    name, then its fields wrapped to the width): no line wider than the terminal, nothing cut."""
    width = shutil.get_terminal_size((120, 24)).columns
    frame = pd.DataFrame(rows).fillna("").astype(str)
    table = frame.to_markdown(index=False)
    if max(map(len, table.splitlines())) <= width:
        print(table)
        return
    first, *rest = frame.columns
    for record in frame.to_dict("records"):
        fields = " · ".join(f"{c}: {record[c]}" for c in rest if record[c])
        print(record[first])
        print(textwrap.fill(fields, width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False))


def _list_sweeps() -> None:
    """The built-in sweeps, as a second table under the tables (they run with `cemabench sweep`, not `reproduce`)."""
    from cemabench.tables.spec import available_sweeps
    from cemabench.tables.sweep import load_sweep

    rows = [{"sweep": n, "title": (s := load_sweep(n)).title, "method": s.method,
             "grid": "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in s.grid.items()),
             "severities": ", ".join(map(str, s.severities)), "domains": len(s.table.domains)}
            for n in available_sweeps()]
    if rows:
        print("\nSweeps (run with `cemabench sweep NAME`):\n")
        _print_rows(rows)


def _parse_option(text: str, flag: str = "--option", example: str = "lr=0.001") -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"{flag} takes KEY=VALUE (e.g. {flag} {example}), got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def _dataset_option(text: str) -> tuple[str, object]:
    return _parse_option(text, "--dataset-option", "workers=8")


def _run_spec(args):
    """The one-table spec that ``run`` goes through: a table's settings (``--table``) or the flags alone; flags given
    explicitly override the table's."""
    from dataclasses import replace

    from cemabench.config import Protocol
    from cemabench.datasets import reader
    from cemabench.tables.spec import DataChoice, MethodEntry, TableSpec, load_table

    options = dict(_parse_option(o) for o in args.option)
    if args.table:
        spec = load_table(args.table)
        by_label = {e.label: e for e in spec.methods}
        rows = [e.label for e in spec.methods if e.name == args.method]
        if args.method not in by_label and len(rows) > 1:
            raise UserError(f"--method {args.method} names {len(rows)} rows of table {spec.name}: name one of "
                            f"{', '.join(rows)}")
        entry = by_label.get(args.method) or next((e for e in spec.methods if e.name == args.method), None)
        if entry is None:
            raise UserError(f"table {spec.name} has no method {args.method!r}; its methods: "
                            f"{', '.join(by_label)}")
        chain = [entry]
        while chain[-1].match_uploads_of:
            chain.append(by_label[chain[-1].match_uploads_of])
        choices = {}
        for section in ("real", "miniature"):
            choice = getattr(spec, section)
            if choice is None:
                continue
            method_options = {**choice.method_options,
                              entry.label: {**choice.method_options.get(entry.label, {}), **options}}
            changes = {"method_options": method_options}
            if args.dataset:
                changes["dataset"] = args.dataset
            choices[section] = replace(choice, **changes)
        protocol = spec.protocol
        label = entry.label
        spec = replace(spec, methods=tuple(reversed(chain)), **choices)
    else:
        if not args.isolate:  # isolated, the runner asks the method's class in a planner process (never here)
            registry.build_method(args.method, options)
        dataset = args.dataset or MINIATURE
        if dataset not in registry.available("datasets"):
            registry.load("datasets", dataset)  # an unknown dataset is named first (a plugin's is not imported here)
        if dataset != MINIATURE and args.data_root and Path(args.data_root).is_dir() and not (args.edge and
                                                                                          args.foundation):
            raise UserError(f"--dataset {dataset} needs --edge and --foundation: the default models (mini:edge, "
                            f"mini:foundation) are trained on the miniature's digits; see `cemabench list models`, or "
                            f"--table T for a table's models on that dataset")
        edge, foundation = DEFAULT_MODELS.get(dataset, DEFAULT_MODELS[MINIATURE])
        choice = DataChoice(dataset, args.edge or edge, args.foundation or foundation)
        protocol = Protocol()
        domains = tuple(args.domains or reader.domains_of(dataset, dict(_dataset_option(o) for o in
                                                                      args.dataset_option), args.data_root,
                                                          5 if args.severity is None else args.severity, args.isolate))
        label = args.method
        spec = TableSpec(name=f"run-{args.method}", title=f"{args.method} on {dataset}", source="",
                         protocol=protocol, seeds=(0,), severity=5, domains=domains, recorded={}, real=choice,
                         miniature=choice, methods=(MethodEntry(label, args.method, options),))
    given = _protocol_flags(args)
    if args.table:  # a flag that the entry's own link overrides was printed in its protocol line, and not run
        _flags_some_entry_takes(protocol, given, spec.methods[-1:], spec.name)
    protocol = override(protocol, {k: v for k, v in given.items() if v is not None})
    if args.domains and len(set(args.domains)) != len(args.domains):
        raise UserError(f"--domains names a domain twice: {' '.join(args.domains)}")
    spec = replace(spec, protocol=protocol, domains=tuple(args.domains or spec.domains),
                   severity=spec.severity if args.severity is None else args.severity,
                   seeds=check_seeds((args.seed,), "--seed"))
    return spec, label


_CREATED: list[Path] = []  # folders this command created for its outputs, innermost first


def _remove_created() -> None:
    for folder in _CREATED:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty one: a user error comes before anything is written
    _CREATED.clear()


def _writable(path: str | Path, flag: str, folder: bool) -> Path:
    """Fail before any compute when an output cannot be written: a folder (created if missing) or a file's folder."""
    path = Path(path)
    where = path if folder else path.parent
    missing = [p for p in (where, *where.parents) if not p.exists()]
    blocking = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would say only "File exists" or "Not a directory"
        raise UserError(f"{flag} {path} cannot be written: {blocking} is a file, not a folder; choose a folder you "
                        f"can write to")
    try:
        where.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(missing)  # removed again, while still empty, when the command ends in a user error
        probe = where / f".cemabench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{flag} {path} cannot be written ({error.strerror or error}); choose a folder you can "
                        f"write to") from None
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / 'result.json'}")
    return path


def cmd_run(args) -> int:
    """One method through the same plan/store/executor path as a table, optionally with a table's settings."""
    import tempfile

    from cemabench.protocol import Execution
    from cemabench.report.leaderboard import run_summary
    from cemabench.run.runner import reproduce

    spec, label = _run_spec(args)
    if args.out:
        _writable(args.out, "--out", folder=False)
    if args.store:
        _writable(args.store, "--store", folder=True)
    with tempfile.TemporaryDirectory(prefix="cemabench-run-") as scratch:
        doc = reproduce(spec, args.data_root, Path(args.store or scratch), jobs=args.jobs,
                        execution=Execution(args.device, args.channels_last, args.amp),
                        progress=sys.stderr.isatty(),  # a bar in a terminal; none in a log or a pipe
                        models={"edge": args.edge, "foundation": args.foundation},
                        dataset_options=dict(_dataset_option(o) for o in args.dataset_option),
                        executor=args.executor, address=args.address, weights=args.weights, limits=_limits(args),
                        predictions=_predictions(args), isolate=args.isolate)
    doc["methods"] = [m for m in doc["methods"] if m["label"] == label]
    doc["cells"] = [c for c in doc["cells"] if c["method"] == label]
    if args.out:  # files before stdout: a reader that closes it early (`| head`) loses nothing
        Path(args.out).write_text(_dumps(doc, args))
    print(run_summary(doc))
    failed = [c for c in doc["cells"] if c["status"] != "ok"]
    for c in failed:
        print(f"{c['domain']}: {c['status']}: {c['message'].strip().splitlines()[0] if c['message'] else ''}",
              file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_INCOMPLETE if failed else 0


def _flags_some_entry_takes(protocol, given: dict, entries, table: str) -> None:
    """A protocol flag that every entry's own link overrides would change nothing but the table's name (reproduce)
    or the protocol line printed above the results (run --table): one line, exit 2."""
    for k, v in given.items():
        try:
            alone = protocol if v is None else override(protocol, {k: v})
            unchanged = alone != protocol and entries and all(
                with_link(alone, m.link) == with_link(protocol, m.link) for m in entries)
        except UserError:  # valid only with another flag (--devices 2 with --setting continual): checked together
            continue
        if unchanged:
            which = (f"entry {entries[0].label!r} of {table}: its" if len(entries) == 1
                     else f"entry of {table}: every entry's")
            why = " (the table's regimes = [...] give each entry its regime)" if all(
                "regime" in m.link for m in entries) else ""
            raise UserError(f"--{k.replace('_', '-')} {v} changes no {which} own link overrides it{why}; drop "
                            f"--{k.replace('_', '-')}, or run an entry that takes the table's {k}")


def variant(spec, given: dict):
    """The table under the protocol values given on the command line, named after what they change
    (``table2.input_codec-jpeg-75``: no ':', which scp and rsync read as host:path and Windows refuses)."""
    from dataclasses import replace

    if not any(v is not None for v in given.values()):
        return spec
    protocol = override(spec.protocol, {k: v for k, v in given.items() if v is not None})
    changed = [f"{k}-{getattr(protocol, k)}".replace(":", "-") for k in given
               if getattr(protocol, k) != getattr(spec.protocol, k)]
    _flags_some_entry_takes(spec.protocol, given, spec.methods, spec.name)
    return replace(spec, protocol=protocol, name=".".join([spec.name, *changed]) if changed else spec.name)


def _reproduce_inputs(args):

    from cemabench.protocol import Execution
    from cemabench.tables.spec import check_report_axes, load_table

    spec = load_table(args.table)
    if args.seed:
        check_seeds(args.seed, "--seed")
    spec = variant(spec, _protocol_flags(args))
    check_report_axes(spec, args.table)
    if args.jobs is not None and args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    data_root = args.data_root or os.environ.get("CEMABENCH_DATA_ROOT")
    return spec, data_root, {"execution": Execution(args.device, args.channels_last, args.amp),
                             "models": {"edge": args.edge, "foundation": args.foundation},
                             "dataset_options": dict(_dataset_option(o) for o in args.dataset_option),
                             "pair": args.pair, "weights": args.weights}


def _failed_midway(out: Path, error: OSError) -> int:
    """An OS error while the table ran (a full disk, a folder made read-only): cells finished before it are kept."""
    where = f"{error.filename}: " if error.filename else ""
    print(f"cemabench: error while the table ran: {where}{error.strerror or error}; finished cells are kept under "
          f"{out / 'cells'}: fix it and run the same command to resume", file=sys.stderr)
    return EXIT_INCOMPLETE


def _interrupted(out: Path) -> int:
    print(f"\ninterrupted: finished cells are kept under {out / 'cells'}; run the same command to resume",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def _dumps(doc: dict, args) -> str:
    """The document as written to a file, with when and by which command line (``written``)."""
    written = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "command": shlex.join(args.argv)}
    return json.dumps({**doc, "written": written}, indent=1, sort_keys=True) + "\n"


def _write_document(out: Path, name: str, doc: dict, markdown: str, args, plot=None, shown: str | None = None
                    ) -> list[Path]:
    """OUT/NAME.json (what the table was rendered from), OUT/NAME.md and the plot (``plot(doc, path)``: False when
    there is nothing to draw), then ``shown`` on stdout (default: the Markdown): files first, so that a reader that
    closes stdout early (`| head`) loses nothing. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(_dumps(doc, args))
    (out / f"{name}.md").write_text(markdown)
    written = [out / f"{name}.md", out / f"{name}.json"]
    if plot is not None and plot[0](doc, out / plot[1]):
        written.append(out / plot[1])
    print(markdown if shown is None else shown)
    return written


def cmd_reproduce(args) -> int:
    from cemabench.report.leaderboard import render, terminal_summary, write_tradeoff_plot
    from cemabench.run.runner import reproduce

    spec, data_root, options = _reproduce_inputs(args)
    out = _writable(args.out, "--out", folder=True)
    try:
        doc = reproduce(spec, data_root, out, tuple(args.seed) if args.seed else None, args.jobs,
                        progress=not args.no_progress, executor=args.executor, address=args.address,
                        limits=_limits(args), predictions=_predictions(args), isolate=args.isolate, **options)
    except KeyboardInterrupt:
        return _interrupted(out)
    except OSError as error:
        return _failed_midway(out, error)
    wrote = _write_document(out, spec.name, doc, render(doc), args, (write_tradeoff_plot, f"{spec.name}.tradeoffs.png"),
                            terminal_summary(doc))
    print(f"wrote {', '.join(map(str, wrote))}", file=sys.stderr)
    failed = [c for c in doc["cells"] if c["status"] != "ok"]
    if failed:
        print(f"the table is incomplete: {len(failed)} cell(s) did not finish ok (see 'Failed cells'); "
              f"`{_same_table(args, 'status')}` lists them; rerunning recomputes them", file=sys.stderr)
    return EXIT_INCOMPLETE if failed else 0


def cmd_status(args) -> int:
    from cemabench.run.runner import status

    spec, data_root, options = _reproduce_inputs(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; status reads the folder that `cemabench reproduce --out` wrote")
    rows = status(spec, data_root, out, tuple(args.seed) if args.seed else None, isolate=args.isolate, **options)
    print(pd.DataFrame(rows).to_markdown(index=False))
    counts = {state: sum(r["state"] == state for r in rows) for state in ("done", "running", "failed", "missing")}
    print(f"\n{spec.name}: {len(rows)} units: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if not out.exists():
        print(f"(--out {out} does not exist: nothing has run there yet; `{_same_table(args, 'reproduce')}` starts "
              f"it)")
    return 0 if counts["done"] == len(rows) else EXIT_INCOMPLETE


def _same_table(args, command: str) -> str:
    """The command line that runs ``command`` (reproduce or status) on the table this one named, with the same
    flags (a table under --regime or --input-codec is another table) and its --out."""
    words = [w for w in args.argv[2:] if w != "--no-progress"]
    if not any(w == "--out" or w.startswith("--out=") for w in words):
        words += ["--out", str(args.out)]
    return shlex.join(["cemabench", command, *words])


def cmd_check(args) -> int:
    from cemabench.report.check import check_tolerance, compare, load_document

    if args.tol is not None:
        check_tolerance(args.tol)
    result, expected = load_document(args.result), load_document(args.against)
    problems, checked = compare(result, expected, args.tol)
    tol = args.tol if args.tol is not None else expected.get("check", {}).get("tolerance", DEFAULT_TOLERANCE)
    seeds = sorted({c["seed"] for c in expected["cells"]})
    what = f"means over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "values"
    if problems:
        print(f"{len(problems)} problem(s) against {args.against} (tolerance {tol} percentage points on the {what}):\n")
        print(pd.DataFrame(problems).to_markdown(index=False))
        return 1
    print(f"all {checked} checked {what} within {tol} percentage points of {args.against}")
    return 0


def cmd_sweep(args) -> int:
    from cemabench.report.sweep import plot_sweep, render_sweep
    from cemabench.run.runner import run_sweep
    from cemabench.tables.sweep import load_sweep

    sweep = load_sweep(args.spec)
    if args.jobs is not None and args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    seeds = check_seeds(args.seed, "--seed") if args.seed else None
    out = _writable(args.out, "--out", folder=True)
    data_root = args.data_root or os.environ.get("CEMABENCH_DATA_ROOT")
    try:
        doc = run_sweep(sweep, data_root, out, seeds=seeds, jobs=args.jobs, progress=not args.no_progress,
                        limits=_limits(args), isolate=args.isolate)
    except OSError as error:
        return _failed_midway(out, error)
    except KeyboardInterrupt:
        return _interrupted(out)
    written = _write_document(out, sweep.name, doc, render_sweep(doc), args, (plot_sweep, f"{sweep.name}.png"))
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    failed = [c for t in doc["tables"].values() for c in t["cells"] if c["status"] != "ok"]
    if failed:
        print(f"{len(failed)} cell(s) did not finish ok; see 'Failed cells' above", file=sys.stderr)
    return EXIT_INCOMPLETE if failed else 0


def _execution_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. subset=robustbench-5000, scoring=argmax-1000, workers=8 (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for models and inputs")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (off by default: fidelity first)")
    p.add_argument("--weights", metavar="DIR", help="folder of weight files, looked in before the torch/HF caches "
                   "(default: $CEMABENCH_WEIGHTS; see `cemabench list models`)")
    p.add_argument("--jobs", type=int, help="local worker processes (default: min(2, CPU cores))")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local processes (--jobs) or Ray tasks (pip install 'cemabench[ray]')")
    p.add_argument("--address", help="with --executor ray: the address of a running Ray cluster (default: start a "
                   "local Ray with --jobs CPUs)")
    _limit_arguments(p)
    p.add_argument("--save-predictions", metavar="DIR", help="detection: write each cell's predictions in COCO's "
                   "results format to DIR/TABLE/METHOD/seedN/DOMAIN.json, image ids as in the ground truth")


def _limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--isolate", action="store_true", help="run each unit's edge half and cloud half in processes of "
                   "their own, apart from the labels, the store and each other; the same numbers, at a cost per unit "
                   "(README: Method code apart from the harness)")
    p.add_argument("--unit-timeout", metavar="TIME", help="stop a run unit that runs longer, e.g. 90s, 30m or 2h; its "
                   "cells say timeout and the table goes on (default: the spec's [limits], else none)")
    p.add_argument("--unit-memory", metavar="SIZE", help="the most data memory a run unit's process may hold, e.g. "
                   "16G; past it the unit's cells say out-of-memory (default: the spec's [limits], else none)")


def _predictions(args) -> str | None:
    folder = getattr(args, "save_predictions", None)
    return None if folder is None else str(_writable(folder, "--save-predictions", folder=True))


def _limits(args):
    """The unit limits given on the command line (each None where not given)."""
    from cemabench.config.limits import Limits, duration, size

    timeout, memory = getattr(args, "unit_timeout", None), getattr(args, "unit_memory", None)
    return Limits(None if timeout is None else duration(timeout, "--unit-timeout"),
                  None if memory is None else size(memory, "--unit-memory"))


def _protocol_arguments(p: argparse.ArgumentParser, stream_only: bool = False) -> None:
    """One flag per protocol field (:class:`cemabench.config.Protocol`), or per field of the stream setting only
    (``reproduce`` and ``status``: the table under another stream setting); unset flags keep the table's value."""
    for name, f in FIELDS.items():
        rule = f.metadata["rule"]
        if stream_only and not rule.stream:
            continue
        default = f"unset: {rule.unset}" if f.default is None else f"default {f.default}"
        choices = f"; one of {', '.join(rule.choices)}" if rule.choices else ""
        p.add_argument(rule.flag or f"--{name.replace('_', '-')}", dest=name, type=kind(name),
                       metavar=name.upper(), help=f"{rule.help}{choices} ({default}, or the table's)")


def _protocol_flags(args) -> dict:
    """The protocol fields given on the command line."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def _table_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="a built-in table name (see `cemabench list tables`) or a .toml spec path")
    _protocol_arguments(p, stream_only=True)
    p.add_argument("--data-root", help="folder with the real dataset; without it the embedded miniature runs")
    p.add_argument("--out", default="out", help="output folder; its cells/ are reused on a rerun (default out)")
    p.add_argument("--seed", type=int, action="append", help="seed(s) to run instead of the spec's (repeatable)")
    p.add_argument("--edge", help="edge model instead of the spec's, e.g. tiny:edge or torchvision:resnet18")
    p.add_argument("--foundation", help="foundation model instead of the spec's")
    p.add_argument("--pair", help="one of the spec's named edge/foundation pairs (`cemabench list tables`)")
    _execution_arguments(p)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or value in one line (its usage block is `--help`'s), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cemabench", description="Benchmark harness for cloud-edge model adaptation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list methods, tables, datasets or models")
    p.add_argument("what", choices=["methods", "tables", "datasets", "models"],
                   help="which registry to list (tables also lists the sweeps)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run one method on a dataset (or with a table's settings: --table)")
    p.add_argument("--method", required=True, help="a method, or with --table the label of one of its rows")
    p.add_argument("--table", help="take this table spec's settings (protocol, miniature options, models); "
                   "the flags below given explicitly override them")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--dataset", help="dataset plugin (default miniature-digits-c, or the table's)")
    p.add_argument("--data-root", help="folder with the real dataset (needs --dataset, or --table)")
    p.add_argument("--domains", nargs="+", help="domains in stream order (default: all of the dataset's, or the "
                   "table's)")
    p.add_argument("--severity", type=int, help="default 5, or the table's")
    p.add_argument("--edge", help="default mini:edge (minidet:edge on miniature-digits-det-c), or the table's")
    p.add_argument("--foundation", help="default mini:foundation (minidet:cloud on miniature-digits-det-c), or the "
                   "table's")
    p.add_argument("--seed", type=int, default=0, help="the seed of the stream order and of the method (default 0)")
    _protocol_arguments(p)
    _execution_arguments(p)
    p.add_argument("--store", metavar="DIR", help="keep the unit records here and reuse them (default: not kept)")
    p.add_argument("--out", help="write the cells and their provenance as JSON here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reproduce", help="run a table spec and write OUT/TABLE.md and OUT/TABLE.json")
    _table_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("sweep", help="run a sweep over a method's options and write OUT/NAME.md, .json and .png")
    p.add_argument("spec", help="a built-in sweep name (see `cemabench list tables`) or a .toml spec with [sweep]")
    p.add_argument("--data-root", help="folder with the real dataset; without it the embedded miniature runs")
    p.add_argument("--out", default="out", help="output folder; its cells/ are reused on a rerun (default out)")
    p.add_argument("--seed", type=int, action="append", help="seed(s) to run instead of the spec's (repeatable)")
    p.add_argument("--jobs", type=int, help="local worker processes (default: min(2, CPU cores))")
    _limit_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="done / running / failed / missing units of a table in an --out folder")
    _table_arguments(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="exit 1 when a result is out of tolerance of an expected table")
    p.add_argument("result", help="a table's JSON document (OUT/TABLE.json of reproduce)")
    p.add_argument("--against", required=True, help="the expected table's JSON, e.g. "
                   "leaderboards/table2.miniature.json")
    p.add_argument("--tol", type=float, help="tolerance in percentage points, >= 0, on each (method, domain) mean over "
                   "seeds (default: the expected table's)")
    p.set_defaults(func=cmd_check)
    return parser


def check_meter(computes: bool) -> None:
    """CEMABENCH_METER names a meter; where it insists on the C++ one, that one builds (before any compute)."""
    try:
        if native.choice() == "native" and computes:
            native.meter_module()
    except (ValueError, RuntimeError) as error:
        raise UserError(str(error)) from None


def main(argv=None) -> int:
    # timm's import runs torch.jit.interface, which torch 2.14 deprecates in two lines on stderr: before a user
    # error's one line, they read as part of it (a new user's trial). A library's notice, not the user's to act on
    warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0), or a flag argparse refused (2, one line on stderr)
        return done.code if isinstance(done.code, int) else 2
    args.argv = ["cemabench", *(sys.argv[1:] if argv is None else argv)]
    try:
        numerics.check()
        check_meter(computes=getattr(args, "device", None) is not None)
        if getattr(args, "address", None) and args.executor != "ray":
            raise UserError(f"--address {args.address} is the address of a Ray cluster: add --executor ray, or drop "
                            f"--address to run with local processes")
        if getattr(args, "address", None) and args.func is not cmd_status:
            from cemabench.run.executors import check_ray_address

            check_ray_address(args.address)
        if getattr(args, "device", None) is not None:
            args.device = check_device(args.device)  # run and reproduce: before any data, model or compute
        return args.func(args)
    except UserError as error:
        _remove_created()
        print(f"cemabench: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # reproduce and sweep say where their cells are kept; every command exits 130
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`cemabench ... | head -1`): files are written first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return EXIT_BROKEN_PIPE
    except OSError as error:
        if error.filename is None or error.errno not in PATH_ERRORS:
            raise
        print(f"cemabench: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
