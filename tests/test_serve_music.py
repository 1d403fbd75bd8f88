"""POST /v1/audio/music through FastAPI's TestClient: shape, same pieces as MusicGenerator, store rows, errors."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import write_text_run


def write_music_run(out: Path, seed: int = 0) -> Path:
    """A run directory as `aigc train music` writes it: a gpt config + weights + a music tokenizer."""
    from safetensors.torch import save_model

    from aigc.models import build_model
    from aigc.tokenizers.music import MusicTokenizer
    from aigc.utils.io import atomic_write_json

    tok = MusicTokenizer()
    cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(seed)
    model = build_model("gpt", cfg)
    with torch.no_grad():  # the weights' scale as after some training: pieces differ per seed
        model.tok_emb.weight.mul_(20)
    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"))
    data = {"tokenizer": {"kind": "music", "id": tok.id}}
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": data})
    tok.save(out / "tokenizer.json")
    return out


@pytest.fixture
def root(tmp_path):
    write_music_run(tmp_path / "models" / "bach")
    write_text_run(tmp_path / "models" / "tiny")
    return tmp_path / "models"


@pytest.fixture
def client(root, tmp_path):
    settings = Settings(models_dirs=[root], db=str(tmp_path / "aigc.db"), outputs_dir=tmp_path / "outputs")
    with TestClient(create_app(settings)) as c:
        yield c


def test_music_route_matches_the_generator_and_is_recorded(client, root, tmp_path):
    from aigc.generation.music import MusicGenerator

    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["bach"]["kind"] == "music" and listed["tiny"]["kind"] == "text"
    body = {"model": "bach", "key": "D minor", "meter": "3/4", "bars": 1, "n": 2, "seed": 7, "format": "both"}
    r = client.post("/v1/audio/music", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["seed"] == 7 and out["parameters"]["key"] == "D minor"
    assert len(out["data"]) == 2
    refs = MusicGenerator.from_artifact(root / "bach").generate(
        n=2, key="D minor", meter="3/4", bars=1, seed=7
    )
    for item, ref in zip(out["data"], refs, strict=True):
        midi = base64.b64decode(item["midi_b64"])
        assert midi[:4] == b"MThd"
        with wave.open(io.BytesIO(base64.b64decode(item["wav_b64"]))) as w:
            assert w.getframerate() == 22_050
        assert base64.b64decode(item["piano_roll_b64"])[:4] == b"\x89PNG"
        m = item["metadata"]
        assert m["seed"] == ref.seed and m["model"] == "bach" and m["params"]["bars"] == 1
        assert m["notes"] == len(ref.piece.notes)
        # the same seed gives the same piece as the Python API (MIDI differs only in its timestamp)
        from aigc.data.music import read_midi

        assert read_midi(midi).notes == read_midi(ref.midi).notes
    # one store row per piece, the MIDI as its blob
    ids = out["generation_ids"]
    assert len(ids) == 2 and all(isinstance(i, int) for i in ids)
    row = client.get(f"/v1/generations/{ids[1]}").json()
    assert row["kind"] == "music" and row["seed"] == 8 and row["output_ref"].endswith(".mid")
    assert row["prompt"] == "D minor 3/4"


def test_midi_format_leaves_the_wav_out(client):
    r = client.post("/v1/audio/music", json={"model": "bach", "bars": 1, "seed": 1, "format": "midi"})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert item["wav_b64"] is None and item["midi_b64"] and item["piano_roll_b64"]


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"key": "H minor"}, 400, "key"),
        ({"style": "jazz"}, 400, "unknown style 'jazz'"),
        ({"bars": 0}, 400, "bars"),
        ({"n": 99}, 400, "n"),
        ({"format": "mp3"}, 422, "format"),
        ({"volume": 3}, 422, "volume"),
        ({"model": "nope"}, 404, "not found"),
        ({"model": "tiny"}, 400, "is a text model; this route needs a music model"),
    ],
)
def test_bad_requests_are_one_clear_error(client, body, status, match):
    r = client.post("/v1/audio/music", json={"model": "bach", "bars": 1, **body})
    assert r.status_code == status, r.text
    assert match in r.json()["detail"]


def test_text_routes_refuse_a_music_model(client):
    r = client.post("/v1/completions", json={"model": "bach", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400 and "is a music model" in r.json()["detail"]
