"""Music evaluation: valid-MIDI share, key-relative pitch-class distance, statistics, baseline."""

from __future__ import annotations

import numpy as np
import pytest

from aigc.tokenizers.music import Note, Piece, normalize_notes

pytest.importorskip("mido")

from aigc.evaluation.music import (  # noqa: E402
    compare,
    js_divergence,
    pitch_class_histogram,
    polyphony,
    repetition,
    statistics,
    tonal_profile,
    unigram_baseline,
    valid_midi,
    valid_midi_share,
)
from aigc.generation.music_render import midi_bytes  # noqa: E402

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)


def tonal_piece(tonic: int, seed: int, bars: int = 8) -> Piece:
    """Two voices in a major key: tonic-heavy melody over a tonic/dominant bass."""
    rng = np.random.default_rng(seed)
    degrees = rng.choice(MAJOR_SCALE, size=bars * 4, p=[0.3, 0.1, 0.2, 0.05, 0.2, 0.1, 0.05])
    notes = [Note(4 * i, 4, 60 + tonic + int(d)) for i, d in enumerate(degrees)]
    notes += [Note(16 * b, 16, 48 + tonic + (7 if b % 2 else 0)) for b in range(bars)]
    return Piece(normalize_notes(notes), meter="4/4", name=f"tonal-{tonic}-{seed}")


def test_js_divergence_matches_scipy():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.random(12), rng.random(12)
        p[3] = 0.0  # zeros are allowed
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert js_divergence(np.eye(12)[0], np.eye(12)[5]) == pytest.approx(1.0)
    assert js_divergence(np.ones(12), 2 * np.ones(12)) == 0.0


def test_valid_midi_share():
    good = midi_bytes(Piece([Note(0, 4, 60)]))
    empty = midi_bytes(Piece([]))
    assert valid_midi(good) and not valid_midi(empty)
    assert not valid_midi(b"MThd\x00\x00\x00\x06\x00")
    assert not valid_midi(good[:30])  # truncated mid-track
    assert valid_midi_share([good, good, b"junk", empty]) == 0.5
    assert valid_midi_share([]) == 0.0


def test_pitch_class_histogram_and_key_relative_profile():
    piece = Piece([Note(0, 4, 62), Note(4, 2, 66), Note(6, 2, 69), Note(8, 8, 74)])  # D major triad
    hist = pitch_class_histogram(piece)
    assert hist[[2, 6, 9]].tolist() == [0.75, 0.125, 0.125] and hist.sum() == pytest.approx(1.0)
    # transposing a piece leaves its key-relative profile unchanged
    a = tonal_profile(tonal_piece(0, seed=1))
    b = tonal_profile(tonal_piece(7, seed=1))
    assert a[:12].sum() == pytest.approx(1.0)  # estimated as a major key
    np.testing.assert_allclose(a, b)


def test_structure_statistics():
    bar = [Note(0, 4, 60), Note(4, 4, 64), Note(8, 8, 67)]
    piece = Piece([n._replace(start=n.start + 16 * b) for b in range(4) for n in bar] + [Note(64, 4, 61)])
    assert repetition(piece) == pytest.approx(3 / 5)  # bars 1-3 repeat bar 0; bar 4 is new
    chord = Piece([Note(0, 4, 60), Note(0, 4, 64), Note(0, 2, 67), Note(2, 2, 72)])
    assert polyphony(chord) == pytest.approx((3 + 3) / 2)
    stats = statistics([piece])
    assert stats["notes_per_bar"] == pytest.approx(13 / 5)
    # 68 steps of notes, 4 steps per quarter, 13 notes
    assert stats["mean_duration_quarters"] == pytest.approx((4 * 16 + 4) / 4 / 13)


def test_unigram_baseline_draws_from_the_training_histograms():
    train = [tonal_piece(t, seed=s) for t in (0, 2, 5, 7) for s in range(3)]
    base = unigram_baseline(train, n_pieces=20, bars=8, seed=0)
    assert base == unigram_baseline(train, n_pieces=20, bars=8, seed=0)  # seeded
    assert len(base) == 20 and all(p.length_steps == 128 for p in base)
    train_pitches = {n.pitch for p in train for n in p.notes}
    assert {n.pitch for p in base for n in p.notes} <= train_pitches
    durations = [n.duration for p in base for n in p.notes]
    # drawn from {4, 16}; only the bar-8 end and same-pitch overlaps between voices cut notes short
    assert max(durations) == 16 and sum(d in (4, 16) for d in durations) / len(durations) > 0.9


def test_compare_ranks_real_music_above_the_unigram_baseline():
    """The figure's logic: pieces in one key each are closer to held-out tonal music than
    independent draws from the pooled (all-keys) histogram, though the raw histograms match."""
    tonics = [0, 2, 4, 5, 7, 9]
    train = [tonal_piece(t, seed=s) for t in tonics for s in range(4)]
    held_out = [tonal_piece(t, seed=100 + s) for t in tonics for s in range(2)]
    generated = [tonal_piece(t, seed=200 + s) for t in tonics for s in range(2)]
    baseline = unigram_baseline(train, n_pieces=12, bars=8, seed=0)
    real, base = compare(generated, held_out), compare(baseline, held_out)
    assert real["pc_distance"] < base["pc_distance"] / 2
    assert real["pc_piece_distance"] < base["pc_piece_distance"]
    assert compare(held_out, held_out)["pc_distance"] == 0.0
    assert real["generated"]["pieces"] == 12 and real["reference"]["notes"] > 0
