"""The offline training stage: a method's ``train`` hook, run deterministically before the online stream and cached.

Methods that need trained parts (adapters, gates, distilled edges) train them here, on the labelled clean training
split the cloud keeps, never on the test stream. The returned tensors are stored under
``$CEMABENCH_CACHE/artefacts/<key>.pt`` (written atomically), the key being a hash of everything that determines
them: method name and options, the source models' weights, the clean split (name, size, a hash of its images), the
code that computes them (the one provenance policy of :mod:`cemabench.provenance`), the seed and the torch version.
A second run unit with the same key loads them instead of training again, so a per-domain table trains once per
method entry and seed.

Training runs with its own seed, derived from (seed, method name, options), and leaves the caller's random state as
it found it, so that the online numbers are the same whether the artefacts were trained or loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cemabench.config.paths import cache_root
from cemabench.method import Method, MethodFacts, TrainingResources
from cemabench.protocol.stream import derive_seed
from cemabench.provenance import code_digest, data_fingerprint, fingerprint


def trains(method: Method | MethodFacts) -> bool:
    """Whether the method has an offline training stage (overrides :meth:`Method.train`)."""
    return method.trains if isinstance(method, MethodFacts) else type(method).train is not Method.train


def options_of(method: Method | MethodFacts) -> dict:
    """The options that can change what ``train`` returns (all but the method's declared ``online_options``)."""
    if isinstance(method, MethodFacts):
        options = method.options
    else:
        options = dataclasses.asdict(method.options) if dataclasses.is_dataclass(method.options) else {}
    return {k: v for k, v in options.items() if k not in method.online_options}


def training_key(method: Method | MethodFacts, resources: TrainingResources,
                 fingerprints: tuple[str, str] | None = None) -> str:
    """The key of a method's trained artefacts: method name and options, the source models' weights (their
    ``fingerprints`` where given: models built apart, never unpickled here), the clean split, the code that trains
    them (:func:`cemabench.provenance.code_digest`: the method's own code or its declared version, and every harness
    module the computation imports), the seed, torch's version and the device."""
    if fingerprints is None or not isinstance(method, MethodFacts):
        models = resources.edge(), resources.foundation()
        fingerprints = fingerprints or (fingerprint(models[0]), fingerprint(models[1]))
    config = {"method": method.name, "options": options_of(method),
              "edge": fingerprints[0], "foundation": fingerprints[1],
              "data": data_fingerprint(resources.clean), "num_classes": resources.num_classes,
              "code": method.training_code if isinstance(method, MethodFacts) else code_digest(type(method), *models),
              "seed": resources.seed, "torch": torch.__version__, "device": resources.device.type,
              # CPU numbers depend on the intra-op threads (run_unit pins one): artefacts trained otherwise are stale
              "cpu_threads": torch.get_num_threads() if resources.device.type == "cpu" else None}
    if isinstance(method, MethodFacts) and method.entry not in (None, method.name):
        # isolated, the name and the code digest are a planner's word, and the halves build the entry point asked
        # about: a plugin that names itself as another method (and sends that one's digest) keys apart from it
        config["entry"] = method.entry
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _own_random_state(seed: int):
    """Seed python/numpy/torch for the training, and give the caller its random state back afterwards."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def train_here(method: Method, resources: TrainingResources) -> dict | None:
    """The stage's computation in this process: ``method.train`` under its own seed, derived from (seed, method name,
    options), with grad enabled; the caller's random state is left as it was."""
    seed = derive_seed("train", resources.seed, method.name, json.dumps(options_of(method), sort_keys=True,
                                                                        default=str))
    with _own_random_state(seed), torch.enable_grad():
        return method.train(resources)


def run_training(method: Method, resources: TrainingResources,
                 train: Callable[[], dict | None] | None = None, fingerprints: tuple[str, str] | None = None) -> dict:
    """Set ``method.artefacts`` (trained or loaded from the cache) and return the record of the stage:
    ``{"key", "seconds", "cached"}``, or an empty record for a method without a training stage. ``train`` computes
    the artefacts where they are not cached (default: :func:`train_here`; ``--isolate``: in the cloud half's process,
    while this process keeps the key, the cache and the check of what came back)."""
    method.artefacts = None
    if not trains(method):
        return {}
    start = time.perf_counter()
    key = training_key(method, resources, fingerprints)
    path = cache_root() / "artefacts" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel units with one key (a per-domain table's workers) train it once
        cached = path.exists()
        if cached:
            state = torch.load(path, map_location=resources.device, weights_only=True)
        else:
            state = train() if train is not None else train_here(method, resources)
            if state is not None:
                if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
                    raise TypeError(f"{type(method).__name__}.train must return a dict of tensors or None")
                _save(state, path)
                state = {k: v.detach() for k, v in state.items()}
    method.artefacts = state
    return {"key": key, "seconds": round(time.perf_counter() - start, 3), "cached": cached}
