"""Jobs: long image work run in the background, watched over SSE, cancellable.

    POST /v1/jobs                   {"type": "images.generations", "input": {...image request...}}
    GET  /v1/jobs/{id}              status, progress {step, total}, eta_s, result when done
    GET  /v1/jobs/{id}/events       SSE: one event per change (step/total, eta_s, preview), [DONE]
    POST /v1/jobs/{id}/cancel       cancelled at once: the job changes no more

A job's input is admitted as POST /v1/images/generations admits a request (images.admit: the same
checks, the same 4xx), so a job is accepted only when it can start. It makes its images one at a
time (image i with seed `seed + i`, as image i of the direct route, recorded per image), so
progress, preview (the newest image, as a data URL) and cancellation happen between images. The
generator gives no hook inside one image's denoising loop, so a step is one image. Each image is
recorded in the content store as it is made (`generation_id` in its result item). The result has
the direct route's response shape (ImageResponse: data, seed, parameters, generation_ids); a
cancelled job keeps the images made before the cancel in its result.

Status: queued -> running -> succeeded | failed; cancel makes a queued or running job `cancelled`
at once, the status its events stream ends with; the job changes no more (the image being made is
dropped when it ends). Admitting a job loads its model, as the direct route does. Jobs live in
memory, visible only to the API key that created them; the oldest finished ones are forgotten
past MAX_JOBS.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections import OrderedDict
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from aigc.errors import AigcError
from aigc.serve.app import ApiError, identity
from aigc.serve.routes import feedback
from aigc.serve.routes.images import admit, image_item, run_images, sign_pngs
from aigc.serve.schemas import ErrorResponse, ImageRequest, ImageResponse, Strict
from aigc.serve.streaming import SSE_DONE, SSE_HEADERS, sse

router = APIRouter(tags=["jobs"])
MAX_JOBS = 1000
TERMINAL = ("succeeded", "failed", "cancelled")
JobId = Path(pattern=r"^job-[0-9a-f]{24}$")


class JobRequest(Strict):
    type: Literal["images.generations"]
    input: ImageRequest


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: str
    status: str  # queued | running | succeeded | failed | cancelled
    created: int
    progress: dict[str, int]  # {"step", "total"}
    eta_s: float | None
    error: str | None = None
    result: dict[str, Any] | None = None


class Job:
    def __init__(self, owner: str, body: JobRequest, seed: int, lm: Any) -> None:
        self.id = f"job-{secrets.token_hex(12)}"
        self.owner, self.body, self.seed, self.lm = owner, body, seed, lm
        self.status, self.error, self.created = "queued", None, int(time.time())
        self.step, self.total = 0, body.input.n
        self.started: float | None = None
        self.data: list[dict[str, Any]] = []
        self.preview: str | None = None
        self.cancel_requested = False
        self.changed = asyncio.Event()  # set on every change; watchers clear and wait again
        self.task: asyncio.Task | None = None  # kept here: the loop holds tasks only weakly
        self.moderation: str | None = None  # the prompt's verdict ("flagged:..."), on every image row
        self.flag: dict[str, Any] | None = None  # the same as each result item's `moderation`

    def eta(self) -> float | None:
        if self.status != "running" or not self.step or self.started is None:
            return None
        per = (time.monotonic() - self.started) / self.step
        return round(per * (self.total - self.step), 3)

    def view(self) -> JobView:
        result = None
        if self.status == "succeeded" or (self.status == "cancelled" and self.data):
            result = ImageResponse(created=self.created, data=self.data, seed=self.seed,
                                   parameters=self.data[0]["parameters"],
                                   generation_ids=[d["generation_id"] for d in self.data]).model_dump()  # fmt: skip
        return JobView(id=self.id, type=self.body.type, status=self.status, created=self.created,
                       progress={"step": self.step, "total": self.total}, eta_s=self.eta(), error=self.error,
                       result=result)  # fmt: skip

    def touch(self) -> None:
        self.changed.set()


def _jobs(request: Request) -> OrderedDict[str, Job]:
    state = request.app.state
    if not hasattr(state, "jobs"):
        state.jobs = OrderedDict()
    return state.jobs


def _find(request: Request, job_id: str, key: str) -> Job:
    job = _jobs(request).get(job_id)
    if job is None or job.owner != key:  # another key's job looks the same as a missing one
        raise ApiError(404, f"job {job_id} not found; jobs are kept in memory until the server restarts",
                       "job_not_found")  # fmt: skip
    return job


async def _run(request: Request, job: Job) -> None:
    st = request.app.state
    body, lm = job.body.input, job.lm
    job.lm = None  # a finished job kept in memory must not keep an evicted model loaded
    if job.cancel_requested:  # cancelled before it started
        return
    try:
        job.status, job.started = "running", time.monotonic()
        job.touch()
        for i in range(job.total):
            if job.cancel_requested:
                return
            # image i as the direct route makes it: seed + i, and its label (the classes cycle without one)
            one = body.model_copy(update={"n": 1, "label": lm.generator.label_of(i, body.label, body.prompt)})
            seed = job.seed + i  # in range: ImageRequest checks seed + n - 1
            t0 = time.perf_counter()
            pngs, params = await asyncio.to_thread(run_images, lm, one, seed)
            if job.cancel_requested:  # cancelled while it was made: dropped, the job already says so
                return
            if st.settings.c2pa:  # signed as POST /v1/images/generations signs them
                pngs = await asyncio.to_thread(sign_pngs, pngs, params, lm.entry, body.prompt)
            # recorded like POST /v1/images/generations: PNG in the blob folder, one row per image
            row = dict(kind="image", model=feedback.model_name(lm.entry), prompt=body.prompt or "",
                       params=params[0], seed=seed, duration=time.perf_counter() - t0,
                       moderation=job.moderation)  # fmt: skip
            [gid] = await feedback.record(request, lm.entry, [row], blobs=pngs, ext="png")
            if job.cancel_requested:  # during the write: in the store, not in the cancelled job's result
                return
            job.data.append(image_item(pngs[0], params[0], body, job.flag, gid))
            job.preview = "data:image/png;base64," + base64.b64encode(pngs[0]).decode("ascii")
            job.step = i + 1
            st.metrics.observe_images(1)
            job.touch()
        job.status = "succeeded"
    except Exception as e:  # a cancelled job stays cancelled
        if not job.cancel_requested:
            job.status, job.error = "failed", _error(e)
    finally:
        job.touch()


def _error(e: Exception) -> str:
    if isinstance(e, AigcError):
        return str(e)
    if isinstance(e, ApiError):  # the store was busy: the image was not recorded
        return e.message
    return f"internal error: {type(e).__name__}"  # a bug: recorded on the job, not lost in a background task


@router.post("/v1/jobs", summary="Start a background job", response_model=JobView, status_code=202,
             responses={c: {"model": ErrorResponse} for c in (400, 401, 404, 422, 503)})  # fmt: skip
async def create_job(body: JobRequest, request: Request, key: str = Depends(identity)) -> JobView:
    st = request.app.state
    # admitted as POST /v1/images/generations admits it (moderation, model, input): 4xx now, not a failed job
    lm, verdict, flag = await admit(request, body.input)
    jobs = _jobs(request)
    active = sum(j.status not in TERMINAL for j in jobs.values())
    if active >= st.settings.max_queue:
        raise ApiError(503, "too many jobs running; retry later", "overloaded", retry=True)
    for old in [j for j in jobs.values() if j.status in TERMINAL][: max(0, len(jobs) + 1 - MAX_JOBS)]:
        del jobs[old.id]
    seed = body.input.seed if body.input.seed is not None else body.input.random_seed()
    job = Job(key, body, seed, lm)
    job.moderation, job.flag = verdict, flag  # the verdict each image row gets
    jobs[job.id] = job
    job.task = asyncio.get_running_loop().create_task(_run(request, job))
    return job.view()


@router.get("/v1/jobs/{job_id}", summary="A job's status", response_model=JobView)
async def get_job(request: Request, job_id: str = JobId, key: str = Depends(identity)) -> JobView:
    return _find(request, job_id, key).view()


@router.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job", response_model=JobView)
async def cancel_job(request: Request, job_id: str = JobId, key: str = Depends(identity)) -> JobView:
    job = _find(request, job_id, key)
    if job.status not in TERMINAL:  # cancelled now: the image being made (if any) is dropped
        job.cancel_requested, job.status = True, "cancelled"
        job.touch()
    return job.view()


@router.get("/v1/jobs/{job_id}/events", summary="Job progress as server-sent events")
async def job_events(request: Request, job_id: str = JobId, key: str = Depends(identity)):
    job = _find(request, job_id, key)

    async def events():
        sent_step = -1
        while True:
            job.changed.clear()
            v = job.view()
            event = {"id": job.id, "status": v.status, "step": v.progress["step"], "total": v.progress["total"],
                     "eta_s": v.eta_s, "error": v.error}  # fmt: skip
            if job.step != sent_step and job.preview is not None:
                event["preview"] = job.preview
                sent_step = job.step
            yield sse(event)
            if job.status in TERMINAL:
                yield SSE_DONE
                return
            await job.changed.wait()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
