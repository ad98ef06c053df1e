"""The meter's per-op work in C++ (``native_meter.cpp``), built on first use with PyTorch's own extension builder.

``CEMABENCH_METER`` chooses: ``auto`` (the default: the C++ meter where it builds, else the Python dispatch mode,
with one line on stderr saying why), ``native`` (the C++ meter or an error) or ``python``. Both count the same FLOPs
and refuse the same ops (tests hold each against the other and against ``FlopCounterMode``); the C++ one adds about
a microsecond per op where the Python one adds a Python call. The build (about 30 s, once per source and torch
version) goes where PyTorch keeps extensions (``$TORCH_EXTENSIONS_DIR/cemabench``, else
``~/.cache/torch_extensions/cemabench``), under a name that carries the digest of the source and torch's version, so
an edited source is never loaded stale.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import flop_registry

__companions__ = ("native_meter.cpp",)  # part of this module's source for cemabench.provenance
CHOICES = ("auto", "native", "python")
SOURCE = Path(__file__).with_name("native_meter.cpp")
FLAGS = ["-O2", "-DNDEBUG"]
_loaded: dict = {}


def choice() -> str:
    value = os.environ.get("CEMABENCH_METER", "auto")
    if value not in CHOICES:
        raise ValueError(f"CEMABENCH_METER={value!r} is not a meter; choose one of {', '.join(CHOICES)}")
    return value


def formula_ops() -> list[str]:
    """The aten ops that carry FLOPs: those ``torch.utils.flop_counter`` has a formula for."""
    return sorted(p._qualified_op_name for p in flop_registry if isinstance(p, torch._ops.OpOverloadPacket))


def _directory() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "cemabench"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    """Import the built meter, building it first if no process has (one builds at a time, under a lock the system
    drops if the builder dies; each builds in its own folder and moves the result into place whole)."""
    identity = SOURCE.read_bytes() + f"{torch.__version__} {sys.version} {' '.join(FLAGS)}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:12]
    name = f"cemabench_meter_{digest}"
    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    built = directory / f"{name}.so"
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built.exists():
            module = _import(name, built)
        else:
            if shutil.which("ninja") is None:  # the pip package's, where the system has none
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            # imported here (0.2 s, needed once), without its warning that a CPU machine has no CUDA runtime
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            print("cemabench: building the C++ FLOP meter, once per machine and torch version (about 30-60 s)",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                module = load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=scratch,
                              verbose=False)
                os.replace(module.__file__, built)
            print(f"cemabench: built it in {time.perf_counter() - start:.0f} s ({built})", file=sys.stderr)
    module.set_formulas(formula_ops())
    sys.modules[name] = module
    return module


def meter_module():
    """The built C++ meter, or None where the choice or the machine rules it out."""
    if "module" not in _loaded:
        wanted = choice()
        _loaded["module"], _loaded["why"] = None, "CEMABENCH_METER=python" if wanted == "python" else ""
        if wanted != "python":
            try:
                _loaded["module"] = _build()
            except Exception as error:  # no compiler, no headers, a failed build: the Python meter does the same
                why = " ".join(str(error).split())[:300]
                if wanted == "native":
                    del _loaded["module"]  # asked again, it says so again
                    raise RuntimeError(f"the C++ meter did not build ({why}); unset CEMABENCH_METER or set it to "
                                       f"python") from error
                _loaded["why"] = f"it did not build: {why}"
                print(f"cemabench: counting FLOPs with the Python meter (slower per op): {_loaded['why']}",
                      file=sys.stderr)
            else:
                from cemabench.protocol.hygiene import seal_harness

                seal_harness()  # its methods, as loaded, join the harness code that a unit finds unreplaced
    return _loaded["module"]


def kind() -> str:
    """Which meter counts in this process: 'native' or 'python' (building the C++ one if it is due)."""
    return "native" if meter_module() is not None else "python"
