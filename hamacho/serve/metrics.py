"""The service's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests and errors by endpoint and status, latency, batch sizes, model load time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["endpoint", "method", "status"]
        self.requests = Counter(
            "hamacho_requests", "HTTP requests by endpoint and status", labels,
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "hamacho_errors", "HTTP responses with status >= 400", labels, registry=self.registry
        )
        self.latency = Histogram(
            "hamacho_request_duration_seconds", "Time to answer a request",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "hamacho_batch_size", "Images per model call (micro-batches)", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.load_seconds = Gauge(
            "hamacho_model_load_seconds", "Seconds to load each model", ["model"],
            registry=self.registry,
        )  # fmt: skip

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
