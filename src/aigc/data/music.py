"""Music data: scores and MIDI files -> quantised pieces -> event tokens, in the text data format.

Sources (`prepare_music(source, ...)`):
  - `music21:bach`   the ~371 Bach chorales bundled in music21's wheel (MusicXML), style "chorale"
  - `music21:folk`   the Essen folk-song collections bundled in music21 (ABC, ~30 files of
                     many tunes each), style "folk"
  - a file or a directory of .mid/.midi (read with mido), .xml/.musicxml/.mxl, .abc, .krn
    (read with music21); style from `style=` (default "other")

Every piece is quantised to `resolution` steps per quarter note (onsets and ends rounded),
pickup bars are aligned so bar lines fall where the score has them, tied notes are merged. Key
comes from the score's key signature (major or minor chosen by a Krumhansl-Kessler profile
fit; estimated from the notes when there is none), meter from the first time signature. Files
that do not parse are skipped and counted. The split is by piece (a hash of its name, so it is
deterministic and a piece never straddles train and val); transposition augmentation
(`transpose=k`: every shift in -k..k semitones) applies to the train split only.

Output: the prepared text data layout (docs/internals.md "Prepared text data") with
`"kind": "music"`: train.bin / val.bin (uint16 ids, each piece `<bos> ... <eos>`), tokenizer.json
(a `MusicTokenizer`), meta.json (per-piece counts, what was skipped), config.json. `*_bytes`
and `*_chars` count the UTF-8 event text (`tokenizer.decode`), so the text trainer's bits/byte
is defined. music21 parses ~3 chorales/s, so parsed pieces are cached as JSON under
`$AIGC_HOME/cache/music/` keyed by the file's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aigc.config import resolve, save_config
from aigc.errors import AigcError
from aigc.tokenizers.music import (
    DEFAULT_STYLES,
    DEFAULT_TEMPO,
    METERS,
    MusicTokenizer,
    Note,
    Piece,
    normalize_notes,
    parse_key,
    parse_meter,
)
from aigc.utils.io import atomic_write_json, building_dir, prepare_out_dir, read_json

FORMAT_VERSION = 1
CACHE_VERSION = 1  # bump when parsing changes, so old cached pieces are not reused
MIDI_SUFFIXES = (".mid", ".midi")
SCORE_SUFFIXES = (".xml", ".musicxml", ".mxl", ".abc", ".krn")
BUILTIN_MUSIC = {
    "music21:bach": "Bach chorales bundled with music21 (~371, MusicXML), style chorale",
    "music21:folk": "Essen folk songs bundled with music21 (ABC collections), style folk",
}
MAX_REPORTED = 5

# Krumhansl & Kessler (1982) key profiles, tonic first
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
NAMES_MAJOR = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
NAMES_MINOR = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")


@dataclass
class MusicDataConfig:
    """How to turn a music source into token arrays."""

    resolution: int = 4  # grid steps per quarter note (4 = sixteenths; 12 also holds triplets)
    val_fraction: float = 0.1  # share of pieces held out (by piece)
    seed: int = 0  # salts the split hash
    transpose: int = 0  # augment the train split with every shift in -transpose..transpose semitones
    limit: int | None = None  # use at most this many pieces (the first ones in source order)
    style: str | None = None  # style label of a file/directory source (default "other")
    cache: bool = True  # cache parsed scores under $AIGC_HOME/cache/music

    def __post_init__(self) -> None:
        if self.resolution < 1 or 480 % self.resolution:
            raise ValueError(f"resolution must divide 480 (e.g. 2, 4, 8, 12), got {self.resolution}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.transpose <= 6:
            raise ValueError(f"transpose must be 0..6 semitones, got {self.transpose}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")


# ----------------------------------------------------------------------------- key finding


def estimate_key(notes: list[Note], candidates: list[str] | None = None) -> str | None:
    """Krumhansl-Schmuckler: the key whose profile best correlates with the duration-weighted
    pitch-class histogram (among `candidates`, default all 24). None when there are no notes."""
    hist = np.zeros(12)
    for n in notes:
        hist[n.pitch % 12] += n.duration
    if not hist.any():
        return None
    keys = candidates or [f"{n} major" for n in NAMES_MAJOR] + [f"{n} minor" for n in NAMES_MINOR]
    best, best_r = None, -2.0
    for key in keys:
        name, mode = key.split(" ")
        pc = (NAMES_MAJOR if mode == "major" else NAMES_MINOR).index(name)
        profile = np.roll(MAJOR_PROFILE if mode == "major" else MINOR_PROFILE, pc)
        r = np.corrcoef(hist, profile)[0, 1] if hist.std() > 0 else 0.0
        if r > best_r:
            best, best_r = key, r
    return best


# ----------------------------------------------------------------------------- MIDI (mido)


def read_midi(data: bytes | str | Path, resolution: int = 4, name: str = "") -> Piece:
    """A MIDI file (bytes or path) -> Piece on the grid. Drums (channel 10) are left out.

    Tempo, meter and key come from the first set_tempo / time_signature / key_signature events
    (key estimated from the notes when absent); an `aigc:{json}` text event gives the style.
    """
    try:
        import mido
    except ModuleNotFoundError:
        raise AigcError("reading MIDI needs mido: pip install 'aigc[music]'") from None
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    mid = mido.MidiFile(file=io.BytesIO(raw))
    tpq = mid.ticks_per_beat
    if not tpq or tpq <= 0:
        raise ValueError("SMPTE time division is not supported")
    tempo, meter, key, style = None, None, None, None
    notes: list[Note] = []
    for track in mid.tracks:
        tick = 0
        open_: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (channel, pitch) -> [(tick, vel)]
        for msg in track:
            tick += msg.time
            if msg.type == "set_tempo" and tempo is None:
                tempo = 60_000_000 / msg.tempo
            elif msg.type == "time_signature" and meter is None:
                meter = f"{msg.numerator}/{msg.denominator}"
            elif msg.type == "key_signature" and key is None:
                key = parse_key(msg.key)
            elif msg.type == "text" and msg.text.startswith("aigc:"):
                with contextlib.suppress(ValueError):  # someone else's "aigc:" text: ignore it
                    style = json.loads(msg.text[5:]).get("style") or style
            elif msg.type in ("note_on", "note_off") and msg.channel != 9:
                k = (msg.channel, msg.note)
                if msg.type == "note_on" and msg.velocity > 0:
                    open_.setdefault(k, []).append((tick, msg.velocity))
                elif open_.get(k):
                    on, vel = open_[k].pop(0)  # first on, first off
                    notes.append(_grid_note(on, tick, msg.note, vel, tpq, resolution))
        for (_, pitch), ons in open_.items():  # notes never switched off end with the track
            notes += [_grid_note(on, tick, pitch, vel, tpq, resolution) for on, vel in ons]
    notes = normalize_notes(notes)
    return Piece(
        notes=notes,
        key=key or estimate_key(notes),
        meter=meter or "4/4",
        style=style,
        resolution=resolution,
        tempo=round(tempo, 3) if tempo else DEFAULT_TEMPO,
        name=name,
    )


def _grid_note(on: int, off: int, pitch: int, vel: int, tpq: int, res: int) -> Note:
    start, end = round(on * res / tpq), round(off * res / tpq)
    return Note(start, max(1, end - start), pitch, vel)


# ----------------------------------------------------------------------------- scores (music21)


def score_to_pieces(obj: Any, resolution: int, name: str) -> list[Piece]:
    """A music21 Score (or an Opus of several, as ABC files hold) -> pieces."""
    from music21 import stream

    if isinstance(obj, stream.Opus):
        return [
            p for i, s in enumerate(obj.scores) for p in score_to_pieces(s, resolution, f"{name}#{i + 1}")
        ]
    from music21 import key as m21key
    from music21 import meter as m21meter
    from music21 import tempo as m21tempo

    flat = obj.flatten()
    ts = next(iter(flat.getElementsByClass(m21meter.TimeSignature)), None)
    ks = next(iter(flat.getElementsByClass(m21key.KeySignature)), None)
    mm = next(iter(flat.getElementsByClass(m21tempo.MetronomeMark)), None)
    parts = list(obj.parts) if hasattr(obj, "parts") and len(obj.parts) else [obj]
    # a pickup bar is short on the left: shift everything so bar lines land on bar starts
    first = next(iter(parts[0].getElementsByClass(stream.Measure)), None)
    shift = float(first.paddingLeft) if first is not None else 0.0
    notes = []
    for part in parts:
        for n in part.stripTies().flatten().notes:
            ql = float(n.duration.quarterLength)
            if ql <= 0:  # grace notes
                continue
            start = round((float(n.offset) + shift) * resolution)
            end = round((float(n.offset) + shift + ql) * resolution)
            vel = n.volume.velocity if n.volume.velocity is not None else 79
            for p in n.pitches:
                notes.append(Note(start, max(1, end - start), int(p.midi), int(vel)))
    notes = normalize_notes(notes)
    candidates = None
    if ks is not None:  # the signature fixes the key up to major / relative minor
        candidates = [parse_key(f"{ks.asKey(m).tonic.name} {m}") for m in ("major", "minor")]
    try:
        meter = parse_meter(ts.ratioString) if ts is not None else "4/4"
    except AigcError:  # e.g. an unmeasured folk song notated as 116/4: kept raw, skipped later
        meter = ts.ratioString
    tempo = float(mm.number) if mm is not None and mm.number else DEFAULT_TEMPO
    return [Piece(notes, estimate_key(notes, candidates), meter, None, resolution, tempo, name)]


def parse_file(path: Path, resolution: int, name: str | None = None) -> list[Piece]:
    """One file -> its pieces (several for an ABC collection). Raises on a corrupt file."""
    name = name or path.name
    if path.suffix.lower() in MIDI_SUFFIXES:
        return [read_midi(path, resolution, name)]
    try:
        from music21 import converter
    except ModuleNotFoundError:
        raise AigcError(
            f"{path.name}: reading {path.suffix} files needs music21: pip install 'aigc[music]'"
        ) from None
    return score_to_pieces(converter.parse(str(path)), resolution, name)


def _cache_dir() -> Path:
    from aigc.utils.paths import aigc_home

    return aigc_home() / "cache" / "music"


def parse_cached(path: Path, resolution: int, name: str, use_cache: bool) -> tuple[list[Piece], str]:
    """`parse_file` through a JSON cache keyed by (file hash, resolution, parser version)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not use_cache:
        return parse_file(path, resolution, name), digest
    cache = _cache_dir() / f"{digest[:32]}-r{resolution}-v{CACHE_VERSION}.json"
    if cache.is_file():
        try:
            rows = read_json(cache)
            return [
                Piece(
                    [Note(*n) for n in r["notes"]],
                    r["key"],
                    r["meter"],
                    None,
                    resolution,
                    r["tempo"],
                    r["name"],
                )
                for r in rows
            ], digest
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is parsed again and rewritten
    pieces = parse_file(path, resolution, name)
    rows = [
        {"name": p.name, "key": p.key, "meter": p.meter, "tempo": p.tempo, "notes": p.notes} for p in pieces
    ]
    atomic_write_json(cache, rows)
    return pieces, digest


