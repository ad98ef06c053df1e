"""Model plugins built apart from the harness (``--isolate``).

Under ``--isolate`` the loop's process (labels, link, scoring, store, artefact cache) runs no method code; a model
that is not cemabench's own is a plugin's code too: its loader, its module's import-time code and its ``forward``.
Such a model is built in a *builder* process, forked from the zygote and confined as a planner is
(:mod:`cemabench.protocol.isolation`), which may read, besides code and the system's files, the weights folder
(``--weights``), the zoos' weight caches (torch hub's checkpoints, Hugging Face's hub: not its token) and the plugin's
package folder, never a data root, a results folder or cemabench's cache (hidden), and writes nothing. Whether a
model is cemabench's own is read from where its code lies (:func:`cemabench.registry.own`), not from a
distribution's name. What comes back is plain data: the model as the ``torch.save``
bytes that the halves and planners unpickle (the loop never does), the names of its state entries, and, when asked,
what the model answers to images (its outputs' shape, for the check of its classes; its class predictions, for the
ccc setting's calibration), and its fingerprint (:func:`cemabench.provenance.fingerprint` of its state, as the loop
takes of a model built in-process, so that a unit keys alike in both modes; the builder's word, as every fact of a
plugin's model is: only plugin code can look inside it). Every model is built with the random state
seeded (:func:`build`), so a model plugin's random initialisation gives the same weights in both modes and every run.
Each call is bounded (:data:`cemabench.protocol.isolation.SERVED_S`) and its failure is one line.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from cemabench import registry
from cemabench.config.paths import weight_caches
from cemabench.errors import UserError
from cemabench.models import zoo
from cemabench.models.split import probing
from cemabench.protocol import Models, ccc, hygiene
from cemabench.protocol.isolation import Served
from cemabench.protocol.messages import pack
from cemabench.protocol.plain import owned
from cemabench.protocol.sides import SIDES
from cemabench.protocol.zygote import Access
from cemabench.provenance import fingerprint

MAX_NAMES = 100_000  # state entries of a model (a ViT-H has about 400)


def own(name: str) -> bool:
    """Whether the model ``prefix:name`` is cemabench's own code (:func:`cemabench.registry.own`)."""
    return registry.own("models", name.partition(":")[0])


