"""Music rendering: MIDI writer checked by mido (oracle), WAV synthesiser, piano roll, sidecars."""

from __future__ import annotations

import io
import json
import shutil
import time
import wave

import numpy as np
import pytest

from aigc.errors import AigcError
from aigc.generation.music_render import (
    INSTRUMENTS,
    find_soundfont,
    midi_bytes,
    piano_roll_png,
    render_wav,
    save_music,
    synthesize,
    wav_bytes,
)
from aigc.tokenizers.music import Note, Piece

mido = pytest.importorskip("mido")


def chorale_like(seconds: float = 30.0, tempo: float = 100.0) -> Piece:
    """Four voices of quarter and eighth notes in C major, `seconds` long."""
    rng = np.random.default_rng(0)
    steps = int(seconds * tempo / 60 * 4)
    notes = []
    for base in (72, 64, 55, 48):
        t = 0
        while t < steps:
            d = int(rng.choice([2, 4, 4, 8]))
            notes.append(Note(t, min(d, steps - t), base + int(rng.choice([0, 2, 4, 5, 7])), 79))
            t += d
    return Piece(notes, key="C major", meter="4/4", style="chorale", tempo=tempo, name="test")


def test_midi_bytes_parse_in_mido_with_all_events():
    piece = Piece(
        [Note(0, 4, 60, 95), Note(4, 2, 60, 47), Note(4, 6, 67, 79)],
        key="Eb minor",
        meter="6/8",
        tempo=90.0,
        name="tune",
    )
    mid = mido.MidiFile(file=io.BytesIO(midi_bytes(piece, {"seed": 3, "model": "m"}, program=19)))
    assert mid.type == 0 and mid.ticks_per_beat == 480
    msgs = list(mid.tracks[0])
    by_type = {m.type: m for m in msgs}
    assert by_type["track_name"].name == "tune"
    assert mido.tempo2bpm(by_type["set_tempo"].tempo) == pytest.approx(90.0)
    assert (by_type["time_signature"].numerator, by_type["time_signature"].denominator) == (6, 8)
    assert by_type["key_signature"].key == "Ebm"
    assert json.loads(by_type["text"].text.removeprefix("aigc:")) == {"seed": 3, "model": "m"}
    assert by_type["program_change"].program == 19
    # note events at absolute ticks; the note-off of the first C comes before the second C's note-on
    t, events = 0, []
    for m in msgs:
        t += m.time
        if m.type in ("note_on", "note_off"):
            events.append((t, m.type, m.note))
    assert events == [
        (0, "note_on", 60),
        (480, "note_off", 60),
        (480, "note_on", 60),
        (480, "note_on", 67),
        (720, "note_off", 60),
        (1200, "note_off", 67),
    ]
    assert mid.length == pytest.approx(1200 / 480 * 60 / 90)


def test_wav_is_16_bit_normalised_and_as_long_as_the_piece():
    piece = chorale_like(seconds=4.0)
    for instrument in INSTRUMENTS:
        audio = synthesize(piece, instrument, sample_rate=22_050)
        assert audio.dtype == np.float32
        assert np.abs(audio).max() == pytest.approx(0.891, rel=1e-4)  # -1 dBFS peak, no clipping
        expected = piece.seconds() + INSTRUMENTS[instrument]["release"]
        assert len(audio) / 22_050 == pytest.approx(expected, abs=0.01)
    data = wav_bytes(audio, 22_050)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22_050)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert np.abs(pcm).max() == round(0.891 * 32767)


def test_synth_pitch_is_right():
    """The spectrum of a sustained A4 peaks at 440 Hz (organ: no decay, strong fundamental)."""
    sr = 22_050
    audio = synthesize(Piece([Note(0, 16, 69, 127)], tempo=60.0), "organ", sr)
    seg = audio[sr // 2 : sr // 2 + sr]  # one steady second
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    assert np.fft.rfftfreq(len(seg), 1 / sr)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)


