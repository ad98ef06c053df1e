"""Plugins by name, found through entry points; the built-in ones come through the same groups.

A third-party distribution adds a method by declaring, in its own pyproject.toml::

    [project.entry-points."cemabench.methods"]
    my-method = "my_package.module:MyMethod"

A plugin that fails to import is reported, with its error, by the commands that need it; the others still work.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import random
import sys
from importlib.metadata import EntryPoint, entry_points

import numpy as np
import torch

from cemabench.errors import UserError
from cemabench.method import Method

GROUPS = {"methods": "cemabench.methods", "datasets": "cemabench.datasets", "models": "cemabench.models"}


_SCANNED: dict[str, tuple[tuple, tuple[EntryPoint, ...]]] = {}  # group -> (the import path's state, its entry points)


def _state(path: str) -> tuple:
    """What an import-path entry's entry points depend on: its own modification time (a zip archive, a folder that
    gained or lost a distribution), and the size and modification time of every ``entry_points.txt`` of the
    distributions in it (rewritten in place by an editable or legacy develop install)."""
    try:
        info = [os.stat(path or ".").st_mtime_ns]
        with os.scandir(path or ".") as entries:
            for entry in entries:
                if entry.name.endswith((".dist-info", ".egg-info")):
                    try:
                        found = os.stat(os.path.join(entry.path, "entry_points.txt"))
                        info.append((entry.name, found.st_mtime_ns, found.st_size))
                    except OSError:
                        info.append((entry.name,))
        return tuple(info)
    except OSError:  # absent, or a file (a zip archive): its time alone
        try:
            return (os.stat(path).st_mtime_ns,)
        except OSError:
            return ()


def _group(group: str) -> tuple[EntryPoint, ...]:
    """A group's entry points, read again only when the import path or what it holds changed (:func:`_state`: about
    1 ms; reading every installed distribution's entry points takes about 7 ms, and a table asks hundreds of
    times)."""
    state = tuple((p, _state(p)) for p in sys.path)
    known = _SCANNED.get(group)
    if known is None or known[0] != state:
        known = _SCANNED[group] = (state, tuple(entry_points(group=group)))
    return known[1]


def available(kind: str) -> dict[str, EntryPoint]:
    """The installed plugins of one kind (``methods``, ``datasets``, ``models``) by name."""
    return {ep.name: ep for ep in _group(GROUPS[kind])}


def entry_points_of_all() -> list[EntryPoint]:
    """Every installed cemabench plugin, of every kind."""
    return [ep for group in GROUPS.values() for ep in _group(group)]


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _origin(entry: EntryPoint) -> str:
    return f" from {entry.dist.name} {entry.dist.version}" if entry.dist else ""


@contextlib.contextmanager
def seeded():
    """Python's, NumPy's and torch's (CPU) random states seeded to 0 within, the caller's put back after: what a
    plugin's model or dataset draws while it is built is the same in every process and run, whatever ran before (a
    factory that took a random half of each domain gave other numbers in each run, and in each worker)."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(0)
            np.random.seed(0)
            torch.manual_seed(0)
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def plugin_errors(kind: str, name: str):
    """A plugin's failure while it builds a model or a dataset, as one line naming it (its own ``UserError`` as it
    is); cemabench's own code keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if own(kind, name):
            raise
        raise UserError(f"the {kind[:-1]} plugin {name!r} failed: {one_line(error)}") from error


def own(kind: str, name: str) -> bool:
    """Whether the entry point ``name`` of ``kind`` names cemabench's own code: a module of the cemabench package,
    found in this package's folder, whatever the distribution that declares it says it is (any can call itself
    cemabench); nothing outside cemabench is imported. An unknown name is own: it is refused, naming the valid ones,
    where it is loaded."""
    entry = available(kind).get(name)
    if entry is None:
        return True
    if entry.module.partition(".")[0] != __package__:
        return False
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return False
    folder = os.path.dirname(os.path.realpath(__file__))
    return spec is not None and spec.origin is not None and os.path.realpath(spec.origin).startswith(folder + os.sep)


def load(kind: str, name: str):
    """The object an entry point names, or a UserError that lists the valid names or says why it cannot load."""
    found = available(kind)
    if name not in found:
        raise UserError(f"unknown {kind[:-1]} {name!r}; available: {', '.join(sorted(found)) or '(none)'} "
                        f"(install the plugin that provides it, or run `cemabench list {kind}`)")
    entry = found[name]
    try:
        return entry.load()
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # a plugin's import may even call sys.exit; it is still just a broken plugin
        raise UserError(f"the {kind[:-1]} plugin {name!r}{_origin(entry)} failed to load ({entry.value}): "
                        f"{one_line(error)}") from error


def load_method(name: str) -> type:
    """The Method subclass registered as ``name``; a class without its own ``name`` takes the entry-point name."""
    cls = load("methods", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"the method plugin {name!r} must name a subclass of cemabench.method.Method, got {cls!r}")
    if cls.edge is Method.edge:
        raise UserError(f"the method plugin {name!r} ({cls.__module__}.{cls.__qualname__}) does not implement "
                        f"edge(num_classes) -> EdgeLogic, which every method needs")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        cls.name = name
    return cls


def build_method(name: str, options: dict | None = None):
    return load_method(name)(**(options or {}))


HARNESS_DATASET_ARGUMENTS = ("data_root", "severity", "domains")  # what the harness passes to every factory


def dataset_factory(name: str, options=()):
    """The factory registered as dataset ``name``, after checking that it takes every option named (before any data
    is read): an unknown one is a UserError that lists the options the factory takes."""
    factory = load("datasets", name)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature: it checks its own arguments
        return factory
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return factory
    valid = [k for k in parameters if k not in HARNESS_DATASET_ARGUMENTS]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; valid options: "
                        f"{', '.join(valid) or '(none)'}")
    return factory


def build_model(spec: str):
    """A model from a ``prefix:name`` string, e.g. ``mini:edge``; prefixes are ``cemabench.models`` entry points."""
    prefix, sep, name = spec.partition(":")
    if not sep or not name:
        raise UserError(f"model names look like PREFIX:NAME (e.g. mini:edge), got {spec!r}; prefixes: "
                        f"{', '.join(sorted(available('models')))}")
    loader = load("models", prefix)
    try:
        return loader(name)
    except (KeyError, FileNotFoundError) as error:
        raise UserError(f"model {spec!r} cannot be built: {error}") from error