def _package_folder(name: str) -> list[str]:
    """The folder of the package that provides the model ``prefix:name`` (its weights may lie beside its code),
    found without importing it."""
    entry = registry.available("models").get(name.partition(":")[0])
    if entry is None:
        return []
    try:
        spec = importlib.util.find_spec(entry.module.partition(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    # a package's folders (not a module's on its own: its folder is an import path entry, a project's, say, whose
    # data and results lie beside it)
    return [str(p) for p in spec.submodule_search_locations or ()]


def reads(name: str, weights: str | None) -> tuple[str, ...]:
    """What a builder of ``name`` may read besides code and the system's files: the weights folder, the zoos'
    weight caches (:func:`cemabench.config.paths.weight_caches`) and the plugin's package folder; the hidden folders
    stay hidden (:func:`cemabench.protocol.zygote.hide`)."""
    found = [weights, os.environ.get("CEMABENCH_WEIGHTS"), *weight_caches(), *_package_folder(name)]
    return tuple(sorted({os.path.realpath(p) for p in found if p and os.path.isdir(p)}))


class _BuilderSide:
    """The builder process's side: the models built here, each the way the loop builds its own
    (:func:`cemabench.registry.build_model` within :func:`cemabench.models.zoo.weights_folder`)."""

    device = torch.device("cpu")

    def __init__(self):
        self.replaced = hygiene.replaced_harness_code()
        self.models: dict[str, torch.nn.Module] = {}

    def build(self, role: str, name: str, weights: str | None) -> dict:
        model = self.models[role] = build(name, weights)
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"model {name!r} is a {type(model).__name__}, not a torch.nn.Module")
        return {"pickled": pack(model), "state": list(model.state_dict()), "fingerprint": fingerprint(model)}

    def look(self, role: str, image: torch.Tensor) -> dict:
        detector, outputs = look(self.models[role], image)
        return {"detector": detector, "outputs": outputs}

    def predict(self, role: str, images: torch.Tensor) -> dict:
        return {"predictions": torch.from_numpy(ccc.predict(self.models[role], images.numpy()))}


SIDES["builder"] = _BuilderSide


def build(name: str, weights: str | None) -> torch.nn.Module:
    """The model ``prefix:name`` as every table builds it, in the loop's process or a builder: loaders look in the
    weights folder first, under :func:`cemabench.registry.seeded` random state, so that a random initialisation (a
    plugin's model without a checkpoint) gives the same weights in every process and run, whatever ran before
    (cemabench's zoos seed their own random builds likewise: :func:`cemabench.models.zoo.seeded`)."""
    with zoo.weights_folder(weights), registry.seeded(), registry.plugin_errors("models", name.partition(":")[0]):
        return registry.build_model(name)


def look(model: torch.nn.Module, image: torch.Tensor) -> tuple[bool, int | None]:
    """(whether ``model`` is a detector, its outputs per image) for one image, in eval mode without autograd, its
    modes put back (:func:`cemabench.models.split.probing`)."""
    reference = next(iter(model.parameters()), None)
    with probing(model):
        output = model(image.to(reference.device) if reference is not None else image)
    detector = isinstance(output, list)
    return detector, None if detector else int(output.shape[-1])


def apart(edge: torch.nn.Module | BuiltApart, foundation: torch.nn.Module | BuiltApart) -> Models:
    """The source models of a table where one or both were built apart: what an isolated unit's halves get (their
    bytes), the edge's state names (the link's vocabulary) and the fingerprints (the training stage's key); this
    process builds no copy (a model built here is pickled once, as :func:`cemabench.protocol.isolation._set_up`
    does)."""
    def refused():
        raise RuntimeError("a model built apart (--isolate) is never unpickled in the loop's process")

    pickled = {role: m.pickled if isinstance(m, BuiltApart) else pack(m)
               for role, m in (("edge", edge), ("foundation", foundation))}
    return Models(edge=refused, foundation=refused, _copies=True, _pickled=pickled,
                  _state=edge.state if isinstance(edge, BuiltApart) else tuple(edge.state_dict()),
                  _fingerprints=tuple(m.fingerprint if isinstance(m, BuiltApart) else fingerprint(m)
                                      for m in (edge, foundation)))


@dataclass(frozen=True)
class BuiltApart:
    """The loop's stand-in for a model built in a builder process: its ``torch.save`` bytes, their fingerprint, the
    names of its state entries, and the builder that still holds it (for :meth:`look` and :meth:`predict`)."""

    role: str
    name: str
    pickled: bytes
    state: tuple[str, ...]
    fingerprint: str
    builder: Builder

    def look(self, image: torch.Tensor) -> tuple[bool, int | None]:
        """(whether it is a detector, its outputs per image) for one image, in eval mode without autograd."""
        answer = self.builder.call("look", self.role, image)
        detector, outputs = answer.get("detector"), answer.get("outputs")
        if type(detector) is not bool or not (detector or type(outputs) is int):
            raise UserError(f"the {self.role} model {self.name}'s builder sent a malformed answer")
        return detector, outputs

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Its class predictions on uint8 images (:func:`cemabench.protocol.ccc.predict`, in the builder)."""
        answer = self.builder.call("predict", self.role, torch.from_numpy(np.ascontiguousarray(images)))
        return owned(answer.get("predictions"), f"the {self.role} model {self.name}'s predictions, from its builder,",
                     shape=(len(images),), integers=True).numpy()


class Builder(Served):
    """A builder process for the models ``names``, started on the first one built and kept for the table."""

    role = "builder"
    what = ("a model could not be built in its own process, which reads the weights folder and the zoos' weight "
            "caches and writes nothing (fetch its weights first: run it once without --isolate, or put them in "
            "--weights)")

    def __init__(self, names: list[str], weights: str | None, memory: int | None = None):
        super().__init__(memory)
        self.reads = tuple(sorted({p for name in names for p in reads(name, weights)}))

    def access(self) -> Access:
        return Access(reads=self.reads, maps_shared=True)

    def build(self, role: str, name: str, weights: str | None) -> BuiltApart:
        answer = self.keep("build", role, name, weights)
        pickled, state, print_ = answer.get("pickled"), answer.get("state"), answer.get("fingerprint")
        if type(pickled) is not bytes or type(state) is not list or len(state) > MAX_NAMES or not all(
                type(s) is str and len(s) <= 1024 for s in state) or not (
                type(print_) is str and re.fullmatch(r"[0-9a-f]{16}", print_)):
            raise UserError(f"the {role} model {name}'s builder sent a malformed model")
        return BuiltApart(role, name, pickled, tuple(state), print_, self)
