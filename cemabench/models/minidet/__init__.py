"""The detection miniature's edge and cloud detectors (``minidet:edge``, ``minidet:cloud``) with their shipped
weights, trained on clean training canvases by :mod:`.train`."""
from __future__ import annotations

from pathlib import Path

import torch

from cemabench.models.mini import shipped
from cemabench.models.minidet import nets

WEIGHTS_DIR = Path(__file__).parent / "weights"


def load_model(kind: str) -> torch.nn.Module:
    """A shipped miniature detector (``edge`` or ``cloud``) with its trained weights."""
    return shipped(kind, nets.ARCHITECTURES, nets.build, WEIGHTS_DIR, "minidet")
