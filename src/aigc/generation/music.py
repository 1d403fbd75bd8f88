"""MusicGenerator: a GPT trained on music events -> pieces, MIDI, WAV and piano rolls.

    gen = aigc.load("runs/bach")                       # a run whose tokenizer.json is "kind": "music"
    [r] = gen.generate(key="D minor", meter="3/4", style="chorale", bars=8, seed=0)
    r.midi, r.wav, r.png, r.metadata                   # bytes, bytes, bytes, provenance dict
    r.save("out", "piece-0")                           # piece-0.mid / .wav / .png / .json

The prompt is the tokenizer's conditioning tokens (`<bos> <style> <key> <meter>`) followed, when a
primer is given, by the primer's events. Decoding runs on the token-id `Engine` (the same engine
as text, so sampling, seeds and context sliding behave the same) with two music rules on top:

1. Length in bars: every generated `Bar` token is counted and the row stops at the (bars+1)-th,
   which is dropped, so a piece has exactly `bars` new bars (unless `max_new_tokens` runs out).
2. Grammar guards as banned tokens: `<eos>`, `<bos>`, `<pad>`, every conditioning token and the
   `Pos_i` past the meter's bar length can never be sampled. An early `<eos>` was what made pieces
   end empty and fail to parse; with it banned the requested bars are always written.

Each result records its model, seed (row k of a call uses seed + k, so it is reproducible alone),
the parameters, the time, and how many events `decode_notes` had to skip.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation.engine import Engine, Request
from aigc.generation.params import make_params
from aigc.tokenizers.music import (
    DEFAULT_TEMPO,
    METERS,
    MusicTokenizer,
    Note,
    Piece,
    bar_steps,
    parse_key,
    parse_meter,
)
from aigc.utils.io import atomic_write_bytes, atomic_write_json

FORMATS = ("mid", "wav", "png")
MAX_N = 64  # pieces per call
MAX_BARS = 64
MIN_TOKENS_PER_BAR = 64  # the token budget per bar is max(this, 6 per grid step of a bar)


@dataclass
class MusicResult:
    """One generated piece with its renderings (None when not asked for) and provenance."""

    piece: Piece
    midi: bytes | None
    wav: bytes | None
    png: bytes | None
    metadata: dict[str, Any]  # model, seed, params, created, key, meter, ..., synth
    tokens: list[int]  # generated ids (the prompt excluded)
    seed: int
    params: dict[str, Any]  # generate() arguments: generate(**params, seed=seed) gives it again
    model: str
    finish_reason: str  # "stop" (bars reached) | "length" (token budget ran out)
    skipped: int = 0  # ungrammatical events decode_notes skipped
    problems: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    index: int = 0

    def save(self, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Write stem.mid / .wav / .png (those rendered) and the sidecar stem.json, atomically."""
        out_dir = Path(out_dir)
        paths = {}
        for ext, data in (("mid", self.midi), ("wav", self.wav), ("png", self.png)):
            if data is not None:
                paths[ext] = atomic_write_bytes(out_dir / f"{stem}.{ext}", data)
        from aigc.safety.provenance import file_hashes

        meta = {**self.metadata, "files": {k: p.name for k, p in paths.items()}}
        meta["sha256"] = file_hashes(paths.values())  # `aigc verify` notices an edit of any of them
        paths["json"] = atomic_write_json(out_dir / f"{stem}.json", meta)
        return paths

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no audio bytes): metadata plus the event tokens."""
        return {**self.metadata, "tokens": self.tokens, "finish_reason": self.finish_reason}


class MusicGenerator:
    """Generate music with a GPT trained on `MusicTokenizer` events."""

    kind = "music"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: MusicTokenizer,
        model_id: str = "model",
        dtype: torch.dtype | None = None,
    ) -> None:
        from aigc.generation.decoders import make_decoder

        if getattr(tokenizer, "kind", None) != "music":
            raise AigcError(
                f"{model_id} has a {getattr(tokenizer, 'kind', '?')} tokenizer; music generation needs a "
                "model trained on music events (aigc train music)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.decoder = make_decoder(self.model, dtype)
        self.engine = Engine(self.decoder, eos_id=tokenizer.eos_id)

    @classmethod
    def from_artifact(cls, path: str | Path, dtype: torch.dtype | None = None) -> MusicGenerator:
        """Load a music run directory (a gpt run whose tokenizer.json has "kind": "music")."""
        from aigc.registry import load_artifact

        art = load_artifact(path)
        if art.tokenizer is None or art.tokenizer.kind != "music":
            kind = art.tokenizer.kind if art.tokenizer is not None else art.family
            raise AigcError(
                f"{path} is a {kind} model, not a music model; use aigc generate text / image for it"
            )
        return cls(art.model, art.tokenizer, model_id=str(path), dtype=dtype)

    # ------------------------------------------------------------------ prompt

    def primer_piece(self, primer: Any) -> Piece:
        """A primer as a Piece: a MIDI file path, MIDI bytes, a Piece, or notes (start, dur, pitch[, vel])."""
        from aigc.data.music import read_midi

        if isinstance(primer, Piece):
            return primer
        if isinstance(primer, (str, Path, bytes)):
            if isinstance(primer, (str, Path)) and not Path(primer).is_file():
                raise AigcError(f"primer {primer} not found; give a MIDI file (.mid) or a list of notes")
            try:
                return read_midi(primer, resolution=self.tokenizer.resolution, name="primer")
            except AigcError:
                raise
            except Exception as e:  # mido raises many types on damaged data
                where = primer if not isinstance(primer, bytes) else "the primer bytes"
                raise AigcError(
                    f"{where} is not a readable MIDI file ({type(e).__name__}: {str(e)[:80]}); "
                    "give a Standard MIDI File (.mid) or a list of (start, duration, pitch) notes"
                ) from None
        try:
            notes = [Note(*(int(x) for x in n)) for n in primer]
        except (TypeError, ValueError):
            raise AigcError(
                "primer notes must be (start, duration, pitch[, velocity]) integers in grid steps"
            ) from None
        return Piece(notes=notes, resolution=self.tokenizer.resolution, name="primer")

    def prompt_ids(self, key: str, meter: str, style: str | None, primer: Any = None) -> list[int]:
        """Conditioning tokens, then the primer's events (in the requested key/meter/style)."""
        tok = self.tokenizer
        if primer is None:
            return tok.condition_ids(key, meter, style)
        p = self.primer_piece(primer)
        if not p.notes:
            raise AigcError("the primer has no notes; give a MIDI file or notes with at least one note")
        p = dataclasses.replace(p, key=key, meter=meter, style=style)
        return tok.encode_piece(p, eos=False)

    def banned_ids(self, meter: str) -> list[int]:
        """Tokens never sampled: specials, conditioning, and onsets past the bar's end."""
        tok = self.tokenizer
        ids = [i for i, t in enumerate(tok.vocab) if t.startswith("<")]  # <pad> <bos> <eos> <key=..> ...
        bar_len = bar_steps(meter, tok.resolution)
        ids += [tok.ids[f"Pos_{i}"] for i in range(bar_len, tok.max_bar_steps)]
        return sorted(set(ids))

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        n: int = 1,
        key: str = "C major",
        meter: str = "4/4",
        style: str | None = None,
        bars: int = 8,
        primer: Any = None,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        instrument: str = "piano",
        tempo: float | None = None,
        formats: Sequence[str] = FORMATS,
        max_new_tokens: int | None = None,
    ) -> list[MusicResult]:
        """`n` pieces of `bars` bars (after the primer, if any); seeds seed, seed+1, ...

        key: "D minor", "Bb major", "f#", ... (see `parse_key`); meter: one of `METERS`; style: one
        the model was trained with (None: no style token); formats: which renderings to make.
        """
        from aigc.generation.music_render import INSTRUMENTS, midi_bytes, piano_roll_png, render_wav

        tok = self.tokenizer
        key, meter = parse_key(key), parse_meter(meter)
        if meter not in METERS:
            raise AigcError(f"meter {meter} is not in the vocabulary; supported meters: {', '.join(METERS)}")
        _check_int("n", n, 1, MAX_N)
        _check_int("bars", bars, 1, MAX_BARS)
        if instrument not in INSTRUMENTS:
            raise AigcError(f"unknown instrument {instrument!r}; choose one of: {', '.join(INSTRUMENTS)}")
        tempo = float(DEFAULT_TEMPO if tempo is None else tempo)
        if not 1.0 <= tempo <= 1000.0:
            raise AigcError(f"tempo {tempo} is out of range; give 1 to 1000 quarter notes per minute")
        bad = sorted(set(formats) - set(FORMATS))
        if bad:
            raise AigcError(f"unknown music format {bad[0]!r}; choose from {', '.join(FORMATS)}")
        prompt = self.prompt_ids(key, meter, style, primer)
        per_bar = max(MIN_TOKENS_PER_BAR, 6 * bar_steps(meter, tok.resolution))
        params = make_params(
            max_new_tokens=max_new_tokens or (bars + 1) * per_bar,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            ignore_eos=True,  # eos is banned below; the bar count ends a piece
            bad_words_ids=[[i] for i in self.banned_ids(meter)],
        ).resolved()
        args = {
            "key": key, "meter": meter, "style": style, "bars": bars, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "instrument": instrument, "tempo": tempo,
            "primer": _describe(primer), "max_new_tokens": params.max_new_tokens,
        }  # fmt: skip

        # 1. decode all rows in one batch; row k samples from its own generator seeded seed + k
        rows = [dataclasses.replace(params, seed=(params.seed + k) % 2**63) for k in range(n)]
        run = self.engine.run([Request(prompt, row) for row in rows])
        # 2. count bars as they come; the (bars+1)-th Bar ends the row
        seen = [0] * n
        for step in run:
            for i, t in step:
                if t == tok.bar_id:
                    seen[i] += 1
                    if seen[i] > bars:
                        run.stop(i, "stop")
        # 3. decode events to notes, render, record provenance
        results = []
        for k, c in enumerate(run.completions):
            tokens = list(c.tokens)
            if tokens and tokens[-1] == tok.bar_id and seen[k] > bars:
                tokens.pop()  # the bar that would open bar bars+1
            dec = tok.decode_notes(prompt + tokens, tempo=tempo)
            piece = dec.piece
            piece.name = f"{Path(self.model_id).name}-{rows[k].seed}"
            created = time.time()
            meta = {
                "kind": "music",
                "model": self.model_id,
                "tokenizer": tok.id,
                "seed": rows[k].seed,
                "params": args,
                "created": created,
                "key": piece.key,
                "meter": piece.meter,
                "style": piece.style,
                "tempo": tempo,
                "bars": bars,
                "notes": len(piece.notes),
                "seconds": round(piece.seconds(), 3),
                "instrument": instrument,
                "skipped_events": dec.skipped,
                "finish_reason": c.finish_reason,
            }
            program = INSTRUMENTS[instrument]["program"]
            midi = midi_bytes(piece, meta, program=program) if "mid" in formats else None
            wav = None
            if "wav" in formats:
                wav, used = render_wav(piece, instrument)
                meta["synth"] = used
            png = piano_roll_png(piece, meta) if "png" in formats else None
            results.append(
                MusicResult(
                    piece=piece, midi=midi, wav=wav, png=png, metadata=meta, tokens=tokens,
                    seed=rows[k].seed, params=args, model=self.model_id, finish_reason=c.finish_reason,
                    skipped=dec.skipped, problems=dec.problems, created=created, index=k,
                )
            )  # fmt: skip
        return results


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise AigcError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _describe(primer: Any) -> str | None:
    """What the primer was, for the record (a path, or how many notes)."""
    if primer is None:
        return None
    if isinstance(primer, (str, Path)):
        return str(primer)
    if isinstance(primer, bytes):
        return f"MIDI bytes ({len(primer)})"
    if isinstance(primer, Piece):
        return f"piece {primer.name or ''} ({len(primer.notes)} notes)".replace("  ", " ")
    return f"{len(list(primer))} notes"


def load_music_generator(path: str | Path, dtype: torch.dtype | None = None) -> MusicGenerator:
    """`MusicGenerator.from_artifact` (the name `aigc.load` and the server call)."""
    return MusicGenerator.from_artifact(path, dtype=dtype)


def is_music_run(path: str | Path) -> bool:
    """True when `path` is a run directory whose tokenizer.json holds music events."""
    from aigc.tokenizers.music import is_music_tokenizer_file

    p = Path(path).expanduser() / "tokenizer.json"
    return p.is_file() and is_music_tokenizer_file(p)
