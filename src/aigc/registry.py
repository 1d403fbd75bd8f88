"""Find and load model artifacts: a trained run directory -> model + tokenizer, ready to use.

An artifact (docs/internals.md "Artifacts") is a directory with `config.json` =
`{"family": ..., "model": {...}, ...}`, `model.safetensors` and, for text models, `tokenizer.json`.
The config alone rebuilds the model (no outside flags); weights come only from safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from aigc.errors import AigcError

TEXT_FAMILIES = ("gpt", "lstm")
IMAGE_FAMILIES = ("diffusion", "vae", "gan")
# what a run of each family is, for a message naming a run passed where another kind is needed
RUN_KINDS = {"gpt": "a text model", "lstm": "a text model", "diffusion": "an image model",
             "vae": "an image model", "gan": "an image model", "classifier": "a sentiment classifier",
             "image_classifier": "an image classifier (an evaluation feature network)"}  # fmt: skip


@dataclass
class Artifact:
    """A loaded run: its directory, family, resolved config (dict), model (eval mode), tokenizer."""

    path: Path
    family: str
    config: dict[str, Any]
    model: nn.Module
    tokenizer: Any | None


def _not_an_artifact(path: Path, what: str) -> AigcError:
    hint = ""
    if (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and not (path / "model.safetensors").is_file()
    ):
        hint = " (a transformers folder? load it as hf:<dir>)"
    return AigcError(
        f"{path} is not a model artifact: {what}{hint}; pass a run directory made by `aigc train ... --out DIR` "
        "(config.json, model.safetensors, tokenizer.json)"
    )


def run_family(path: str | Path) -> str | None:
    """The `family` in a directory's config.json: set in every run of ours; None for anything else
    (no config.json, not JSON, a transformers folder's config)."""
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    family = cfg.get("family") if isinstance(cfg, dict) else None
    return family if isinstance(family, str) else None


def run_kind(path: str | Path) -> str | None:
    """What a run directory holds: "text" (gpt, lstm), "music" (a gpt on music events), "image"
    (diffusion, vae, gan), another family's name (e.g. "classifier"), or None if it is not a run."""
    family = run_family(path)
    if family in TEXT_FAMILIES:
        from aigc.tokenizers.music import is_music_tokenizer_file

        return "music" if is_music_tokenizer_file(Path(path).expanduser()) else "text"
    return "image" if family in IMAGE_FAMILIES else family


def describe_run(path: str | Path) -> str:
    """`a diffusion run (an image model)`: a run's family and what it is, for messages."""
    family, kind = run_family(path), run_kind(path)
    what = (
        "a music model" if kind == "music" else RUN_KINDS.get(family or "", "a model this aigc does not know")
    )
    return f"{'an' if (family or 'x')[0] in 'aeiou' else 'a'} {family} run ({what})"


def read_artifact_config(path: str | Path) -> dict[str, Any]:
    """The run config of an artifact directory, checked for `family` and `model`."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AigcError(f"model {path} not found: pass the directory of a trained run")
    if not (path / "config.json").is_file():
        raise _not_an_artifact(path, "no config.json")
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AigcError(f"{path}/config.json is not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(cfg, dict) or "family" not in cfg or "model" not in cfg:
        if isinstance(cfg, dict) and "architectures" in cfg:
            raise AigcError(f"{path} is a transformers folder, not an aigc run; load it as hf:{path}")
        raise _not_an_artifact(path, "config.json lacks 'family' or 'model'")
    return cfg


def load_artifact(path: str | Path, device: str | None = None) -> Artifact:
    """Rebuild the model of a run directory from its config and load its weights and tokenizer.

    Raises AigcError naming what is missing when `path` is not an artifact.
    """
    from safetensors.torch import load_model

    from aigc.models import MODELS, build_model

    path = Path(path).expanduser()
    cfg = read_artifact_config(path)
    family = cfg["family"]
    if family not in MODELS:
        raise AigcError(
            f"{path} holds a {family!r} model, which this aigc cannot build; known families: {', '.join(sorted(MODELS))}"
        )
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise _not_an_artifact(path, "no model.safetensors (did the run finish a checkpoint?)")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from aigc.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(path)
    elif family in TEXT_FAMILIES:
        raise _not_an_artifact(path, f"no tokenizer.json (a {family} model needs its tokenizer)")
    model = build_model(family, cfg["model"])
    try:
        # load_model restores tied weights saved once (safetensors' save_model convention)
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise AigcError(
            f"{weights} does not match the model in config.json ({first}); the run directory is damaged "
            "or mixed from two runs"
        ) from None
    if device is not None:
        model.to(device)
    if tokenizer is not None and tokenizer.vocab_size > getattr(
        model.config, "vocab_size", tokenizer.vocab_size
    ):
        raise AigcError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    return Artifact(path=path, family=family, config=cfg, model=model.eval(), tokenizer=tokenizer)


__all__ = ["Artifact", "describe_run", "load_artifact", "read_artifact_config", "run_family", "run_kind"]
