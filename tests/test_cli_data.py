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


# ---------------------------------------------------------------------- --tokenizer RUN (fine-tuning)

FINE_TUNE_TEXT = "what soft light through yonder window breaks?\n" * 40  # only characters the run knows


@pytest.fixture
def text_run(tmp_path):
    from serve_helpers import write_text_run

    return write_text_run(tmp_path / "run", block_size=16)  # the shape TINY_GPT asks for


def test_prepare_with_a_runs_tokenizer_then_fine_tune_and_eval(run_cli, text_run, tmp_path):
    from serve_helpers import TINY_GPT

    tiny = [a for o in TINY_GPT for a in ("--set", o)]
    src = tmp_path / "more.txt"
    src.write_text(FINE_TUNE_TEXT, encoding="utf-8")
    # a fresh vocabulary: --init-from and eval refuse it, and eval says how to prepare the data
    code, _, err = run_cli("data", "prepare", src, "--out", tmp_path / "own")
    assert code == 0, err
    code, _, err = run_cli("eval", "--model", text_run, "--data", tmp_path / "own", "--n", "2")
    assert code == 1 and "(aigc data prepare SOURCE --out DIR --tokenizer RUN_DIR)" in err
    code, _, err = run_cli(
        "train", "gpt", "--data", tmp_path / "own", "--out", tmp_path / "ft0", "--init-from", text_run, *tiny
    )
    assert code == 1 and f"--tokenizer {text_run})" in err

    code, out, err = run_cli("data", "prepare", src, "--out", tmp_path / "d", "--tokenizer", text_run)
    assert code == 0, err
    assert f"char tokenizer with vocab 37 from {text_run.resolve() / 'tokenizer.json'}" in out
    code, out, err = run_cli(
        "train", "gpt", "--data", tmp_path / "d", "--out", tmp_path / "ft", "--init-from", text_run,
        *tiny, "--max-steps", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "trained gpt: 2 steps" in out
    code, out, err = run_cli(
        "eval", "--model", text_run, "--data", tmp_path / "d", "--n", "2", "--max-new-tokens", "8"
    )
    assert code == 0, err


@pytest.mark.parametrize(
    "tokenizer, source, message",
    [
        (
            "{tmp}/nope",
            "{corpus}",
            "--tokenizer {tmp}/nope: no such file or directory; give char or bpe, a run",
        ),
        ("{tmp}", "{corpus}", "--tokenizer {tmp}: the directory holds no tokenizer.json; give char or bpe"),
        ("{run}", "{corpus}", "3 character(s) of file {corpus} are not in the char tokenizer at {run}/"),
        ("{run}", "{corpus}", "tokenizer.json: '.' (U+002E), 'T' (U+0054), 'q' (U+0071); remove them"),
        (
            "{run}",
            "{tmp}/letters.txt",
            ": 'C' (U+0043), 'D' (U+0044), 'F' (U+0046), 'G' (U+0047), 'H' (U+0048) and 5 more;",
        ),
        ("{run}", "{tmp}/ids.txt", "'N' (U+004E), '[' (U+005B), ']' (U+005D); remove them"),  # [NUMBER]
        ("{run}", "{tmp}/ids.txt", "; PII masks such as [NUMBER] count too: --no-scrub-pii keeps the text"),
    ],
)
def test_prepare_with_a_bad_tokenizer_is_one_line(
    run_cli, corpus, text_run, tmp_path, tokenizer, source, message
):
    (tmp_path / "letters.txt").write_text("CDFGHIJKLN light\n" * 20, encoding="utf-8")
    (tmp_path / "ids.txt").write_text("light 1234567890\n" * 20, encoding="utf-8")
    names = {"{tmp}": str(tmp_path), "{run}": str(text_run), "{corpus}": str(corpus)}
    for k, v in names.items():
        tokenizer, source, message = tokenizer.replace(k, v), source.replace(k, v), message.replace(k, v)
    code, out, err = run_cli("data", "prepare", source, "--out", tmp_path / "out", "--tokenizer", tokenizer)
    assert code == 1 and out == ""
    error = err.strip().splitlines()[-1]  # (after the progress lines, when the source was read)
    assert error.startswith("error: ") and message in error and err.count("error") == 1, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- an --out that cannot be written


def test_out_under_a_file_is_one_line(run_cli, corpus, tmp_path):
    code, out, err = run_cli("data", "prepare", corpus, "--out", corpus / "x")
    assert code == 1 and "Traceback" not in err and err.count("error:") == 1 and not out
    assert f"cannot write {corpus / 'x'} ({corpus} is a file, not a directory); pick another --out" in err


def test_unwritable_out_is_one_line(run_cli, corpus, tmp_path, monkeypatch):
    import errno
    import tempfile

    def denied(*a, **k):  # as root chmod stops nothing: fail the way a read-only parent does
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code, _, err = run_cli("data", "prepare", corpus, "--out", tmp_path / "ro" / "x")
    assert code == 1 and "Traceback" not in err and err.count("error:") == 1
    assert f"cannot write {tmp_path / 'ro' / 'x'} (permission denied); pick another --out" in err
    assert not (tmp_path / "ro").exists() or not list((tmp_path / "ro").iterdir())


def test_stale_staging_dirs_of_a_killed_prepare_are_removed(run_cli, corpus, tmp_path):
    import fcntl
    import os

    stale = tmp_path / ".data.abc123.tmp"  # left by a kill -9: nobody holds its lock
    live = tmp_path / ".data.live99.tmp"  # another process still building: locked
    for d in (stale, live):
        d.mkdir()
        (d / "train.bin").write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code, _, err = run_cli("data", "prepare", corpus, "--out", tmp_path / "data")
    finally:
        os.close(fd)
    assert code == 0, err
    assert not stale.exists() and live.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data.") and p != live]
