"""The detection miniature's edge and cloud detectors (``minidet:edge``, ``minidet:cloud``) with their shipped
weights, trained on clean training canvases by :mod:`.train`.

The family is described for collaborative inference: cut points ``stem``, ``layer1`` and ``layer2`` (its last stage
is the prediction head, which ends at the raw maps; :func:`.nets.decode` makes them detections), and how a detector
of the family trains offline (:mod:`.objective`)."""
from __future__ import annotations

from pathlib import Path

import torch

from cemabench.models.layouts import CLASSIFIER, DetectorTraining, Stages, register_detector_training, register_layout
from cemabench.models.mini import shipped
from cemabench.models.minidet import nets, objective

WEIGHTS_DIR = Path(__file__).parent / "weights"


def load_model(kind: str) -> torch.nn.Module:
    """A shipped miniature detector (``edge`` or ``cloud``) with its trained weights."""
    return shipped(kind, nets.ARCHITECTURES, nets.build, WEIGHTS_DIR, "minidet")


def _stages(net: nets.MiniDetector) -> Stages:
    return [("stem", [net.normalize, net.stem]), ("layer1", [net.layer1]), ("layer2", [net.layer2]),
            (CLASSIFIER, [net.head])]


register_layout("cemabench.models.minidet.nets", "MiniDetector", _stages)
register_detector_training("cemabench.models.minidet.nets", "MiniDetector", DetectorTraining(
    postprocess=nets.decode, targets=objective.annotation_targets, loss=objective.loss, distill=objective.distill))
