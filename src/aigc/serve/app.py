"""The FastAPI app factory: `create_app(settings)` wires the registry, limits, auth and routes.

    uvicorn.run(create_app(Settings(models_dirs=[Path("runs")])), host="127.0.0.1", port=8000)

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}, "detail": message}`,
so the official client raises its usual exceptions: 400 out-of-range parameter (naming the bound)
or a user error (AigcError), 401 API key, 404 unknown model (listing the available ones), 413 body
too large, 415 a body not sent as JSON, 422 malformed JSON / wrong type (naming the field), 429
too many requests for one key, 503 server queue full (both with Retry-After) or a model that
cannot be loaded (without), 504 timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.errors import AigcError
from aigc.serve import settings as S
from aigc.serve.auth import KeyChecker, load_keys
from aigc.serve.metrics import Metrics
from aigc.serve.registry import ModelRegistry, UnknownModel
from aigc.serve.settings import Settings

log = logging.getLogger("aigc.serve")

# pydantic error types that mean "a value out of its documented range": 400 naming the bound
BOUND_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_long",
    "too_short",
    "string_too_long",
    "string_too_short",
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry = status, message, code, param, retry


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   retry: bool = False) -> JSONResponse:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}, "detail": message}
    headers = {"Retry-After": str(S.RETRY_AFTER_S)} if retry else None
    return JSONResponse(body, status_code=status, headers=headers)


class Admission:
    """Bounded in-flight requests: per key (429) and over the whole server (503)."""

    def __init__(self, settings: Settings) -> None:
        self.per_key: dict[str, int] = {}
        self.total = 0
        self.settings = settings

    def acquire(self, key: str) -> None:
        s = self.settings
        if self.per_key.get(key, 0) >= s.max_inflight_per_key:
            raise ApiError(
                429, f"too many requests in flight for this key (limit {s.max_inflight_per_key}); retry later",
                "rate_limit_exceeded", retry=True,
            )  # fmt: skip
        if self.total >= s.max_queue:
            raise ApiError(
                503, f"server busy ({s.max_queue} requests in flight); retry later", "overloaded", retry=True
            )
        self.per_key[key] = self.per_key.get(key, 0) + 1
        self.total += 1

    def release(self, key: str) -> None:
        self.total -= 1
        self.per_key[key] -= 1
        if not self.per_key[key]:
            del self.per_key[key]


class BodyLimit:
    """ASGI middleware: refuse bodies over MAX_BODY_BYTES (413) before anything parses them.

    A declared Content-Length is checked at once; a chunked body is read (up to the limit) into
    memory first, then replayed to the app.
    """

    def __init__(self, app: Any, limit: int, paths: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.paths = app, limit, paths or {}  # paths: their own limits (uploads)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope["path"], self.limit)

        def too_big(scope, receive, send):  # built only when needed (~8 us a request otherwise)
            return error_response(
                413, f"request body over {limit} bytes; send a smaller request", "body_too_large"
            )(scope, receive, send)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > limit:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client gone
                return
            size += len(msg.get("body", b""))
            if size > limit:
                return await too_big(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)


def replaying(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that gives `body` (already read) as one message, then `receive`'s."""
    replay = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay_receive():
        return replay.pop() if replay else await receive()

    return replay_receive


def json_content(content_type: str | None) -> bool:
    """Whether FastAPI would read the body as JSON: no content type, application/json or
    application/*+json. (Not text/plain: a browser sends that cross-site without asking first.)"""
    if content_type is None:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def not_json_message(content_type: str | None) -> str:
    return f"the body must be JSON sent with 'Content-Type: application/json', not {content_type!r}"


class RequestCounter:
    """ASGI middleware: count each request by method, route template and status for /metrics.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware pipes every
    streamed chunk through an extra task and memory stream, a cost paid per SSE chunk per client.
    """

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises before answering

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on this same scope dict
            self.metrics.count_request(scope["method"], getattr(route, "path", "unmatched"), status)


def _validation_response(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes):
        # FastAPI reads JSON only when sent as JSON (not text/plain, which a browser may send
        # cross-site unasked, nor curl -d's form encoding); it handed over the raw bytes
        return error_response(415, not_json_message(content_type), "unsupported_media_type")
    # keep field names and list indices; drop pydantic's union tags ("constrained-str", "list[...]")
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and re.fullmatch(r"\w+", str(x))]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return error_response(
            422, f"malformed JSON body: {first.get('msg')}; send a JSON object", "invalid_json"
        )
    if first.get("type") == "extra_forbidden":
        return error_response(422, f"unknown field {field!r}; see GET /openapi.json for the accepted ones",
                              "unknown_field", field)  # fmt: skip
    status = 400 if first.get("type") in BOUND_ERRORS else 422
    msg = f"{field}: {first.get('msg')}"
    if status == 422:
        msg += f" (got {json.dumps(first.get('input'), default=str)[:80]})"
    return error_response(status, msg, "invalid_value" if status == 400 else "invalid_type", field)


