"""Text watermark: green lists and scores vs transformers' lefthash scheme, marking inside the engine,
detection statistics, key handling and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from aigc.safety import watermark_text as W

HF_KEY = 15485863  # transformers' default hashing_key


def hf_config(gamma: float = 0.25, delta: float = 2.0) -> dict:
    return dict(
        greenlist_ratio=gamma, bias=delta, hashing_key=HF_KEY, seeding_scheme="lefthash", context_width=1
    )


def our_config(gamma: float = 0.25, delta: float = 2.0) -> W.WatermarkConfig:
    return W.WatermarkConfig(key=format(HF_KEY, "x"), gamma=gamma, delta=delta)  # hex key -> same integer


def test_greenlists_and_processor_match_transformers():
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    V = 97
    cfg = our_config()
    assert cfg.hash_key == HF_KEY
    hf = WatermarkLogitsProcessor(vocab_size=V, device="cpu", **hf_config())
    for prev in (0, 1, 5, 42, 96):
        ours = W.greenlist_ids([7, prev], cfg, V)
        theirs = hf._get_greenlist_ids(torch.tensor([7, prev]))
        assert torch.equal(ours, theirs)
        assert len(ours) == int(V * 0.25)
    # the whole processor on a batch: identical logits
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 9))
    logits = torch.randn(4, V)
    expected = hf(ids, logits.clone())
    got = W.watermark_logits(logits, ids.tolist(), [cfg] * 4)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("ignore_repeated", [False, True])
def test_detector_matches_transformers(ignore_repeated):
    from transformers.generation.watermarking import WatermarkDetector

    V = 64
    model_config = SimpleNamespace(vocab_size=V, bos_token_id=-1, is_encoder_decoder=False)
    det = WatermarkDetector(model_config, "cpu", hf_config(), ignore_repeated_ngrams=ignore_repeated)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8, (3, 50), generator=g)  # small alphabet: many repeated pairs
    out = det(ids, z_threshold=4.0, return_dict=True)
    for row in range(3):
        d = W.detect(ids[row].tolist(), our_config(), V, ignore_repeated=ignore_repeated)
        assert d.scored == out.num_tokens_scored[row]
        assert d.green == out.num_green_tokens[row]
        assert d.z_score == pytest.approx(float(out.z_score[row]))
        assert d.p_value == pytest.approx(float(out.p_value[row]))


def test_statistics_without_a_mark():
    # random tokens: green share ~ gamma, z ~ N(0, 1); the p-value is the normal tail
    assert W.p_value(0.0) == pytest.approx(0.5)
    assert W.p_value(4.0) == pytest.approx(3.167e-5, rel=1e-3)
    cfg = W.WatermarkConfig(key="ab" * 32)
    g = torch.Generator().manual_seed(0)
    zs = [W.detect(torch.randint(0, 500, (200,), generator=g).tolist(), cfg, 500).z_score for _ in range(200)]
    zs = torch.tensor(zs)
    assert abs(float(zs.mean())) < 0.25 and 0.75 < float(zs.std()) < 1.25
    assert int((zs > 4).sum()) == 0
    # empty / one-token text: nothing to score, a clean "no" rather than an error
    d = W.detect([3], cfg, 500)
    assert d.scored == 0 and not d.detected and "too short" in d.verdict()
    with pytest.raises(W.AigcError, match="outside the vocabulary"):
        W.detect([1, 500], cfg, 500)


def tiny_model(V: int = 64):
    from aigc.generation.decoders import GPTDecoder
    from aigc.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=1, n_head=2, n_embd=16)).eval()
    return GPTDecoder(model)


def generate(decoder, watermark: bool, seeds: range, n_tokens: int = 200) -> list[list[int]]:
    from aigc.generation.engine import Engine, Request
    from aigc.generation.params import GenerationParams

    reqs = [
        Request([1], GenerationParams(max_new_tokens=n_tokens, seed=s, watermark=watermark)) for s in seeds
    ]
    return [c.tokens for c in Engine(decoder).generate(reqs)]


def test_engine_marks_and_detector_finds_it(monkeypatch):
    monkeypatch.setenv(W.KEY_ENV, "cd" * 32)
    dec = tiny_model()
    V = dec.vocab_size
    cfg = W.load_config()
    marked = generate(dec, True, range(2), 120)
    plain = generate(dec, False, range(2), 120)
    for toks in marked:
        d = W.detect(toks, cfg, V)
        assert d.detected and d.z_score > 4, d
        # a different deployment's key sees nothing
        assert not W.detect(toks, W.WatermarkConfig(key="ef" * 32), V).detected
    for toks in plain:
        assert not W.detect(toks, cfg, V).detected
    # greedy rows are marked too (transformers applies the processor to every row), and a mixed
    # batch keeps unmarked rows untouched
    from aigc.generation.engine import Engine, Request
    from aigc.generation.params import GenerationParams

    mixed = Engine(dec).generate(
        [
            Request([1], GenerationParams(max_new_tokens=50, seed=9, watermark=True)),
            Request([1], GenerationParams(max_new_tokens=50, seed=9)),
        ]
    )
    assert mixed[1].tokens == generate(dec, False, range(9, 10), 50)[0]
    assert mixed[0].tokens == generate(dec, True, range(9, 10), 50)[0]


def test_key_file_is_created_once_and_env_wins(monkeypatch, tmp_path):
    monkeypatch.delenv(W.KEY_ENV, raising=False)
    path = W.key_path()
    assert str(path).startswith(str(tmp_path))  # AIGC_HOME points into tmp_path (conftest)
    assert not path.exists()
    a = W.load_config()
    assert path.exists() and len(path.read_text().strip()) == 64 and (path.stat().st_mode & 0o777) == 0o600
    assert W.load_config().key == a.key and len(a.key_id) == 12 and a.key_id not in a.key
    monkeypatch.setenv(W.KEY_ENV, "my deployment secret")
    b = W.load_config()
    assert b.key == "my deployment secret" and b.key_id != a.key_id and b.hash_key > 0
    path.write_text("")
    monkeypatch.delenv(W.KEY_ENV)
    with pytest.raises(W.AigcError, match="empty"):
        W.load_config()
    with pytest.raises(W.AigcError, match="gamma"):
        W.WatermarkConfig(key="x", gamma=1.0)


def test_params_flag():
    from aigc.generation.params import GenerationParams, make_params

    assert GenerationParams().watermark is False
    assert make_params(watermark=True).to_dict()["watermark"] is True
    with pytest.raises(W.AigcError, match="watermark"):
        GenerationParams(watermark="yes")


CORPUS = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"


@pytest.fixture
def run_dir(tmp_path):
    from safetensors.torch import save_model

    from aigc.models.gpt import GPT, GPTConfig
    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", [CORPUS])
    cfg = dict(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(**cfg)), str(tmp_path / "model.safetensors"))
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "model.safetensors").rename(out / "model.safetensors")
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")
    return out


def test_cli_generate_watermark_then_detect(run_cli, run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(W.KEY_ENV, raising=False)
    base = ["generate", "text", "--model", run_dir, "--max-new-tokens", "200", "--seed", "3", "--no-echo"]
    code, marked, err = run_cli(*base, "--watermark", "--temperature", "1.0")
    assert code == 0, err
    code, plain, _ = run_cli(*base, "--temperature", "1.0")
    assert code == 0 and plain != marked
    (tmp_path / "marked.txt").write_text(marked.rstrip("\n"), encoding="utf-8")
    (tmp_path / "plain.txt").write_text(plain.rstrip("\n"), encoding="utf-8")

    code, out, err = run_cli("detect", "text", tmp_path / "marked.txt", "--model", run_dir, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["detected"] and d["z_score"] > 4 and d["p_value"] < 1e-4
    code, out, _ = run_cli("detect", "text", tmp_path / "plain.txt", "--model", run_dir)
    assert code == 0 and "no watermark" in out and "z =" in out
    # another deployment's key: no detection, no crash
    monkeypatch.setenv(W.KEY_ENV, "another deployment")
    code, out, _ = run_cli("detect", "text", tmp_path / "marked.txt", "--model", run_dir)
    assert code == 0 and "no watermark" in out
    # bad inputs: one clean line
    code, _, err = run_cli("detect", "text", tmp_path / "missing.txt", "--model", run_dir)
    assert code == 1 and "missing.txt" in err
    (tmp_path / "alien.txt").write_text("日本語", encoding="utf-8")
    code, _, err = run_cli("detect", "text", tmp_path / "alien.txt", "--model", run_dir)
    assert code == 1 and "tokenize" in err


def test_server_request_with_watermark(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from aigc.generation import load_generator
    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from serve_helpers import write_text_run

    monkeypatch.setenv(W.KEY_ENV, "server key")
    write_text_run(tmp_path / "models" / "tiny", block_size=256)
    gen = load_generator(tmp_path / "models" / "tiny")
    body = {"model": "tiny", "prompt": "", "max_tokens": 150, "seed": 4, "temperature": 1.0}
    with TestClient(create_app(Settings(models_dirs=[tmp_path / "models"]))) as client:
        marked = client.post("/v1/completions", json={**body, "watermark": True}).json()
        plain = client.post("/v1/completions", json=body).json()
    assert marked["choices"][0]["text"] != plain["choices"][0]["text"]
    V, cfg = gen.decoder.vocab_size, W.load_config()
    assert W.detect_text(marked["choices"][0]["text"], gen, V, cfg).detected
    assert not W.detect_text(plain["choices"][0]["text"], gen, V, cfg).detected
