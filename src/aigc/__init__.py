"""AIGC Studio: train, evaluate, serve and tune generative models on your own data.

The public API is small; heavy modules (torch, transformers) load only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
