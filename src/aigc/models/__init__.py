"""Model families: one file each, a config dataclass plus an `nn.Module`.

`MODELS` maps a family name to `(ConfigClass, ModelClass)`; `build_model` turns a config (dict or
dataclass) into a model. See docs/internals.md "Models" for the interface every family keeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from aigc.errors import AigcError
from aigc.models.gpt import GPT, GPTConfig, KVCache
from aigc.models.lstm import LSTMLM, LSTMConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "lstm": (LSTMConfig, LSTMLM),
}


def model_config(family: str, config: dict[str, Any] | Any) -> Any:
    """The family's config dataclass from a dict (strictly validated) or an instance of it."""
    if family not in MODELS:
        raise AigcError(f"unknown model family {family!r}; valid families: {', '.join(sorted(MODELS))}")
    cfg_cls = MODELS[family][0]
    if isinstance(config, cfg_cls):
        return config
    if dataclasses.is_dataclass(config):
        raise AigcError(f"model family {family!r} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    from aigc.config import from_dict

    return from_dict(cfg_cls, dict(config), prefix="model.")


def build_model(family: str, config: dict[str, Any] | Any) -> nn.Module:
    """Build a freshly initialised model of `family` from its config (dict or dataclass)."""
    cfg = model_config(family, config)
    try:
        return MODELS[family][1](cfg)
    except ValueError as e:  # e.g. vocab_size still 0
        raise AigcError(f"cannot build a {family} model: {e}") from None


__all__ = ["GPT", "LSTMLM", "MODELS", "GPTConfig", "KVCache", "LSTMConfig", "build_model", "model_config"]
