"""Server limits (module constants, the one place they are set) and the `Settings` of one server.

Every bound a request is checked against is a constant here; the pydantic schemas and the error
messages are built from the same constants, so the documented limit is the enforced one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# request bodies and parameters
MAX_BODY_BYTES = 1_000_000  # a larger body is refused with 413 before it is parsed
MAX_TOKENS = 4096  # max_tokens per completion
DEFAULT_MAX_TOKENS = 128  # when the request gives none
MAX_N = 8  # completions per request
MAX_BEST_OF = 16  # best_of candidates per prompt (completions)
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_PROMPT_CHARS = 100_000  # one prompt or one chat message
MAX_MESSAGES = 256  # chat messages per request
MAX_STOP = 4  # stop strings (OpenAI allows 4)
MAX_LOGPROBS = 5  # /v1/completions `logprobs` (OpenAI allows 5)
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`
MAX_MODEL_NAME = 128

# scheduling
MAX_BATCH = 32  # rows decoded together per model
MAX_QUEUE = 256  # requests waiting or running over all models: above it 503
MAX_INFLIGHT_PER_KEY = 64  # requests of one API key at a time: above it 429
RETRY_AFTER_S = 1  # the Retry-After header of a 429 / 503
REQUEST_TIMEOUT_S = 300.0  # a request still running after this is cancelled (504)
MEMORY_BUDGET_BYTES = 8 * 2**30  # loaded models above it: least recently used ones are unloaded
STREAM_INTERVAL_S = 0.01  # a stream sends at most one batch of deltas per 10 ms (the first at once)
EMIT_INTERVAL_S = STREAM_INTERVAL_S  # the batch worker hands a row's text over at most this often
# ... except its first tokens, each at once: a stream's first text can be held back (a possible stop
# string or blocked phrase) until the next characters come, and should not wait EMIT_INTERVAL_S
EMIT_EACH_FIRST = 2
HEADERS_WITHIN_S = 1.0  # a stream's response headers go with its first chunk, or after this long without one
RESCAN_INTERVAL_S = 1.0  # model dirs are listed again at most this often (new versions appear)
GC_GEN0_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default: 700)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def settle_gc() -> None:
    """For a long-running server process, once its start-up objects exist: freeze them out of the
    cyclic collector's scans and collect the young generation less often. Each request and decode
    step allocates many short-lived objects; with Python's defaults the collections were ~4.5 % of
    the server's CPU under 16 streams (perf), ~0.5 % after this."""
    import gc

    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)


# training jobs (POST /v1/train) and the model page
MAX_TRAIN_TIME_S = 3600.0  # default server cap on one job's max_time (--max-train-time)
DEFAULT_TRAIN_TIME_S = 300.0  # a job that gives neither max_steps nor max_time
MAX_TRAIN_STEPS = 1_000_000
MAX_OVERRIDES = 32  # "set" entries of one job
MAX_SERIES_POINTS = 500  # loss points per series in GET /v1/models/{id}/details
MAX_CARD_BYTES = 200_000  # card.md larger than this is cut


def default_models_dir() -> Path:
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".aigc") / "models"


@dataclass
class Settings:
    """What one server serves and how; limits default to the constants above."""

    models_dirs: list[Path] = field(default_factory=lambda: [default_models_dir()])
    models_config: Path | None = None  # JSON {"models": {"name": "hf:<dir>"}} for extra entries
    api_keys_file: Path | None = None  # lines "sha256:<hex>" (see auth.py)
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = MAX_BATCH
    dtype: str | None = None  # text models' decoding weights, a torch dtype name (None: as stored)
    worker_process: bool = False  # text models decode in a child process (worker.ProcessScheduler)
    max_queue: int = MAX_QUEUE
    max_inflight_per_key: int = MAX_INFLIGHT_PER_KEY
    request_timeout_s: float = REQUEST_TIMEOUT_S
    memory_budget_bytes: int = MEMORY_BUDGET_BYTES
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    db: str | None = None  # the store: SQLAlchemy URL or SQLite file; None: $AIGC_DB or $AIGC_HOME/aigc.db
    outputs_dir: Path | None = None  # stored images etc.; None: $AIGC_HOME/outputs
    c2pa: bool = False  # sign image PNGs and music WAVs with a C2PA manifest (aigc.safety.c2pa)
    store_lock_timeout_s: float = 10.0  # a write waiting longer on a lock answers 503
    # scorer specs a request may name in `aigc_scorer` (best_of); the first is "default". Never python:
    scorers: list[str] = field(default_factory=lambda: ["sentiment"])
    data_dirs: list[Path] = field(default_factory=list)  # prepared data sets (+ $AIGC_HOME/data)
    max_train_time_s: float = MAX_TRAIN_TIME_S  # cap on a training job's max_time


# images
MAX_IMAGES = 8  # images per request
MAX_STEPS = 1000  # denoising steps
MAX_GUIDANCE = 30.0
MAX_IMAGE_SIZE = 1024  # side in pixels (text-to-image pipelines)

# safety: uploads to POST /v1/watermark/detect and /v1/verify
MAX_UPLOAD_BYTES = 20 * 2**20  # a larger upload is refused with 413 before it is read
MAX_UPLOAD_PIXELS = 4096 * 4096  # a larger image is refused (a PNG "bomb" decodes to far more than its size)
MAX_DETECT_CHARS = 200_000  # text sent to watermark detection
