"""Hugging Face interop: export to LlamaForCausalLM (logit parity), import back, the generic
wrapper, the artifact loader and `aigc export` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aigc.errors import AigcError
from aigc.export import export_hf, llama_config
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.hf_causal import HFCausalLM, import_llama
from aigc.models.lstm import LSTMLM, LSTMConfig
from aigc.registry import load_artifact
from aigc.tokenizers import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer("char", [TEXT])


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer("bpe", [TEXT * 20], vocab_size=300)


def make_gpt(vocab: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_embd=32, rope_theta=500.0, norm_eps=1e-6
    )
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_load(path: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **kw).eval()


@pytest.mark.parametrize("tie, n_kv_head", [(True, None), (False, None), (True, 2)])
def test_export_logits_match_transformers(tmp_path, char_tok, tie, n_kv_head):
    model = make_gpt(char_tok.vocab_size, tie_embeddings=tie, n_kv_head=n_kv_head)
    out = export_hf(model, char_tok, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = hf_load(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == tie
    assert hf.config.num_key_value_heads == (n_kv_head or 4)
    idx = torch.tensor([char_tok.encode(TEXT[:30]), char_tok.encode(TEXT[30:60])])
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(input_ids=idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()
    # the tokenizer loads in AutoTokenizer and encodes/decodes like ours
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == char_tok.encode(TEXT)
    assert hf_tok.decode(char_tok.encode(TEXT)) == TEXT


def test_export_bpe_with_eos_and_greedy_generate_matches(tmp_path, bpe_tok):
    model = make_gpt(bpe_tok.vocab_size, seed=1)
    out = export_hf(model, bpe_tok, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == bpe_tok.eos_id is not None and cfg["bos_token_id"] is None
    hf = hf_load(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token_id == bpe_tok.eos_id
    prompt = bpe_tok.encode("To be, or")
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):  # our greedy decode, full recomputation
            nxt = model(idx)[0][:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert theirs.tolist() == idx.tolist()


def test_export_bfloat16(tmp_path, char_tok):
    model = make_gpt(char_tok.vocab_size)
    out = export_hf(model, char_tok, tmp_path / "hf", dtype="bfloat16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    hf = hf_load(out, dtype=torch.float32)
    idx = torch.tensor([char_tok.encode(TEXT[:20])])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_import_llama_round_trip(tmp_path, char_tok, tie):
    model = make_gpt(char_tok.vocab_size, tie_embeddings=tie, n_kv_head=2)
    out = export_hf(model, char_tok, tmp_path / "hf")
    cfg, state = import_llama(out)
    assert cfg == model.config
    back = GPT(cfg)
    back.load_state_dict(state, strict=True)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (back.lm_head.weight is back.tok_emb.weight) == tie
    idx = torch.randint(0, char_tok.vocab_size, (2, 16))
    torch.testing.assert_close(back.eval()(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_import_refuses_unsupported_llamas_and_pickles(tmp_path, char_tok):
    out = export_hf(make_gpt(char_tok.vocab_size), char_tok, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(AigcError, match="attention biases"):
        import_llama(out)
    (out / "config.json").write_text(
        json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(AigcError, match="not a Llama"):
        import_llama(out)
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AigcError, match="only pytorch_model.bin"):
        import_llama(pickled)
    with pytest.raises(AigcError, match="only pytorch_model.bin"):
        HFCausalLM(pickled)


def test_hf_causal_wrapper_matches_our_interface(tmp_path, char_tok):
    model = make_gpt(char_tok.vocab_size)
    out = export_hf(model, char_tok, tmp_path / "hf")
    wrapped = HFCausalLM(out).eval()
    assert wrapped.config.vocab_size == model.config.vocab_size and wrapped.config.block_size == 32
    idx = torch.randint(0, char_tok.vocab_size, (2, 12))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    logits, loss = wrapped(idx, targets)
    ref_logits, ref_loss = model(idx, targets)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert wrapped.num_params() == model.num_params()
    assert wrapped.flops_per_token() == model.flops_per_token()
    loss.backward()  # trainable like ours
    assert wrapped.hf.model.embed_tokens.weight.grad is not None


def test_hf_causal_wrapper_on_gpt2(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    wrapped = HFCausalLM(tmp_path / "gpt2")
    assert wrapped.config.model_type == "gpt2" and wrapped.config.block_size == 16
    logits, loss = wrapped(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 50) and loss.item() > 0
    # matmul weights: per layer c_attn 3C^2, c_proj C^2, MLP 8C^2; plus the tied head (not wpe)
    assert wrapped.flops_per_token() == 6 * (12 * 16 * 16 + 50 * 16) + 12 * 1 * 16 * 16
    with pytest.raises(AigcError, match="not a Llama"):
        import_llama(tmp_path / "gpt2")


def test_export_refuses_lstm_and_bad_dtype_and_keeps_dirs_safe(tmp_path, char_tok):
    lstm = LSTMLM(LSTMConfig(vocab_size=char_tok.vocab_size, n_embd=8, n_hidden=8, n_layer=1))
    with pytest.raises(AigcError, match="only gpt models export"):
        export_hf(lstm, char_tok, tmp_path / "lstm")
    model = make_gpt(char_tok.vocab_size)
    with pytest.raises(AigcError, match="valid dtypes: float32, bfloat16"):
        export_hf(model, char_tok, tmp_path / "x", dtype="float16")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(AigcError, match="--overwrite"):
        export_hf(model, char_tok, busy)
    assert (busy / "keep.txt").read_text() == "mine"

    class Broken:
        vocab_size, eos_id = char_tok.vocab_size, None

        def save_pretrained(self, d):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(model, Broken(), busy, overwrite=True)
    assert (busy / "keep.txt").read_text() == "mine"  # old folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no staging left behind
    export_hf(model, char_tok, busy, overwrite=True)
    assert (busy / "model.safetensors").is_file() and not (busy / "keep.txt").exists()


def test_llama_config_fields():
    cfg = GPTConfig(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    c = llama_config(cfg, eos_id=7)
    assert c["intermediate_size"] == cfg.hidden_dim and c["num_key_value_heads"] == 2
    assert c["max_position_embeddings"] == 64 and c["eos_token_id"] == 7 and c["head_dim"] == 16
    built = transformers.LlamaConfig(
        **{k: v for k, v in c.items() if k not in ("architectures", "model_type")}
    )
    assert built.rope_parameters["rope_theta"] == cfg.rope_theta


# ----------------------------------------------------------------------------- artifacts and CLI


def write_artifact(root: Path, family: str, model: torch.nn.Module, tok) -> Path:
    """A run directory in the docs/internals.md "Artifacts" format, built by hand."""
    from dataclasses import asdict

    from safetensors.torch import save_model

    root.mkdir(parents=True)
    cfg = {"family": family, "model": asdict(model.config), "train": {"lr": 1e-3}, "data": {}}
    (root / "config.json").write_text(json.dumps(cfg))
    save_model(model, str(root / "model.safetensors"))  # tied weights stored once
    tok.save(root / "tokenizer.json")
    return root


def test_load_artifact_rebuilds_model_and_tokenizer(tmp_path, char_tok):
    model = make_gpt(char_tok.vocab_size)
    run = write_artifact(tmp_path / "run", "gpt", model, char_tok)
    art = load_artifact(run)
    assert art.family == "gpt" and art.path == run and art.config["train"] == {"lr": 1e-3}
    assert not art.model.training and art.tokenizer.id == char_tok.id
    idx = torch.randint(0, char_tok.vocab_size, (1, 10))
    torch.testing.assert_close(art.model(idx)[0], model(idx)[0], atol=0, rtol=0)
    assert art.model.lm_head.weight is art.model.tok_emb.weight


def test_load_artifact_says_what_is_missing(tmp_path, char_tok):
    with pytest.raises(AigcError, match="not found"):
        load_artifact(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AigcError, match="no config.json"):
        load_artifact(empty)
    model = make_gpt(char_tok.vocab_size)
    run = write_artifact(tmp_path / "run", "gpt", model, char_tok)
    (run / "tokenizer.json").unlink()
    with pytest.raises(AigcError, match="no tokenizer.json"):
        load_artifact(run)
    char_tok.save(run / "tokenizer.json")
    (run / "model.safetensors").unlink()
    with pytest.raises(AigcError, match="no model.safetensors"):
        load_artifact(run)
    # weights of another shape: damaged/mixed run
    from safetensors.torch import save_model

    save_model(make_gpt(char_tok.vocab_size, n_layer=1), str(run / "model.safetensors"))
    with pytest.raises(AigcError, match="does not match the model in config.json"):
        load_artifact(run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "family": "mamba"}))
    with pytest.raises(AigcError, match="known families: .*gpt"):
        load_artifact(run)
    hf_dir = export_hf(model, char_tok, tmp_path / "hf")
    with pytest.raises(AigcError, match="transformers folder"):
        load_artifact(hf_dir)


def test_cli_export_end_to_end(tmp_path, run_cli, char_tok):
    model = make_gpt(char_tok.vocab_size, tie_embeddings=False)
    run = write_artifact(tmp_path / "run", "gpt", model, char_tok)
    code, stdout, stderr = run_cli("export", "--model", run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "hf")
    hf = hf_load(tmp_path / "hf")
    idx = torch.tensor([char_tok.encode(TEXT[:24])])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], atol=1e-4, rtol=0)
    # again without --overwrite: refused, one line, exit 1
    code, _, stderr = run_cli("export", "--model", run, "--out", tmp_path / "hf")
    assert code == 1 and "--overwrite" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(
        "export", "--model", run, "--out", tmp_path / "hf", "--overwrite", "--dtype", "bfloat16"
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    code, _, stderr = run_cli("export", "--model", run, "--format", "onnx", "--out", tmp_path / "o")
    assert code == 1 and "valid formats: hf" in stderr
    lstm = LSTMLM(LSTMConfig(vocab_size=char_tok.vocab_size, n_embd=8, n_hidden=8, n_layer=1))
    lrun = write_artifact(tmp_path / "lstm", "lstm", lstm, char_tok)
    code, _, stderr = run_cli("export", "--model", lrun, "--out", tmp_path / "l")
    assert code == 1 and "is a lstm model; only gpt models export" in stderr
    assert not (tmp_path / "l").exists() and not (tmp_path / "o").exists()
    code, stdout, _ = run_cli("export", "--help")
    assert code == 0 and "--format" in stdout


@pytest.mark.slow
def test_trained_run_exports_and_loads_in_transformers(tmp_path, run_cli):
    """The real pipeline: data prepare -> train 2 steps -> export -> transformers, same logits."""
    (tmp_path / "in.txt").write_text(TEXT * 40, encoding="utf-8")
    data, run, hf_dir = tmp_path / "data", tmp_path / "run", tmp_path / "hf"
    code, _, stderr = run_cli("data", "prepare", tmp_path / "in.txt", "--out", data)
    assert code == 0, stderr
    code, _, stderr = run_cli(
        "train",
        "gpt",
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--set",
        "model.block_size=32",
    )
    assert code == 0, stderr
    code, _, stderr = run_cli("export", "--model", run, "--out", hf_dir)
    assert code == 0, stderr
    art = load_artifact(run)
    hf = hf_load(hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = hf_tok("To be, or not", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == art.tokenizer.encode("To be, or not")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, art.model(ids)[0], atol=1e-4, rtol=0)


def test_export_of_a_diffusion_run_points_at_its_diffusers_folder(tmp_path, run_cli):
    """A diffusion run was exported by training (RUN/diffusers/): say so, not "use model.safetensors"."""
    from safetensors.torch import load_file

    from aigc.models.diffusion import DiffusionConfig
    from aigc.training.image_tasks import export_diffusers
    from serve_helpers import write_image_run

    run = write_image_run(tmp_path / "diff", classes=["a", "b"])
    code, _, err = run_cli("export", "--model", run, "--out", tmp_path / "o")
    assert code == 1 and "is a diffusion model; only gpt models export" in err  # no diffusers/ folder yet
    cfg = json.loads((run / "config.json").read_text())["model"]
    cfg = DiffusionConfig(**{**cfg, "block_out_channels": tuple(cfg["block_out_channels"]),
                             "attention_levels": tuple(cfg["attention_levels"])})  # fmt: skip
    export_diffusers(cfg, load_file(str(run / "model.safetensors")), run / "diffusers")
    code, _, err = run_cli("export", "--model", run, "--out", tmp_path / "o")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"already exported in diffusers format at {run / 'diffusers'}" in err and "card.md" in err
    assert not (tmp_path / "o").exists()
