"""`aigc generate text` and `aigc chat` on a tiny artifact written in the test."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

CORPUS = "ROMEO: But soft, what light through yonder window breaks?\nUser: Assistant: 春眠不觉晓\n"


@pytest.fixture
def run_dir(tmp_path):
    from safetensors.torch import save_model

    from aigc.models.gpt import GPT, GPTConfig
    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", [CORPUS])
    cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    out = tmp_path / "run"
    out.mkdir()
    save_model(model, str(out / "model.safetensors"))
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")
    return out


def test_help(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps long option names at 80 columns
    for args, word in (
        (["generate", "--help"], "text"),
        (["generate", "text", "--help"], "--model"),
        (["chat", "--help"], "/reset"),
    ):
        code, out, _ = run_cli(*args)
        assert code == 0 and word in out
    code, out, _ = run_cli("generate", "text", "--help")
    for flag in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty",
                 "--no-repeat-ngram-size", "--num-beams", "--seed", "--stop", "--stream", "--n"):  # fmt: skip
        assert flag in out


def test_generate_text_is_reproducible_and_streams(run_cli, run_dir):
    args = [
        "generate",
        "text",
        "--model",
        run_dir,
        "--prompt",
        "ROMEO:",
        "--seed",
        "7",
        "--max-new-tokens",
        "30",
    ]
    code, out1, err = run_cli(*args)
    assert code == 0, err
    assert out1.startswith("ROMEO:") and "seed 7" in err and "tokens/s" in err
    code, out2, _ = run_cli(*args)
    assert out2 == out1
    code, out3, _ = run_cli(*args, "--stream")
    assert code == 0 and out3 == out1


def test_generate_n_json_and_beams(run_cli, run_dir):
    code, out, err = run_cli("generate", "text", "-m", run_dir, "-p", "ROMEO:", "--n", "2", "--seed", "3", "--json",
                             "--max-new-tokens", "5")  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["seed"] for r in rows] == [3, 4] and rows[0]["model"] == str(run_dir)
    code, out, err = run_cli("generate", "text", "-m", run_dir, "-p", "ROMEO:", "--num-beams", "3",
                             "--no-repeat-ngram-size", "2", "--max-new-tokens", "8")  # fmt: skip
    assert code == 0, err


def test_generate_errors_are_one_line(run_cli, run_dir, tmp_path):
    code, _, err = run_cli("generate", "text", "-m", run_dir, "--top-p", "1.5")
    assert code == 1 and "top_p=1.5" in err and "(0, 1]" in err
    code, _, err = run_cli("generate", "text", "-m", run_dir, "--num-beams", "2", "--top-k", "5")
    assert code == 1 and "num_beams" in err
    # refused like --top-k with beams, not silently set to 0
    code, _, err = run_cli("generate", "text", "-m", run_dir, "--num-beams", "3", "--temperature", "1.5")
    assert code == 1 and "--num-beams 3 cannot be combined with --temperature 1.5" in err
    for bad in ("0", "-2", "65"):  # (--best-of 0 and -2 generated one plain sample)
        code, _, err = run_cli("generate", "text", "-m", run_dir, "--best-of", bad)
        assert code == 1 and f"--best-of {bad} is out of range; allowed: 1..64" in err, err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("generate", "text", "-m", tmp_path / "empty")
    assert code == 1 and "missing config.json" in err
    code, _, err = run_cli("generate", "text", "-m", run_dir, "-p", "ROMEO: §你好§")
    assert (
        code == 1
        and "3 character(s) not in the char tokenizer's vocabulary, which this model cannot encode: '§' (U+00A7), '你' (U+4F60), '好'"
        in err
    )
    assert (
        "fixed when the model's data was prepared" in err and "use --unknown" not in err
    )  # generate has no --unknown


def test_a_run_that_is_not_a_text_model_is_one_line(run_cli, run_dir, tmp_path):
    """An image or classifier run given where a text model is needed names what it is (it fell
    through to the transformers loader: a 60-line traceback), for every command that loads one."""
    from serve_helpers import write_image_run

    image = write_image_run(tmp_path / "digits")
    clf = tmp_path / "clf"  # a sentiment classifier run as the loader sees it (config.json first)
    clf.mkdir()
    (clf / "config.json").write_text(json.dumps({"family": "classifier", "model": {}, "labels": ["a", "b"]}))
    (clf / "model.safetensors").write_bytes(b"")
    text = tmp_path / "out.txt"
    text.write_text("ROMEO: But soft")
    commands = [("generate", "text", "-m", "{m}", "-p", "x"), ("detect", "text", text, "--model", "{m}"),
                ("verify", text, "--model", "{m}"), ("generate", "text", "-m", "hf:{m}", "-p", "x")]  # fmt: skip
    for run, words in ((image, ["a diffusion run (an image model)", "`aigc generate image`"]),
                       (clf, ["a classifier run (a sentiment classifier)", "`aigc sentiment`"])):  # fmt: skip
        for args in commands:
            code, _, err = run_cli(*[str(a).replace("{m}", str(run)) for a in args])
            assert code == 1 and len(err.strip().splitlines()) == 1, (args, err)
            assert "not a text model" in err and "text run (gpt, lstm)" in err and "hf:<id>" in err
            assert all(w in err for w in words), err
    # our text run as hf:, our run without its tokenizer, a folder that is no model: one line each
    code, _, err = run_cli("generate", "text", "-m", f"hf:{run_dir}", "-p", "R")
    assert code == 1 and "a gpt run (a text model) of aigc, not a transformers folder; drop hf:" in err
    (run_dir / "tokenizer.json").unlink()
    code, _, err = run_cli("generate", "text", "-m", run_dir, "-p", "R")
    assert code == 1 and "missing tokenizer.json" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"a": 1}')
    (junk / "model.safetensors").write_bytes(b"")
    for spec in (junk, f"hf:{junk}"):
        code, _, err = run_cli("generate", "text", "-m", spec, "-p", "R")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "names no aigc 'family'" in run_cli("generate", "text", "-m", junk, "-p", "R")[2]
    assert "has no tokenizer" in run_cli("generate", "text", "-m", f"hf:{junk}", "-p", "R")[2]


def test_a_long_prompt_warns_once(run_cli, run_dir, caplog):
    """The truncation warning is printed once, as `warning: ...`: not logged as well (outside pytest
    the log goes to stderr too), and once for n rows of one prompt."""
    with caplog.at_level(logging.WARNING, logger="aigc.generation"):
        code, _, err = run_cli("generate", "text", "-m", run_dir, "-p", "ROMEO " * 20, "--max-new-tokens", "4",
                               "--n", "2")  # fmt: skip
    logged = [r.getMessage() for r in caplog.records]
    assert code == 0
    assert (err + "".join(logged)).count("but the model's context is 64") == 1, (err, logged)
    assert "warning: prompt has 120 tokens but the model's context is 64: kept the last 60 tokens" in err


def test_chat_reads_piped_stdin(run_cli, run_dir, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("ROMEO\n/reset\n\nbut soft\n/exit\nnever read\n"))
    code, out, err = run_cli("chat", "-m", run_dir, "--seed", "1", "--max-new-tokens", "8")
    assert code == 0, err
    assert len(out.splitlines()) >= 2  # two replies, one per line (a reply may hold newlines)
    assert "history cleared" in err
