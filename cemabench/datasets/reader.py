"""Dataset plugins read apart from the harness (``--isolate``).

Under ``--isolate`` the loop's process (the link, scoring, the store, the artefact cache) runs no plugin code; a
dataset that is not cemabench's own is a plugin's code too: its factory, its domains' ``images`` and ``labels``, its
corruption generator. Such a dataset is built and read in a *reader* process, forked from the zygote and confined as
a planner is (:mod:`cemabench.protocol.isolation`), which may read, besides code and the system's files, the data
root (shown to it alone), the zoos' weight caches and Hugging Face's datasets cache, and write only a cache folder of
its own (``CACHE/datasets/NAME-HASH``, its ``CEMABENCH_CACHE``: :func:`own_cache_of`): never the results folder,
cemabench's cache or the artefacts.

The loop holds a :class:`~cemabench.data.DatasetSource` of plain facts whose domains, clean split and corruption
generator are stand-ins (:class:`DomainApart`): each ``images``, ``labels``, ``ground_truth`` and ``corrupt`` is a call
to the reader that comes back as plain tensors and JSON, checked, with the loop's random state threaded through it (a
generator's state too), so that the stream, every batch and every label are the in-process run's. The labels still
come from the plugin: it defines them. What isolation adds is that its code never shares an address space with the
store, the scheduler, the other cells' records or the methods' halves.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cemabench import registry
from cemabench.config.paths import cache_root, dataset_caches, weight_caches
from cemabench.data import Corruptor, DatasetSource, sequential_batches
from cemabench.errors import UserError
from cemabench.protocol import hygiene
from cemabench.protocol.isolation import Served
from cemabench.protocol.plain import owned
from cemabench.protocol.sides import SIDES
from cemabench.protocol.zygote import Access

CLEAN = -1  # the clean split's place where a domain's index goes


def own(name: str) -> bool:
    """Whether the dataset ``name`` is cemabench's own code (:func:`cemabench.registry.own`)."""
    return registry.own("datasets", name)


def default_domains(name: str, options: dict, data_root: str | None, severity: int) -> list[str]:
    """The domains a dataset is read at when none are named: its factory's default ``domains``, or where it has none,
    every domain a build of it finds."""
    default = inspect.signature(registry.load("datasets", name)).parameters.get("domains")
    if default is not None and default.default is not inspect.Parameter.empty and default.default:
        return [str(d) for d in default.default]
    with registry.seeded(), registry.plugin_errors("datasets", name):
        built = registry.dataset_factory(name, list(options))(data_root=data_root, severity=severity, **options)
    return [str(d.name) for d in built.domains]


def domains_of(name: str, options: dict, data_root: str | None, severity: int, isolate: bool) -> list[str]:
    """:func:`default_domains` here, or under ``isolate`` for a plugin's dataset in a reader process of its own."""
    if not isolate or own(name):
        return default_domains(name, options, data_root, severity)
    found = Reader(name, data_root).domains(options, severity)
    if type(found) is not list or not all(type(d) is str for d in found):
        raise UserError(f"dataset {name}'s reader sent malformed domain names")
    return found


def _domain_facts(domain) -> list:
    return [str(domain.name), int(len(domain)), int(domain.sample_nbytes)]


