"""AIGC Studio: train, evaluate, serve and tune generative models on your own data.

The public API is small; heavy modules (torch, transformers) load only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

IMAGE_FAMILIES = ("diffusion", "gan", "vae")


def load(spec: str | Path, **kwargs: Any) -> Any:
    """The generator for a trained run directory or a pretrained `hf:<dir or hub id>` model.

    Text runs (gpt, lstm) and transformers causal LMs give a `TextGenerator`
    (`.generate(prompt, **params)`, `.stream(...)`); music runs (a gpt on music events) a
    `MusicGenerator` (`.generate(key=, meter=, style=, bars=, n=, seed=)`); image runs (diffusion,
    gan, vae) and diffusers pipelines an `ImageGenerator`; a sentiment classifier run its
    classifier (`.predict(texts)`).
    Everything is rebuilt from the directory alone. `kwargs` go to the generator's loader
    (e.g. `dtype=torch.bfloat16` for text).
    """
    import json

    spec = str(spec)
    local = Path(spec.removeprefix("hf:")).expanduser()
    if spec.startswith("hf:") and (local / "model_index.json").is_file():  # a diffusers pipeline
        from aigc.generation.image import ImageGenerator

        return ImageGenerator.load(spec, **kwargs)
    family = None
    if not spec.startswith("hf:") and (local / "config.json").is_file():
        family = json.loads((local / "config.json").read_text(encoding="utf-8")).get("family")
    if family in IMAGE_FAMILIES:
        from aigc.generation.image import ImageGenerator

        return ImageGenerator.load(local, **kwargs)
    if family == "classifier":
        from aigc.evaluation.sentiment import load_classifier

        return load_classifier(local)
    if family is not None:
        from aigc.generation.music import is_music_run

        if is_music_run(local):  # a gpt trained on music events (tokenizer.json "kind": "music")
            from aigc.generation.music import MusicGenerator

            return MusicGenerator.from_artifact(local, **kwargs)
    from aigc.generation import load_generator  # text runs, transformers folders, clear errors

    return load_generator(spec, **kwargs)


def sentiment(texts: str | list[str], model: str | Path | None = None) -> Any:
    """Label + probability for a text, or a list of them, with a trained classifier.

    `model`: a classifier run directory; default the newest classifier under $AIGC_HOME/models
    or ./runs. See `aigc.evaluation.sentiment.sentiment`.
    """
    from aigc.evaluation.sentiment import sentiment as _sentiment

    return _sentiment(texts, model=model)


def evaluate(run: str | Path, data: str | Path | None = None, n: int = 1000, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a trained run on its data: metrics beside a real-vs-real floor, written to
    `run/eval/report.json` (+ .md, PNGs) and linked from its card.md. See
    `aigc.evaluation.run.evaluate` for the options (seed, out, classifier, sampler settings)."""
    from aigc.evaluation.run import evaluate as _evaluate

    return _evaluate(run, data=data, n=n, **kwargs)


def tune(
    model: str | Path,
    out: str | Path | None = None,
    method: str | None = None,
    db: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Tune a model on its feedback in the store (`db`: URL or SQLite path; default the usual
    store) and publish it as the model's next version; returns the report. Text: dpo, kto or sft;
    images (diffusion runs): rwr. See `aigc.tuning.tune` for the options (overrides, scorer, ...)."""
    from aigc.feedback.store import Store
    from aigc.tuning import tune as _tune

    with Store.open(db, create=False) as store:
        return _tune(model, out, store=store, method=method, **{"progress": False, **kwargs})


__all__ = ["__version__", "evaluate", "load", "sentiment", "tune"]
