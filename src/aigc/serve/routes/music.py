"""POST /v1/audio/music: pieces from a music run (a GPT on music events), as WAV + MIDI + piano roll.

A native route (OpenAI has no music API). Request: `model`, `key` ("D minor"), `meter` ("3/4"),
`style`, `bars`, `n`, `seed`, `temperature`, `top_k`, `top_p`, `instrument`, `tempo`, `format`
("wav" | "midi" | "both"). Response:

    {"object": "list", "data": [{"wav_b64", "midi_b64", "piano_roll_b64", "metadata"}, ...],
     "seed", "parameters", "generation_ids"}

A format not asked for is null (the piano roll always comes). `metadata` is the piece's provenance
(model, seed, parameters, time, key, meter, notes, seconds); the MIDI carries it as an `aigc:` text
event and the PNG as a text chunk. Piece k of a call has seed `seed + k`, so any one of them can be
asked for again alone. Each piece is recorded in the content store with its MIDI as the blob.

As for images, one call per model runs at a time in a worker thread (decoding and synthesis are
seconds long, never on the event loop).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from aigc.serve.app import ApiError, identity
from aigc.serve.routes import feedback
from aigc.serve.routes.common import Slot
from aigc.serve.routes.moderations import moderate_prompts, moderator, outcome
from aigc.serve.schemas import ErrorResponse, ModelName, Strict

router = APIRouter(tags=["audio"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503, 504)}
MAX_PIECES = 8  # pieces per request
MAX_BARS = 32  # bars per piece (~1 min of four-voice chorale at 100 bpm)


class MusicRequest(Strict):
    """What to generate; key / meter / style are checked against the model's vocabulary (400)."""

    model: ModelName
    key: str = Field("C major", max_length=40, pattern=r"^[A-Za-z0-9#/ _-]+$")
    meter: str = Field("4/4", max_length=10, pattern=r"^[0-9]{1,2}/[0-9]{1,2}$")
    style: str | None = Field(None, max_length=40, pattern=r"^[\w-]+$")
    bars: int = Field(8, ge=1, le=MAX_BARS)
    n: int = Field(1, ge=1, le=MAX_PIECES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    instrument: Literal["piano", "organ", "strings"] = "piano"
    tempo: float | None = Field(None, ge=20.0, le=300.0)
    format: Literal["wav", "midi", "both"] = "both"
    user: str | None = Field(None, max_length=256)


class MusicData(BaseModel):
    wav_b64: str | None = None
    midi_b64: str | None = None
    piano_roll_b64: str
    metadata: dict[str, Any]
    moderation: dict[str, Any] | None = None  # the prompt's flag (aigc.safety), None when clean


class MusicResponse(BaseModel):
    object: Literal["list"] = "list"
    created: int
    data: list[MusicData]
    seed: int
    parameters: dict[str, Any]
    generation_ids: list[int | None] = []  # per piece: its id in the content store


def run_music(lm: Any, body: MusicRequest, seed: int) -> list[Any]:
    """Generate in the calling (worker) thread, one call per model at a time."""
    from aigc.serve.batching import inherit_torch_threads

    inherit_torch_threads()
    formats = ("mid", "png") if body.format == "midi" else ("mid", "wav", "png")
    with lm.lock:
        return lm.generator.generate(
            n=body.n, key=body.key, meter=body.meter, style=body.style, bars=body.bars, seed=seed,
            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            instrument=body.instrument, tempo=body.tempo, formats=formats,
        )  # fmt: skip


def sign_pieces(results: list[Any], entry: Any, prompt: str) -> None:
    """Give each piece's WAV and piano roll a C2PA manifest (in place; C2PA has no MIDI binding)."""
    from aigc.safety.c2pa import sign_bytes
    from aigc.safety.provenance import make_record

    name, digest = feedback.model_name(entry), feedback.model_hash(entry)
    for r in results:
        record = make_record("music", name, r.params, r.seed, prompt, digest)
        if r.wav is not None:
            r.wav = sign_bytes(r.wav, "audio/wav", record, "piece.wav")
        if r.png is not None:
            r.png = sign_bytes(r.png, "image/png", record, "piano-roll.png")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


@router.post("/v1/audio/music", summary="Generate music (WAV + MIDI + piano roll)",
             response_model=MusicResponse, responses=ERRORS)  # fmt: skip
async def generate_music(body: MusicRequest, request: Request, key: str = Depends(identity)):
    st = request.app.state
    # the "prompt" of a piece (key, meter, style) is moderated like any other: block -> 400 + a row
    prompt = " ".join(x for x in (body.key, body.meter, body.style) if x)
    verdict, flag = outcome(
        moderator(request), *await moderate_prompts(request, [prompt], kind="music", model=body.model)
    )
    lm = await asyncio.to_thread(st.registry.get, body.model, "music")
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    slot = Slot(request, key)
    t0 = time.perf_counter()
    try:
        results = await asyncio.wait_for(
            asyncio.to_thread(run_music, lm, body, seed), timeout=st.settings.request_timeout_s
        )
    except asyncio.TimeoutError:
        raise ApiError(504, f"music generation took longer than {st.settings.request_timeout_s:g} s; ask for "
                       "fewer bars or pieces", "timeout") from None  # fmt: skip
    finally:
        slot.release()
    if st.settings.c2pa:
        await asyncio.to_thread(sign_pieces, results, lm.entry, prompt)
    # every piece lands in the store: its MIDI in the content-addressed folder, a row per piece
    dt = (time.perf_counter() - t0) / len(results)
    rows = [dict(kind="music", model=feedback.model_name(lm.entry), prompt=prompt, params=r.params,
                 seed=r.seed, duration=dt, moderation=verdict) for r in results]  # fmt: skip
    ids = await feedback.record(request, lm.entry, rows, blobs=[r.midi for r in results], ext="mid")
    data = [
        MusicData(
            wav_b64=_b64(r.wav) if body.format in ("wav", "both") else None,
            midi_b64=_b64(r.midi) if body.format in ("midi", "both") else None,
            piano_roll_b64=_b64(r.png),
            metadata=r.metadata,
            moderation=flag,
        )
        for r in results
    ]
    return MusicResponse(created=int(time.time()), data=data, seed=seed, parameters=results[0].params,
                         generation_ids=ids)  # fmt: skip