class _ReaderSide:
    """The reader process's side: the dataset built here by its factory, as the loop builds its own, at each
    severity asked for, and read when asked."""

    device = torch.device("cpu")

    def __init__(self):
        self.replaced = hygiene.replaced_harness_code()
        self.built: dict[int, DatasetSource] = {}

    def build(self, name: str, options: dict, data_root: str | None, severity: int, domains: list[str]) -> dict:
        with registry.seeded(), registry.plugin_errors("datasets", name):  # as the loop builds its own
            source = registry.dataset_factory(name, options)(data_root=data_root, severity=severity,
                                                             domains=tuple(domains), **options)
        if not isinstance(source, DatasetSource):
            raise UserError(f"dataset {name!r}'s factory returned {type(source).__name__}, not a DatasetSource")
        self.built[severity] = source
        corruptor = source.corruptor
        return {"name": str(source.name), "num_classes": int(source.num_classes), "task": str(source.task),
                "is_miniature": bool(source.is_miniature), "clean_hint": str(source.clean_hint),
                "provenance": json.dumps(source.provenance, sort_keys=True, default=str),  # (as a key reads it)
                "scored_classes": None if source.scored_classes is None else _copy(source.scored_classes),
                "domains": [_domain_facts(d) for d in source.domains],
                "clean": None if source.clean is None else _domain_facts(source.clean),
                "corruptor": None if corruptor is None else {
                    "lazy": bool(corruptor.lazy), "calibration_images": int(corruptor.calibration_images),
                    "shape": [int(n) for n in corruptor.images().shape]}}

    def domains(self, name: str, options: dict, data_root: str | None, severity: int) -> dict:
        return {"domains": default_domains(name, options, data_root, severity)}

    def _domain(self, severity: int, which: int):
        source = self.built[severity]
        return source.clean if which == CLEAN else source.domains[which]

    def images(self, severity: int, which: int, indices: torch.Tensor) -> dict:
        return {"images": _copy(self._domain(severity, which).images(indices.numpy()))}

    def labels(self, severity: int, which: int) -> dict:
        return {"labels": _copy(np.asarray(self._domain(severity, which).labels()))}

    def ground_truth(self, severity: int, which: int) -> dict:
        return {"json": json.dumps(self._domain(severity, which).ground_truth(), default=str)}

    def generator_images(self, severity: int, indices: torch.Tensor) -> dict:
        return {"images": _copy(self.built[severity].corruptor.images()[indices.numpy()])}

    def generator_labels(self, severity: int) -> dict:
        return {"labels": _copy(np.asarray(self.built[severity].corruptor.labels()))}

    def corrupt(self, severity: int, images: torch.Tensor, corruption: str, level: float, state: str) -> dict:
        rng = np.random.Generator(getattr(np.random, json.loads(state)["bit_generator"])())
        rng.bit_generator.state = json.loads(state)
        out = self.built[severity].corruptor.corrupt(images.numpy(), corruption, level, rng)
        return {"images": _copy(out), "state": json.dumps(rng.bit_generator.state)}


SIDES["reader"] = _ReaderSide


def _copy(value) -> torch.Tensor:
    """A tensor (or array) as a contiguous copy that owns exactly its bytes, which the loop accepts (a dataset's
    images may be a view of a larger batch, its labels a slice of a larger array)."""
    return torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).detach().clone(
        memory_format=torch.contiguous_format)


def own_cache_of(name: str) -> Path:
    """The reader's own cache folder, ``CACHE/datasets/NAME-HASH``, made here: the entry point's name made one safe
    path component (a name is any string: ``..`` or ``x/../../artefacts`` named the cache's parent and the artefacts,
    which the reader could then write; helper-38), never a link."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:40]
    parent = cache_root() / "datasets"
    folder = parent / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() or os.path.realpath(folder) != os.path.join(os.path.realpath(parent), folder.name):
        raise UserError(f"dataset {name}'s own cache {folder} is not a folder of {parent}")
    return folder


class Reader(Served):
    """A reader process for the dataset ``name``, started on its first call and kept for the table."""

    role = "reader"
    threads_random_state = True  # (a dataset's reads draw from the loop's random state in-process)

    def __init__(self, name: str, data_root: str | None, memory: int | None = None):
        super().__init__(memory)
        self.name, self.data_root = name, data_root
        self.what = f"dataset {name} could not be read in its own process"

    def access(self) -> Access:
        own_cache = own_cache_of(self.name)
        reads = [self.data_root, *weight_caches(), *dataset_caches()]
        return Access(reads=tuple(sorted({os.path.realpath(p) for p in reads if p and os.path.isdir(p)})),
                      writes=(str(own_cache),), shown=(self.data_root,) if self.data_root else (),
                      environ=(("CEMABENCH_CACHE", str(own_cache)),), maps_shared=True)

    def domains(self, options: dict, severity: int) -> list:
        """The dataset's default domains (:func:`default_domains`), asked once, the reader then ended."""
        try:
            return self.call("domains", self.name, dict(options), self.data_root, severity).get("domains")
        finally:
            self.close()

    def build(self, options: dict, severity: int, domains: tuple[str, ...]) -> DatasetSource:
        facts = self.keep("build", self.name, dict(options), self.data_root, severity, list(domains))
        try:
            return _source(self, severity, facts)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"dataset {self.name}'s reader sent malformed facts ({error})") from None


MAX_JSON = 1 << 26  # the longest JSON text read from a reader (a COCO ground truth of 5,000 images is ~20 MB)


def _json(text, what: str):
    """A reader's JSON text, read: a string of at most :data:`MAX_JSON` characters that parses (no depth that ends
    the parser), else the one line naming ``what``."""
    try:
        if type(text) is not str or len(text) > MAX_JSON:
            raise ValueError
        return json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{what} is malformed") from None


