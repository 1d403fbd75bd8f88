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


def sentiment(texts: str | list[str], model: str | Path | None = None) -> Any:
    """Label + probability for a text, or a list of them, with a trained classifier.

    `model`: a classifier run directory; default the newest classifier under $AIGC_HOME/models
    or ./runs. See `aigc.evaluation.sentiment.sentiment`.
    """
    from aigc.evaluation.sentiment import sentiment as _sentiment

    return _sentiment(texts, model=model)


__all__ = ["__version__", "load"]
