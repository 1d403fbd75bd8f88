"""Music evaluation: do outputs parse, and do their statistics match held-out pieces?

Metrics (Yang & Lerch 2018, "On the evaluation of generative models in music", pitch-class
histograms, note-length and density statistics):
  - valid_midi_share   share of MIDI files that parse (mido) and hold at least one note
  - pc_distance        Jensen-Shannon divergence (base 2: 0 = same, 1 = disjoint) between the
                       mean *key-relative* pitch-class profiles of two sets: each piece's
                       duration-weighted pitch-class histogram is rotated to its estimated tonic
                       (Krumhansl-Schmuckler) into 24 bins (12 major, 12 minor). Key-relative,
                       because the raw histogram of a set mixes all its keys, and a unigram
                       baseline sampled from the training histogram matches that mix by
                       construction while sounding in no key at all.
  - pc_distance_raw    the same divergence on raw (absolute) pitch-class histograms, for reference
  - pc_piece_distance  mean over pieces of JS(piece's 12-bin key-relative histogram, the reference
                       profile of the same mode): how far a typical single piece is from the
                       reference's tonality
  - duration / density: mean note length (quarters), JS between note-length histograms, notes per
                       bar, mean polyphony (sounding notes at an onset-weighted step)
  - repetition         share of non-empty bars whose exact content (positions, pitches,
                       durations) already occurred earlier in the same piece

`unigram_baseline` samples pieces whose pitches and durations are drawn independently from the
training histograms: the floor a model must beat.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from aigc.data.music import estimate_key
from aigc.tokenizers.music import Note, Piece, bar_steps, key_tonic, normalize_notes

# ----------------------------------------------------------------------------- validity


def valid_midi(data: bytes) -> bool:
    """Parses as a Standard MIDI File (mido) and holds at least one note-on."""
    import mido

    try:
        mid = mido.MidiFile(file=io.BytesIO(data))
        return any(m.type == "note_on" and m.velocity > 0 for t in mid.tracks for m in t)
    except Exception:  # mido raises many types on damaged data
        return False


def valid_midi_share(files: Sequence[bytes]) -> float:
    return sum(valid_midi(f) for f in files) / len(files) if files else 0.0


# ----------------------------------------------------------------------------- histograms


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0..1) of two histograms (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def pitch_class_histogram(piece: Piece) -> np.ndarray:
    """(12,) duration-weighted pitch-class histogram, summing to 1 (zeros for an empty piece)."""
    hist = np.zeros(12)
    for n in piece.notes:
        hist[n.pitch % 12] += n.duration
    return hist / hist.sum() if hist.any() else hist


def tonal_profile(piece: Piece) -> np.ndarray:
    """(24,) the pitch-class histogram rotated to the estimated tonic; major keys fill bins 0-11,
    minor keys 12-23."""
    hist = pitch_class_histogram(piece)
    out = np.zeros(24)
    key = estimate_key(piece.notes)
    if key is None:
        return out
    tonic, mode = key_tonic(key)
    offset = 0 if mode == "major" else 12
    out[offset : offset + 12] = np.roll(hist, -tonic)
    return out


def _mean(rows: list[np.ndarray], size: int) -> np.ndarray:
    rows = [r for r in rows if r.any()]
    return np.mean(rows, axis=0) if rows else np.full(size, 1.0 / size)


def duration_histogram(pieces: Sequence[Piece], max_steps: int = 64) -> np.ndarray:
    hist = np.zeros(max_steps + 1)
    for p in pieces:
        for n in p.notes:
            hist[min(n.duration, max_steps)] += 1
    return hist if hist.any() else np.ones_like(hist)


# ----------------------------------------------------------------------------- structure


def _bars(piece: Piece) -> dict[int, tuple]:
    length = bar_steps(piece.meter, piece.resolution)
    bars: dict[int, list] = {}
    for n in piece.notes:
        bars.setdefault(n.start // length, []).append((n.start % length, n.pitch, n.duration))
    return {b: tuple(sorted(v)) for b, v in bars.items()}


def repetition(piece: Piece) -> float:
    """Share of non-empty bars equal to an earlier bar of the same piece."""
    bars = _bars(piece)
    seen, repeats = set(), 0
    for b in sorted(bars):
        repeats += bars[b] in seen
        seen.add(bars[b])
    return repeats / len(bars) if bars else 0.0


def polyphony(piece: Piece) -> float:
    """Mean number of notes sounding at the onsets of the piece."""
    onsets = sorted({n.start for n in piece.notes})
    if not onsets:
        return 0.0
    counts = [sum(n.start <= t < n.start + n.duration for n in piece.notes) for t in onsets]
    return float(np.mean(counts))


def statistics(pieces: Sequence[Piece]) -> dict[str, float]:
    """Per-set summary: pieces, notes, note length, notes per bar, polyphony, repetition."""
    notes = [n for p in pieces for n in p.notes]
    bars = sum(len(_bars(p)) for p in pieces)
    return {
        "pieces": len(pieces),
        "notes": len(notes),
        "mean_duration_quarters": float(np.mean([n.duration / p.resolution for p in pieces for n in p.notes]))
        if notes
        else 0.0,
        "notes_per_bar": len(notes) / bars if bars else 0.0,
        "polyphony": float(np.mean([polyphony(p) for p in pieces])) if pieces else 0.0,
        "repetition": float(np.mean([repetition(p) for p in pieces])) if pieces else 0.0,
    }


def _piece_distance(profiles: list[np.ndarray], ref: np.ndarray) -> float:
    """Mean JS of each piece's 12-bin key-relative histogram to the reference profile of its mode."""
    out = []
    for g in profiles:
        half = slice(0, 12) if g[:12].any() else slice(12, 24)
        ref_half = ref[half] if ref[half].any() else np.full(12, 1 / 12)
        out.append(js_divergence(g[half], ref_half))
    return float(np.mean(out)) if out else 1.0


