"""Serving metrics, recorded with `ray.util.metrics` and exported by Ray's per-node metrics agent.

Why Ray's metrics and not prometheus-client: every replica is a separate Ray actor process, and several may
share a node; a prometheus-client registry per process would need a port per replica, and a `/metrics` route on
the ingress would be answered by whichever replica the proxy picked. Ray aggregates every process of a node on
one endpoint — the node's metrics export port (`ray start --metrics-export-port=N`; KubeRay names it `metrics`,
8080) — next to Ray Serve's own `ray_serve_*` series, so one scrape config covers the platform.

Ray prefixes custom metrics with `ray_`, so the names in :mod:`raytrain.metrics_names` leave the node as:

- `ray_raytrain_serve_requests_total{model,route,status}` (counter)
- `ray_raytrain_serve_latency_seconds_bucket|_sum|_count{model,route}` (histogram, full request incl. streaming)
- `ray_raytrain_serve_ttft_seconds_bucket|_sum|_count{model,route}` (histogram, request start to first text)
- `ray_raytrain_serve_generated_tokens_total{model,route}` (counter)
- `ray_raytrain_serve_queue_depth{model}` (gauge, requests waiting for a batch slot on a replica)

plus Ray's own labels (`WorkerId`, `NodeAddress`, `SessionName`, …): sum over `WorkerId` for per-deployment figures.
Outside a Ray worker (unit tests, the in-process benchmark) :class:`NullMetrics` records nothing.
"""

from __future__ import annotations

from typing import Protocol

from raytrain import metrics_names as names

# Seconds. LLM requests range from milliseconds (a cached short answer) to minutes (long generations on CPU).
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class Metrics(Protocol):
    """What request handling records; model is the public model id, or '' before one is known."""

    def request(self, *, model: str, route: str, status: int, latency_s: float) -> None: ...

    def first_token(self, *, model: str, route: str, ttft_s: float) -> None: ...

    def generated(self, *, model: str, route: str, tokens: int) -> None: ...

    def queue_depth(self, *, model: str, depth: int) -> None: ...


class NullMetrics:
    """Records nothing: for code running outside Ray."""

    def request(self, *, model: str, route: str, status: int, latency_s: float) -> None:
        pass

    def first_token(self, *, model: str, route: str, ttft_s: float) -> None:
        pass

    def generated(self, *, model: str, route: str, tokens: int) -> None:
        pass

    def queue_depth(self, *, model: str, depth: int) -> None:
        pass


class RayMetrics:
    """`ray.util.metrics` instruments; create one per replica process (inside the actor)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._requests = Counter(
            names.SERVE_REQUESTS,
            description="HTTP requests answered by the serving app, by route and status code.",
            tag_keys=("model", "route", "status"),
        )
        self._latency = Histogram(
            names.SERVE_LATENCY,
            description="Seconds from request arrival to the last byte of the response (streams included).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "route"),
        )
        self._ttft = Histogram(
            names.SERVE_TTFT,
            description="Seconds from request arrival to the first generated text.",
            boundaries=TTFT_BOUNDARIES,
            tag_keys=("model", "route"),
        )
        self._generated = Counter(
            names.SERVE_GENERATED_TOKENS,
            description="Completion tokens generated.",
            tag_keys=("model", "route"),
        )
        self._queue = Gauge(
            names.SERVE_QUEUE_DEPTH,
            description="Requests on a replica waiting for a batch slot in the engine.",
            tag_keys=("model",),
        )

    def request(self, *, model: str, route: str, status: int, latency_s: float) -> None:
        self._requests.inc(1, tags={"model": model, "route": route, "status": str(status)})
        self._latency.observe(latency_s, tags={"model": model, "route": route})

    def first_token(self, *, model: str, route: str, ttft_s: float) -> None:
        self._ttft.observe(ttft_s, tags={"model": model, "route": route})

    def generated(self, *, model: str, route: str, tokens: int) -> None:
        if tokens > 0:
            self._generated.inc(tokens, tags={"model": model, "route": route})

    def queue_depth(self, *, model: str, depth: int) -> None:
        self._queue.set(depth, tags={"model": model})
