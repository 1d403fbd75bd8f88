"""Training jobs started from the studio or the API, and the prepared data sets they train on.

    GET  /v1/datasets               prepared data under $AIGC_HOME/data and --data-dir (OpenAI list)
    POST /v1/train                  {"family", "data", "name", "preset"?, "max_steps"?, "max_time"?,
                                     "set"?: ["train.lr=3e-3", ...]} -> the job (202)
    GET  /v1/train                  the caller's training jobs, newest first (OpenAI list)
    GET  /v1/train/{id}             status, step, loss, val_loss, eta_s, progress, model when done
    GET  /v1/train/{id}/events      SSE: the job's state plus the new loss points, then [DONE]
    POST /v1/train/{id}/cancel      stop it (the half-trained run is removed)

A job runs `python -m aigc train FAMILY --data DIR --out STAGE ...`, the same command a user would
type, in a subprocess: it can be cancelled, cannot take the server down, and a crash of the trainer
is the job's error (the CLI's one-line message). Progress is read from the run's metrics.jsonl.
STAGE is a hidden folder in the server's first models dir (`.train-<id>`, a name the registry
skips); only a run that finishes is moved to `<models dir>/<name>/<next version>`, so the model
appears in `GET /v1/models` (and the studio's pickers) exactly when it is done.

Names from the client are only looked up: `data` in the data-set listing, `family` in the CLI's
TRAINERS, `preset` in the shipped presets; none is joined to a path. One job runs at a time per
server (409 otherwise); `max_time` is capped by `--max-train-time`. Jobs are rows of the store's
`jobs` table (kind "train", `user_id` = the caller's key hash: another key sees a 404).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import Field

from aigc.errors import AigcError
from aigc.serve import settings as S
from aigc.serve.app import ApiError, identity
from aigc.serve.registry import NAME_RE
from aigc.serve.routes.feedback import ERRORS, _user, run_store
from aigc.serve.schemas import ErrorResponse, Strict
from aigc.serve.streaming import SSE_DONE, SSE_HEADERS, sse

router = APIRouter(tags=["train"])
TERMINAL = ("succeeded", "failed", "cancelled")
# which families train on which prepared data kind (the order is the studio's default first)
FAMILIES_FOR = {
    "text": ("gpt", "lstm"),
    "music": ("music", "gpt", "lstm"),
    "image": ("diffusion", "vae", "gan"),
}
OVERRIDE_RE = re.compile(r"^(model|train|sample)\.[A-Za-z_][A-Za-z0-9_.]*=[^\n\r]{0,200}$")
JobId = PathParam(pattern=r"^train-[0-9]{1,18}$")
POLL_S = 0.25  # how often the watcher reads metrics.jsonl (and SSE looks for news)
STORE_EVERY_S = 2.0  # progress written to the store at most this often
KILL_GRACE_S = 10.0  # after SIGTERM, SIGKILL


class TrainRequest(Strict):
    family: str = Field(min_length=1, max_length=32)
    data: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=64, pattern=NAME_RE.pattern)
    preset: str = Field(default="auto", min_length=1, max_length=64)
    max_steps: int | None = Field(default=None, ge=1, le=S.MAX_TRAIN_STEPS)
    max_time: float | None = Field(default=None, gt=0)  # the server's cap: checked below (400)
    set: list[str] = Field(default_factory=list, max_length=S.MAX_OVERRIDES)


# ----------------------------------------------------------------------------- data sets


@dataclass
class Dataset:
    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "text")

    def view(self) -> dict[str, Any]:
        m = self.meta
        size = {k: m[k] for k in ("train_tokens", "val_tokens", "vocab_size", "count", "shape", "classes",
                                  "documents", "source") if k in m}  # fmt: skip
        return {"id": self.name, "object": "dataset", "kind": self.kind, "created": int(self.path.stat().st_mtime),
                **size, "families": {f: presets_for(f) for f in families_for(self.kind)}}  # fmt: skip


def data_dirs(settings: S.Settings) -> list[Path]:
    """Where prepared data sets are looked for: $AIGC_HOME/data, then each --data-dir."""
    from aigc.utils.paths import aigc_home

    return [aigc_home() / "data", *[Path(d).expanduser() for d in settings.data_dirs]]


def list_datasets(settings: S.Settings) -> dict[str, Dataset]:
    """name -> prepared data set (a folder with a meta.json of a kind some family trains on)."""
    found: dict[str, Dataset] = {}
    for d in data_dirs(settings):
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if sub.name in found or not NAME_RE.match(sub.name) or not (sub / "meta.json").is_file():
                continue
            try:
                meta = json.loads((sub / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("kind", "text") in FAMILIES_FOR:
                found[sub.name] = Dataset(sub.name, sub, meta)
    return found


def trainers() -> dict[str, str]:
    from aigc.cli import TRAINERS  # the one dispatch table, shared with `aigc train`

    return TRAINERS


def families_for(kind: str) -> list[str]:
    return [f for f in FAMILIES_FOR.get(kind, ()) if f in trainers()]


def _preset_family(family: str) -> str:
    return "gpt" if family == "music" else family  # a music run is the gpt trainer on events


def presets_for(family: str) -> list[str]:
    from aigc.config import list_presets

    return ["auto", *list_presets(_preset_family(family))]


def _preset_arg(family: str, preset: str) -> str:
    """The shipped preset's file (a path, never the bare name: a folder named like it in the
    trainer's working directory would be taken for it)."""
    if preset == "auto":
        return preset
    from importlib import resources

    from aigc.config import PRESET_PACKAGE

    return str(resources.files(PRESET_PACKAGE).joinpath(_preset_family(family), f"{preset}.toml"))


