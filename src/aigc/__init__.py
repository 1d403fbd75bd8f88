"""AIGC Studio: train, evaluate, serve and tune generative models on your own data.

The public API is small; heavy modules (torch, transformers) load only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load(path: str | Path) -> Any:
    """Load a trained model artifact (a run directory) with no outside flags.

    Returns what `aigc.registry.load_artifact` returns (the rebuilt model, its config and
    tokenizer); a later version returns a Generator object.
    """
    from aigc.registry import load_artifact

    return load_artifact(path)


__all__ = ["__version__", "load"]
