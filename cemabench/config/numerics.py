"""CPU numerics pinned to one instruction set, so that a CPU run gives the same bits on every x86-64 machine.

torch's own kernels (``ATEN_CPU_CAPABILITY``), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's BLAS
(``MKL_CBWR``) each pick the widest instructions the processor has, and a sum over 16 lanes rounds differently from a
sum over 8. Adaptation feeds its rounding back into the model, so over a continual stream the difference grows: the
miniature `continual` table's CEMA row moved by up to 13 points of accuracy between an AVX-512 machine and an AVX2
one. Pinned to AVX2 (which every x86-64 server since 2013 has), an AVX-512 machine gave the AVX2 machine's numbers
to the last sample (CEMA, 15 continual domains; README: Reproducibility), for about 1.3x its unpinned CPU time.

:func:`pin` runs when cemabench is imported, before torch computes anything in the process; each library reads its
variable once, at its first computation, so a process that computed with torch before importing cemabench keeps the
native choice, and :func:`cpu_numerics` (in every result's provenance and store key) records what was used. A value
already in the environment is kept; ``CEMABENCH_CPU_NUMERICS=native`` pins nothing. GPU kernels are not affected.
"""
from __future__ import annotations

import os
import platform

from cemabench.errors import UserError

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
SWITCH = "CEMABENCH_CPU_NUMERICS"  # "native": leave each library its own choice
CHOICES = ("avx2", "native")


def _x86() -> bool:
    """An x86-64 processor that has AVX2 and FMA (asking torch for AVX2 kernels on one without would crash), as numpy
    detected them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return bool(features.get("AVX2") and features.get("FMA3"))


def pin() -> None:
    """Set the pinned values in this process's environment (inherited by the worker processes it starts), unless
    the switch says otherwise (a value that is not a choice pins nothing, and :func:`check` refuses it), the machine
    is not x86-64 with AVX2 and FMA, or a value is already set."""
    if os.environ.get(SWITCH, "avx2").lower() != "avx2" or not _x86():
        return
    for name, value in PINNED.items():
        os.environ.setdefault(name, value)


def check() -> None:
    """The switch names a choice (the command line calls this before any compute)."""
    choice = os.environ.get(SWITCH, "avx2").lower()
    if choice not in CHOICES:
        raise UserError(f"{SWITCH} must be one of {', '.join(CHOICES)}, got {choice!r}")


def cpu_numerics() -> str:
    """What this process's CPU kernels use: torch's dispatch level, then the oneDNN and MKL settings in force, e.g.
    ``AVX2 onednn=AVX2 mkl=AVX2``; ``native`` where a library was left its own choice."""
    import torch

    rest = [f"{key}={os.environ.get(name, 'native')}" for key, name in (("onednn", "ONEDNN_MAX_CPU_ISA"),
                                                                        ("mkl", "MKL_CBWR"))]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *rest])
