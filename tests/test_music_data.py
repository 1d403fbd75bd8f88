"""Music data: MIDI / score files and music21 built-ins -> prepared token arrays (text data layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aigc.errors import AigcError
from aigc.tokenizers import load_tokenizer
from aigc.tokenizers.music import MusicTokenizer, Note, Piece

mido = pytest.importorskip("mido")

from aigc.data.music import (  # noqa: E402
    estimate_key,
    load_prepared_music,
    prepare_music,
    read_midi,
    split_by_piece,
)
from aigc.generation.music_render import midi_bytes  # noqa: E402


def mido_file(path, notes, tpq=96, meter=(3, 4), key="G", tempo_bpm=120, drums=True):
    """A type-1 MIDI file written by mido (an independent writer): tempo/meta track + note track,
    note-offs as note_on velocity 0, optionally a drum hit on channel 10."""
    mid = mido.MidiFile(type=1, ticks_per_beat=tpq)
    meta = mido.MidiTrack()
    meta.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    meta.append(mido.MetaMessage("time_signature", numerator=meter[0], denominator=meter[1], time=0))
    if key:
        meta.append(mido.MetaMessage("key_signature", key=key, time=0))
    mid.tracks.append(meta)
    events = []
    for start, dur, pitch in notes:  # in quarters
        events.append((round(start * tpq), 1, mido.Message("note_on", note=pitch, velocity=90)))
        events.append((round((start + dur) * tpq), 0, mido.Message("note_on", note=pitch, velocity=0)))
    if drums:
        events.append((0, 1, mido.Message("note_on", channel=9, note=36, velocity=100)))
        events.append((tpq, 0, mido.Message("note_off", channel=9, note=36)))
    track, now = mido.MidiTrack(), 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=tick - now))
        now = tick
    mid.tracks.append(track)
    mid.save(path)


def test_read_midi_from_an_independent_writer(tmp_path):
    mido_file(tmp_path / "a.mid", [(0, 1, 67), (1, 0.5, 71), (1.5, 0.5, 74), (2, 1, 67), (2, 1, 59)])
    p = read_midi(tmp_path / "a.mid", resolution=4)
    assert p.notes == [
        Note(0, 4, 67, 95),
        Note(4, 2, 71, 95),
        Note(6, 2, 74, 95),
        Note(8, 4, 59, 95),
        Note(8, 4, 67, 95),
    ]
    assert (p.key, p.meter, p.tempo) == ("G major", "3/4", 120.0)  # drums (channel 10) left out


def test_read_midi_quantises_off_grid_timing_and_estimates_a_missing_key(tmp_path):
    scale = [60, 62, 64, 65, 67, 69, 71, 72]
    mido_file(
        tmp_path / "b.mid", [(i + 0.04, 0.93, p) for i, p in enumerate(scale * 2)], key=None, drums=False
    )
    p = read_midi(tmp_path / "b.mid", resolution=4)
    assert [n.start for n in p.notes] == [4 * i for i in range(16)]
    assert {n.duration for n in p.notes} == {4}
    assert p.key == "C major"


def test_estimate_key_finds_minor_and_respects_candidates():
    a_minor = [Note(i * 4, 4, p) for i, p in enumerate([57, 59, 60, 62, 64, 65, 68, 69, 64, 57, 69, 57])]
    assert estimate_key(a_minor) == "A minor"
    assert estimate_key(a_minor, ["C major", "A minor"]) == "A minor"
    assert estimate_key([]) is None


def test_split_by_piece_is_deterministic_and_keeps_both_sides():
    names = [f"piece{i}" for i in range(20)]
    a = split_by_piece(names, 0.1)
    assert a == split_by_piece(list(names), 0.1) and sum(a) == 2
    assert split_by_piece(names, 0.1, seed=1) != a
    assert sum(split_by_piece(names[:2], 0.1)) == 1  # two pieces: one each side
    assert split_by_piece(names[:1], 0.5) == [False]


def write_pieces(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        notes = [Note(4 * j, 4, int(rng.integers(55, 80)), 79) for j in range(12)]
        key = "D minor" if i % 2 else "F major"
        piece = Piece(notes, key=key, meter="4/4", name=f"p{i}")
        (folder / f"p{i}.mid").write_bytes(midi_bytes(piece))


def test_prepare_music_from_a_midi_directory(tmp_path):
    write_pieces(tmp_path / "src")
    (tmp_path / "src" / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    (tmp_path / "src" / "notes.txt").write_text("not music")
    meta = prepare_music(
        str(tmp_path / "src"), tmp_path / "out", overrides=["val_fraction=0.33", "style=folk"]
    )
    assert meta["kind"] == "music" and meta["documents"] == 6
    assert (meta["train_documents"], meta["val_documents"]) == (4, 2)
    assert meta["skipped"] == {"corrupt": 1, "corrupt_files": ["broken.mid"]}
    assert meta["keys"] == {"D minor": 3, "F major": 3}
    assert {r["style"] for r in meta["pieces"]} == {"folk"}
    data = load_prepared_music(tmp_path / "out")
    assert isinstance(load_tokenizer(tmp_path / "out"), MusicTokenizer)
    assert (
        len(data.train)
        == meta["train_tokens"]
        == sum(r["tokens"] for r in meta["pieces"] if r["split"] == "train")
    )
    assert meta["train_bytes"] == len(data.tokenizer.decode(data.train.tolist()).encode())
    val = list(data.pieces("val"))
    assert len(val) == 2 and all(len(p.notes) == 12 and p.style == "folk" for p in val)
    # the same split and tokens when prepared again
    meta2 = prepare_music(
        str(tmp_path / "src"), tmp_path / "out", overrides=["val_fraction=0.33", "style=folk"], overwrite=True
    )
    assert meta2["pieces"] == meta["pieces"] and meta2["tokenizer"] == meta["tokenizer"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["val_fraction"] == 0.33


def test_transposition_augments_the_train_split_only(tmp_path):
    write_pieces(tmp_path / "src", n=4)
    plain = prepare_music(str(tmp_path / "src"), tmp_path / "a", overrides={"val_fraction": 0.25})
    aug = prepare_music(
        str(tmp_path / "src"), tmp_path / "b", overrides={"val_fraction": 0.25, "transpose": 2}
    )
    assert aug["val_tokens"] == plain["val_tokens"]
    assert aug["train_tokens"] == 5 * plain["train_tokens"]
    train = [r for r in aug["pieces"] if r["split"] == "train"]
    assert all(r["transpositions"] == [-2, -1, 0, 1, 2] for r in train)
    keys = {p.key for p in load_prepared_music(tmp_path / "b").pieces("train")}
    assert {"C minor", "C# minor", "D minor", "Eb minor", "E minor"} <= keys


def test_bad_sources_are_clear_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mid").write_bytes(b"not a midi file")
    with pytest.raises(AigcError, match=r"no usable pieces .* 1 corrupt file\(s\) \['x.mid'\]"):
        prepare_music(str(tmp_path / "bad"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(AigcError, match="music built-ins: music21:bach, music21:folk"):
        prepare_music("music21:mozart", tmp_path / "out")
    with pytest.raises(AigcError, match="not found"):
        prepare_music(str(tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(AigcError, match="resolution must divide 480"):
        prepare_music(str(tmp_path / "bad"), tmp_path / "out", overrides=["resolution=7"])
    with pytest.raises(AigcError, match="unknown config key bars"):
        prepare_music(str(tmp_path / "bad"), tmp_path / "out", overrides=["bars=3"])


# ----------------------------------------------------------------------------- music21 scores

music21 = pytest.importorskip("music21")


def test_musicxml_with_pickup_and_abc_collection(tmp_path):
    from music21 import key, meter, note, stream

    # a 3/4 tune in E minor starting on the last beat (pickup) with a tie across the bar
    part = stream.Part()
    m0 = stream.Measure(number=0)
    m0.append([meter.TimeSignature("3/4"), key.Key("e"), note.Note("B3", quarterLength=1)])
    m0.paddingLeft = 2.0
    m1 = stream.Measure(number=1)
    first = note.Note("E4", quarterLength=2)
    first.tie = music21.tie.Tie("start")
    m1.append([first, note.Note("G4", quarterLength=1)])
    m2 = stream.Measure(number=2)
    held = note.Note("E4", quarterLength=1)
    held.tie = music21.tie.Tie("stop")
    m2.append([held, note.Note("F#4", quarterLength=1), note.Note("E4", quarterLength=1)])
    part.append([m0, m1, m2])
    score = stream.Score([part])
    (tmp_path / "src").mkdir()
    score.write("musicxml", fp=tmp_path / "src" / "tune.musicxml")
    abc = "X:1\nT:One\nM:2/4\nL:1/8\nK:G\nGABc|d2B2|\n\nX:2\nT:Two\nM:6/8\nL:1/8\nK:Dm\nDEF AGF|D3 D3|\n"
    (tmp_path / "src" / "tunes.abc").write_text(abc)
    meta = prepare_music(str(tmp_path / "src"), tmp_path / "out", overrides=["val_fraction=0", "cache=false"])
    rows = {r["name"]: r for r in meta["pieces"]}
    assert set(rows) == {"tune.musicxml", "tunes.abc#1", "tunes.abc#2"}
    assert (rows["tune.musicxml"]["key"], rows["tune.musicxml"]["meter"]) == ("E minor", "3/4")
    assert (rows["tunes.abc#1"]["meter"], rows["tunes.abc#2"]["meter"]) == ("2/4", "6/8")
    assert rows["tunes.abc#2"]["key"] == "D minor"
    data = load_prepared_music(tmp_path / "out")
    tune = next(p for p in data.pieces("train") if p.meter == "3/4")
    # pickup on beat 3 of bar 0 (step 8), the tied E4 merged into one 3-beat note from bar 1
    assert tune.notes == [
        Note(8, 4, 59, 79),
        Note(12, 12, 64, 79),
        Note(20, 4, 67, 79),
        Note(28, 4, 66, 79),
        Note(32, 4, 64, 79),
    ]


@pytest.mark.slow
def test_bach_builtin_and_cache(tmp_path):
    meta = prepare_music("music21:bach", tmp_path / "out", overrides=["limit=3", "val_fraction=0.34"])
    assert meta["documents"] == 3 and meta["skipped"]["corrupt"] == 0
    assert {r["style"] for r in meta["pieces"]} == {"chorale"}
    assert all(r["notes"] > 100 for r in meta["pieces"])  # four voices
    cached = list((tmp_path / "aigc-home" / "cache" / "music").glob("*.json"))
    assert len(cached) == 3
    again = prepare_music("music21:bach", tmp_path / "out2", overrides=["limit=3", "val_fraction=0.34"])
    assert again["pieces"] == meta["pieces"] and again["tokenizer"] == meta["tokenizer"]


def test_cli_data_prepare_and_show_music(tmp_path, run_cli):
    write_pieces(tmp_path / "src", n=12)
    (tmp_path / "src" / "broken.mid").write_bytes(b"garbage")
    code, out, err = run_cli(
        "data", "prepare", tmp_path / "src", "--kind", "music", "--out", tmp_path / "out"
    )
    assert code == 0, err
    assert "12 pieces (10 train / 2 val)" in out and "skipped 1 corrupt file(s) e.g. broken.mid" in out
    code, out, _ = run_cli("data", "show", tmp_path / "out")
    assert code == 0 and "kind: music" in out and "pieces: [12 entries; see meta.json]" in out
    code, _, err = run_cli(
        "data", "prepare", tmp_path / "src", "--kind", "music", "--out", tmp_path / "o2", "--vocab-size", "9"
    )
    assert code == 1 and "--vocab-size: text options do not apply to --kind music" in err
    code, _, err = run_cli("data", "prepare", "music21:nope", "--kind", "music", "--out", tmp_path / "o3")
    assert code == 1 and "music built-ins: music21:bach, music21:folk" in err
