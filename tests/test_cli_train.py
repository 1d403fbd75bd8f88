"""`aigc train` and `aigc models` through the CLI: help, a smoke run, user errors as one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import TEXT

TINY = [
    "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16",
    "--set", "model.block_size=16", "--set", "train.batch_size=4", "--set", "train.eval_batches=2",
    "--set", "train.peak_flops=1e9", "--set", "sample.num=1", "--set", "sample.tokens=10",
]  # fmt: skip


@pytest.fixture
def prepared(tmp_path) -> Path:
    from aigc.data import prepare_text

    src = tmp_path / "data.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_text(str(src), tmp_path / "data")
    return tmp_path / "data"


def test_train_help(run_cli):
    code, out, _ = run_cli("train", "--help")
    assert code == 0
    for option in (
        "--data",
        "--out",
        "--preset",
        "--set",
        "--max-steps",
        "--max-time",
        "--resume",
        "--init-from",
    ):
        assert option in out
    assert "gpt" in out and "lstm" in out


def test_models_help(run_cli):
    code, out, _ = run_cli("models", "--help")
    assert code == 0 and "DIRECTORY" in out.upper()


def test_train_then_list(run_cli, prepared, tmp_path):
    code, out, err = run_cli(
        "train", "gpt", "--data", prepared, "--out", tmp_path / "runs" / "g", *TINY, "--max-steps", "2"
    )
    assert code == 0, err
    assert "trained gpt: 2 steps" in out and "best val loss" in out
    code, out, _ = run_cli("models", tmp_path / "runs")
    row = next(line for line in out.splitlines() if "│ g " in line)
    assert code == 0 and "gpt" in row and "4,784" in row and " 2 " in row


def test_unknown_family_is_one_line(run_cli, prepared, tmp_path):
    code, _, err = run_cli("train", "transformer-xl", "--data", prepared, "--out", tmp_path / "r")
    assert code == 1 and "unknown model family 'transformer-xl'; valid families: " in err
    assert "gpt" in err and "lstm" in err
    assert "Traceback" not in err


def test_missing_data_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli(
        "train", "gpt", "--data", tmp_path / "nothing", "--out", tmp_path / "r", "--max-steps", "1"
    )
    assert code == 1 and "prepared data directory" in err and "aigc data prepare" in err


def test_bad_override_lists_valid_keys(run_cli, prepared, tmp_path):
    code, _, err = run_cli(
        "train", "gpt", "--data", prepared, "--out", tmp_path / "r", "--set", "train.lrr=1"
    )
    assert code == 1 and "unknown config key train.lrr" in err and "lr" in err


def test_non_empty_out_needs_overwrite_or_resume(run_cli, prepared, tmp_path):
    args = ["train", "gpt", "--data", prepared, "--out", tmp_path / "r", *TINY, "--max-steps", "1"]
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args)
    assert code == 1 and "already holds a training run; pass --resume to continue it, --overwrite" in err
    assert run_cli(*args, "--overwrite")[0] == 0


def test_resume_with_changed_model_shows_the_difference(run_cli, prepared, tmp_path):
    args = ["train", "gpt", "--data", prepared, "--out", tmp_path / "r", *TINY, "--max-steps", "2"]
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args, "--set", "model.n_layer=2", "--resume")
    assert code == 1 and "cannot resume" in err and "model.n_layer: 1 -> 2" in err


def test_out_under_a_file_is_one_line(run_cli, prepared, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(
        "train", "gpt", "--data", prepared, "--out", tmp_path / "f" / "t", *TINY, "--max-steps", "1"
    )
    assert code == 1 and "Traceback" not in err
    assert (
        f"cannot write {tmp_path / 'f' / 't'} ({tmp_path / 'f'} is a file, not a directory); pick another --out"
        in err
    )


def test_ctrl_c_saves_a_checkpoint_and_exits_130(run_cli, prepared, tmp_path, monkeypatch, default_sigint):
    import os
    import signal

    from aigc.training.text import TextTask

    real = TextTask.training_step

    def ctrl_c_at_3(self, ctx):
        if ctx.step_num == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, ctx)

    monkeypatch.setattr(TextTask, "training_step", ctrl_c_at_3)
    args = ["train", "gpt", "--data", prepared, "--out", tmp_path / "r", *TINY, "--max-steps", "6"]
    code, _, err = run_cli(*args)
    assert code == 130 and "interrupted at step 3; checkpoint saved; continue with --resume" in err
    assert "Traceback" not in err and "error:" not in err
    monkeypatch.setattr(TextTask, "training_step", real)
    code, out, err = run_cli(*args, "--resume")
    assert code == 0 and "(step 3)" in err and "trained gpt: 6 steps" in out


def test_resume_without_a_checkpoint_says_so(run_cli, prepared, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"family": "gpt", "model": {}}')
    code, _, err = run_cli("train", "gpt", "--data", prepared, "--out", tmp_path / "r", *TINY, "--resume")
    assert code == 1 and "no checkpoint in" in err and "stopped before its first save" in err
    assert "config differs" not in err
