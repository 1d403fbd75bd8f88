"""Music rendering: a `Piece` -> MIDI bytes, WAV audio, piano-roll PNG, JSON sidecar.

- MIDI: a tiny Standard MIDI File writer (format 0, one track): tempo, meter, key signature,
  program, notes, and the generation metadata as a text meta event `aigc:{json}`.
- WAV: a numpy wavetable synthesiser. Each instrument is one period of a harmonic spectrum
  (additive synthesis) read at the note's frequency, shaped by an ADSR envelope; the piano
  cross-fades from a bright to a dull table as the note decays. Notes are mixed, then scaled
  to -1 dBFS peak (never clipped) and written as 16-bit PCM. When `fluidsynth` and a SoundFont
  are both present (`AIGC_SOUNDFONT` or a usual path), `engine="auto"` uses them instead.
- Piano roll: Pillow, one pixel row per semitone, bar lines, velocity as colour; the metadata
  goes into a PNG text chunk too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aigc.errors import AigcError
from aigc.tokenizers.music import FIFTHS, Piece, bar_steps, parse_meter
from aigc.utils.io import atomic_write_bytes, atomic_write_json

TICKS_PER_QUARTER = 480
SAMPLE_RATE = 22_050
TABLE_SIZE = 4096

# ----------------------------------------------------------------------------- MIDI


def _vlq(n: int) -> bytes:
    """MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _meta(kind: int, data: bytes) -> bytes:
    return bytes([0xFF, kind]) + _vlq(len(data)) + data


def check_piece(piece: Piece) -> None:
    """Refuse what no renderer can play: a non-positive tempo, notes off the MIDI range or grid."""
    if not 1.0 <= piece.tempo <= 1000.0:
        raise AigcError(f"tempo {piece.tempo} is out of range; give 1 to 1000 quarter notes per minute")
    bad = next(
        (n for n in piece.notes if not (0 <= n.pitch <= 127 and n.start >= 0 and n.duration >= 1)), None
    )
    if bad is not None:
        raise AigcError(f"cannot render {bad}: pitch must be 0..127, start >= 0, duration >= 1 step")


