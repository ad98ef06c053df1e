"""Plugins by name, found through entry points; the built-in ones come through the same groups.

A third-party distribution adds a method by declaring, in its own pyproject.toml::

    [project.entry-points."cemabench.methods"]
    my-method = "my_package.module:MyMethod"
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from cemabench.errors import UserError

GROUPS = {"methods": "cemabench.methods", "datasets": "cemabench.datasets", "models": "cemabench.models"}


def available(kind: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def load(kind: str, name: str):
    """The object an entry point names, or a UserError that lists the valid names."""
    found = available(kind)
    if name not in found:
        raise UserError(f"unknown {kind[:-1]} {name!r}; available: {', '.join(sorted(found)) or '(none)'} "
                        f"(install the plugin that provides it, or run `cemabench list {kind}`)")
    entry = found[name]
    try:
        return entry.load()
    except Exception as error:
        source = f" from {entry.dist.name} {entry.dist.version}" if entry.dist else ""
        raise UserError(f"the {kind[:-1]} plugin {name!r}{source} failed to load ({entry.value}): "
                        f"{type(error).__name__}: {error}") from error


def build_method(name: str, options: dict | None = None):
    from cemabench.method import Method

    cls = load("methods", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"the method plugin {name!r} must name a subclass of cemabench.method.Method, got {cls!r}")
    return cls(**(options or {}))


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
