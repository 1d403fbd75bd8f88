"""POST /v1/images/generations: images from a diffusion / GAN / VAE run (or a diffusers pipeline).

OpenAI's shape (`n`, `size`, `response_format` b64_json | url) plus our extensions `seed`, `steps`,
`guidance`, `label`, `sampler`, `watermark` (the deployment's invisible key-id mark, images of at
least 24 px; `POST /v1/watermark/detect` finds it). `url` is a `data:image/png;base64,...` URL: the server stores
nothing under that URL, so there is no file to expire or leak. Each image is also recorded in
the content store (its PNG in the blob folder, GET /v1/outputs/{ref}; `generation_ids`, one per
image). Each PNG carries its parameters in text chunks (as `aigc generate image` writes them).
Our models have one native size: `size` must be it (or omitted); a text-to-image pipeline takes
any square size up to MAX_IMAGE_SIZE.

One call per model at a time runs in a worker thread (image work is seconds long: it never blocks
the event loop). Requests are not merged into one batch: the generator draws all images of a call
from one seeded generator, so merging would change every image a seed gives.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time

from fastapi import APIRouter, Depends, Request

from aigc.errors import AigcError
from aigc.serve import settings as S
from aigc.serve.app import ApiError, identity
from aigc.serve.routes import feedback
from aigc.serve.routes.common import Slot
from aigc.serve.routes.moderations import moderate_prompts, moderator, outcome
from aigc.serve.schemas import ErrorResponse, ImageRequest, ImageResponse

router = APIRouter(tags=["images"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503, 504)}


def native_size(gen) -> int | None:
    """Side of the images a run of ours makes (None for a diffusers pipeline: it takes a size)."""
    return None if gen.family == "hf" else int(gen.config.image_size)


def _png(image, params: dict) -> bytes:
    from aigc.generation.image_io import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


def sign_pngs(pngs: list[bytes], params: list[dict], entry, prompt: str | None) -> list[bytes]:
    """The PNGs with a C2PA manifest each (`--c2pa` / Settings.c2pa): model, hash, params, seed."""
    from aigc.safety.c2pa import sign_bytes
    from aigc.safety.provenance import make_record

    name, digest = feedback.model_name(entry), feedback.model_hash(entry)
    return [sign_bytes(png, "image/png", make_record("image", name, p, p.get("seed"), prompt, digest), "image.png")
            for png, p in zip(pngs, params, strict=True)]  # fmt: skip


def run_images(lm, body: ImageRequest, seed: int) -> tuple[list[bytes], list[dict]]:
    """Generate in the calling (worker) thread, one call per model at a time."""
    from aigc.serve.batching import inherit_torch_threads

    inherit_torch_threads()
    gen = lm.generator
    size = None
    if body.size is not None:
        w, h = (int(x) for x in body.size.split("x"))
        native = native_size(gen)
        if w != h or (native is not None and w != native) or not 8 <= w <= S.MAX_IMAGE_SIZE:
            allowed = (
                f"{native}x{native}"
                if native is not None
                else f"a square WxW with 8 <= W <= {S.MAX_IMAGE_SIZE}"
            )
            raise AigcError(f"size {body.size!r} is not available for {lm.entry.id}; allowed: {allowed}")
        size = None if native is not None else w
    with lm.lock:
        out = gen.generate(n=body.n, seed=seed, label=body.label, guidance=body.guidance, sampler=body.sampler,
                           steps=body.steps, prompt=body.prompt, size=size)  # fmt: skip
    images, params = out.images, out.params
    if body.watermark:  # the invisible key-id mark (aigc.safety.watermark_image); its id in the params
        from aigc.safety.watermark_image import embed
        from aigc.safety.watermark_text import load_config

        cfg = load_config()
        images = [embed(img, cfg) for img in images]
        params = [{**p, "watermark_key_id": cfg.key_id} for p in params]
    return [_png(img, p) for img, p in zip(images, params, strict=True)], params


@router.post(
    "/v1/images/generations", summary="Generate images", response_model=ImageResponse, responses=ERRORS
)
async def generate_images(body: ImageRequest, request: Request, key: str = Depends(identity)):
    st = request.app.state
    # a blocked prompt: 400 content_blocked (+ a row with the verdict); a flagged one is served, marked
    checks = (
        await moderate_prompts(request, [body.prompt], kind="image", model=body.model) if body.prompt else []
    )
    verdict, flag = outcome(moderator(request), *checks)
    lm = await asyncio.to_thread(st.registry.get, body.model, "image")
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    slot = Slot(request, key)
    t0 = time.perf_counter()
    try:
        pngs, params = await asyncio.wait_for(
            asyncio.to_thread(run_images, lm, body, seed), timeout=st.settings.request_timeout_s
        )
    except asyncio.TimeoutError:
        raise ApiError(504, f"image generation took longer than {st.settings.request_timeout_s:g} s; ask for fewer "
                       "steps or images", "timeout") from None  # fmt: skip
    finally:
        slot.release()
    st.metrics.observe_images(len(pngs))
    if st.settings.c2pa:  # last: the manifest binds the final bytes
        pngs = await asyncio.to_thread(sign_pngs, pngs, params, lm.entry, body.prompt)
    # every image lands in the store: its PNG in the content-addressed folder, a row per image
    dt = (time.perf_counter() - t0) / len(pngs)
    rows = [dict(kind="image", model=feedback.model_name(lm.entry), prompt=body.prompt or "", params=p,
                 seed=p.get("seed", seed), duration=dt, moderation=verdict) for p in params]  # fmt: skip
    ids = await feedback.record(request, lm.entry, rows, blobs=pngs, ext="png")
    data = []
    for png, p in zip(pngs, params, strict=True):
        b64 = base64.b64encode(png).decode("ascii")
        item = (
            {"b64_json": b64}
            if body.response_format == "b64_json"
            else {"url": "data:image/png;base64," + b64}
        )
        data.append(
            {**item, "seed": seed, "parameters": p, "revised_prompt": body.prompt, "moderation": flag}
        )
    return ImageResponse(
        created=int(time.time()), data=data, seed=seed, parameters=params[0], generation_ids=ids
    )
