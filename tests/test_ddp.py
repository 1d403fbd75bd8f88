"""DDP: `aigc train` under torchrun with 2 CPU processes (gloo) matches one process with the same
global batch: each rank trains on its half of the same windows and DDP averages the gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aigc.training.metrics import read_metrics
from serve_helpers import TEXT

ARGS = [
    "--preset", "auto",
    "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=32", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
    "--set", "train.log_interval=1", "--set", "train.eval_interval=3", "--set", "train.eval_batches=2",
    "--set", "train.precision=fp32", "--set", "train.peak_flops=1e9", "--set", "sample.num=0",
    "--max-steps", "6",
]  # fmt: skip


def make_prepared(tmp_path: Path) -> Path:
    from aigc.data import prepare_text

    src = tmp_path / "data.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_text(str(src), tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    data = make_prepared(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["train", "gpt", "--data", str(data), *ARGS]
    single = subprocess.run(
        [sys.executable, "-m", "aigc", *train, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "aigc",
    ]
    ddp = subprocess.run(
        [*launcher, *train, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in ddp.stderr

    one, two = (
        read_metrics(tmp_path / "one" / "metrics.jsonl"),
        read_metrics(tmp_path / "two" / "metrics.jsonl"),
    )
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]  # rank 0 logs once
    for a, b in zip(one, two, strict=True):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-4)
    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)
