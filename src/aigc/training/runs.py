"""Find trained run directories and summarise them (for `aigc models`), reading only JSON and
safetensors headers (no weights are loaded)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from aigc.training.metrics import read_metrics


@dataclass
class RunInfo:
    path: Path
    family: str
    params: int
    steps: int | None
    val_loss: float | None  # the best validation loss logged


def count_params(weights: Path) -> int:
    """Number of values in a safetensors file, from its header."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def run_info(path: Path) -> RunInfo | None:
    """Summary of a run directory; None if `path` is not one (needs config.json + model.safetensors)."""
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not (cfg_file.is_file() and weights.is_file()):
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        params = count_params(weights)
    except (OSError, ValueError, RuntimeError):
        return None
    records = read_metrics(path / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    steps = max((r.get("step", 0) for r in records), default=None)
    return RunInfo(path, str(cfg.get("family", "?")), params, steps, min(vals) if vals else None)


def list_runs(directory: str | Path) -> list[RunInfo]:
    """Runs in `directory` itself and in its sub-directories (two levels deep), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        return []
    candidates = [root, *root.glob("*"), *root.glob("*/*")]
    found = [info for p in sorted(set(candidates)) if p.is_dir() and (info := run_info(p)) is not None]
    return found
