"""`aigc data prepare|list|show` through the CLI: output, exit codes, one-line errors."""

from __future__ import annotations

import pytest


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    return path


@pytest.mark.parametrize("args", [["data"], ["data", "prepare"], ["data", "list"], ["data", "show"]])
def test_help(run_cli, args):
    code, out, _ = run_cli(*args, "--help")
    assert code == 0 and "Usage" in out


def test_prepare_then_show(run_cli, corpus, tmp_path):
    code, out, err = run_cli("data", "prepare", corpus, "--out", tmp_path / "out", "--val-fraction", "0.2")
    assert code == 0, err
    assert "1,720 train / 430 val tokens" in out and "char tokenizer with vocab" in out
    code, out, _ = run_cli("data", "show", tmp_path / "out", "--tokens", "20")
    assert code == 0
    assert "train_tokens: 1720" in out and "To be, or not to be," in out


def test_prepare_bpe_with_flags_and_set(run_cli, corpus, tmp_path):
    code, out, err = run_cli(
        "data", "prepare", corpus, "-o", tmp_path / "out", "--tokenizer", "bpe", "--vocab-size", "270",
        "--set", "data.seed=3", "--scrub-pii", "--dedup",
    )  # fmt: skip
    assert code == 0, err
    assert "bpe tokenizer with vocab 270" in out and "PII masked: 0 e-mails" in out
    import json

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["seed"], config["scrub_pii"], config["vocab_size"]) == (3, True, 270)


def test_list(run_cli, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_PATH", "")
    code, out, _ = run_cli("data", "list")
    assert code == 0
    for name in ("python-stdlib", "shakespeare", "tang-poems", "--download"):
        assert name in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "not found: no such file or directory"),
        (["shakspeare"], "unknown built-in corpus 'shakspeare'; built-ins: python-stdlib"),
        (["{corpus}", "--kind", "video"], "unknown --kind 'video'; kinds available here: text"),
        (["{corpus}", "--tokenizer", "bpe", "--vocab-size", "100"], "smaller than the byte alphabet"),
        (["{corpus}", "--set", "colour=red"], "unknown config key colour; valid keys"),
        (["{corpus}", "--set", "val_fraction=x"], "val_fraction: expected float"),
        (["{corpus}", "--unknown", "maybe"], "unknown: expected one of 'error' | 'unk'"),
    ],
)
def test_errors_are_one_line_and_exit_1(run_cli, corpus, tmp_path, args, message):
    args = [a.replace("{corpus}", str(corpus)) for a in args]
    code, out, err = run_cli("data", "prepare", *args, "--out", tmp_path / "out")
    assert code == 1
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out(run_cli, corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    code, _, err = run_cli("data", "prepare", corpus, "--out", tmp_path / "out")
    assert code == 1 and "pass --overwrite" in err
    code, _, _ = run_cli("data", "prepare", corpus, "--out", tmp_path / "out", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "x").exists()


def test_show_rejects_a_non_data_dir(run_cli, tmp_path):
    code, _, err = run_cli("data", "show", tmp_path)
    assert code == 1 and "is not a prepared text data set: missing train.bin" in err


def test_kind_image_rejects_text_options(run_cli, corpus, tmp_path):
    import importlib.util

    if importlib.util.find_spec("aigc.data.images") is None:
        pytest.skip("image data module not installed")
    code, _, err = run_cli(
        "data", "prepare", corpus, "--kind", "image", "--tokenizer", "bpe", "-o", tmp_path / "o"
    )
    assert code == 1 and "--tokenizer: text options do not apply to --kind image" in err
