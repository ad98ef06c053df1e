"""Deterministic training of the miniature's networks; writes ``edge.pt`` and ``foundation.pt``.

    python -m cemabench.models.mini.train [--out DIR] [--epochs-scale F]

The edge network sees clean digits with small shifts. The foundation network is larger and also sees generic
photometric augmentation (noise, blur, contrast and brightness jitter), standing in for the robustness a real
foundation model owes to scale; it never sees the corruption generator itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cemabench.datasets.miniature import splits
from cemabench.models.mini import WEIGHTS_DIR, nets

SCHEDULE = {"edge": dict(epochs=30, robust=False), "foundation": dict(epochs=40, robust=True)}


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=g)
    return torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])


def _photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)

    def chosen(p):
        return (torch.rand(n, 1, 1, 1, generator=g) < p).float()

    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=3)
    x = x + chosen(0.3) * (blurred - x)
    means = x.mean(dim=(1, 2, 3), keepdim=True)
    x = x + chosen(0.3) * ((x - means) * torch.empty(n, 1, 1, 1).uniform_(0.2, 1.0, generator=g) + means - x)
    x = x + chosen(0.3) * torch.empty(n, 1, 1, 1).uniform_(0.0, 0.4, generator=g)
    x = x + chosen(0.5) * torch.randn(x.shape, generator=g) * torch.empty(n, 1, 1, 1).uniform_(0, 0.15, generator=g)
    return x.clamp(0, 1)


def train(kind: str, epochs_scale: float = 1.0, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Train one network; returns it with its clean test accuracy."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = splits()["train"]
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y_all = torch.from_numpy(labels)
    schedule = SCHEDULE[kind]
    epochs = max(1, round(schedule["epochs"] * epochs_scale))
    model = nets.build(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps_per_epoch = int(np.ceil(len(y_all) / 64))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=g)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            x = _shift(x_all[idx], g)
            if schedule["robust"]:
                x = _photometric(x, g)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    test_images, test_labels = splits()["test"]
    with torch.no_grad():
        logits = model(torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255)
    accuracy = (logits.argmax(1).numpy() == test_labels).mean() * 100
    return model, float(accuracy)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--epochs-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in SCHEDULE:
        model, accuracy = train(kind, args.epochs_scale)
        torch.save(model.state_dict(), args.out / f"{kind}.pt")
        print(f"{kind}: clean test accuracy {accuracy:.2f}% -> {args.out / f'{kind}.pt'}")


if __name__ == "__main__":
    main()
