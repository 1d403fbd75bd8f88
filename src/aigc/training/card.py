"""`card.md`: the model card written at the end of a run (data, config, final metrics, curve, sample)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from aigc.training.task import Task
from aigc.utils.io import atomic_write_text
from aigc.utils.paths import public_config


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_card(
    run_dir: Path,
    run_config: dict[str, Any],
    task: Task,
    final: dict[str, float],
    best_val: float,
    steps: int,
    elapsed: float,
    sample_files: list[Path],
) -> Path:
    """Assemble card.md from the run config, the task's own sections and the final metrics."""
    family = run_config.get("family", "model")
    lines = [f"# {family} model card", ""]
    sections = task.card()
    params = sections.pop("Parameters", None)
    lines += ["## Summary", ""]
    if params:
        lines.append(f"- parameters: {params}")
    lines.append(f"- trained for {steps} steps in {elapsed:.1f} s")
    if not math.isinf(best_val):
        lines.append(f"- best val loss: {best_val:.4f} (weights in model.safetensors)")
    lines.append("")
    if final:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final.items()]
        lines.append("")
    if (run_dir / "loss.png").exists():
        lines += ["## Loss curve", "", "![loss curve](loss.png)", ""]
    for title, body in sections.items():
        lines += [f"## {title}", "", body.rstrip(), ""]
    if sample_files:
        lines += ["## Samples", ""] + [f"- [{p.name}](samples/{p.name})" for p in sample_files] + [""]
    # the config as trained, minus host paths (data.dir, init_from, ...): a card is shown and shared
    lines += ["## Config", "", "```json", json.dumps(public_config(run_config), indent=2), "```", ""]
    return atomic_write_text(run_dir / "card.md", "\n".join(lines))
