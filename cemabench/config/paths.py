"""Where cemabench keeps what it generates and caches: ``$CEMABENCH_CACHE``, else ``~/.cache/cemabench``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of cemabench's cache (the miniature's generated data, training artefacts)."""
    return Path(os.environ.get("CEMABENCH_CACHE") or Path.home() / ".cache" / "cemabench")


def _hugging_face(sub: str, variable: str) -> Path:
    base = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.environ.get(variable) or Path(base) / sub)


def weight_caches() -> list[Path]:
    """Where the zoos keep the weights they fetched: torch hub's checkpoints (torchvision's) and Hugging Face's hub
    (timm's), not the rest of those caches (Hugging Face's token lies beside its hub)."""
    import torch  # (only where asked: this module is read by every command)

    return [Path(torch.hub.get_dir()) / "checkpoints", _hugging_face("hub", "HF_HUB_CACHE")]


def dataset_caches() -> list[Path]:
    """Where Hugging Face's datasets library keeps the datasets it prepared (what a dataset plugin built on it
    reads)."""
    return [_hugging_face("datasets", "HF_DATASETS_CACHE")]