def _source(reader: Reader, severity: int, facts: dict) -> DatasetSource:
    def domain(which: int, fields) -> DomainApart:
        name, length, nbytes = fields
        if type(name) is not str or type(length) is not int or type(nbytes) is not int or length < 0 or nbytes < 0:
            raise ValueError(f"domain {fields!r}")
        return DomainApart(name, length, nbytes, reader, severity, which)

    scored = facts["scored_classes"]
    if scored is not None:
        scored = owned(scored, f"dataset {reader.name}'s scored classes, from its reader,", integers=True)
    provenance = _json(facts["provenance"], f"dataset {reader.name}'s provenance, from its reader,")
    if type(provenance) is not dict:
        raise ValueError("provenance")
    generator = facts["corruptor"]
    return DatasetSource(
        name=str(facts["name"]), num_classes=int(facts["num_classes"]), task=str(facts["task"]),
        is_miniature=facts["is_miniature"] is True, clean_hint=str(facts["clean_hint"]), provenance=provenance,
        scored_classes=scored, domains=[domain(i, d) for i, d in enumerate(facts["domains"])],
        clean=None if facts["clean"] is None else domain(CLEAN, facts["clean"]),
        corruptor=None if generator is None else _corruptor(reader, severity, generator))


@dataclass(frozen=True)
class DomainApart:
    """A domain read in the reader process: its name, size and sample size here, its images and labels there."""

    name: str
    length: int
    sample_nbytes: int
    reader: Reader
    severity: int
    which: int

    def __len__(self) -> int:
        return self.length

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices``: floats, ``sample_nbytes`` values each (C x H x W)."""
        indices = np.asarray(indices, dtype=np.int64)
        images = self.reader.call("images", self.severity, self.which, torch.from_numpy(indices)).get("images")
        what = f"dataset {self.reader.name}'s images of domain {self.name}, from its reader,"
        owned(images, what, numel=len(indices) * self.sample_nbytes)
        if images.dim() != 4 or len(images) != len(indices):
            raise UserError(f"{what} is malformed")
        return images

    def labels(self) -> np.ndarray:
        return owned(self.reader.call("labels", self.severity, self.which).get("labels"),
                      f"dataset {self.reader.name}'s labels of domain {self.name}, from its reader,",
                      shape=(self.length,), integers=True).numpy()

    def ground_truth(self) -> dict:
        document = _json(self.reader.call("ground_truth", self.severity, self.which).get("json"),
                         f"dataset {self.reader.name}'s ground truth of {self.name}, from its reader,")
        if type(document) is not dict:
            raise UserError(f"dataset {self.reader.name}'s reader sent a malformed ground truth for {self.name}")
        return document

    batches = sequential_batches


@dataclass(frozen=True)
class _GeneratorImages:
    """A corruption generator's clean test images, read in the reader when indexed (by an integer array)."""

    reader: Reader
    severity: int
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        images = self.reader.call("generator_images", self.severity, torch.from_numpy(indices)).get("images")
        return owned(images, f"dataset {self.reader.name}'s generator images, from its reader,",
                      shape=(*indices.shape, *self.shape[1:]), dtype=torch.uint8).numpy()


def _corruptor(reader: Reader, severity: int, facts: dict) -> Corruptor:
    images = _GeneratorImages(reader, severity, tuple(int(n) for n in facts["shape"]))

    def labels() -> np.ndarray:
        return owned(reader.call("generator_labels", severity).get("labels"),
                      f"dataset {reader.name}'s generator labels, from its reader,", shape=(images.shape[0],),
                      integers=True).numpy()

    def corrupt(pixels: np.ndarray, corruption: str, level: float, rng: np.random.Generator) -> np.ndarray:
        answer = reader.call("corrupt", severity, torch.from_numpy(np.ascontiguousarray(pixels)), str(corruption),
                             float(level), json.dumps(rng.bit_generator.state))
        what = f"dataset {reader.name}'s corrupted images, from its reader,"
        out = owned(answer.get("images"), what, shape=pixels.shape, dtype=torch.uint8)
        state = _json(answer.get("state"), f"dataset {reader.name}'s generator state, from its reader,")
        try:
            rng.bit_generator.state = state
        except (KeyError, TypeError, ValueError):
            raise UserError(f"dataset {reader.name}'s generator state, from its reader, is malformed") from None
        return out.numpy()

    return Corruptor(images=lambda: images, labels=labels, corrupt=corrupt, lazy=bool(facts["lazy"]),
                     calibration_images=int(facts["calibration_images"]))
