"""Training logs: `metrics.jsonl`, the loss-curve PNG, the MFU ceiling, progress, TensorBoard.

`metrics.jsonl` holds one JSON object per line: train records
`{"kind": "train", "step", "loss", "lr", "grad_norm", "<unit>_per_s", "mfu", "time"}` every
`log_interval` steps and eval records `{"kind": "eval", "step", "val_loss", "val_bpb", ...}`.
On resume the file is cut back to the checkpoint's step so it reads as one uninterrupted run.

MFU (model FLOPs utilisation) = achieved training FLOP/s / the device's matmul ceiling. The
ceiling is measured once per (device, dtype, threads) with a square GEMM and cached in
`$AIGC_HOME/peak_flops.json` (PERFORMANCE-NOTES: fp32 ~ 165-190, bf16 ~ 800-850 GFLOP/s on the
2-core Zen 5 machine); `train.peak_flops` or `$AIGC_PEAK_FLOPS` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from aigc.utils.io import atomic_write_json, atomic_write_text, read_json
from aigc.utils.paths import aigc_home

# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Append-only JSONL metrics file (written by rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------- loss curve


def plot_loss(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Train and val loss against step as a PNG; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'aigc[plot]'); no loss.png", stacklevel=2)
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def save(p: Path) -> None:
        fig.savefig(p, format="png")

    from aigc.utils.io import atomic_write

    atomic_write(png_path, save)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------- MFU ceiling


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device` (best of `reps`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float:
    """The matmul ceiling used for MFU: override, $AIGC_PEAK_FLOPS, cache, or a fresh measurement."""
    if override:
        return override
    if os.environ.get("AIGC_PEAK_FLOPS"):
        return float(os.environ["AIGC_PEAK_FLOPS"])
    key = f"{device.type}:{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}:{dtype}:{torch.get_num_threads()}"
    cache = aigc_home() / "peak_flops.json"
    table = {}
    if cache.is_file():
        try:
            table = read_json(cache)
        except (OSError, ValueError):
            table = {}
    if key not in table:
        table[key] = measure_matmul_flops(device, dtype)
        with contextlib.suppress(OSError):  # a read-only home only costs a re-measurement next time
            atomic_write_json(cache, table)
    return float(table[key])


# ----------------------------------------------------------------------------- progress + TensorBoard


class Progress:
    """A Rich progress bar with ETA on stderr; silent when stderr is not a terminal."""

    def __init__(self, total_steps: int | None, max_time: float | None, enabled: bool = True):
        self.bar = None
        if not (enabled and sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        # with a time budget the bar tracks seconds; otherwise steps
        self.by_time = max_time is not None and total_steps is None
        self.task = self.bar.add_task("train", total=max_time if self.by_time else total_steps, info="")
        self.bar.start()

    def update(self, step: int, elapsed: float, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=elapsed if self.by_time else step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class TensorBoard:
    """Scalars to TensorBoard when asked for and installed (else one warning)."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        except ImportError:
            warnings.warn("train.tensorboard is on but tensorboard is not installed; skipping", stacklevel=2)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        prefix = "val" if record.get("kind") == "eval" else "train"
        for k, v in record.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
