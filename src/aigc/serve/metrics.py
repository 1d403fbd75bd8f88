"""Prometheus metrics in the text exposition format, written by hand (no client library needed).

Counters and histograms are updated from the event loop and from the batching threads, so every
update takes one lock. Rates (tokens/s, images/s) are `rate()` over the counters in Prometheus;
`aigc_tokens_per_second` is also given directly over the last `WINDOW_S` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

WINDOW_S = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]
        return out


class Metrics:
    """The server's metrics; `render(queue_depth, loaded)` gives the /metrics text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status)
        self.wait = Histogram()
        self.ttft = Histogram()
        self.step = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.tokens = 0
        self.decode_seconds = 0.0
        self.images = 0
        self.loads: dict[str, int] = defaultdict(int)
        self.load_seconds = Histogram()
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def count_request(self, method: str, route: str, status: int) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1

    def observe_wait(self, seconds: float) -> None:
        with self.lock:
            self.wait.observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_step(self, batch: int, seconds: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.tokens += batch
            self.decode_seconds += seconds
            self.step.observe(seconds)
            self.recent.append((now, batch))
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()

    def observe_images(self, n: int) -> None:
        with self.lock:
            self.images += n

    def observe_load(self, model: str, seconds: float) -> None:
        with self.lock:
            self.loads[model] += 1
            self.load_seconds.observe(seconds)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            n = sum(b for t, b in self.recent if t >= now - WINDOW_S)
        return n / WINDOW_S

    def render(self, queue_depth: dict[str, int], loaded: list[str]) -> str:
        tps = self.tokens_per_second()
        with self.lock:
            out = [
                "# HELP aigc_requests_total HTTP requests by route and status.",
                "# TYPE aigc_requests_total counter",
            ]
            for (m, r, s), n in sorted(self.requests.items()):
                out.append(f'aigc_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}')
            out += [
                "# HELP aigc_queue_depth Rows waiting or running per model.",
                "# TYPE aigc_queue_depth gauge",
            ]
            out += [f'aigc_queue_depth{{model="{k}"}} {v}' for k, v in sorted(queue_depth.items())]
            out += ["# HELP aigc_models_loaded Models in memory.", "# TYPE aigc_models_loaded gauge"]
            out.append(f"aigc_models_loaded {len(loaded)}")
            for name, h, help_ in (
                ("aigc_queue_wait_seconds", self.wait, "Time from request to joining the batch."),
                ("aigc_time_to_first_token_seconds", self.ttft, "Time from request to its first token."),
                ("aigc_decode_step_seconds", self.step, "Duration of one batched decode step."),
                ("aigc_model_load_seconds", self.load_seconds, "Duration of a model load."),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
            out += [
                "# HELP aigc_generated_tokens_total Tokens generated.",
                "# TYPE aigc_generated_tokens_total counter",
                f"aigc_generated_tokens_total {self.tokens}",
                "# HELP aigc_decode_seconds_total Time spent in decode steps.",
                "# TYPE aigc_decode_seconds_total counter",
                f"aigc_decode_seconds_total {self.decode_seconds:.6f}",
                "# HELP aigc_tokens_per_second Tokens generated per second over the last 10 s.",
                "# TYPE aigc_tokens_per_second gauge",
                f"aigc_tokens_per_second {tps:.3f}",
                "# HELP aigc_generated_images_total Images generated.",
                "# TYPE aigc_generated_images_total counter",
                f"aigc_generated_images_total {self.images}",
                "# HELP aigc_model_loads_total Model loads by model id.",
                "# TYPE aigc_model_loads_total counter",
            ]
            out += [f'aigc_model_loads_total{{model="{k}"}} {v}' for k, v in sorted(self.loads.items())]
        return "\n".join(out) + "\n"
