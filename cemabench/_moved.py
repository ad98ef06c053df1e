"""The module paths of cemabench 0.1 that moved into subpackages, kept importable for one release with a
``DeprecationWarning``: ``import cemabench.spec`` gives a module that finds each name in its new home."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the modules its public names now live in, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "cemabench.execution": ("cemabench.protocol.execution",),
    "cemabench.meter": ("cemabench.protocol.meter",),
    "cemabench.training": ("cemabench.protocol.training", "cemabench.provenance"),
    "cemabench.stream": ("cemabench.protocol.stream", "cemabench.config.settings"),
    "cemabench.spec": ("cemabench.tables.spec",),
    "cemabench.plan": ("cemabench.tables.plan",),
    "cemabench.sweep": ("cemabench.tables.sweep", "cemabench.run.runner", "cemabench.report.sweep"),
    "cemabench.context": ("cemabench.run.context", "cemabench.provenance"),
    "cemabench.runner": ("cemabench.run.runner",),
    "cemabench.executors": ("cemabench.run.executors",),
    "cemabench.store": ("cemabench.run.store",),
    "cemabench.leaderboard": ("cemabench.report.leaderboard",),
    "cemabench.pareto": ("cemabench.report.plots",),
    "cemabench.check": ("cemabench.report.check",),
    "cemabench.corruptions": ("cemabench.datasets.corruptions",),
    "cemabench.imagenet": ("cemabench.datasets.imagenet",),
    "cemabench.cifar": ("cemabench.datasets.cifar",),
    "cemabench.hf": ("cemabench.datasets.hf",),
    "cemabench.miniature": ("cemabench.datasets.miniature", "cemabench.models.mini"),
    "cemabench.miniature.nets": ("cemabench.models.mini.nets", "cemabench.models.layers"),
    "cemabench.miniature.train": ("cemabench.models.mini.train",),
    "cemabench.zoo": ("cemabench.models.zoo", "cemabench.models.layers"),
    "cemabench.cifar_zoo": ("cemabench.models.cifar",),
    "cemabench.robustbench_zoo": ("cemabench.models.robustbench",),
    "cemabench.split": ("cemabench.models.split",),
}


class _Alias(importlib.abc.Loader):
    def create_module(self, spec):
        homes = MOVED[spec.name]
        module = types.ModuleType(spec.name, f"Moved: see {', '.join(homes)}.")

        def find(name: str):
            for home in homes:
                target = importlib.import_module(home)
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {spec.name!r} (moved to {', '.join(homes)}) has no attribute {name!r}")

        module.__getattr__ = find
        if any(other.startswith(spec.name + ".") for other in MOVED):
            module.__path__ = []  # a package: its moved submodules import through it
        return module

    def exec_module(self, module):
        warnings.warn(f"{module.__name__} moved to {' / '.join(MOVED[module.__name__])}; the old path goes away in "
                      f"the next release", DeprecationWarning, stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.machinery.ModuleSpec(name, _Alias())
        return None


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