# The API reference, offline: no Swagger/ReDoc from a CDN. The page itself holds no data; it
# fetches /openapi.json (behind the API key like every route but /health) with the key typed in.
DOCS_HTML = """<!doctype html><meta charset="utf-8"><title>AIGC Studio API</title>
<style>body{font:15px system-ui;max-width:60em;margin:2em auto}code{background:#eee;padding:0 .3em}</style>
<h1>AIGC Studio API</h1><p>OpenAI-compatible. Machine-readable spec: <code>GET /openapi.json</code>.</p>
<p><input id="key" type="password" placeholder="API key (if the server has keys)" size="40">
<button onclick="load()">show the routes</button></p><div id="ops"></div><script>
function esc(t){return String(t||"").replace(/&/g,"&amp;").replace(/</g,"&lt;")}
function load(){const k=document.getElementById("key").value;
fetch("openapi.json",{headers:k?{Authorization:"Bearer "+k}:{}}).then(r=>r.json()).then(s=>{let h="";
if(!s.paths){document.getElementById("ops").textContent=JSON.stringify(s);return}
for(const[p,ms]of Object.entries(s.paths))for(const[m,o]of Object.entries(ms))
h+=`<h3><code>${m.toUpperCase()} ${esc(p)}</code></h3><p>${esc(o.summary)}</p><pre>${esc(o.description)}</pre>`;
document.getElementById("ops").innerHTML=h})}
load()
</script>"""


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The server for `settings` (API keys are read here: a bad key file fails at startup)."""
    from aigc.serve.routes import (
        chat,
        completions,
        health,
        images,
        jobs,
        model_details,
        models,
        moderations,
        music,
        presets,
        train,
        watermark,
    )
    from aigc.serve.routes import feedback as feedback_routes

    settings = settings or Settings()
    keys = load_keys(settings.api_keys_file) if settings.api_keys_file else None
    # the content store opens now: an unwritable or locked database fails here, not on a request
    from aigc.feedback.blobs import Blobs
    from aigc.feedback.store import Store

    store = Store.open(settings.db, lock_timeout=settings.store_lock_timeout_s)
    metrics = Metrics()
    registry = registry or ModelRegistry(settings, metrics)
    registry.metrics = registry.metrics or metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.loop = asyncio.get_running_loop()  # worker processes' events are read on it
        yield
        if hasattr(app.state, "train"):
            app.state.train.close()  # stop a running training subprocess
        registry.close()  # stop the batching threads
        store.close()

    app = FastAPI(
        lifespan=lifespan,
        title="AIGC Studio",
        version="0.1.0",
        description="OpenAI-compatible API for models trained with aigc.",
        docs_url=None,  # the default pages load Swagger/ReDoc from a CDN; ours works offline
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key
        # no OpenTelemetry here (GET /metrics is ours): unconfigured, it still read os.environ on
        # every request (~10 % of the event loop's time at 16 streams)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.admission = Admission(settings)
    app.state.check_key = KeyChecker(keys)
    app.state.store = store
    from aigc.serve.streaming import TextRecorder

    app.state.text_recorder = TextRecorder(app.state)  # text outputs: coalesced store writes
    app.state.blobs = Blobs(settings.outputs_dir)
    from aigc.safety.moderation import Moderator

    app.state.moderator = Moderator.load()  # defaults + $AIGC_MODERATION: a bad rules file fails here
    if settings.c2pa:  # signing outputs: the package and the certificate are checked now
        from aigc.safety.c2pa import init_cert, require

        require()
        init_cert()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.retry)

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return error_response(404, str(exc), "model_not_found", "model")

    @app.exception_handler(AigcError)
    async def _aigc_error(request: Request, exc: AigcError):
        return error_response(400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_response(exc, request.headers.get("content-type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads
            return error_response(422, "malformed JSON body: nested too deeply; send a flat JSON object",
                                  "invalid_json")  # fmt: skip
        return error_response(exc.status_code, str(exc.detail), None)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        if "*" in settings.cors_origins:
            raise AigcError("--cors '*' is not allowed; list the origins that may call the API")
        # an explicit allow-list only: origins are never reflected, credentials are not sent
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    uploads = {"/v1/watermark/detect": S.MAX_UPLOAD_BYTES, "/v1/verify": S.MAX_UPLOAD_BYTES}
    app.add_middleware(BodyLimit, limit=S.MAX_BODY_BYTES, paths=uploads)
    app.add_middleware(RequestCounter, metrics=metrics)  # added last, so outermost: counts 413s too

    auth = [Depends(identity)]
    app.include_router(health.router)
    for r in (models, model_details, completions, chat, images, music, jobs, moderations, presets, train):
        app.include_router(r.router, dependencies=auth)
    # streamed text requests skip FastAPI's per-request machinery (see serve/lane.py); the routes
    # above stay for the rest, and the lanes check the key with the same `identity`
    from aigc.serve.lane import StreamLane
    from aigc.serve.schemas import ChatRequest, CompletionRequest

    for path, endpoint, body in (
        ("/v1/completions", completions.completions, CompletionRequest),
        ("/v1/chat/completions", chat.chat_completions, ChatRequest),
    ):
        app.router.routes.insert(0, StreamLane(app.router, path, endpoint, body, identity))
    app.include_router(feedback_routes.router, dependencies=auth)
    app.include_router(watermark.router, dependencies=auth)  # detection + verify (aigc.safety)
    _mount_studio(app)

    @app.get("/docs", include_in_schema=False)
    async def _docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML)

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def _openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def _mount_studio(app: FastAPI) -> None:
    """The web studio at `/` (static files, no data inside: every call it makes sends the key)."""
    from pathlib import Path

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    ui = Path(__file__).parent / "ui"
    if not (ui / "index.html").is_file():
        return
    app.mount("/ui", StaticFiles(directory=ui), name="ui")

    @app.get("/", include_in_schema=False)
    async def _studio() -> FileResponse:
        return FileResponse(ui / "index.html", headers={"Cache-Control": "no-cache"})


async def identity(request: Request) -> str:
    """The auth dependency of every route but /health: the caller's key hash (401 if none or
    wrong), or "anonymous:<host>" on a server without keys; the per-key limits count by it."""
    return request.app.state.check_key(request)