@router.get("/v1/datasets", summary="Prepared data sets a training job can use", responses=ERRORS)
async def get_datasets(request: Request) -> dict[str, Any]:
    found = await asyncio.to_thread(list_datasets, request.app.state.settings)
    data = [d.view() for d in found.values()]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}  # fmt: skip


# ----------------------------------------------------------------------------- jobs


@dataclass
class TrainJob:
    """One training subprocess and what its watcher thread has read of its metrics."""

    id: int
    owner: str
    params: dict[str, Any]
    stage: Path
    models_dir: Path
    deadline_s: float  # killed past this many seconds (the server's cap, with a margin)
    status: str = "queued"
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    model: str | None = None  # the id it is served under, once done
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    points: list[list[float]] = field(default_factory=list)  # [step, loss]
    evals: list[list[float]] = field(default_factory=list)  # [step, val_loss]
    version: int = 0  # bumped on every change: SSE watchers send when it moves
    cancel_requested: bool = False
    proc: subprocess.Popen | None = None

    @property
    def api_id(self) -> str:
        return f"train-{self.id}"

    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def eta(self) -> float | None:
        """Seconds left: by steps (time per step so far) and by the time budget, whichever is less."""
        if self.status != "running" or self.started is None:
            return None
        elapsed, left = time.time() - self.started, []
        if self.total_steps and self.step:
            left.append(elapsed / self.step * max(0, self.total_steps - self.step))
        if self.params.get("max_time"):
            left.append(max(0.0, self.params["max_time"] - elapsed))
        return round(min(left), 1) if left else None

    def progress(self) -> float | None:
        if self.status == "succeeded":
            return 1.0
        elapsed, shares = self.elapsed() or 0.0, []
        if self.total_steps:
            shares.append(self.step / self.total_steps)
        if self.params.get("max_time"):
            shares.append(elapsed / self.params["max_time"])
        return round(min(0.99, max(shares)), 4) if shares else None

    def view(self) -> dict[str, Any]:
        p = self.params
        return {
            "id": self.api_id, "object": "train.job", "status": self.status, "created": int(self.created),
            "finished": int(self.finished) if self.finished else None, "family": p["family"], "data": p["data"],
            "name": p["name"], "preset": p["preset"], "max_steps": p.get("max_steps"), "max_time": p.get("max_time"),
            "model": self.model, "step": self.step, "total_steps": self.total_steps, "loss": self.loss,
            "val_loss": self.val_loss, "elapsed_s": round(self.elapsed(), 1) if self.started else None,
            "eta_s": self.eta(), "progress": self.progress(), "error": self.error,
        }  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What the store keeps in the job row's `result` (the live fields of `view`)."""
        return {k: v for k, v in self.view().items() if k in ("step", "total_steps", "loss", "val_loss", "model",
                                                                "elapsed_s")}  # fmt: skip


