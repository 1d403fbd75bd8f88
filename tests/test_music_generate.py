"""MusicGenerator, `aigc train music`, `aigc generate music` and the music-run dispatch of aigc.load."""

from __future__ import annotations

import io
import json
import wave

import pytest

from aigc.errors import AigcError

# 30 steps at a high learning rate: enough for a 16-wide GPT to learn that bars end (a 2-step
# model is near uniform over 316 events and would rarely sample `Bar`)
STEPS = 30
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=32",
        "train.batch_size=4", f"train.eval_interval={STEPS}", "train.eval_batches=1", "train.lr=1e-2",
        "train.warmup_steps=5", "sample.tokens=8"]  # fmt: skip


@pytest.fixture(scope="module")
def music_run(tmp_path_factory):
    """A tiny GPT trained on 4 Bach chorales through the `music` trainer adapter (`aigc train music`)."""
    pytest.importorskip("music21")
    pytest.importorskip("mido")
    from aigc.data.music import prepare_music
    from aigc.training.music import train_music

    root = tmp_path_factory.mktemp("music")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the autouse _hermetic fixture
        mp.setenv("AIGC_HOME", str(root / "aigc-home"))
        prepare_music("music21:bach", root / "data", overrides=["limit=4"])
        result = train_music("music", root / "data", root / "run", overrides=TINY, max_steps=STEPS,
                             progress=False)  # fmt: skip
    assert result.steps == STEPS
    return root / "run"


@pytest.fixture(scope="module")
def gen(music_run):
    from aigc.generation.music import MusicGenerator

    return MusicGenerator.from_artifact(music_run)


def test_run_is_a_gpt_with_a_music_tokenizer_and_load_dispatches(music_run):
    import aigc
    from aigc.generation.music import MusicGenerator

    cfg = json.loads((music_run / "config.json").read_text())
    assert cfg["family"] == "gpt" and cfg["data"]["tokenizer"]["kind"] == "music"
    g = aigc.load(music_run)
    assert isinstance(g, MusicGenerator) and g.tokenizer.kind == "music"


def test_generate_two_pieces_of_two_bars(gen):
    from aigc.evaluation.music import valid_midi

    results = gen.generate(n=2, key="D minor", meter="3/4", style="chorale", bars=2, seed=5)
    assert [r.seed for r in results] == [5, 6]
    tok = gen.tokenizer
    for r in results:
        # exactly `bars` bars: the (bars+1)-th Bar stopped the row and was dropped
        assert r.finish_reason == "stop" and r.tokens.count(tok.bar_id) == 2
        assert tok.eos_id not in r.tokens  # banned until the bar count ends the piece
        assert valid_midi(r.midi)
        assert r.midi[:4] == b"MThd" and b"aigc:" in r.midi  # provenance in a MIDI text event
        with wave.open(io.BytesIO(r.wav)) as w:
            assert w.getnchannels() == 1 and w.getnframes() > 0
        assert r.png[:8] == b"\x89PNG\r\n\x1a\n"
        m = r.metadata
        assert m["seed"] == r.seed and m["model"] == gen.model_id and m["created"] > 0
        assert m["key"] == "D minor" and m["meter"] == "3/4" and m["style"] == "chorale"
        assert m["params"]["bars"] == 2 and m["params"]["temperature"] == 1.0
        # every note lies inside the two 3/4 bars (12 steps each at resolution 4)
        assert r.piece.notes and all(n.start < 24 for n in r.piece.notes)


def test_a_seed_reproduces_its_piece_alone(gen):
    a = gen.generate(n=2, key="G major", bars=2, seed=11, formats=("mid",))
    b = gen.generate(n=1, key="G major", bars=2, seed=12, formats=("mid",))
    assert a[1].tokens == b[0].tokens and a[1].piece.notes == b[0].piece.notes
    assert a[0].wav is None and a[0].png is None  # only the formats asked for


