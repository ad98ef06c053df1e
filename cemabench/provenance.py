"""Which code and which inputs computed a number: the one policy behind stored results and training artefacts alike.

**Code.** A run unit's numbers, and the artefacts its method trains, are keyed by the source of every module that
their computation imports: the method's classes, the protocol's loop, the dataset's factory and the models' code,
followed through every ``import`` statement (function-level imports and ``TYPE_CHECKING`` blocks included) into
every module of the ``cemabench`` distribution and of the plugins' own distributions. A method that declares a
``version`` on its class is keyed by that version instead of by its own distribution's source. Third-party libraries
(torch, torchvision, timm, ...) are keyed by their versions (:func:`versions`), not their source.

Imports are read from the source (Python's ``ast``), not from what happens to be imported in this process, so a
key does not depend on what ran before. A module whose code runs files of other languages names them, relative to
itself, in a module-level ``__companions__`` tuple (the C++ meter's source, say); their bytes are part of its source.
An import made by name at run time (``importlib.import_module(text)``) is not seen: a plugin that loads code that way
should declare a ``version``.

**Inputs.** A model by the hash of its full state (:func:`fingerprint`); a clean training split by the hash of its
images (:func:`data_fingerprint`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import platform
from collections import defaultdict
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import cemabench
from cemabench import registry
from cemabench.config.numerics import cpu_numerics

HARNESS = "cemabench"  # the harness package: what the "harness" part of a code digest covers
PROTOCOL_ROOT = "cemabench.protocol.loop"  # where every unit's computation starts
CHUNK = 1024  # images hashed at a time


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's full state, so that changed weights never reuse a stored result."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


_DATA_FINGERPRINTS: dict[int, tuple[object, str]] = {}  # id(clean split) -> (the split, kept alive; its hash)


def data_fingerprint(clean) -> str:
    """(name, size, hash of every image) of a clean split, computed once per split object in this process."""
    if clean is None:
        return "none"
    known = _DATA_FINGERPRINTS.get(id(clean))
    if known is not None and known[0] is clean:
        return known[1]
    digest = hashlib.sha256(f"{getattr(clean, 'name', '')}/{len(clean)}".encode())
    for start in range(0, len(clean), CHUNK):
        digest.update(clean.images(np.arange(start, min(len(clean), start + CHUNK))).numpy().tobytes())
    _DATA_FINGERPRINTS[id(clean)] = (clean, digest.hexdigest()[:16])
    return _DATA_FINGERPRINTS[id(clean)][1]


def versions() -> dict[str, str]:
    """The versions of cemabench, Python, the libraries that compute numbers, the platform, and the instruction set
    the CPU kernels use (:func:`cemabench.config.numerics.cpu_numerics`)."""
    return {**_installed(), "cpu_numerics": cpu_numerics()}


@functools.cache
def _installed() -> dict[str, str]:
    """What cannot change while a process runs, read once (reading a distribution's version scans every installed
    one: 4 ms, and a table asks once per unit)."""
    return {"cemabench": cemabench.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": metadata.version("torchvision"), "timm": metadata.version("timm"),
            "numpy": np.__version__, "platform": platform.platform()}


@functools.cache
def _families() -> dict[str, frozenset[str]]:
    """Top-level import name -> every top-level name its distribution ships (one family of code)."""
    tops_of: dict[str, set[str]] = defaultdict(set)
    by_top = metadata.packages_distributions()
    for top, dists in by_top.items():
        for dist in dists:
            tops_of[dist].add(top)
    return {top: frozenset().union(*(tops_of[d] for d in dists)) for top, dists in by_top.items()}


def family(top: str) -> frozenset[str]:
    """The top-level names shipped by the distribution that ships ``top``; ``top`` alone outside any distribution."""
    return _families().get(top, frozenset({top})) | {top}


def plugin_code() -> set[str]:
    """The top-level names of every installed plugin's code: the distributions (or modules) behind the entry points
    of every cemabench group."""
    return {top for entry in registry.entry_points_of_all() for top in family(_top(entry.module))}


def _top(module: str) -> str:
    return module.split(".")[0]


_PARSED: dict[str, tuple] = {}  # module -> (file stat, source, package, imports, companions, their stats)


def _imports_of(tree: ast.AST, module: str, package: bool) -> list[str]:
    """Every module name an import statement anywhere in ``tree`` may load (``from a import b``: ``a`` and ``a.b``)."""
    names = []
    here = module if package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


def _parse(module: str) -> tuple[bytes, tuple[str, ...]] | None:
    """A module's source and the module names it imports, or None when ``module`` is no module with a source file
    (an attribute named in ``from a import b``, a namespace package). Cached while the file is unchanged."""
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # noqa: BLE001 - a parent that is no package (``b`` in ``from a import b`` is an attribute), or
        return None  # one whose import fails: then the computation cannot import it either
    if spec is None or not spec.has_location or not spec.origin or not spec.origin.endswith(".py"):
        return None
    path = Path(spec.origin)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    cached = _PARSED.get(module)
    if cached is not None and cached[0] == key and _stats(cached[4]) == cached[5]:
        return cached[1], cached[3]
    source = path.read_bytes()
    tree = ast.parse(source)
    package = spec.submodule_search_locations is not None
    imports = tuple(_imports_of(tree, module, package))
    companions = tuple(path.parent / name for name in _companions(tree))
    stats = _stats(companions)
    for companion in companions:
        source += b"\0" + companion.name.encode() + b"\0" + companion.read_bytes()
    _PARSED[module] = (key, source, package, imports, companions, stats)
    return source, imports


def _companions(tree: ast.Module) -> tuple[str, ...]:
    """The names in a module-level ``__companions__ = (...)``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__companions__" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def _stats(paths) -> tuple:
    return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


