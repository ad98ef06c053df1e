"""Where a model family is cut for collaborative inference: its ordered stages, registered by the zoo that builds the
family (:mod:`cemabench.models.split` does the cutting). Kept apart from the cutting code, so that a zoo's models do
not depend on it: only the methods that split a model do."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

from torch import nn

from cemabench import registry
from cemabench.errors import UserError

CLASSIFIER = "classifier"
Stages = list[tuple[str, list[nn.Module]]]


# (module, class name) -> the family's ordered stages: the one place a family's cut points are described. Each zoo
# registers the families it builds (a model plugin registers its own), by name, so that the family's library need
# not be imported to register it.
_LAYOUTS: dict[tuple[str, str], Callable[[nn.Module], Stages]] = {}


def register_layout(module: str, name: str, layout: Callable[[nn.Module], Stages]) -> None:
    """Describe how the class ``module.name`` (and its subclasses) is cut: ``layout(net)`` returns its ordered
    stages, each a name and the network's own modules (plus parameter-free glue), the last one ``classifier``."""
    _LAYOUTS[(module, name)] = layout


def _registered(net: nn.Module) -> Callable[[nn.Module], Stages] | None:
    for cls in type(net).__mro__:
        layout = _LAYOUTS.get((cls.__module__, cls.__qualname__))
        if layout is not None:
            return layout
    return None


def layout_of(net: nn.Module) -> Callable[[nn.Module], Stages]:
    """The registered layout of ``net``'s family (its class or a base class). A family no loaded zoo has registered
    is looked for in every model plugin's module, each zoo registering its families when imported."""
    layout = _registered(net)
    if layout is None:
        for entry in registry.available("models").values():
            with contextlib.suppress(Exception):
                importlib.import_module(entry.module)
        layout = _registered(net)
    if layout is None:
        known = ", ".join(f"{module}.{name}" for module, name in sorted(_LAYOUTS))
        raise UserError(f"cannot split a {type(net).__module__}.{type(net).__name__}: stages are described only for "
                        f"{known} (a model plugin describes its own with cemabench.models.layouts.register_layout)")
    return layout
