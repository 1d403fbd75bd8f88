"""Music event tokenizer: key/meter parsing, lossless round trips, tolerant decoding, save/load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc.errors import AigcError
from aigc.tokenizers import load_tokenizer
from aigc.tokenizers.music import (
    KEYS,
    METERS,
    MusicTokenizer,
    Note,
    Piece,
    bar_steps,
    normalize_notes,
    parse_key,
    parse_meter,
)

pytest.importorskip("mido")

from aigc.data.music import read_midi  # noqa: E402  (needs mido)
from aigc.generation.music_render import midi_bytes  # noqa: E402


@pytest.mark.parametrize(
    "text, key",
    [
        ("D minor", "D minor"),
        ("d minor", "D minor"),
        ("Dm", "D minor"),
        ("d", "D minor"),
        ("D", "D major"),
        ("F# major", "F# major"),
        ("Gb major", "F# major"),
        ("B-flat major", "Bb major"),
        ("B- minor", "Bb minor"),
        ("E♭ maj", "Eb major"),
        ("f#m", "F# minor"),
        ("Cb", "B major"),
        ("A min", "A minor"),
    ],
)
def test_parse_key(text, key):
    assert parse_key(text) == key


@pytest.mark.parametrize("bad", ["H major", "D dorian", "", "minor", "C##", "3/4"])
def test_parse_key_rejects_with_accepted_forms(bad):
    with pytest.raises(AigcError, match="accepted forms: 'D minor'"):
        parse_key(bad)


def test_every_canonical_key_parses_to_itself():
    assert [parse_key(k) for k in KEYS] == list(KEYS)


@pytest.mark.parametrize("text, meter", [("3/4", "3/4"), (" 6 / 8 ", "6/8"), ("C", "4/4"), ("C|", "2/2")])
def test_parse_meter(text, meter):
    assert parse_meter(text) == meter


@pytest.mark.parametrize("bad", ["3/5", "0/4", "three-four", "4", "33/4"])
def test_parse_meter_rejects_with_accepted_forms(bad):
    with pytest.raises(AigcError, match="accepted forms: '3/4'"):
        parse_meter(bad)


def test_bar_steps():
    assert bar_steps("3/4", 4) == 12
    assert bar_steps("6/8", 4) == 12
    assert bar_steps("7/8", 2) == 7


def test_encoding_layout_and_event_text():
    tok = MusicTokenizer()
    piece = Piece(
        [Note(0, 4, 60, 80), Note(0, 4, 64, 80), Note(4, 8, 62, 100), Note(20, 2, 67, 100)],
        key="d minor",
        meter="3/4",
        style="chorale",
    )
    ids = tok.encode(piece)
    text = tok.decode(ids)
    assert text == (
        "<bos> <style=chorale> <key=D minor> <meter=3/4> Bar Pos_0 Vel_79 Pitch_60 Dur_4 Pitch_64 Dur_4 "
        "Pos_4 Vel_95 Pitch_62 Dur_8 Bar Pos_8 Pitch_67 Dur_2 <eos>"
    )
    assert tok.encode(text) == ids  # the event text is a second, lossless form
    with pytest.raises(AigcError, match="unknown music token 'Pitch_200'"):
        tok.encode("Bar Pos_0 Pitch_200")


def test_conditioning_errors_name_the_choices():
    tok = MusicTokenizer()
    with pytest.raises(AigcError, match="this model knows: chorale, folk, other"):
        tok.condition_ids(style="jazz")
    with pytest.raises(AigcError, match="supported meters"):
        tok.condition_ids(meter="11/16")


# ----------------------------------------------------------------------------- round trips

notes_strategy = st.lists(
    st.tuples(
        st.integers(0, 200),  # start (steps)
        st.integers(1, 70),  # duration: up to past max_duration (clipped by normalisation)
        st.integers(0, 127),  # pitch
        st.integers(1, 127),  # velocity
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(notes=notes_strategy, meter=st.sampled_from(METERS), key=st.sampled_from(KEYS))
def test_round_trip_events_midi_events(notes, meter, key):
    tok = MusicTokenizer()
    piece = Piece([Note(*n) for n in notes], key=key, meter=meter, style="folk", tempo=96.0)
    ids = tok.encode(piece)
    decoded = tok.decode_notes(ids)
    assert decoded.skipped == 0
    # quantised input: decode gives exactly the normalised notes and the conditioning back
    assert decoded.piece.notes == normalize_notes(piece.notes, tok.max_duration)
    assert (decoded.piece.key, decoded.piece.meter, decoded.piece.style) == (key, meter, "folk")
    # events -> MIDI bytes (our writer) -> mido reader -> events: lossless
    midi = midi_bytes(decoded.piece, metadata={"style": "folk"})
    back = read_midi(midi, resolution=tok.resolution)
    assert back.notes == decoded.piece.notes
    assert (back.key, back.meter, back.style) == (key, meter, "folk")
    assert tok.encode(back) == ids


@settings(max_examples=30, deadline=None)
@given(notes=notes_strategy)
def test_round_trip_at_triplet_resolution(notes):
    tok = MusicTokenizer(resolution=12)
    piece = Piece([Note(*n) for n in notes], resolution=12)
    ids = tok.encode(piece)
    back = read_midi(midi_bytes(tok.decode_notes(ids).piece), resolution=12)
    assert tok.encode(Piece(back.notes, resolution=12)) == ids


def test_normalize_notes_cuts_same_pitch_overlaps():
    notes = normalize_notes([(0, 8, 60, 80), (4, 4, 60, 80), (4, 2, 60, 80), (0, 3, 200, 80)])
    assert notes == [Note(0, 4, 60, 79), Note(4, 4, 60, 79)]


# ----------------------------------------------------------------------------- tolerant decoding


def test_decoding_skips_grammar_errors_and_counts_them():
    tok = MusicTokenizer()
    text = (
        "<bos> <key=G major> <meter=3/4> Pitch_60 Dur_4 "  # no bar yet: Pitch skipped, then Dur skipped
        "Bar Pos_13 Pitch_61 Dur_4 "  # Pos 13 is outside a 3/4 bar (12 steps): Pos, Pitch, Dur skipped
        "Pos_2 Pitch_62 Dur_4 Dur_2 "  # a second Dur without a Pitch
        "Pitch_64 Pos_3 Pitch_65 Dur_1 "  # Pitch_64 without a Dur
        "<key=D minor> Bar Pos_0 Pitch_67 Dur_2 Pitch_67 Dur_3 Pitch_70"  # late key, duplicate, dangling
    )
    d = tok.decode_notes(tok.encode(text))
    assert d.piece.notes == [
        Note(2, 4, 62, 79),
        Note(3, 1, 65, 79),
        Note(12, 3, 67, 79),
    ]  # longer duplicate kept
    assert d.piece.key == "G major" and d.piece.meter == "3/4"
    assert d.skipped == 10
    assert d.problems[0] == "Pitch_60 without a valid Pos"


def test_decoding_stops_at_eos_and_skips_out_of_range_ids():
    tok = MusicTokenizer()
    ids = tok.encode("<eos> <bos> Bar Pos_0 Pitch_60 Dur_4 <eos> Bar Pos_0 Pitch_62 Dur_4")
    d = tok.decode_notes([*ids[:4], 10_000, *ids[4:]])
    assert d.piece.notes == [Note(0, 4, 60, 79)]
    assert d.skipped == 1
    assert [len(p) for p in tok.split_pieces(ids)] == [1, 6, 4]


# ----------------------------------------------------------------------------- save / load


def test_save_load_and_load_tokenizer_dispatch(tmp_path):
    tok = MusicTokenizer(resolution=12, styles=("chorale", "folk", "other", "reel"))
    tok.save(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["kind"] == "music" and spec["vocab"] == tok.vocab
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        back = load_tokenizer(path)
        assert isinstance(back, MusicTokenizer)
        assert (back.id, back.vocab, back.resolution) == (tok.id, tok.vocab, 12)
    assert MusicTokenizer().id != tok.id
    # a text tokenizer still loads as before
    from aigc.tokenizers import Tokenizer, train_tokenizer

    train_tokenizer("char", ["hello"]).save(tmp_path / "text.json")
    assert isinstance(load_tokenizer(tmp_path / "text.json"), Tokenizer)


def test_load_rejects_a_tampered_vocabulary(tmp_path):
    tok = MusicTokenizer()
    spec = tok.to_dict()
    spec["vocab"] = spec["vocab"][::-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(AigcError, match="vocabulary differs"):
        load_tokenizer(tmp_path)