def midi_bytes(piece: Piece, metadata: dict[str, Any] | None = None, program: int = 0) -> bytes:
    """A format-0 Standard MIDI File of `piece` (channel 0, General MIDI `program`)."""
    check_piece(piece)
    step = TICKS_PER_QUARTER // piece.resolution
    num, den = (int(x) for x in parse_meter(piece.meter).split("/"))
    head = [_meta(0x03, (piece.name or "aigc").encode("utf-8")[:120])]
    head.append(_meta(0x51, round(60_000_000 / piece.tempo).to_bytes(3, "big")))  # microseconds per quarter
    head.append(_meta(0x58, bytes([num, den.bit_length() - 1, 24, 8])))  # den as a power of two
    if piece.key is not None:
        head.append(_meta(0x59, struct.pack("bB", FIFTHS[piece.key], piece.key.endswith("minor"))))
    if metadata:
        text = "aigc:" + json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), default=str)
        head.append(_meta(0x01, text.encode("utf-8")))
    head.append(bytes([0xC0, program & 0x7F]))
    # (tick, order, bytes): at one tick note-offs go first, so touching same-pitch notes stay apart
    events = []
    for n in piece.notes:
        events.append((n.start * step, 1, bytes([0x90, n.pitch, max(1, n.velocity)])))
        events.append(((n.start + n.duration) * step, 0, bytes([0x80, n.pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1], e[2][1]))
    track = bytearray(b"".join(b"\x00" + h for h in head))
    now = 0
    for tick, _, msg in events:
        track += _vlq(tick - now) + msg
        now = tick
    track += b"\x00" + _meta(0x2F, b"")  # end of track
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


# ----------------------------------------------------------------------------- synthesiser

Instrument = Literal["piano", "organ", "strings"]
INSTRUMENTS: dict[str, dict[str, Any]] = {
    # harmonic amplitudes (additive spectrum), ADSR in seconds / sustain level, decay time constant
    "piano": {
        "partials": [1.0, 0.5, 0.3, 0.18, 0.1, 0.07, 0.04, 0.02],
        "attack": 0.004,
        "release": 0.12,
        "decay": 1.2,
        "program": 0,
    },
    "organ": {
        "partials": [1.0, 0.8, 0.0, 0.55, 0.0, 0.35, 0.0, 0.3],
        "attack": 0.02,
        "release": 0.06,
        "decay": None,
        "program": 19,
    },
    "strings": {
        "partials": [1.0 / k for k in range(1, 13)],
        "attack": 0.09,
        "release": 0.2,
        "decay": None,
        "program": 48,
    },
}


def _table(partials: list[float]) -> np.ndarray:
    """One period of sum_k a_k sin(2 pi k t), peak-normalised, TABLE_SIZE samples (+1 for wrap)."""
    t = np.arange(TABLE_SIZE + 1) / TABLE_SIZE
    wave_ = sum(a * np.sin(2 * np.pi * (k + 1) * t) for k, a in enumerate(partials) if a)
    return (wave_ / np.abs(wave_).max()).astype(np.float32)


def _read(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Wavetable lookup with linear interpolation (the table carries one wrap-around sample)."""
    idx = phase.astype(np.int32)
    frac = (phase - idx).astype(np.float32)
    return table[idx] * (1 - frac) + table[idx + 1] * frac


def _envelope(n_on: int, n_total: int, sr: int, spec: dict[str, Any]) -> np.ndarray:
    """ADSR-like envelope: linear attack, exponential decay (piano) or sustain, linear release."""
    t = np.arange(n_total, dtype=np.float32) / sr
    env = np.minimum(1.0, t / spec["attack"])
    if spec["decay"] is not None:
        env *= np.exp(-t / spec["decay"])
    rel = n_total - n_on
    if rel > 0:
        level = env[n_on - 1] if n_on > 0 else 0.0
        env[n_on:] = level * np.linspace(1.0, 0.0, rel, dtype=np.float32)
    return env


def synthesize(piece: Piece, instrument: str = "piano", sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio in [-1, 1] (peak at -1 dBFS) of `piece`."""
    if instrument not in INSTRUMENTS:
        raise AigcError(f"unknown instrument {instrument!r}; choose one of: {', '.join(INSTRUMENTS)}")
    check_piece(piece)
    spec = INSTRUMENTS[instrument]
    bright = _table(spec["partials"])
    dull = _table(spec["partials"][:2]) if spec["decay"] is not None else None
    sec_per_step = 60.0 / (piece.tempo * piece.resolution)
    release = int(spec["release"] * sample_rate)
    total = int(piece.length_steps * sec_per_step * sample_rate) + release + 1
    out = np.zeros(total, dtype=np.float32)
    cache: dict[tuple[int, int], np.ndarray] = {}  # (pitch, samples) -> waveform, chorales repeat a lot
    for n in piece.notes:
        n_on = max(1, int(n.duration * sec_per_step * sample_rate))
        key = (n.pitch, n_on)
        if key not in cache:
            freq = 440.0 * 2 ** ((n.pitch - 69) / 12)
            n_total = n_on + release
            phase = (np.arange(n_total, dtype=np.float64) * (freq * TABLE_SIZE / sample_rate)) % TABLE_SIZE
            env = _envelope(n_on, n_total, sample_rate, spec)
            if dull is None:
                wav = _read(bright, phase) * env
            else:  # the piano loses its upper partials as it decays
                mix = np.exp(-np.arange(n_total, dtype=np.float32) / (0.25 * sample_rate))
                wav = (_read(bright, phase) * mix + _read(dull, phase) * (1 - mix)) * env
            cache[key] = wav
        start = int(n.start * sec_per_step * sample_rate)
        wav = cache[key]
        out[start : start + len(wav)] += wav * (n.velocity / 127.0)
    peak = float(np.abs(out).max()) if len(out) else 0.0
    if peak > 0:
        out *= 0.891 / peak  # -1 dBFS: normalised, never clipped
    return out


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM mono WAV of float audio in [-1, 1]."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)


def find_soundfont() -> Path | None:
    """`AIGC_SOUNDFONT`, else a General MIDI SoundFont at a usual system path, else None."""
    for p in [os.environ.get("AIGC_SOUNDFONT", ""), *SOUNDFONT_PATHS]:
        if p and Path(p).is_file():
            return Path(p)
    return None


def soundfont_warning() -> str | None:
    """Why a SoundFont named in `AIGC_SOUNDFONT` will not be used (the built-in synth renders
    instead), or None: a missing file or a missing fluidsynth program is said, not silently skipped."""
    name = os.environ.get("AIGC_SOUNDFONT", "")
    if not name:
        return None
    if not Path(name).is_file():
        return (
            f"AIGC_SOUNDFONT={name} is not a file; WAVs are rendered with the built-in synth instead "
            "(point it at an existing .sf2 file, or unset it)"
        )
    if shutil.which("fluidsynth") is None:
        return (
            f"AIGC_SOUNDFONT={name} is set but the fluidsynth program is not installed; WAVs are rendered "
            "with the built-in synth instead (install fluidsynth, or unset AIGC_SOUNDFONT)"
        )
    return None


def fluidsynth_wav(midi: bytes, soundfont: Path, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Render MIDI bytes with the fluidsynth program (no audio device: file output only)."""
    with tempfile.TemporaryDirectory() as d:
        mid, wav = Path(d) / "in.mid", Path(d) / "out.wav"
        mid.write_bytes(midi)
        cmd = [
            "fluidsynth",
            "-ni",
            "-q",
            "-F",
            str(wav),
            "-r",
            str(sample_rate),
            "-T",
            "wav",
            str(soundfont),
            str(mid),
        ]
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        if done.returncode != 0 or not wav.is_file():
            raise AigcError(
                f"fluidsynth failed ({done.stderr.decode(errors='replace')[:200]}); use engine='builtin'"
            )
        return wav.read_bytes()


def render_wav(
    piece: Piece,
    instrument: str = "piano",
    sample_rate: int = SAMPLE_RATE,
    engine: Literal["auto", "builtin", "fluidsynth"] = "auto",
) -> tuple[bytes, str]:
    """(WAV bytes, engine used). `auto` = fluidsynth when it and a SoundFont exist, else builtin."""
    sf = find_soundfont()
    have_fluid = shutil.which("fluidsynth") is not None and sf is not None
    if engine == "fluidsynth" and not have_fluid:
        raise AigcError(
            "engine fluidsynth needs the fluidsynth program and a SoundFont (set AIGC_SOUNDFONT=FILE.sf2); "
            "or use engine builtin"
        )
    if engine in ("auto", "fluidsynth") and have_fluid:
        program = INSTRUMENTS.get(instrument, INSTRUMENTS["piano"])["program"]
        return fluidsynth_wav(midi_bytes(piece, program=program), sf, sample_rate), "fluidsynth"
    return wav_bytes(synthesize(piece, instrument, sample_rate), sample_rate), "builtin"


# ----------------------------------------------------------------------------- piano roll


def piano_roll_png(piece: Piece, metadata: dict[str, Any] | None = None, px_per_step: int = 4) -> bytes:
    """A piano-roll PNG: time left to right, pitch bottom to top, bar lines, darker = louder."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    pitches = [n.pitch for n in piece.notes] or [60]
    lo, hi = min(pitches) - 2, max(pitches) + 2
    row = 5
    steps = max(piece.length_steps, 1)
    width, height = min(steps * px_per_step, 8000) + 1, (hi - lo + 1) * row
    scale = (width - 1) / steps
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for p in range(lo, hi + 1):  # shade the black keys
        if p % 12 in (1, 3, 6, 8, 10):
            y = (hi - p) * row
            draw.rectangle([0, y, width, y + row - 1], fill=(242, 242, 246))
    bar = bar_steps(parse_meter(piece.meter), piece.resolution)
    for s in range(0, steps + 1, bar):
        draw.line([round(s * scale), 0, round(s * scale), height], fill=(190, 190, 200))
    for n in piece.notes:
        y = (hi - n.pitch) * row
        shade = int(200 - 170 * n.velocity / 127)
        x0, x1 = round(n.start * scale), round((n.start + n.duration) * scale) - 1
        draw.rectangle([x0, y, max(x0, x1), y + row - 2], fill=(shade, shade, 230), outline=(20, 20, 90))
    info = PngInfo()
    if metadata:
        info.add_text("aigc", json.dumps(metadata, ensure_ascii=False, default=str))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# ----------------------------------------------------------------------------- files


def save_music(
    piece: Piece,
    out_dir: str | Path,
    stem: str,
    metadata: dict[str, Any] | None = None,
    instrument: str = "piano",
    formats: tuple[str, ...] = ("mid", "wav", "png"),
    sample_rate: int = SAMPLE_RATE,
    engine: Literal["auto", "builtin", "fluidsynth"] = "auto",
) -> dict[str, Path]:
    """Write `stem.mid|.wav|.png` and the sidecar `stem.json` (metadata + what was written), atomically."""
    unknown = sorted(set(formats) - {"mid", "wav", "png"})
    if unknown:
        raise AigcError(f"unknown music format {unknown[0]!r}; choose from mid, wav, png")
    out_dir = Path(out_dir)
    meta = dict(metadata or {})
    meta.update(
        key=piece.key,
        meter=piece.meter,
        style=piece.style,
        tempo=piece.tempo,
        notes=len(piece.notes),
        seconds=round(piece.seconds(), 3),
        instrument=instrument,
    )
    paths: dict[str, Path] = {}
    if "mid" in formats:
        program = INSTRUMENTS.get(instrument, INSTRUMENTS["piano"])["program"]
        paths["mid"] = atomic_write_bytes(out_dir / f"{stem}.mid", midi_bytes(piece, meta, program=program))
    if "wav" in formats:
        data, used = render_wav(piece, instrument, sample_rate, engine)
        meta.update(synth=used, sample_rate=sample_rate)
        paths["wav"] = atomic_write_bytes(out_dir / f"{stem}.wav", data)
    if "png" in formats:
        paths["png"] = atomic_write_bytes(out_dir / f"{stem}.png", piano_roll_png(piece, meta))
    from aigc.safety.provenance import file_hashes

    meta["files"] = {k: p.name for k, p in paths.items()}
    meta["sha256"] = file_hashes(paths.values())  # `aigc verify` notices an edit of any of them
    paths["json"] = atomic_write_json(out_dir / f"{stem}.json", meta)
    return paths
