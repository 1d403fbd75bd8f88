"""Simulated raters: fill the content store with feedback for tests and demos.

    rater = Rater(load_scorer("sentiment"), threshold=0.5)     # likes positive texts
    simulate_feedback("http://127.0.0.1:8000", "story", rater, n=200)

A `Rater` turns a scorer's number into a thumb: +1 when the score reaches `threshold`, else -1;
with `noise` > 0 each answer is flipped with that probability (a careless person), seeded.
`simulate_feedback` goes through the HTTP API exactly as a person using the studio does:
`POST /v1/completions` (or `/v1/images/generations`) to generate, then `POST /v1/ratings` with a
thumb per output, so the store rows are the ones a person's session leaves behind (the rating's
comment names the simulated rater and its score).
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from aigc.errors import AigcError

MAX_PER_REQUEST = 8  # the server's MAX_N / MAX_IMAGES: outputs asked for in one request


class Rater:
    """Thumbs up (+1) when `scorer`'s score >= `threshold`, else down (-1); `noise`: flip chance."""

    def __init__(self, scorer: Any, threshold: float = 0.5, noise: float = 0.0, seed: int = 0) -> None:
        if isinstance(scorer, str):
            from aigc.evaluation.scorers import load_scorer

            scorer = load_scorer(scorer)
        if not 0.0 <= noise <= 1.0:
            raise AigcError(f"rater noise {noise} is out of range; allowed: a probability in [0, 1]")
        self.scorer = scorer
        self.threshold = float(threshold)
        self.noise = float(noise)
        self.rng = random.Random(seed)

    @property
    def kind(self) -> str:
        return self.scorer.kind

    def thumbs(self, scores: Sequence[float]) -> list[int]:
        out = []
        for s in scores:
            vote = 1 if s >= self.threshold else -1
            if self.noise and self.rng.random() < self.noise:
                vote = -vote
            out.append(vote)
        return out

    def rate_many(self, items: Sequence[Any]) -> list[tuple[int, float]]:
        """(thumb, score) for each item, scored in one batch."""
        scores = self.scorer.score(items)
        return list(zip(self.thumbs(scores), scores, strict=True))

    def rate(self, item: Any) -> int:
        """+1 or -1 for one item."""
        return self.rate_many([item])[0][0]


# ----------------------------------------------------------------------------- through the API