class TrainState:
    """The server's training jobs in memory (the store has them all, these are the live ones)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.jobs: dict[int, TrainJob] = {}
        self.lock = threading.Lock()  # one job at a time: checked and claimed under it
        self.host = socket.gethostname()

    def active(self) -> TrainJob | None:
        return next((j for j in self.jobs.values() if j.status not in TERMINAL), None)

    def close(self) -> None:
        """Server shutdown: stop a running trainer (its run is removed, the row says why)."""
        job = self.active()
        if job is not None:
            job.error = "the server stopped while the job ran"
            job.cancel_requested = True
            _stop(job)


def _state(request: Request) -> TrainState:
    st = request.app.state
    if not hasattr(st, "train"):
        st.train = TrainState(request.app)
        _recover(st.train)
    return st.train


def _recover(state: TrainState) -> None:
    """Jobs this host left queued/running (a server that stopped) are failed; their stages removed."""
    store = state.app.state.store
    for status in ("queued", "running"):
        for row in store.list_jobs(status=status, kind="train", limit=1000)["data"]:
            if row["params"].get("host") != state.host:
                continue  # another server replica's job (a shared PostgreSQL store)
            store.update_job(row["id"], status="failed", error="the server stopped while the job ran")
            stage = _stage(Path(state.app.state.settings.models_dirs[0]).expanduser(), row["id"])
            shutil.rmtree(stage, ignore_errors=True)
            stage.with_name(stage.name + ".log").unlink(missing_ok=True)


def _stage(models_dir: Path, job_id: int) -> Path:
    """Where job `job_id` trains: hidden in the models dir (the registry skips names with a dot)."""
    return models_dir / f".train-{job_id}"


def _view_row(row: dict[str, Any]) -> dict[str, Any]:
    """The API view of a store row (a job this server process no longer holds in memory)."""
    p, r = row["params"], row["result"] or {}
    return {
        "id": f"train-{row['id']}", "object": "train.job", "status": row["status"], "created": int(row["created"]),
        "finished": int(row["finished"]) if row["finished"] else None, "family": p.get("family"),
        "data": p.get("data"), "name": p.get("name"), "preset": p.get("preset"), "max_steps": p.get("max_steps"),
        "max_time": p.get("max_time"), "model": r.get("model") or row["model"], "step": r.get("step", 0),
        "total_steps": r.get("total_steps"), "loss": r.get("loss"), "val_loss": r.get("val_loss"),
        "elapsed_s": r.get("elapsed_s"), "eta_s": None,
        "progress": 1.0 if row["status"] == "succeeded" else row["progress"], "error": row["error"],
    }  # fmt: skip


async def _find(request: Request, job_id: str, key: str) -> tuple[TrainJob | None, dict[str, Any]]:
    """(live job or None, its view); another key's job is a 404, like a missing one."""
    n = int(job_id.removeprefix("train-"))
    state = _state(request)
    job = state.jobs.get(n)
    if job is not None and job.owner == _user(key):
        return job, job.view()
    missing = ApiError(
        404, f"training job {job_id} not found; list yours with GET /v1/train", "job_not_found"
    )
    if job is not None:
        raise missing
    try:
        row = await run_store(lambda: request.app.state.store.get_job(n))
    except ApiError:
        raise missing from None
    if row["kind"] != "train" or row["user"] != _user(key):
        raise missing
    return None, _view_row(row)


