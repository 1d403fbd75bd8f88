"""Music events: a REMI-like vocabulary (Huang & Yang 2020, "Pop Music Transformer", sec. 3).

Time is a grid of `resolution` steps per quarter note (default 4: sixteenth notes). A piece is a
list of `Note(start, duration, pitch, velocity)` in grid steps, plus key, meter and style. Its
token sequence is

    <bos> <style=S> <key=K> <meter=N/D>  ( Bar ( Pos_i ( [Vel_v] Pitch_p Dur_d )+ )* )*  <eos>

Vocabulary, in id order:
  <pad> <bos> <eos>                       specials (`<eos>` ends a piece and separates pieces)
  <style=S>   one per style name           e.g. chorale, folk, other (set when the tokenizer is made)
  <key=K>     the 24 keys                  canonical spelling: "D minor", "Bb major", "F# minor"
  <meter=N/D> METERS                       sets the bar length: N * 4/D * resolution steps
  Bar                                      opens the next bar (the first Bar opens bar 0)
  Pos_i       i = 0 .. max_bar_steps - 1   onset inside the current bar
  Vel_v       VELOCITY_LEVELS (8)          velocity of the following notes (only written on change)
  Pitch_p     p = 0 .. 127                 MIDI pitch
  Dur_d       d = 1 .. max_duration        duration in steps (default 16 quarters)

Conditioning is the three tokens after <bos>: a generation request primes them (and, optionally,
a primer melody's events). `encode` normalises notes first (`normalize_notes`: quantised
velocity, durations clipped, same-pitch overlaps cut), so `decode_notes(encode(p))` gives the
normalised notes back exactly, and the round trip events -> MIDI -> events is lossless.
`decode_notes` is tolerant: a generated sequence with grammar errors (a Dur with no Pitch, a Pos
past the bar's end, ...) still yields valid notes; bad events are skipped and counted.

`decode(ids) -> str` (space-separated token names) and `encode(str)` keep the text tokenizer's
contract, so the text trainer and `aigc data show` work on music data unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aigc.errors import AigcError
from aigc.utils.io import atomic_write_text

FORMAT_VERSION = 1
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
BAR = "Bar"
DEFAULT_STYLES = ("chorale", "folk", "other")
METERS = (
    *("2/2", "3/2", "4/2", "2/4", "3/4", "4/4", "5/4", "6/4", "3/8", "5/8", "6/8", "7/8", "9/8", "12/8"),
    *("1/4", "8/4", "12/4", "6/2", "2/1", "3/1", "4/1"),  # long bars of older and folk notations (Essen)
)
VELOCITY_LEVELS = (15, 31, 47, 63, 79, 95, 111, 127)
DEFAULT_VELOCITY = 79
DEFAULT_TEMPO = 100.0  # quarter notes per minute, when a source gives none

# ----------------------------------------------------------------------------- keys and meters

PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
KEYS = tuple(f"{n} major" for n in MAJOR_NAMES) + tuple(f"{n} minor" for n in MINOR_NAMES)
# sharps (+) / flats (-) of each canonical key, for the MIDI key-signature event
FIFTHS = dict(
    zip(
        KEYS, (0, -5, 2, -3, 4, -1, 6, 1, -4, 3, -2, 5, -3, 4, -1, -6, 1, -4, 3, -2, 5, 0, -5, 2), strict=True
    )
)
KEY_FORMS = (
    "'D minor', 'Dm', 'd' (lower case = minor), 'F# major', 'F#', 'Bb minor', 'B-flat major', 'E♭' "
    "(tonic A-G, optional #/b/♯/♭/sharp/flat, then major|minor|maj|min|m; no mode = major)"
)
_KEY_RE = re.compile(
    r"^(?P<tonic>[a-gA-G])\s*(?P<acc>#|b|-?\s*sharp|-?\s*flat|-)?\s*(?P<mode>major|minor|maj|min|m)?$"
)


def parse_key(text: str) -> str:
    """'d minor', 'Dm', 'D', 'B-flat major', 'F#m' ... -> canonical key name ('D minor', 'Bb major').

    Enharmonic keys map to one spelling ('Gb major' -> 'F# major'). Raises AigcError listing the
    accepted forms when `text` is not a key.
    """
    raw = unicodedata.normalize("NFKC", str(text)).replace("♯", "#").replace("♭", "b").strip()
    m = _KEY_RE.match(raw.replace("_", " "))
    if not m:
        raise AigcError(f"cannot parse key {text!r}; accepted forms: {KEY_FORMS}")
    tonic, mode = m["tonic"], m["mode"]
    acc = m["acc"] if m["acc"] in (None, "-") else m["acc"].lstrip("-").strip()  # 'B-flat' = 'B flat'

    if mode is None:
        mode = "minor" if tonic.islower() else "major"
    mode = "major" if mode in ("major", "maj") else "minor"
    pc = PITCH_CLASSES[tonic.upper()] + {"#": 1, "sharp": 1, "b": -1, "flat": -1, "-": -1}.get(acc or "", 0)
    pc %= 12
    return f"{(MAJOR_NAMES if mode == 'major' else MINOR_NAMES)[pc]} {mode}"


def key_tonic(key: str) -> tuple[int, str]:
    """Canonical key name -> (tonic pitch class, 'major' | 'minor')."""
    name, mode = key.split(" ")
    names = MAJOR_NAMES if mode == "major" else MINOR_NAMES
    return names.index(name), mode


def transpose_key(key: str | None, semitones: int) -> str | None:
    if key is None:
        return None
    pc, mode = key_tonic(key)
    return f"{(MAJOR_NAMES if mode == 'major' else MINOR_NAMES)[(pc + semitones) % 12]} {mode}"


METER_FORMS = (
    "'3/4', '6/8', '4/4', 'C' (= 4/4), 'C|' (= 2/2): numerator 1-32, denominator 1, 2, 4, 8, 16 or 32"
)


def parse_meter(text: str) -> str:
    """'3/4', ' 6 / 8 ', 'C', 'C|' -> canonical meter 'N/D'; AigcError listing the accepted forms."""
    raw = str(text).strip()
    if raw.upper() in ("C", "COMMON"):
        return "4/4"
    if raw.upper() in ("C|", "CUT", "¢"):
        return "2/2"
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", raw)
    if not m or not 1 <= int(m[1]) <= 32 or int(m[2]) not in (1, 2, 4, 8, 16, 32):
        raise AigcError(f"cannot parse meter {text!r}; accepted forms: {METER_FORMS}")
    return f"{int(m[1])}/{int(m[2])}"


def bar_steps(meter: str, resolution: int) -> int:
    """Grid steps in one bar of `meter` ('3/4' at 4 steps per quarter -> 12)."""
    num, den = (int(x) for x in meter.split("/"))
    steps = num * 4 * resolution / den
    if steps != int(steps):
        raise AigcError(
            f"meter {meter} does not fit a grid of {resolution} steps per quarter; "
            "use a resolution that is a multiple of 2 (e.g. --set resolution=4)"
        )
    return int(steps)


# ----------------------------------------------------------------------------- notes and pieces


class Note(NamedTuple):
    """One note on the grid: onset and duration in steps, MIDI pitch, MIDI velocity."""

    start: int
    duration: int
    pitch: int
    velocity: int = DEFAULT_VELOCITY


@dataclass
class Piece:
    """Notes plus what conditions them. `resolution` = grid steps per quarter note."""

    notes: list[Note]
    key: str | None = None
    meter: str = "4/4"
    style: str | None = None
    resolution: int = 4
    tempo: float = DEFAULT_TEMPO
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def transposed(self, semitones: int) -> Piece:
        notes = [n._replace(pitch=n.pitch + semitones) for n in self.notes]
        return replace(self, notes=notes, key=transpose_key(self.key, semitones))

    @property
    def length_steps(self) -> int:
        return max((n.start + n.duration for n in self.notes), default=0)

    def seconds(self) -> float:
        return self.length_steps * 60.0 / (self.tempo * self.resolution)


def quantize_velocity(v: int) -> int:
    return min(VELOCITY_LEVELS, key=lambda level: (abs(level - v), level))


def normalize_notes(notes: Iterable[Sequence[int]], max_duration: int | None = None) -> list[Note]:
    """The canonical form the tokenizer encodes exactly.

    Drops pitches outside 0..127 and negative onsets, quantises velocity to VELOCITY_LEVELS,
    clips durations to 1..max_duration, and makes notes of one pitch not overlap (MIDI cannot
    tell overlapping same-pitch notes apart): of two at one onset the longer stays, an earlier
    one is cut where the next starts. Sorted by (start, pitch).
    """
    by_pitch: dict[int, dict[int, int]] = {}
    velocity: dict[tuple[int, int], int] = {}
    for n in notes:
        start, dur, pitch = int(n[0]), int(n[1]), int(n[2])
        vel = int(n[3]) if len(n) > 3 else DEFAULT_VELOCITY
        if not 0 <= pitch <= 127 or start < 0:
            continue
        dur = max(1, dur if max_duration is None else min(dur, max_duration))
        starts = by_pitch.setdefault(pitch, {})
        if dur > starts.get(start, 0):
            starts[start] = dur
            velocity[(start, pitch)] = quantize_velocity(vel)
    out = []
    for pitch, starts in by_pitch.items():
        onsets = sorted(starts)
        for i, s in enumerate(onsets):
            dur = starts[s] if i + 1 == len(onsets) else min(starts[s], onsets[i + 1] - s)
            out.append(Note(s, dur, pitch, velocity[(s, pitch)]))
    return sorted(out, key=lambda n: (n.start, n.pitch))


@dataclass
class Decoded:
    """What `decode_notes` made of a token sequence: the piece and how many events it skipped."""

    piece: Piece
    skipped: int
    problems: list[str]  # the first few skipped events, for messages


# ----------------------------------------------------------------------------- the tokenizer


class MusicTokenizer:
    """Event vocabulary over notes (see the module docstring); stored as JSON with "kind": "music"."""

    kind = "music"
    unknown = "error"

    def __init__(
        self,
        resolution: int = 4,
        styles: Sequence[str] = DEFAULT_STYLES,
        max_duration: int | None = None,
    ) -> None:
        if resolution < 1 or 480 % resolution:
            raise AigcError(
                f"resolution {resolution} must divide 480 (e.g. 2, 4, 6, 8, 12 steps per quarter)"
            )
        bad = [s for s in styles if not re.fullmatch(r"[\w-]+", s)]
        if bad or not styles:
            raise AigcError(
                f"style names must be non-empty words (letters, digits, _ or -), got {bad or styles}"
            )
        self.resolution = resolution
        self.styles = tuple(dict.fromkeys(styles))
        self.max_duration = max_duration or 16 * resolution
        self.max_bar_steps = max(bar_steps(m, resolution) for m in METERS)
        vocab = [*SPECIALS]
        vocab += [f"<style={s}>" for s in self.styles]
        vocab += [f"<key={k}>" for k in KEYS]
        vocab += [f"<meter={m}>" for m in METERS]
        vocab += [BAR]
        vocab += [f"Pos_{i}" for i in range(self.max_bar_steps)]
        vocab += [f"Vel_{v}" for v in VELOCITY_LEVELS]
        vocab += [f"Pitch_{p}" for p in range(128)]
        vocab += [f"Dur_{d}" for d in range(1, self.max_duration + 1)]
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id = (self.ids[t] for t in SPECIALS)
        self.eos_token = EOS
        self.special_tokens = list(SPECIALS)
        self.bar_id = self.ids[BAR]
        # first id of each numeric family, to decode with arithmetic instead of string parsing
        self._pos0, self._vel0 = self.ids["Pos_0"], self.ids[f"Vel_{VELOCITY_LEVELS[0]}"]
        self._pitch0, self._dur0 = self.ids["Pitch_0"], self.ids["Dur_1"]
        self.id = hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"MusicTokenizer(resolution={self.resolution}, vocab_size={self.vocab_size}, id={self.id!r})"

    def token(self, i: int) -> str | None:
        return self.vocab[i] if 0 <= i < len(self.vocab) else None

    # ------------------------------------------------------------------ conditioning

    def condition_ids(
        self, key: str | None = None, meter: str = "4/4", style: str | None = None
    ) -> list[int]:
        """<bos> <style> <key> <meter>: the prompt a generation request starts from."""
        ids = [self.bos_id]
        if style is not None:
            if style not in self.styles:
                raise AigcError(f"unknown style {style!r}; this model knows: {', '.join(self.styles)}")
            ids.append(self.ids[f"<style={style}>"])
        if key is not None:
            ids.append(self.ids[f"<key={parse_key(key)}>"])
        meter = parse_meter(meter)
        if meter not in METERS:
            raise AigcError(f"meter {meter} is not in the vocabulary; supported meters: {', '.join(METERS)}")
        ids.append(self.ids[f"<meter={meter}>"])
        return ids

    # ------------------------------------------------------------------ encode

    def encode_piece(self, piece: Piece, eos: bool = True) -> list[int]:
        """Conditioning tokens, then Bar / Pos / Vel / Pitch / Dur events of the normalised notes."""
        if piece.resolution != self.resolution:
            raise AigcError(
                f"piece {piece.name or ''} is on a grid of {piece.resolution} steps per quarter, this "
                f"tokenizer uses {self.resolution}; quantise it with resolution={self.resolution}"
            )
        ids = self.condition_ids(piece.key, piece.meter, piece.style)
        bar_len = bar_steps(parse_meter(piece.meter), self.resolution)
        bar, pos, vel = -1, -1, None
        for n in normalize_notes(piece.notes, self.max_duration):
            while n.start >= (bar + 1) * bar_len:  # open bars up to the note's (empty bars too)
                ids.append(self.bar_id)
                bar, pos = bar + 1, -1
            if n.start - bar * bar_len != pos:
                pos = n.start - bar * bar_len
                ids.append(self._pos0 + pos)
            if n.velocity != vel:
                vel = n.velocity
                ids.append(self._vel0 + VELOCITY_LEVELS.index(vel))
            ids += [self._pitch0 + n.pitch, self._dur0 + n.duration - 1]
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, x: str | Piece | Iterable[Sequence[int]]) -> list[int]:
        """Ids of a Piece, of a list of notes (4/4, no key or style), or of event text ('Bar Pos_0 ...')."""
        if isinstance(x, Piece):
            return self.encode_piece(x)
        if isinstance(x, str):
            # key names hold a space ('<key=D minor>'): a <...> group is one token
            tokens = re.findall(r"<[^>]*>|[^\s<]+", x)
            unknown = [t for t in tokens if t not in self.ids]
            if unknown:
                raise AigcError(
                    f"unknown music token {unknown[0]!r}; tokens look like {BOS}, <key=D minor>, Bar, "
                    "Pos_0, Vel_79, Pitch_60, Dur_4 (see aigc.tokenizers.music)"
                )
            return [self.ids[t] for t in tokens]
        return self.encode_piece(Piece(notes=[Note(*n) for n in x], resolution=self.resolution))

    def encode_array(self, x: str | Piece) -> np.ndarray:
        return np.asarray(self.encode(x), dtype=np.int64)

    def encode_batch(self, xs: Sequence[str | Piece]) -> list[np.ndarray]:
        return [self.encode_array(x) for x in xs]

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int]) -> str:
        """Event text of `ids` ('<bos> <key=D minor> Bar Pos_0 Pitch_62 Dur_4 ...')."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AigcError(
                f"token id {bad[0]} is out of range; this tokenizer has ids 0..{self.vocab_size - 1}"
            )
        return " ".join(self.vocab[i] for i in ids)

    def decode_notes(
        self, ids: Iterable[int], tempo: float = DEFAULT_TEMPO, stop_at_eos: bool = True
    ) -> Decoded:
        """Notes of a (possibly ungrammatical) sequence; bad events are skipped and counted.

        Rules: conditioning tokens count only before the first Bar; a Pos needs an open bar and
        must lie inside it; a Pitch needs a Pos; a Dur needs the Pitch before it. Decoding stops
        at the first <eos> after some content (a leading <eos> is a separator and is skipped).
        """
        piece = Piece(notes=[], resolution=self.resolution, tempo=tempo)
        skipped, problems = 0, []

        def skip(what: str) -> None:
            nonlocal skipped
            skipped += 1
            if len(problems) < 5:
                problems.append(what)

        bar, pos, vel, pitch = -1, None, DEFAULT_VELOCITY, None
        bar_len = bar_steps(piece.meter, self.resolution)
        started = False
        for i in (int(i) for i in ids):
            tok = self.vocab[i] if 0 <= i < self.vocab_size else None
            if tok is None:
                skip(f"id {i} out of range")
                continue
            if tok == EOS and stop_at_eos and started:
                break
            if tok in SPECIALS:
                continue
            if pitch is not None and not tok.startswith("Dur_"):
                skip(f"Pitch_{pitch} without Dur")
                pitch = None
            if tok.startswith("<"):  # conditioning
                if bar >= 0:
                    skip(f"{tok} after the first bar")
                    continue
                name, _, value = tok[1:-1].partition("=")
                if name == "meter":
                    piece.meter, bar_len = value, bar_steps(value, self.resolution)
                else:
                    setattr(piece, name, value)
                started = True
            elif tok == BAR:
                bar, pos, started = bar + 1, None, True
            elif tok.startswith("Pos_"):
                if bar < 0 or i - self._pos0 >= bar_len:
                    skip(f"{tok} {'before any Bar' if bar < 0 else f'outside a {piece.meter} bar'}")
                    pos = None
                else:
                    pos = i - self._pos0
            elif tok.startswith("Vel_"):
                vel = VELOCITY_LEVELS[i - self._vel0]
            elif tok.startswith("Pitch_"):
                if pos is None:
                    skip(f"{tok} without a valid Pos")
                else:
                    pitch = i - self._pitch0
            else:  # Dur_
                if pitch is None:
                    skip(f"{tok} without a Pitch")
                    continue
                piece.notes.append(Note(bar * bar_len + pos, i - self._dur0 + 1, pitch, vel))
                pitch = None
        if pitch is not None:
            skip(f"Pitch_{pitch} without Dur at the end")
        normal = normalize_notes(piece.notes, self.max_duration)
        skipped += len(piece.notes) - len(normal)  # duplicate notes (same onset and pitch)
        piece.notes = normal
        return Decoded(piece, skipped, problems)

    def split_pieces(self, ids: Sequence[int]) -> list[list[int]]:
        """Cut a token stream (a prepared .bin split) into pieces at <eos>."""
        pieces, cur = [], []
        for i in ids:
            cur.append(int(i))
            if i == self.eos_id:
                pieces.append(cur)
                cur = []
        if len(cur) > 1:
            pieces.append(cur)
        return pieces

    # ------------------------------------------------------------------ save / load

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "music",
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "styles": list(self.styles),
            "max_duration": self.max_duration,
            "meters": list(METERS),
            "velocity_levels": list(VELOCITY_LEVELS),
            "vocab": self.vocab,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path`, or into `path` if it is a directory) atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return atomic_write_text(path, self.to_json() + "\n")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Music tokenizers have no transformers counterpart: writes tokenizer.json only."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / "tokenizer.json")
        return directory

    @classmethod
    def from_dict(cls, spec: dict[str, Any], where: str = "tokenizer.json") -> MusicTokenizer:
        if spec.get("kind") != "music":
            raise AigcError(f"{where} is not a music tokenizer (kind {spec.get('kind')!r})")
        if spec.get("format_version") != FORMAT_VERSION:
            raise AigcError(
                f"{where}: music tokenizer format {spec.get('format_version')}, this aigc reads "
                f"{FORMAT_VERSION}; prepare the data again with `aigc data prepare --kind music`"
            )
        try:
            tok = cls(int(spec["resolution"]), list(spec["styles"]), int(spec["max_duration"]))
        except (KeyError, TypeError, ValueError) as e:
            raise AigcError(f"{where}: damaged music tokenizer ({e}); prepare the data again") from None
        if spec.get("vocab") != tok.vocab:
            raise AigcError(
                f"{where}: its vocabulary differs from the one this aigc builds for the same settings "
                "(made by another version?); prepare the data again with `aigc data prepare --kind music`"
            )
        return tok

    @classmethod
    def load(cls, path: str | Path) -> MusicTokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AigcError(f"cannot read music tokenizer {file} ({e}); prepare the data again") from None
        return cls.from_dict(spec, str(file))


def is_music_tokenizer_file(path: str | Path) -> bool:
    """Whether a tokenizer.json (or a directory holding one) is a music tokenizer.

    Reads only the first bytes: music tokenizer files start with {"kind": "music" (see `to_json`).
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        with open(file, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return re.match(rb'\s*\{\s*"kind"\s*:\s*"music"', head) is not None
