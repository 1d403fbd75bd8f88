"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed with --resume logs the
same loss sequence as an uninterrupted run (CPU, fp32 and bf16)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc.training import checkpoint as ckpt
from aigc.training.metrics import read_metrics
from serve_helpers import TEXT

STEPS = 60


def env() -> dict[str, str]:
    """The test's environment (AIGC_HOME in tmp_path), one thread: same in every run, no oversubscription."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


ARGS = [
    "--preset", "auto",
    "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=32", "--set", "model.dropout=0.1",  # dropout: the global RNG must resume too
    "--set", "train.batch_size=8", "--set", "train.warmup_steps=10", "--set", "train.log_interval=1",
    "--set", "train.eval_interval=20", "--set", "train.eval_batches=2", "--set", "train.ckpt_interval=10",
    "--set", "train.keep_last=2", "--set", "train.peak_flops=1e9", "--set", "sample.num=0",
    "--max-steps", str(STEPS),
]  # fmt: skip


def make_prepared(tmp_path: Path) -> Path:
    from aigc.data import prepare_text

    src = tmp_path / "data.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_text(str(src), tmp_path / "data")
    return tmp_path / "data"


def cli(data: Path, out: Path, precision: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aigc", "train", "gpt", "--data", str(data), "--out", str(out),
            *ARGS, "--set", f"train.precision={precision}", *extra]  # fmt: skip


def losses(run: Path) -> list[tuple[str, int, float]]:
    return [
        (r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run / "metrics.jsonl")
    ]


def kill_after_first_checkpoint(cmd: list[str], run: Path) -> int:
    """Start `cmd`, SIGKILL it once a checkpoint exists (mid-run); return the checkpoint's step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "checkpoints" / ckpt.LATEST).is_file():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (
        f"run was not killed mid-way: {proc.stderr.read().decode()[-2000:]}"
    )
    path = ckpt.latest_checkpoint(run / "checkpoints")
    assert path is not None
    return ckpt.load_checkpoint(path)[1]["step"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, precision):
    from aigc.training.trainer import bf16_supported

    if precision == "bf16" and not bf16_supported(__import__("torch").device("cpu")):
        pytest.skip("this CPU has no bf16 support")
    data = make_prepared(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(cli(data, a, precision), check=True, capture_output=True, env=env())

    step = kill_after_first_checkpoint(cli(data, b, precision), b)
    assert 0 < step < STEPS
    done = subprocess.run(cli(data, b, precision, "--resume"), capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr

    expected, got = losses(a), losses(b)
    assert len(expected) == STEPS + STEPS // 20  # every step logged, plus the evaluations
    assert got == expected  # identical floats, not just close


OVERRIDES = [a for a in ARGS[2:-2] if a != "--set"]  # the same run as above, as --set values


def test_ctrl_c_saves_the_step_reached_and_resume_is_exact(tmp_path, monkeypatch, default_sigint):
    """SIGINT mid-step: the step completes, is checkpointed (not a multiple of ckpt_interval), and
    --resume continues to exactly the losses of an uninterrupted run (fast, in-process)."""
    from aigc.training.text import TextTask, train_text
    from aigc.training.trainer import TrainingInterrupted

    data = make_prepared(tmp_path)
    steps, at = 30, 13

    def run(out: Path, resume: bool = False):
        over = [*OVERRIDES, "train.precision=fp32"]
        return train_text("gpt", data, out, overrides=over, max_steps=steps, resume=resume, progress=False)

    run(tmp_path / "a")
    real = TextTask.training_step

    def ctrl_c_during(self, ctx):
        if ctx.step_num == at:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as a user's Ctrl-C would
        return real(self, ctx)

    monkeypatch.setattr(TextTask, "training_step", ctrl_c_during)
    with pytest.raises(
        TrainingInterrupted, match=rf"interrupted at step {at}; checkpoint saved; continue with --resume"
    ):
        run(tmp_path / "b")
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))[1]["step"] == at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(TextTask, "training_step", real)
    assert run(tmp_path / "b", resume=True).steps == steps
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
