"""Tune on feedback: ratings -> preference data -> DPO / KTO / SFT -> a new version -> report.

`versions` (find, name and publish model versions), `preference` (store -> training rows),
`text` (`tune_text`: own GPT/LSTM runs and transformers causal LMs), `images` (`tune_images`:
reward-weighted fine-tuning of diffusion runs), `report` (before/after). `tune(...)` picks by the
run's family; the CLI (`aigc tune`) and `aigc.tune` call it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

IMAGE_FAMILIES = ("diffusion", "vae", "gan")


def check_tune_args(model: str | Path, method: str | None, models_dirs: list[Path] | None = None) -> Path:
    """The run directory `tune` would tune, after checking the model exists and `method` suits its
    family: run before the store is opened, so a wrong argument is named first."""
    from aigc.errors import AigcError
    from aigc.tuning.versions import resolve_model
    from aigc.utils.io import read_json

    model_dir = resolve_model(str(model), models_dirs)
    config = model_dir / "config.json"
    family = read_json(config).get("family") if config.is_file() else None
    if method is None:
        return model_dir
    if family in IMAGE_FAMILIES:
        from aigc.tuning.images import METHODS as allowed
        from aigc.tuning.images import REFUSED_METHODS

        if method in REFUSED_METHODS:
            raise AigcError(
                f"--method {method} is not supported for images; use rwr (reward-weighted fine-tuning)"
            )
    else:
        from aigc.tuning.preference import METHODS as allowed
    if method not in allowed:
        kind = "image" if family in IMAGE_FAMILIES else "text"
        raise AigcError(
            f"--method {method!r} is not a tuning method for {kind} models ({model}); allowed: {', '.join(allowed)}"
        )
    return model_dir


def tune(
    model: str | Path,
    out: str | Path | None = None,
    *,
    store: Any,
    method: str | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
    scorer: str | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    models_dirs: list[Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tune any model on its feedback: text runs go to `text.tune_text` (dpo | kto | sft), image
    runs to `images.tune_images` (rwr); the result is published as the model's next version."""
    from aigc.errors import AigcError
    from aigc.tuning.versions import next_version_dir, resolve_model
    from aigc.utils.io import read_json

    model_dir = resolve_model(str(model), models_dirs)
    config = model_dir / "config.json"
    family = read_json(config).get("family") if config.is_file() else None
    if family in IMAGE_FAMILIES:
        from aigc.tuning.images import tune_images

        if preset is not None:
            raise AigcError(
                "image tuning has no presets; set its options with --set train.lr=... / tune.<key>=..."
            )
        extra = [f"tune.scorer={scorer}"] if scorer else []
        kwargs = {"method": method} if method else {}
        return tune_images(model_dir, Path(out) if out else next_version_dir(model_dir), store=store,
                           overrides=[*(overrides or []), *extra], max_steps=max_steps, max_time=max_time,
                           overwrite=overwrite, progress=progress, log=log, **kwargs)  # fmt: skip
    from aigc.tuning.text import tune_text

    return tune_text(model_dir, out, store=store, method=method, overrides=overrides, preset=preset,
                     max_steps=max_steps, max_time=max_time, overwrite=overwrite, progress=progress,
                     scorer=scorer, models_dirs=models_dirs, log=log)  # fmt: skip