def _check(request: Request, body: TrainRequest) -> tuple[Dataset, float | None, Path]:
    """Validate a request against the server's tables; returns (data set, max_time, models dir)."""
    settings = request.app.state.settings
    fams = trainers()
    if body.family not in fams:
        raise AigcError(f"unknown family {body.family!r}; valid families: {', '.join(fams)}")
    found = list_datasets(settings)
    ds = found.get(body.data)
    if ds is None:
        where = ", ".join(map(str, data_dirs(settings)))
        raise ApiError(404, f"data set {body.data!r} not found; available: {', '.join(found) or 'none'} "
                       f"(prepared data sets under {where}; make one with `aigc data prepare`)",
                       "dataset_not_found", "data")  # fmt: skip
    allowed = families_for(ds.kind)
    if body.family not in allowed:
        raise AigcError(
            f"data set {body.data!r} holds {ds.kind} data; families that train on it: {', '.join(allowed)}"
        )
    presets = presets_for(body.family)
    if body.preset not in presets:
        raise AigcError(
            f"unknown preset {body.preset!r} for {body.family}; valid presets: {', '.join(presets)}"
        )
    for item in body.set:
        if not OVERRIDE_RE.match(item):
            raise AigcError(f"set entry {item!r} is not allowed; use section.key=value with section model, "
                            "train or sample (e.g. train.lr=3e-3)")  # fmt: skip
    cap = settings.max_train_time_s
    if body.max_time is not None and body.max_time > cap:
        raise AigcError(f"max_time {body.max_time:g} s is over this server's cap of {cap:g} s; "
                        "ask for less (the server's --max-train-time sets the cap)")  # fmt: skip
    max_time = body.max_time
    if max_time is None and body.max_steps is None:
        max_time = min(S.DEFAULT_TRAIN_TIME_S, cap)  # every job ends
    models_dir = Path(settings.models_dirs[0]).expanduser()
    if (models_dir / body.name / "config.json").is_file():
        raise ApiError(409, f"a model named {body.name!r} already exists as an unversioned run in {models_dir}; "
                       "choose another name (a name made by training gets versions 1, 2, ...)",
                       "name_taken", "name")  # fmt: skip
    return ds, max_time, models_dir


@router.post("/v1/train", summary="Start a training job", status_code=202,
             responses={c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 422)})  # fmt: skip
async def start_training(
    body: TrainRequest, request: Request, key: str = Depends(identity)
) -> dict[str, Any]:
    state = _state(request)
    ds, max_time, models_dir = await asyncio.to_thread(_check, request, body)
    params = {"family": body.family, "data": body.data, "name": body.name, "preset": body.preset,
              "max_steps": body.max_steps, "max_time": max_time, "set": list(body.set), "host": state.host}  # fmt: skip
    store, cap = request.app.state.store, request.app.state.settings.max_train_time_s

    def claim() -> TrainJob:  # in a worker thread: SQLite may wait on a lock, the event loop must not
        with state.lock:  # the check and the row under one lock: a second request cannot slip in
            running = state.active()
            if running is not None:
                raise ApiError(409, f"a training job is already running ({running.api_id}); this server runs "
                               "one at a time: wait for it or cancel it", "job_running")  # fmt: skip
            job_id = store.add_job("train", params, model=body.name, user=_user(key))
            job = TrainJob(job_id, _user(key), params, _stage(models_dir, job_id), models_dir,
                           deadline_s=cap * 1.1 + 60)  # fmt: skip
            state.jobs[job_id] = job
        store.update_job(job_id, result=job.summary())
        return job

    job = await run_store(claim)
    stage = job.stage
    cmd = [sys.executable, "-m", "aigc", "train", body.family, "--data", str(ds.path), "--out", str(stage),
           "--preset", _preset_arg(body.family, body.preset)]  # fmt: skip
    if body.max_steps is not None:
        cmd += ["--max-steps", str(body.max_steps)]
    if max_time is not None:
        cmd += ["--max-time", repr(float(max_time))]
    for item in body.set:
        cmd.append(f"--set={item}")
    threading.Thread(target=_watch, args=(request.app, job, cmd), daemon=True, name=job.api_id).start()
    return job.view()


