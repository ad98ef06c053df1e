"""Where cemabench keeps what it generates and caches: ``$CEMABENCH_CACHE``, else ``~/.cache/cemabench``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of cemabench's cache (the miniature's generated data, training artefacts)."""
    return Path(os.environ.get("CEMABENCH_CACHE") or Path.home() / ".cache" / "cemabench")