# ----------------------------------------------------------------------------- sources


def music21_corpus_dir() -> Path:
    try:
        import music21
    except ModuleNotFoundError:
        raise AigcError("the music21 built-ins need music21: pip install 'aigc[music]'") from None
    return Path(music21.__file__).parent / "corpus"


def source_files(source: str, style: str | None) -> tuple[list[tuple[Path, str, str]], str]:
    """(files as (path, piece name, style), description) of a source."""
    if source == "music21:bach":
        from music21 import corpus

        files = []
        for work in corpus.chorales.Iterator(returnType="filename"):
            found = corpus.getWork(work)  # a list when the corpus has several formats of one work
            found = found if isinstance(found, list) else [found]
            files.append(Path(str(sorted(found, key=lambda f: Path(f).suffix != ".mxl")[0])))
        return [(f, f.stem, style or "chorale") for f in files], BUILTIN_MUSIC[source]
    if source == "music21:folk":
        files = sorted((music21_corpus_dir() / "essenFolksong").glob("*.abc"))
        files = [f for f in files if not f.stem.startswith("test")]  # music21's own test tunes
        return [(f, f.stem, style or "folk") for f in files], BUILTIN_MUSIC[source]
    if source.startswith("music21:"):
        raise AigcError(f"unknown built-in {source!r}; music built-ins: {', '.join(BUILTIN_MUSIC)}")
    path = Path(source)
    suffixes = MIDI_SUFFIXES + SCORE_SUFFIXES
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise AigcError(
                f"{path}: not a music file; accepted: {', '.join(suffixes)} (or a directory of them)"
            )
        return [(path, path.name, style or "other")], f"music file {path}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise AigcError(f"{path} holds no music files ({', '.join(suffixes)})")
        return [(f, str(f.relative_to(path)), style or "other") for f in files], f"music directory {path}"
    raise AigcError(
        f"music source {source!r} not found; give a MIDI/MusicXML/ABC/kern file, a directory of them, "
        f"or a built-in: {', '.join(BUILTIN_MUSIC)}"
    )


