"""Where a model family is cut for collaborative inference: its ordered stages, registered by the zoo that builds the
family (:mod:`cemabench.models.split` does the cutting). Kept apart from the cutting code, so that a zoo's models do
not depend on it: only the methods that split a model do."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
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
    stages, each a name and the network's own modules (plus parameter-free glue), the last one ``classifier``. A
    family is described once: describing it again with another function is refused (a plugin cannot re-cut another's
    family)."""
    _register(_LAYOUTS, module, name, layout, "layout")


def _registered(net: nn.Module, table: dict) -> Callable | None:
    for cls in type(net).__mro__:
        found = table.get((cls.__module__, cls.__qualname__))
        if found is not None:
            return found
    return None


def _lookup(net: nn.Module, table: dict, what: str, how: str, register: str):
    """``net``'s family's entry in ``table`` (its class's or a base class's). A family no loaded zoo has registered
    is looked for in every model plugin's module, each zoo registering its families when imported."""
    found = _registered(net, table)
    if found is None:
        for entry in registry.available("models").values():
            with contextlib.suppress(Exception):
                importlib.import_module(entry.module)
        found = _registered(net, table)
    if found is None:
        known = ", ".join(f"{module}.{name}" for module, name in sorted(table)) or "no family"
        raise UserError(f"cannot {what} a {type(net).__module__}.{type(net).__name__}: {how} only for {known} (a "
                        f"model plugin describes its own with cemabench.models.layouts.{register})")
    return found


def layout_of(net: nn.Module) -> Callable[[nn.Module], Stages]:
    """The registered layout of ``net``'s family (its class or a base class)."""
    return _lookup(net, _LAYOUTS, "split", "stages are described", "register_layout")


@dataclass(frozen=True)
class DetectorTraining:
    """How a detector family is trained offline, for methods that train one (a distilled edge detector, an adapter
    into a detector's later stages). The family's layout ends at its raw outputs (the last stage has no
    postprocessing), so that a split detector's tail gives raw outputs; ``postprocess`` turns them into detections.

    - ``postprocess(raw)``: one dict of ``boxes``, ``scores`` and ``labels`` per image, as the detector returns them;
    - ``targets(annotations)``: the training targets of a batch of images given as one list of COCO annotations each;
    - ``loss(raw, targets)``: the family's own training loss;
    - ``distill(raw_student, raw_teacher)``: a response-distillation loss towards a teacher of the same family."""

    postprocess: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]
    targets: Callable[[list[list[dict]]], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_TRAINING: dict[tuple[str, str], DetectorTraining] = {}


def register_detector_training(module: str, name: str, training: DetectorTraining) -> None:
    """Describe how the detector class ``module.name`` (and its subclasses) is trained offline; once per family, as a
    layout is."""
    _register(_TRAINING, module, name, training, "offline training")


def _register(table: dict, module: str, name: str, value, what: str) -> None:
    known = table.get((module, name))
    if known is not None and known != value:
        raise UserError(f"the {what} of {module}.{name} is already described (by "
                        f"{getattr(known, '__module__', type(known).__module__)}); a family is described once, by the "
                        f"zoo that builds it")
    table[(module, name)] = value


def detector_training(net: nn.Module) -> DetectorTraining:
    """The registered training description of ``net``'s detector family."""
    return _lookup(net, _TRAINING, "train", "offline training of a detector is described",
                   "register_detector_training")
