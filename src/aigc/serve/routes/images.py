"""POST /v1/images/generations: images from a diffusion / GAN / VAE run (or a diffusers pipeline).

OpenAI's shape (`n`, `size`, `response_format` b64_json | url) plus our extensions `seed`, `steps`,
`guidance`, `label`, `sampler`, `watermark` (the deployment's invisible key-id mark, images of at
least 24 px; `POST /v1/watermark/detect` finds it). `url` is a `data:image/png;base64,...` URL: the server stores
nothing under that URL, so there is no file to expire or leak. Each image is also recorded in
the content store (its PNG in the blob folder, GET /v1/outputs/{ref}; `generation_ids`, one per
image). Each PNG carries its parameters in text chunks (as `aigc generate image` writes them).
Our models have one native size: `size` must be it (or omitted); a text-to-image pipeline takes
any square size up to MAX_IMAGE_SIZE.

`prompt` is text for a text-to-image pipeline; a model that takes no text (ours, an unconditional
pipeline) accepts it only empty (no prompt) or naming one of its classes, case and surrounding
spaces ignored (`prompt="3"` is `label="3"`; a `label` given too must agree): so the official
client, whose `images.generate` requires a prompt, can ask for a class. `parameters.label` is the
class index used.

Image i of a call has seed `seed + i` (`data[i].seed`, like the text routes' choices): its noise
comes from its own generator, so `n=1` with that seed and its label makes it again (up to the
rounding of a batched pass, see BATCH). One call per model at a time runs in a worker thread
(image work is seconds long: it never blocks the event loop). Requests that arrive while a call
runs are coalesced: those sharing sampler, steps, guidance, size (and a pipeline's prompt) run next
as one batched call, each with its own seeds and labels (`ImageQueue`). `admit` is every check
made before image work; POST /v1/jobs admits with it too, so a job is accepted only when it can
start.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

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
# images per forward pass. Image i of a call replays alone (n=1, its seed and label) up to the
# rounding of a batched pass (the UNet rounds a batch of 8 differently from one image: ~1e-5 in
# fp32, a few 8-bit levels under bf16 autocast); one image per pass would make it bit-identical at
# ~2.7x the time for n=8 on the `small` preset (one thread)
BATCH = 64


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


def image_size(lm, body: ImageRequest) -> int | None:
    """The side to ask a pipeline for (None: the model's own); AigcError when `size` is not allowed."""
    if body.size is None:
        return None
    w, h = (int(x) for x in body.size.split("x"))
    native = native_size(lm.generator)
    if w != h or (native is not None and w != native) or not 8 <= w <= S.MAX_IMAGE_SIZE:
        allowed = (
            f"{native}x{native}" if native is not None else f"a square WxW with 8 <= W <= {S.MAX_IMAGE_SIZE}"
        )
        raise AigcError(f"size {body.size!r} is not available for {lm.entry.id}; allowed: {allowed}")
    return None if native is not None else w


def check_images(lm, body: ImageRequest) -> None:
    """Every check of `body` against the model, with no tensor work (AigcError -> 400)."""
    image_size(lm, body)
    lm.generator.check(n=body.n, label=body.label, guidance=body.guidance, sampler=body.sampler,
                       steps=body.steps, prompt=body.prompt)  # fmt: skip


async def admit(request: Request, body: ImageRequest) -> tuple[Any, str | None, dict[str, Any] | None]:
    """What a request meets before any image work, in this order: the prompt's moderation (blocked:
    400 content_blocked + a row), the model (404 unknown, 400 not an image model), the request
    against the model (400). Returns (loaded model, store verdict, response `moderation`)."""
    checks = (
        await moderate_prompts(request, [body.prompt], kind="image", model=body.model) if body.prompt else []
    )
    verdict, flag = outcome(moderator(request), *checks)
    lm = await asyncio.to_thread(request.app.state.registry.get, body.model, "image")
    await asyncio.to_thread(check_images, lm, body)  # to_thread: the first "auto" dtype check measures
    return lm, verdict, flag


def image_item(png: bytes, params: dict, body: ImageRequest, flag: dict | None, gid: int | None) -> dict:
    """One `data` entry of an ImageResponse (the jobs' result uses it too)."""
    b64 = base64.b64encode(png).decode("ascii")
    item = (
        {"b64_json": b64} if body.response_format == "b64_json" else {"url": "data:image/png;base64," + b64}
    )
    return {**item, "seed": params["seed"], "parameters": params, "revised_prompt": body.prompt,
            "moderation": flag, "generation_id": gid}  # fmt: skip


def run_images(lm, body: ImageRequest, seed: int) -> tuple[list[bytes], list[dict]]:
    """One request's images, made in the calling (worker) thread: image i with seed + i."""
    return run_group(lm, [(body, seed)])[0]


def group_key(lm, body: ImageRequest) -> tuple:
    """What requests must share to be made in one call: everything but n, seed, label (per image)
    and what is applied to each image afterwards (watermark, response format)."""
    prompt = body.prompt if lm.generator.is_text_to_image else None
    return body.sampler, body.steps, body.guidance, image_size(lm, body), prompt


def run_group(lm, group: list[tuple[ImageRequest, int]]) -> list[tuple[list[bytes], list[dict]]]:
    """Requests of one `group_key` made in one call, in the calling (worker) thread (one call per
    model at a time) -> each request's (PNGs, params). Image i of a request has its seed + i and
    its label (`label_of`), so it is what the request alone gives, up to a batched pass's rounding."""
    from aigc.serve.batching import inherit_torch_threads

    inherit_torch_threads()
    gen, (first, _) = lm.generator, group[0]
    seeds = [seed + i for body, seed in group for i in range(body.n)]  # in range: ImageRequest checks
    labels = [gen.label_of(i, body.label, body.prompt) for body, _ in group for i in range(body.n)]
    with lm.lock:
        out = gen.generate(n=len(seeds), seed=seeds, label=None if labels[0] is None else labels,
                           guidance=first.guidance, sampler=first.sampler, steps=first.steps,
                           prompt=first.prompt if gen.is_text_to_image else None,
                           size=image_size(lm, first), batch_size=BATCH)  # fmt: skip
    results, at = [], 0
    for body, _ in group:
        images = out.images[at : at + body.n]
        params = [{**p, "index": i, "n": body.n} for i, p in enumerate(out.params[at : at + body.n])]
        at += body.n
        if body.watermark:  # the invisible key-id mark (aigc.safety.watermark_image); its id in the params
            from aigc.safety.watermark_image import embed
            from aigc.safety.watermark_text import load_config

            cfg = load_config()
            images = [embed(img, cfg) for img in images]
            params = [{**p, "watermark_key_id": cfg.key_id} for p in params]
        results.append(([_png(img, p) for img, p in zip(images, params, strict=True)], params))
    return results


class ImageQueue:
    """The direct requests to one image model (`LoadedModel.images`), on the event loop: one call
    runs at a time; the requests that arrive meanwhile wait, and when it ends, the first waiting one
    and every other waiting one of its `group_key` (up to BATCH images) run as one batched call.

    A request to an idle model starts at once, alone. Each request keeps its own seeds and labels,
    so merging changes its images only by the rounding of a bigger batch (see BATCH). A request
    that gives up while it waits (timeout) leaves the queue.
    """

    def __init__(self, lm) -> None:
        self.lm = lm
        self.waiting: list[tuple[ImageRequest, int, asyncio.Future]] = []
        self.running = False
        self.calls = self.merged = 0  # calls made, and requests that shared a call with another

    async def generate(self, body: ImageRequest, seed: int) -> tuple[list[bytes], list[dict]]:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((body, seed, done))
        if not self.running:
            self._start()
        try:
            return await done
        finally:
            self.waiting = [w for w in self.waiting if w[2] is not done]

    def _start(self) -> None:
        if not self.waiting:
            self.running = False
            return
        key, group, rest, count = group_key(self.lm, self.waiting[0][0]), [], [], 0
        for w in self.waiting:
            if count + w[0].n <= max(BATCH, self.waiting[0][0].n) and group_key(self.lm, w[0]) == key:
                group.append(w)
                count += w[0].n
            else:
                rest.append(w)
        self.waiting, self.running = rest, True
        self.calls += 1
        self.merged += len(group) if len(group) > 1 else 0
        task = asyncio.ensure_future(asyncio.to_thread(run_group, self.lm, [(b, s) for b, s, _ in group]))

        def finished(t: asyncio.Future) -> None:
            error = asyncio.CancelledError() if t.cancelled() else t.exception()
            for i, (_, _, done) in enumerate(group):
                if not done.done():  # (a request that gave up has its future cancelled)
                    if error is not None:
                        done.set_exception(error)
                    else:
                        done.set_result(t.result()[i])
            self._start()

        task.add_done_callback(finished)


@router.post(
    "/v1/images/generations", summary="Generate images", response_model=ImageResponse, responses=ERRORS
)
async def generate_images(body: ImageRequest, request: Request, key: str = Depends(identity)):
    st = request.app.state
    # a blocked prompt: 400 content_blocked (+ a row with the verdict); a flagged one is served, marked
    lm, verdict, flag = await admit(request, body)
    seed = body.seed if body.seed is not None else body.random_seed()
    slot = Slot(request, key)
    t0 = time.perf_counter()
    try:
        if lm.images is None:
            lm.images = ImageQueue(lm)
        pngs, params = await asyncio.wait_for(lm.images.generate(body, seed), st.settings.request_timeout_s)
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
    data = [image_item(png, p, body, flag, gid) for png, p, gid in zip(pngs, params, ids, strict=True)]
    return ImageResponse(
        created=int(time.time()), data=data, seed=seed, parameters=params[0], generation_ids=ids
    )