def test_louder_notes_are_louder_and_silence_is_silent():
    sr = 22_050
    audio = synthesize(Piece([Note(0, 4, 60, 127), Note(8, 4, 60, 31)], tempo=60.0), "piano", sr)
    first, second = np.abs(audio[: sr // 2]).max(), np.abs(audio[2 * sr : 2 * sr + sr // 2]).max()
    assert second / first == pytest.approx(31 / 127, rel=0.05)
    assert np.abs(synthesize(Piece([]), "piano")).max() == 0.0


def test_thirty_seconds_of_chorale_render_in_under_a_second():
    piece = chorale_like(seconds=30.0)
    synthesize(Piece([Note(0, 4, 60)]), "piano")  # warm up numpy
    start = time.perf_counter()
    data, engine = render_wav(piece, "piano", engine="builtin")
    elapsed = time.perf_counter() - start
    assert engine == "builtin" and len(data) > 30 * 22_050 * 2
    assert elapsed < 1.0, f"rendering 30 s took {elapsed:.2f} s"


def test_unknown_instrument_and_missing_fluidsynth_are_clear_errors(monkeypatch):
    with pytest.raises(AigcError, match="choose one of: piano, organ, strings"):
        synthesize(Piece([Note(0, 4, 60)]), "banjo")
    with pytest.raises(AigcError, match="tempo 0.0 is out of range"):
        midi_bytes(Piece([Note(0, 4, 60)], tempo=0.0))
    with pytest.raises(AigcError, match="pitch must be 0..127"):
        synthesize(Piece([Note(0, 4, 130)]))
    monkeypatch.setenv("AIGC_SOUNDFONT", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(AigcError, match="engine fluidsynth needs"):
        render_wav(Piece([Note(0, 4, 60)]), engine="fluidsynth")


@pytest.mark.skipif(
    shutil.which("fluidsynth") is None or find_soundfont() is None, reason="no fluidsynth/SoundFont"
)
def test_fluidsynth_path_when_present():
    data, engine = render_wav(chorale_like(seconds=2.0), engine="fluidsynth")
    assert engine == "fluidsynth" and data[:4] == b"RIFF"


def test_piano_roll_png_has_notes_and_metadata():
    from PIL import Image

    piece = Piece([Note(0, 4, 60, 127), Note(4, 4, 64, 127)], meter="4/4")
    img = Image.open(io.BytesIO(piano_roll_png(piece, {"seed": 7}, px_per_step=4)))
    assert img.size == (33, (64 - 60 + 5) * 5)
    assert json.loads(img.text["aigc"]) == {"seed": 7}
    px = np.asarray(img.convert("RGB"))
    row_60, row_64 = (66 - 60) * 5 + 2, (66 - 64) * 5 + 2
    assert px[row_60, 8].tolist() != [255, 255, 255] and px[row_60, 24].tolist() == [255, 255, 255]
    assert px[row_64, 24].tolist() != [255, 255, 255]


def test_save_music_writes_files_and_sidecar(tmp_path):
    paths = save_music(chorale_like(seconds=2.0), tmp_path / "out", "piece-0", {"seed": 1}, engine="builtin")
    assert sorted(paths) == ["json", "mid", "png", "wav"]
    side = json.loads(paths["json"].read_text())
    assert side["seed"] == 1 and side["key"] == "C major" and side["synth"] == "builtin"
    assert side["files"] == {"mid": "piece-0.mid", "wav": "piece-0.wav", "png": "piece-0.png"}
    text = [m for m in mido.MidiFile(paths["mid"]).tracks[0] if m.type == "text"][0].text
    assert json.loads(text.removeprefix("aigc:"))["seed"] == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(AigcError, match="choose from mid, wav, png"):
        save_music(chorale_like(seconds=1.0), tmp_path / "x", "p", formats=("mp3",))
