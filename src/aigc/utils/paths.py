"""Where AIGC Studio keeps its own files."""

from __future__ import annotations

import os
from pathlib import Path


def aigc_home() -> Path:
    """`$AIGC_HOME`, default `~/.aigc`: the store, caches, downloads, models for `aigc serve`."""
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".aigc")
