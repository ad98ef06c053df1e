"""Deterministic training of the detection miniature's detectors; writes ``edge.pt`` and ``cloud.pt``.

    python -m cemabench.models.minidet.train [--out DIR] [--epochs-scale F]

Both learn the CenterNet-style targets (a Gaussian peak per object on its category's heatmap, focal loss; width,
height and centre offset at the object's cell, L1) on clean training canvases (:mod:`cemabench.datasets.minidet`).
The cloud detector is larger and also sees the classification miniature's generic photometric augmentation (noise,
blur, contrast and brightness jitter); neither sees the corruption generator.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cemabench.datasets.minidet import canvases
from cemabench.models.mini.train import _photometric
from cemabench.models.minidet import WEIGHTS_DIR, nets
from cemabench.models.minidet.objective import loss, targets
from cemabench.protocol.tasks.detection import Detections, score

SCHEDULE = {"edge": dict(epochs=12, robust=False), "cloud": dict(epochs=16, robust=True)}
TRAIN_IMAGES, TEST_IMAGES, BATCH = 3000, 300, 64


def train(kind: str, epochs_scale: float = 1.0, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train one detector; returns it with its mAP on clean test canvases."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, doc = canvases("train", TRAIN_IMAGES)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    t_all = targets(doc, len(images))
    schedule = SCHEDULE[kind]
    epochs = max(1, round(schedule["epochs"] * epochs_scale))
    model = nets.build(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = int(np.ceil(len(x_all) / BATCH))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            x = _photometric(x_all[idx], g) if schedule["robust"] else x_all[idx]
            value = loss(model(x), t_all[idx])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            scheduler.step()
    return model.eval(), evaluate(model, *canvases("test", TEST_IMAGES))


def evaluate(model: torch.nn.Module, images: np.ndarray, doc: dict) -> dict:
    with torch.no_grad():
        found = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return score(doc, [i["id"] for i in doc["images"]], [Detections(**d) for d in found])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--epochs-scale", type=float, default=1.0)
    parser.add_argument("--only", choices=list(SCHEDULE))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in [args.only] if args.only else SCHEDULE:
        model, metrics = train(kind, args.epochs_scale)
        torch.save(model.state_dict(), args.out / f"{kind}.pt")
        path = args.out / f"{kind}.pt"
        print(f"{kind}: clean test mAP {metrics['map']:.1f}, mAP@.5 {metrics['map50']:.1f} -> {path}")


if __name__ == "__main__":
    main()