def closure(roots: Iterable[str], scope: Iterable[str]) -> dict[str, bytes]:
    """The modules ``roots`` import, transitively, whose top-level name is in ``scope``: name -> source. Importing
    ``a.b.c`` also runs ``a`` and ``a.b``, so parent packages are part of it."""
    scope = set(scope)
    found: dict[str, bytes] = {}
    todo = [r for r in roots if _top(r) in scope]
    while todo:
        name = todo.pop()
        if name in found or _top(name) not in scope:
            continue
        parsed = _parse(name)
        if parsed is None:
            continue
        found[name] = parsed[0]
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += [m for m in parsed[1] if _top(m) in scope and m not in found]
    return found


def digest(sources: dict[str, bytes]) -> str:
    """A short hash of modules' names and sources."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    return h.hexdigest()[:16]


def warm() -> None:
    """Parse the harness's modules once, so that processes forked from this one (the zygote's planners) start with
    the parse cache a code digest reads."""
    closure([PROTOCOL_ROOT, f"{HARNESS}.datasets", f"{HARNESS}.models", f"{HARNESS}.registry"], family(HARNESS))


def modules_of(obj) -> set[str]:
    """The modules whose code an object runs: a model's every submodule class, a function's or class's module, an
    instance's class."""
    if isinstance(obj, torch.nn.Module):
        return {type(m).__module__ for m in obj.modules()}
    module = getattr(obj, "__module__", None) if isinstance(obj, type) or callable(obj) else type(obj).__module__
    return {module} if isinstance(module, str) else set()


def code_digest(method: type, *parts) -> dict[str, str]:
    """What keys a method's results and artefacts to the code that computes them (see the module docstring):
    ``{"method": ..., "harness": ...}``. ``method`` is the method's own code: the source of the modules of its
    distribution that the computation imports (for a built-in method, ``cemabench_methods``), or
    ``version:<version>`` when the class itself declares one. ``harness`` is the source of every other module of the
    computation in the ``cemabench`` distribution or in a plugin's: the protocol, and what ``parts`` run (the
    dataset factory, the models, their loaders)."""
    own = family(_top(method.__module__)) - {HARNESS}
    roots = {c.__module__ for c in method.__mro__ if c.__module__ != "builtins"} | {PROTOCOL_ROOT}
    for part in parts:
        roots |= modules_of(part)
    scope = set(family(HARNESS)) | own | plugin_code()
    sources = closure(roots, scope)
    mine = {m: s for m, s in sources.items() if _top(m) in own}
    version = vars(method).get("version")
    return {"method": f"version:{version}" if version else f"source:{digest(mine)}",
            "harness": digest({m: s for m, s in sources.items() if m not in mine})}