def read_pieces(
    source: str, cfg: MusicDataConfig, log: Callable[[str], None] = lambda m: None
) -> tuple[list[Piece], dict[str, Any], str, str]:
    """(pieces, skipped report, description, source hash); corrupt files are skipped and counted."""
    files, description = source_files(source, cfg.style)
    pieces: list[Piece] = []
    corrupt: list[str] = []
    skipped: Counter[str] = Counter()
    digests = []
    for i, (path, name, style) in enumerate(files):
        if cfg.limit is not None and len(pieces) >= cfg.limit:
            break
        if i and i % 50 == 0:
            log(f"parsed {i}/{len(files)} files, {len(pieces)} pieces")
        try:
            found, digest = parse_cached(path, cfg.resolution, name, cfg.cache)
        except AigcError as e:
            if "pip install" in str(e):  # a missing dependency, not a bad file
                raise
            corrupt.append(name)
            continue
        except Exception:  # music21 and mido raise many types on damaged input
            corrupt.append(name)
            continue
        digests.append(digest)
        for p in found:
            p.style = style
            if not p.notes:
                skipped["empty"] += 1
            elif p.meter not in METERS:
                skipped["unsupported_meter"] += 1
            else:
                pieces.append(p)
    pieces = pieces[: cfg.limit]
    report = {"corrupt": len(corrupt), "corrupt_files": corrupt[:MAX_REPORTED], **skipped}
    source_hash = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    return pieces, report, description, source_hash