def compare(generated: Sequence[Piece], reference: Sequence[Piece]) -> dict[str, Any]:
    """Distances of `generated` to `reference` (held-out) pieces, plus both sets' statistics."""
    ref_profile = _mean([tonal_profile(p) for p in reference], 24)
    gen_profiles = [g for g in (tonal_profile(p) for p in generated) if g.any()]
    return {
        "pc_distance": js_divergence(_mean(gen_profiles, 24), ref_profile),
        "pc_distance_raw": js_divergence(
            _mean([pitch_class_histogram(p) for p in generated], 12),
            _mean([pitch_class_histogram(p) for p in reference], 12),
        ),
        "pc_piece_distance": _piece_distance(gen_profiles, ref_profile),
        "duration_distance": js_divergence(duration_histogram(generated), duration_histogram(reference)),
        "generated": statistics(generated),
        "reference": statistics(reference),
    }


# ----------------------------------------------------------------------------- baseline


def unigram_baseline(train: Sequence[Piece], n_pieces: int, bars: int = 8, seed: int = 0) -> list[Piece]:
    """Pieces of independent draws from the training pitch and duration histograms.

    Each piece has round(training polyphony) voices; each voice fills `bars` bars of the most
    common training meter with back-to-back notes (pitch and duration drawn independently).
    """
    if not train or not any(p.notes for p in train):
        raise ValueError("the unigram baseline needs training pieces with notes")
    rng = np.random.default_rng(seed)
    pitches = Counter(n.pitch for p in train for n in p.notes)
    durs = Counter(n.duration for p in train for n in p.notes)
    p_vals, p_w = np.array(list(pitches)), np.array(list(pitches.values()), dtype=float)
    d_vals, d_w = np.array(list(durs)), np.array(list(durs.values()), dtype=float)
    meter = Counter(p.meter for p in train).most_common(1)[0][0]
    res = train[0].resolution
    voices = max(1, round(statistics(train)["polyphony"]))
    total = bars * bar_steps(meter, res)
    out = []
    for i in range(n_pieces):
        notes = []
        for _ in range(voices):
            t = 0
            while t < total:
                d = int(rng.choice(d_vals, p=d_w / d_w.sum()))
                d = min(d, total - t)
                notes.append(Note(t, d, int(rng.choice(p_vals, p=p_w / p_w.sum()))))
                t += d
        out.append(Piece(normalize_notes(notes), None, meter, "baseline", res, name=f"unigram-{i}"))
    return out