def _touch(job: TrainJob) -> None:
    job.version += 1


def _stop(job: TrainJob) -> None:
    """SIGTERM the trainer's process group (the watcher SIGKILLs it if it lingers)."""
    proc = job.proc
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def _read_metrics(job: TrainJob, f: Any) -> bool:
    """Read complete new lines of metrics.jsonl into the job; True if anything changed."""
    changed = False
    while True:
        pos = f.tell()
        line = f.readline()
        if not line.endswith("\n"):  # a line still being written: read it next time
            f.seek(pos)
            return changed
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step")
        if not isinstance(step, int):
            continue
        # any record says how far the run got: train rows come every log_interval steps, so a short
        # run's last step is often only on its final eval row
        if step > job.step:
            job.step, changed = step, True
        if isinstance(row.get("loss"), int | float) and row.get("kind", "train") == "train":
            job.loss = row["loss"]
            job.points.append([step, row["loss"]])
            changed = True
        if isinstance(row.get("val_loss"), int | float):
            job.val_loss = row["val_loss"]
            job.evals.append([step, row["val_loss"]])
            changed = True


def _error_line(log: Path) -> str:
    """The trainer's last words: the CLI prints a user error as one `error: ...` line."""
    try:
        lines = [
            ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
        ]
    except OSError:
        return "the trainer failed (no log)"
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln.removeprefix("error:").strip()
    return lines[-1][-500:] if lines else "the trainer failed with no output"


def _next_version(home: Path) -> str:
    nums = [int(p.name) for p in home.iterdir() if p.is_dir() and p.name.isdigit()] if home.is_dir() else []
    return str(max(nums, default=0) + 1)


def _watch(app: Any, job: TrainJob, cmd: list[str]) -> None:
    """The job's thread: run the trainer, follow its metrics, then publish or clean up the run."""
    store = app.state.store
    log = job.stage.with_name(job.stage.name + ".log")
    metrics = None
    try:
        job.models_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            # its own process group: a cancel stops the trainer and anything it started
            job.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # fmt: skip
        job.status, job.started = "running", time.time()
        _touch(job)
        store.update_job(job.id, status="running")
        last_store, killed_at = 0.0, None
        while job.proc.poll() is None:
            time.sleep(POLL_S)
            if metrics is None and (job.stage / "metrics.jsonl").is_file():
                metrics = open(job.stage / "metrics.jsonl", encoding="utf-8")  # noqa: SIM115 (closed below)
            if job.total_steps is None and (job.stage / "config.json").is_file():
                try:  # the resolved budget, e.g. the auto preset's 3000 steps
                    cfg = json.loads((job.stage / "config.json").read_text(encoding="utf-8"))
                    job.total_steps = (cfg.get("train") or {}).get("max_steps")
                except (OSError, ValueError):
                    pass
            if metrics is not None and _read_metrics(job, metrics):
                _touch(job)
            if time.time() - last_store > STORE_EVERY_S:
                last_store = time.time()
                store.update_job(job.id, progress=job.progress(), result=job.summary())
            over_time = time.time() - job.started > job.deadline_s
            if (job.cancel_requested or over_time) and killed_at is None:
                if over_time:
                    job.error = (
                        f"stopped: over the server's time cap ({app.state.settings.max_train_time_s:g} s)"
                    )
                _stop(job)
                killed_at = time.time()
            elif killed_at is not None and time.time() - killed_at > KILL_GRACE_S:
                os.killpg(job.proc.pid, signal.SIGKILL)
        if metrics is None and (job.stage / "metrics.jsonl").is_file():  # a run shorter than one poll
            metrics = open(job.stage / "metrics.jsonl", encoding="utf-8")  # noqa: SIM115 (closed below)
        if metrics is not None:
            _read_metrics(job, metrics)
        if job.cancel_requested or job.error:
            job.status = "cancelled" if job.error is None else "failed"
        elif job.proc.returncode != 0:
            job.status, job.error = "failed", _error_line(log)
        else:
            # publish: the finished run becomes <models dir>/<name>/<next version>, in one rename
            home = job.models_dir / job.params["name"]
            home.mkdir(exist_ok=True)
            version = _next_version(home)
            os.replace(log, job.stage / "train.log")
            os.replace(job.stage, home / version)
            job.model = f"{job.params['name']}@{version}"
            job.status = "succeeded"
            app.state.registry.scan(force=True)  # served at once, not after the next rescan
    except Exception as e:  # a bug or a full disk: recorded on the job, never lost in a thread
        job.status, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
        if job.proc is not None and job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
    finally:
        if metrics is not None:
            metrics.close()
        job.finished = time.time()
        if job.status != "succeeded":
            shutil.rmtree(job.stage, ignore_errors=True)  # nothing half-trained is left behind
        log.unlink(missing_ok=True)
        _touch(job)
        # the store may be gone (server stopping): the in-memory job still says how it ended
        with contextlib.suppress(Exception):
            store.update_job(job.id, status=job.status, progress=job.progress(), result=job.summary(),
                             error=job.error)  # fmt: skip