def _client(target: Any, api_key: str | None, timeout: float) -> tuple[Any, bool]:
    """(httpx-style client, whether we opened it) for a base URL, a FastAPI app or a client."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if isinstance(target, str):
        if not target.startswith(("http://", "https://")):
            raise AigcError(f"server {target!r} is not a URL; pass http://HOST:PORT")
        try:
            return httpx.Client(base_url=target.rstrip("/"), headers=headers, timeout=timeout), True
        except httpx.InvalidURL as e:
            raise AigcError(f"server {target!r} is not a valid URL ({e}); pass http://HOST:PORT") from None
    if hasattr(target, "post") and hasattr(target, "headers"):  # an httpx / Starlette test client
        if api_key:
            target.headers.update(headers)
        return target, False
    if hasattr(target, "router") and hasattr(target, "state"):  # a FastAPI app, in process
        from fastapi.testclient import TestClient

        return TestClient(target, headers=headers), True
    raise AigcError(
        f"simulate_feedback needs a base URL, an httpx client or a FastAPI app, got {type(target).__name__}"
    )


def _post(client: Any, path: str, body: dict) -> dict:
    import httpx

    try:
        r = client.post(path, json=body)
    except httpx.TimeoutException:
        raise AigcError(
            f"the server at {client.base_url} did not answer POST {path} in time; check it is not "
            "overloaded (aigc serve's log), or ask for fewer tokens / steps"
        ) from None
    except httpx.TransportError as e:  # refused, unknown host, reset, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise AigcError(
            f"cannot reach the server at {client.base_url} ({reason}); start it with `aigc serve` "
            "or check --server"
        ) from None
    if r.status_code != 200:
        try:
            detail = r.json().get("detail") or r.text
        except ValueError:
            detail = r.text
        raise AigcError(f"POST {path} answered {r.status_code}: {detail}")
    return r.json()


def simulate_feedback(
    base_url_or_app: Any,
    model: str,
    rater: Rater,
    n: int,
    prompts: Sequence[str] | None = None,
    user: str = "sim",
    seed: int = 0,
    kind: Literal["text", "image"] | None = None,
    params: dict[str, Any] | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Generate `n` outputs of `model` through the HTTP API and rate each one with `rater`.

    Output i uses seed `seed + i`; text prompts cycle through `prompts` (default: unconditional).
    `params`: extra request fields (e.g. `{"max_tokens": 40, "temperature": 0.9}` or
    `{"label": 7, "steps": 20}`). `kind`: default the rater's scorer kind. Returns counts
    `{"generated", "liked", "disliked", "mean_score", "generation_ids", ...}`.
    """
    kind = kind or rater.kind
    if kind not in ("text", "image"):
        raise AigcError(f"kind {kind!r} is not supported; allowed: text, image")
    if rater.kind != kind:
        raise AigcError(
            f"rater {rater.scorer.name} scores {rater.kind}, but the generations are {kind}; "
            "pick a scorer of the same kind"
        )
    if n < 1:
        raise AigcError(f"n {n} is out of range; allowed: an integer >= 1")
    prompts = list(prompts or [""])
    params = dict(params or {})
    client, opened = _client(base_url_or_app, api_key, timeout)
    counts: dict[str, Any] = {"model": model, "kind": kind, "rater": rater.scorer.name,
                              "threshold": rater.threshold, "generated": 0, "liked": 0, "disliked": 0}  # fmt: skip
    ids: list[int] = []
    scores: list[float] = []
    try:
        done, request_no = 0, 0
        while done < n:
            k = min(MAX_PER_REQUEST, n - done)
            # 1. generate k outputs (seeds seed+done .. seed+done+k-1) as the studio would
            if kind == "text":
                prompt = prompts[request_no % len(prompts)]
                body = {"model": model, "prompt": prompt, "n": k, "seed": seed + done, "user": user, **params}
                out = _post(client, "/v1/completions", body)
                items = [c["text"][len(prompt) :] if body.get("echo") else c["text"] for c in out["choices"]]
            else:
                from PIL import Image

                body = {"model": model, "n": k, "seed": seed + done, "user": user, **params}
                out = _post(client, "/v1/images/generations", body)
                items = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in out["data"]]
            gids = out.get("generation_ids") or []
            if len(gids) != len(items) or any(g is None for g in gids):
                raise AigcError(
                    f"the server did not record the {kind} outputs of {model}; is its store running?"
                )
            # 2. rate each one with a thumb, the way a person does in the studio
            for gid, (thumb, score) in zip(gids, rater.rate_many(items), strict=True):
                comment = f"simulated rater {user}: {rater.scorer.name} score {score:.3f}"
                _post(
                    client,
                    "/v1/ratings",
                    {"generation_id": gid, "value": thumb, "kind": "thumb", "comment": comment},
                )
                counts["liked" if thumb > 0 else "disliked"] += 1
                ids.append(gid)
                scores.append(score)
            done += len(items)
            request_no += 1
    finally:
        if opened:
            client.close()
    counts["generated"] = len(ids)
    counts["mean_score"] = sum(scores) / len(scores) if scores else None
    counts["generation_ids"] = ids
    return counts


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | Path | None) -> list[str] | None:
    """Prompts from the command line or a file (one per line, blank lines skipped)."""
    if prompts and prompts_file:
        raise AigcError("give prompts with --prompt or --prompts-file, not both")
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise AigcError(f"--prompts-file {path} not found; pass a text file with one prompt per line")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise AigcError(f"--prompts-file {path} holds no prompts; write one prompt per line")
        return lines
    return list(prompts) if prompts else None


__all__ = ["Rater", "read_prompts", "simulate_feedback"]