def split_by_piece(names: list[str], val_fraction: float, seed: int = 0) -> list[bool]:
    """Deterministic split: a piece is held out when its salted name hash ranks in the lowest
    `val_fraction` (at least one held out and one kept when there are two or more)."""
    if not names:
        return []
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"{seed}:{names[i]}".encode()).hexdigest())
    n_val = 0 if val_fraction == 0 else min(len(names) - 1, max(1, math.ceil(len(names) * val_fraction)))
    is_val = [False] * len(names)
    for i in order[:n_val]:
        is_val[i] = True
    return is_val


# ----------------------------------------------------------------------------- prepare


def prepare_music(
    source: str,
    out: str | Path,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Read `source`, quantise and tokenize its pieces, write a prepared directory; return meta."""
    cfg = resolve(MusicDataConfig, overrides=overrides)
    out = prepare_out_dir(out, overwrite=overwrite)
    pieces, skipped, description, source_hash = read_pieces(source, cfg, log)
    if not pieces:
        raise AigcError(
            f"no usable pieces in {description}: {skipped['corrupt']} corrupt file(s) "
            f"{skipped['corrupt_files']}, {skipped.get('empty', 0)} empty, "
            f"{skipped.get('unsupported_meter', 0)} in meters outside {', '.join(METERS)}; give other files"
        )
    styles = list(dict.fromkeys([*DEFAULT_STYLES, *sorted({p.style for p in pieces if p.style})]))
    tok = MusicTokenizer(cfg.resolution, styles)
    is_val = split_by_piece([p.name for p in pieces], cfg.val_fraction, cfg.seed)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    rows, clipped = [], 0
    for piece, val in zip(pieces, is_val, strict=True):
        split = "val" if val else "train"
        shifts = [0] if val or not cfg.transpose else range(-cfg.transpose, cfg.transpose + 1)
        n_tokens, used = 0, []
        for s in shifts:
            p = piece.transposed(s) if s else piece
            if s and not all(0 <= n.pitch <= 127 for n in p.notes):
                continue
            ids = np.asarray(tok.encode_piece(p), dtype=np.uint16)
            splits[split].append(ids)
            n_tokens += len(ids)
            used.append(s)
        clipped += sum(n.duration > tok.max_duration for n in piece.notes)
        rows.append(
            {
                "name": piece.name,
                "split": split,
                "style": piece.style,
                "key": piece.key,
                "meter": piece.meter,
                "notes": len(piece.notes),
                "tokens": n_tokens,
                "transpositions": used,
            }
        )
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.uint16) for k, v in splits.items()}
    text_bytes = {k: len(tok.decode(a.tolist()).encode("utf-8")) for k, a in arrays.items()}
    meta = {
        "kind": "music",
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": "music", "id": tok.id, "eos_id": tok.eos_id, "unknown": "error"},
        "train_tokens": int(len(arrays["train"])),
        "val_tokens": int(len(arrays["val"])),
        "train_chars": text_bytes["train"],
        "val_chars": text_bytes["val"],
        "train_bytes": text_bytes["train"],
        "val_bytes": text_bytes["val"],
        "chars_per_token": round(text_bytes["train"] / max(1, len(arrays["train"])), 3),
        "documents": len(pieces),
        "train_documents": sum(r["split"] == "train" for r in rows),
        "val_documents": sum(r["split"] == "val" for r in rows),
        "split": f"by piece (hash of name, seed {cfg.seed}), val_fraction {cfg.val_fraction}",
        "source": source,
        "source_hash": source_hash,
        "source_description": description,
        "resolution": cfg.resolution,
        "styles": styles,
        "transpose": cfg.transpose,
        "durations_clipped": int(clipped),
        "skipped": skipped,
        "keys": dict(Counter(r["key"] for r in rows).most_common()),
        "meters": dict(Counter(r["meter"] for r in rows).most_common()),
        "pieces": rows,
    }
    with building_dir(out) as stage:
        for split, arr in arrays.items():
            arr.astype("<u2").tofile(stage / f"{split}.bin")
        tok.save(stage / "tokenizer.json")
        atomic_write_json(stage / "meta.json", meta)
        save_config(cfg, stage / "config.json")
    log(f"wrote {out}")
    return meta


@dataclass
class PreparedMusic:
    """A prepared music data set: token arrays (memory-mapped), tokenizer, meta and config."""

    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    tokenizer: MusicTokenizer

    def pieces(self, split: str = "val") -> Iterator[Piece]:
        """The pieces of a split, decoded back from the tokens."""
        arr = self.train if split == "train" else self.val
        for ids in self.tokenizer.split_pieces(np.asarray(arr).tolist()):
            yield self.tokenizer.decode_notes(ids).piece


def load_prepared_music(directory: str | Path) -> PreparedMusic:
    """Open a directory written by `prepare_music` (the prepared text layout, kind "music")."""
    from aigc.data.text import load_prepared

    d = load_prepared(directory, kind="music")
    return PreparedMusic(d.path, d.meta, d.config, d.train, d.val, d.tokenizer)


__all__ = [
    "BUILTIN_MUSIC",
    "MusicDataConfig",
    "PreparedMusic",
    "estimate_key",
    "load_prepared_music",
    "prepare_music",
    "read_midi",
    "score_to_pieces",
    "split_by_piece",
]