def test_primer_notes_open_the_piece(gen):
    primer = [(0, 4, 62), (4, 4, 65), (8, 4, 69)]  # D F A, quarter notes
    [r] = gen.generate(key="D minor", meter="4/4", bars=1, primer=primer, seed=0, formats=("mid",))
    # the primer is kept verbatim; the model may add notes beside it (e.g. a chord at step 0)
    notes = [(n.start, n.duration, n.pitch) for n in r.piece.notes]
    assert set(primer) <= set(notes)
    assert r.params["primer"] == "3 notes"


def test_primer_from_a_midi_file(gen, tmp_path):
    from aigc.generation.music_render import midi_bytes
    from aigc.tokenizers.music import Note, Piece

    path = tmp_path / "p.mid"
    path.write_bytes(midi_bytes(Piece([Note(0, 8, 60), Note(8, 8, 64)], key="C major")))
    [r] = gen.generate(bars=1, primer=path, seed=0, formats=("mid",))
    assert {(0, 60), (8, 64)} <= {(n.start, n.pitch) for n in r.piece.notes}
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd not really")
    with pytest.raises(AigcError, match="not a readable MIDI file"):
        gen.generate(bars=1, primer=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": "H minor"}, "key"),
        ({"meter": "4/5"}, "meter"),
        ({"style": "jazz"}, "unknown style 'jazz'; this model knows"),
        ({"bars": 0}, "bars must be an integer in 1..64"),
        ({"n": 100}, "n must be an integer in 1..64"),
        ({"instrument": "banjo"}, "unknown instrument 'banjo'; choose one of: piano"),
        ({"tempo": 0}, "tempo 0.0 is out of range"),
        ({"temperature": -1}, "temperature"),
    ],
)
def test_bad_input_is_one_clear_error(gen, kwargs, match):
    with pytest.raises(AigcError, match=match):
        gen.generate(**kwargs)


def test_music_run_refuses_text_generation(music_run):
    from aigc.generation import load_generator

    with pytest.raises(AigcError, match="is a music model; use aigc generate music"):
        load_generator(music_run)


def test_music_generator_refuses_a_text_run(tmp_path):
    from aigc.generation.music import MusicGenerator
    from serve_helpers import write_text_run

    write_text_run(tmp_path / "t")
    with pytest.raises(AigcError, match="is a char model, not a music model"):
        MusicGenerator.from_artifact(tmp_path / "t")


def test_train_music_refuses_text_data(tmp_path):
    from aigc.data import prepare_text
    from aigc.training.music import train_music

    (tmp_path / "a.txt").write_text("hello world " * 200)
    prepare_text(str(tmp_path / "a.txt"), tmp_path / "d")
    with pytest.raises(AigcError, match="`aigc train music` needs music events"):
        train_music("music", tmp_path / "d", tmp_path / "r", max_steps=1, progress=False)


def test_cli_generate_music_end_to_end(music_run, tmp_path, run_cli):
    from aigc.evaluation.music import valid_midi

    out = tmp_path / "out"
    args = ["generate", "music", "--model", music_run, "--key", "D minor", "--meter", "3/4",
            "--style", "chorale", "--bars", "2", "--n", "2", "--seed", "3", "--out", out,
            "--instrument", "organ"]  # fmt: skip
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert "piece-1.mid|.wav|.png: seed 4, D minor 3/4" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"piece-{i}.{e}" for i in (0, 1) for e in ("json", "mid", "png", "wav")]
    meta = json.loads((out / "piece-1.json").read_text())
    assert meta["seed"] == 4 and meta["instrument"] == "organ" and meta["files"]["wav"] == "piece-1.wav"
    assert valid_midi((out / "piece-0.mid").read_bytes())
    # the sidecar holds each file's hash: `aigc verify` notices an edited WAV or MIDI
    from aigc.safety.provenance import verify

    assert all(verify(out / f"piece-1.{e}")["file_unchanged"] for e in ("wav", "mid"))
    with open(out / "piece-1.wav", "ab") as f:
        f.write(b"\0")
    assert (
        verify(out / "piece-1.wav")["file_unchanged"] is False
        and verify(out / "piece-1.mid")["file_unchanged"]
    )
    code, stdout, _ = run_cli("verify", out / "piece-1.wav")
    assert "NO (edited)" in stdout
    # a second run into the same directory is refused; a bad key is one line, exit 1, nothing written
    code, _, stderr = run_cli(*args)
    assert code == 1 and "--overwrite" in stderr
    code, _, stderr = run_cli(*args[:5], "H minor", "--out", tmp_path / "o2")
    assert code == 1 and "key" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o2").exists()


