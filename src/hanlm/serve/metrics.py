"""What the server has done: Prometheus metrics (`GET /metrics`) and one log line per request.

`RequestLog` is an ASGI middleware around the `/v1/` routes: it times each request from its
arrival to the last byte of its response (a stream included), takes the status sent, and reads
what the route left in `request.state.hanlm` (`Served`: the response id, token counts, time to
first token, the end user). It then logs one line on the `hanlm.serve` logger and updates the
metrics: requests by route and status, prompt and completion tokens, a latency histogram, time
to first token, and the number of requests in progress (the queue that `max_queue` bounds).
The metrics need `prometheus_client` (the serve extra); without it only the log line is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hanlm.serve")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


@dataclass
class Served:
    """What a route reports about the request it served (`request.state.hanlm`)."""

    id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None  # seconds from submitting to the engine to a first token
    user: str = ""
    path: str = ""  # which engine path generated: "batch" or "generate"


class Metrics:
    """The server's Prometheus metrics in their own registry (one per app)."""

    def __init__(self, active: Any) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        self.prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "hanlm_requests", "Requests answered", ["route", "status"], registry=r
        )
        self.prompt = prom.Counter(
            "hanlm_prompt_tokens", "Prompt tokens of answered requests", ["route"], registry=r
        )
        self.completion = prom.Counter(
            "hanlm_completion_tokens", "Tokens generated", ["route"], registry=r
        )
        self.latency = prom.Histogram(
            "hanlm_request_latency_seconds",
            "Time from a request's arrival to the end of its response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = prom.Histogram(
            "hanlm_time_to_first_token_seconds",
            "Time from a request's submission to the engine to its first generated token",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        queue = prom.Gauge(
            "hanlm_requests_in_progress",
            "Requests admitted and not finished (at most max_queue; more are answered 429)",
            registry=r,
        )
        queue.set_function(active)

    def record(self, route: str, status: int, seconds: float, served: Served | None) -> None:
        if self.registry is None:
            return
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if served is not None:
            self.prompt.labels(route).inc(served.prompt_tokens)
            self.completion.labels(route).inc(served.completion_tokens)
            if served.first_token is not None:
                self.ttft.labels(route).observe(served.first_token)

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        if self.registry is None:
            raise RuntimeError("prometheus_client is not installed")
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware: a log line and the metrics for each `/v1/` request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.monotonic() - start
            served = scope.get("state", {}).get("hanlm")
            # a label per known route (any other path would add a series per URL)
            route = next((r for r in ROUTES if path.startswith(r)), "other")
            self.metrics.record(route, status[0], seconds, served)
            log.info(line(scope.get("method", ""), path, status[0], seconds, served))


def line(method: str, path: str, status: int, seconds: float, served: Served | None) -> str:
    """The request log line: `<id> <method> <path> <status> prompt=.. completion=..
    ttft=..s total=..s [path=batch] [user=..]`."""
    parts = [served.id if served else "-", method, path, str(status)]
    if served is not None:
        parts += [f"prompt={served.prompt_tokens}", f"completion={served.completion_tokens}"]
        if served.first_token is not None:
            parts.append(f"ttft={served.first_token:.3f}s")
    parts.append(f"total={seconds:.3f}s")
    if served is not None and served.path:
        parts.append(f"path={served.path}")
    if served is not None and served.user:
        parts.append(f"user={served.user!r}")
    return " ".join(parts)
