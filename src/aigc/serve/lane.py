"""A short path through the app for streamed text requests.

FastAPI's per-request machinery (matching across the included routers, solving the dependencies,
reading and validating the body, its per-request wrappers) took ~90 of the ~200 us a streamed
completion spent in the server before its rows were submitted (hot, on the 2-core box). With 16
clients arriving together that work is serial on the event loop: the last request's rows reached
the model ~1.8 ms later, and every stream's HTTP process CPU was ~30 % higher.

A `StreamLane` is a route placed first in the app, for one POST path. It runs the same endpoint
function with the same body model and the same API-key check, for the requests it can take whole:

- the body is read and validated with the route's pydantic model, if its content type is one
  FastAPI reads as JSON;
- a body that does not validate, or a request that is not streamed, goes on to the FastAPI route
  unchanged (its body replayed): errors and non-streamed responses keep FastAPI's shapes;
- the caller is `identity(request)`, the one dependency of these routes (`create_app` includes
  them with it and no other); it raises 401 as it does there;
- what the endpoint raises reaches the app's exception handlers as from any route (the lane runs
  inside Starlette's ExceptionMiddleware), and /metrics counts the request under its path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.routing import BaseRoute, Match

from aigc.serve.app import json_content, replaying

_PASSED = "aigc.lane_passed"  # scope key: this request goes to the FastAPI route


class StreamLane(BaseRoute):
    """POST `path` with a valid body asking for `stream: true` -> `endpoint(body, request, key)`."""

    def __init__(
        self,
        router: Any,
        path: str,
        endpoint: Callable[..., Awaitable[Any]],
        body_model: type[BaseModel],
        auth: Callable[[Request], Awaitable[str]],
    ) -> None:
        self.router, self.path, self.path_format = router, path, path
        self.endpoint, self.body_model, self.auth = endpoint, body_model, auth

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        if (
            scope["type"] == "http"
            and scope["path"] == self.path
            and scope["method"] == "POST"
            and _PASSED not in scope
        ):
            return Match.FULL, {"route": self, "endpoint": self.endpoint}
        return Match.NONE, {}

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        raw = await request.body()
        body = None
        if json_content(request.headers.get("content-type")):
            with contextlib.suppress(ValidationError):  # (FastAPI's route answers it)
                body = self.body_model.model_validate_json(raw)
        if body is None or not getattr(body, "stream", False):
            return await self._pass(scope, raw, receive, send)
        key = await self.auth(request)
        response = await self.endpoint(body, request, key)
        await response(scope, receive, send)

    async def _pass(self, scope: Any, raw: bytes, receive: Any, send: Any) -> None:
        """The request as it came, to the routes after this one (the FastAPI route)."""
        scope[_PASSED] = True
        await self.router.app(scope, replaying(raw, receive), send)
