"""The API's Prometheus metrics (`GET /metrics`), in a registry of its own per app instance.

* `obdconv_api_requests_total{method, route, status}`: every HTTP request, by route template;
* `obdconv_api_request_duration_seconds{method, route}`: latency histogram;
* `obdconv_api_conversions_accepted_total{via}`: requests queued (`via`: api, distribution, harbor);
* `obdconv_api_rate_limited_total{token}`: requests refused by the per-token rate limit (token name);
* `obdconv_api_events_total{sender, outcome}`: registry events accepted, ignored or refused.

One API process per replica (scale with replicas, not uvicorn workers), so no multiprocess mode is
needed here. Other collectors (e.g. the fleet's, workers/metrics.py) are served on the same
/metrics with one line: `service.metrics.registry.register(collector)` (see api/app.py).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("obdconv_api_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("obdconv_api_request_duration_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.accepted = Counter("obdconv_api_conversions_accepted_total", "conversion requests queued",
                                ["via"], registry=self.registry)
        self.rate_limited = Counter("obdconv_api_rate_limited_total", "requests refused by the rate limit",
                                    ["token"], registry=self.registry)
        self.events = Counter("obdconv_api_events_total", "registry events by sender and outcome",
                              ["sender", "outcome"], registry=self.registry)


def route_of(scope: Scope) -> str:
    """The matched route's template (`/v1/conversions/{request_id}`), so ids do not explode the
    label set; requests no route matched share one label."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body copy): count and time every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_of(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
