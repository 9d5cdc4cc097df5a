"""Where ortllm keeps its data: `$ORTLLM_HOME` or the platform's user data folder."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def ortllm_home() -> Path:
    """The root folder for models, caches and sessions (created on demand)."""
    env = os.environ.get("ORTLLM_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("ortllm", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir() -> Path:
    """Downloads and intermediate files that can be re-created (safe to delete); `$ORTLLM_CACHE` moves it."""
    env = os.environ.get("ORTLLM_CACHE")
    path = Path(env).expanduser() if env else ortllm_home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