@router.get("/v1/train", summary="Your training jobs, newest first", responses=ERRORS)
async def list_training(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    before: str | None = Query(default=None, pattern=r"^train-[0-9]{1,18}$"),
    key: str = Depends(identity),
) -> dict[str, Any]:
    state = _state(request)
    cursor = int(before.removeprefix("train-")) if before else None
    page = await run_store(lambda: request.app.state.store.list_jobs(kind="train", user=_user(key), limit=limit,
                                                                     before=cursor))  # fmt: skip
    data = [state.jobs[r["id"]].view() if r["id"] in state.jobs else _view_row(r) for r in page["data"]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": page["has_more"]}  # fmt: skip


@router.get("/v1/train/{job_id}", summary="A training job's status", responses=ERRORS)
async def get_training(request: Request, job_id: str = JobId, key: str = Depends(identity)) -> dict[str, Any]:
    return (await _find(request, job_id, key))[1]


@router.post("/v1/train/{job_id}/cancel", summary="Cancel a training job", responses=ERRORS)
async def cancel_training(
    request: Request, job_id: str = JobId, key: str = Depends(identity)
) -> dict[str, Any]:
    job, view = await _find(request, job_id, key)
    if job is not None and job.status not in TERMINAL:
        job.cancel_requested = True
        _stop(job)  # the watcher sees the exit, marks the job cancelled and removes the stage
        _touch(job)
        view = job.view()
    return view


@router.get("/v1/train/{job_id}/events", summary="A training job's progress as server-sent events")
async def training_events(request: Request, job_id: str = JobId, key: str = Depends(identity)):
    job, view = await _find(request, job_id, key)

    async def events():
        if job is None:  # finished before this server process started: its final state
            yield sse(view)
            yield SSE_DONE
            return
        seen, sent_points, sent_evals = -1, 0, 0
        while True:
            if job.version != seen:
                seen = job.version
                points, evals = job.points[sent_points:], job.evals[sent_evals:]
                sent_points, sent_evals = sent_points + len(points), sent_evals + len(evals)
                yield sse({**job.view(), "points": points, "evals": evals})
                if job.status in TERMINAL:
                    yield SSE_DONE
                    return
            await asyncio.sleep(POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
