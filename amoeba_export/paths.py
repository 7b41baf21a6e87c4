"""Where models, data and exported artifacts live: a cache outside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$AMOEBA_CACHE`` or ``~/.cache/amoeba-export``; created on first use."""
    root = os.environ.get("AMOEBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "amoeba-export"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_subdir(*parts: str) -> Path:
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