def test_cli_generate_text_on_a_music_run_says_what_to_use(music_run, run_cli):
    code, _, stderr = run_cli("generate", "text", "--model", music_run)
    assert code == 1 and "is a music model; use aigc generate music" in stderr


def test_cli_train_music_help_and_family():
    from typer.testing import CliRunner

    from aigc.cli import TRAINERS, app

    assert TRAINERS["music"] == "aigc.training.music:train_music"
    res = CliRunner().invoke(app, ["generate", "music", "--help"])
    assert res.exit_code == 0 and "--primer" in res.output


@pytest.mark.slow
def test_demo_music_part(tmp_path, run_cli):
    pytest.importorskip("music21")
    from aigc.evaluation.music import valid_midi

    code, stdout, stderr = run_cli("demo", "--part", "music", "--seconds", "3", "--out", tmp_path / "demo")
    assert code == 0, stderr
    assert "music: GPT trained" in stdout and "chorale-0.mid" in stdout
    samples = tmp_path / "demo" / "music-samples"
    assert sorted(p.suffix for p in samples.iterdir()) == [".json", ".mid", ".png", ".wav"]
    assert valid_midi((samples / "chorale-0.mid").read_bytes())


def test_cli_music_from_a_model_that_makes_no_notes_is_one_line(music_run, tmp_path, run_cli, monkeypatch):
    """Every piece empty (an under-trained model: only ungrammatical events) is exit 1 with nothing
    written, not "0 notes, 0.0 s" and a silent WAV; a SoundFont that cannot be used is a warning."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from aigc.tokenizers import load_tokenizer

    # the run's GPT rewired to always say one Dur_ token: a Dur without a Pitch is skipped
    bad = tmp_path / "bad"
    shutil.copytree(music_run, bad)
    dur = next(i for i, t in enumerate(load_tokenizer(bad).vocab) if t.startswith("Dur_"))
    w = load_file(str(bad / "model.safetensors"))
    for k in w:
        if k.endswith(("proj.weight", "down.weight")):
            w[k] = torch.zeros_like(w[k])  # the blocks add nothing to the residual stream
        elif k == "norm.weight":
            w[k] = torch.ones_like(w[k])
        elif k in ("tok_emb.weight", "lm_head.weight"):  # (tied or not) every token embeds along e_0,
            w[k] = torch.zeros_like(w[k])  # and only Dur's output row points there strongly
            w[k][:, 0], w[k][dur, 0] = 1.0, 100.0
    save_file({k: v.contiguous() for k, v in w.items()}, str(bad / "model.safetensors"))
    code, _, err = run_cli("generate", "music", "-m", bad, "--bars", "1", "--n", "2", "-o", tmp_path / "o")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "all 2 pieces came out empty: 0 notes (" in err and "under-trained" in err and "--max-steps" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("AIGC_SOUNDFONT", str(tmp_path / "nonexistent.sf2"))
    code, _, err = run_cli("generate", "music", "-m", music_run, "--bars", "1", "-o", tmp_path / "o2")
    assert code == 0, err
    assert (
        f"warning: AIGC_SOUNDFONT={tmp_path / 'nonexistent.sf2'} is not a file; WAVs are rendered with the built-in synth"
        in err.replace("\n", " ")
    )
    assert json.loads((tmp_path / "o2" / "piece-0.json").read_text())["synth"] == "builtin"
