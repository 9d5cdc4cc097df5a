"""Prometheus metrics, recorded where every generation passes (the Services, which own one `Metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from .routes import api_route

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 3, 5, 10, 30, 60, 120)


class Metrics:
    """One app's metrics in their own registry (several apps can live in one process)."""

    def __init__(self, loaded: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.health_checks = Counter("health_check_requests", "Health check requests", registry=r)
        self.completions = Counter("completions_requests", "Completion requests", ["model"], registry=r)
        self.chat_completions = Counter(
            "chat_completions_requests", "Chat completion requests", ["model"], registry=r
        )
        self.duration = Histogram(
            "completions_duration_seconds",
            "Request latency: submit to last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("completions_tokens", "Tokens generated", ["model"], registry=r)
        self.errors = Counter("completions_errors", "Failed generations", ["model"], registry=r)
        self.inference = Histogram(
            "model_inference_seconds",
            "Model inference time",
            ["model"],
            buckets=(1, 3, 5, 10, 30, 60),
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.tps = Histogram(
            "decode_tokens_per_second",
            "Decode speed of each request",
            ["model"],
            buckets=(5, 10, 25, 50, 75, 100, 150, 200, 300),
            registry=r,
        )
        self.active_connections = Gauge(
            "active_connections", "HTTP requests and streams in flight", registry=r
        )
        # callers by API key name or JWT subject; by a stable hash when auth is on but /metrics is open
        self.requests = Counter(
            "http_requests",
            "HTTP requests by dialect, caller and status",
            ["dialect", "identity", "status"],
            registry=r,
        )
        r.register(_SchedulerCollector(loaded))

    def observe(self, model: str, final: Any, *, failed: bool) -> None:
        """Record one finished generation from its final TokenEvent (`failed`: it ended in an error)."""
        if failed:
            self.errors.labels(model).inc()
            return
        if final.usage:
            self.tokens.labels(model).inc(final.usage.completion_tokens)
        if final.timings:
            t = final.timings
            self.duration.labels(model).observe(t.total_s)
            self.inference.labels(model).observe(max(0.0, t.total_s - t.queued_s))
            if final.usage and final.usage.completion_tokens:
                self.ttft.labels(model).observe(t.ttft_s)
            if t.decode_tokens_per_s:
                self.tps.labels(model).observe(t.decode_tokens_per_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SchedulerCollector:
    """Queue depth and running batch size of each loaded model, read at scrape time."""

    def __init__(self, loaded: Callable[[], Mapping[str, Any]]) -> None:
        self.loaded = loaded  # the registry's loaded(): name -> scheduler

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("queue_depth", "Requests waiting for a slot", labels=["model"])
        batch = GaugeMetricFamily("batch_size", "Requests generating now", labels=["model"])
        for name, scheduler in self.loaded().items():
            depth.add_metric([name], scheduler.queue_depth)
            batch.add_metric([name], scheduler.active_count)
        yield depth
        yield batch


bp = Blueprint("metrics", __name__)
EXTENSION = "ortllm_metrics"  # where `install` puts the app's Metrics


def install(app: Flask, metrics: Metrics) -> None:
    """Serve `metrics` at /metrics."""
    app.extensions[EXTENSION] = metrics
    app.register_blueprint(bp)


@api_route(bp, "/metrics", tag="health", summary="Prometheus metrics (text exposition format)")
def metrics() -> Response:
    metrics: Metrics = current_app.extensions[EXTENSION]
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
