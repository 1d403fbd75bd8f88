"""Music rendering speed: 30 s of a 4-voice Bach chorale to WAV, against the 1 s budget.

    python bench/bench_music_render.py             # piano, organ, strings at 22.05 and 44.1 kHz
    python bench/bench_music_render.py --quick     # piano at 22.05 kHz only

The piece is a real chorale from music21's corpus (bwv269, repeated to fill 30 s), or a synthetic
four-voice piece when music21 is absent. Peers in the same run: a naive additive synthesiser
(one `np.sin` per partial per note, no wavetable, no cache) and fluidsynth when it and a
SoundFont are installed. Medians of a few repeats.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import numpy as np

from aigc.generation.music_render import (
    INSTRUMENTS,
    _envelope,
    find_soundfont,
    fluidsynth_wav,
    midi_bytes,
    synthesize,
    wav_bytes,
)
from aigc.tokenizers.music import Note, Piece

BUDGET = 1.0  # seconds for 30 s of audio


def thirty_seconds_of_chorale() -> Piece:
    try:
        from pathlib import Path

        from music21 import corpus

        from aigc.data.music import parse_file

        piece = parse_file(Path(str(corpus.getWork("bach/bwv269"))), resolution=4)[0]
    except ModuleNotFoundError:
        rng = np.random.default_rng(0)
        notes = [
            Note(t, 4, b + int(rng.integers(0, 8)), 79) for b in (72, 64, 55, 48) for t in range(0, 64, 4)
        ]
        piece = Piece(notes, key="C major", tempo=100.0, name="synthetic")
    piece.tempo = 100.0
    target = int(30 * piece.tempo / 60 * piece.resolution)  # steps in 30 s
    length = piece.length_steps
    notes = [n._replace(start=n.start + k * length) for k in range(target // length + 1) for n in piece.notes]
    piece.notes = [n._replace(duration=min(n.duration, target - n.start)) for n in notes if n.start < target]
    return piece


def naive_synth(piece: Piece, instrument: str, sr: int) -> np.ndarray:
    """The textbook way: sum of sines per note, every note computed from scratch."""
    spec = INSTRUMENTS[instrument]
    sec = 60.0 / (piece.tempo * piece.resolution)
    rel = int(spec["release"] * sr)
    out = np.zeros(int(piece.length_steps * sec * sr) + rel + 1, dtype=np.float32)
    for n in piece.notes:
        n_on = max(1, int(n.duration * sec * sr))
        t = np.arange(n_on + rel) / sr
        f = 440.0 * 2 ** ((n.pitch - 69) / 12)
        w = sum(a * np.sin(2 * np.pi * f * (k + 1) * t) for k, a in enumerate(spec["partials"]) if a)
        start = int(n.start * sec * sr)
        out[start : start + len(t)] += (w * _envelope(n_on, n_on + rel, sr, spec) * n.velocity / 127).astype(
            np.float32
        )
    return out / max(1e-9, float(np.abs(out).max())) * 0.891


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    piece = thirty_seconds_of_chorale()
    print(f"piece: {piece.name}, {len(piece.notes)} notes, {piece.seconds():.1f} s of music")
    rates = [22_050] if args.quick else [22_050, 44_100]
    instruments = ["piano"] if args.quick else list(INSTRUMENTS)
    for sr in rates:
        for inst in instruments:
            ours = timed(lambda i=inst, r=sr: wav_bytes(synthesize(piece, i, r), r), args.repeats)
            line = f"{inst:8s} {sr / 1000:5.2f} kHz  builtin {ours:6.3f} s  ({ours / BUDGET:.2f}x the 1 s budget)"
            if not args.quick:
                naive = timed(lambda i=inst, r=sr: naive_synth(piece, i, r), max(1, args.repeats // 2))
                line += f"  naive additive {naive:6.3f} s  (builtin is {naive / ours:.1f}x faster)"
            print(line, flush=True)
    sf = find_soundfont()
    if shutil.which("fluidsynth") and sf is not None:
        midi = midi_bytes(piece)
        fl = timed(lambda: fluidsynth_wav(midi, sf, 44_100), 3)
        print(f"fluidsynth 44.1 kHz {fl:.3f} s")
    else:
        print("fluidsynth: not installed (or no SoundFont), skipped")


if __name__ == "__main__":
    main()
