"""Prometheus metrics of the serving API (one registry per app, so several apps can share a process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
INFERENCE_FORMS = ("onnx", "exact-arrays", "pipeline")
KNOWN_PATHS = frozenset({"/predict", "/invocations", "/health", "/ready", "/model", "/metrics", "/reload"})


class ServingMetrics:
    """Requests, errors, latency, batch sizes, the served version, reloads and the prediction log."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlops_serving_requests_total", "HTTP requests.", ["path", "status"], registry=r)
        self.errors = Counter(
            "mlops_serving_errors_total", "Requests answered with a 4xx or 5xx status.", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "mlops_serving_request_seconds", "Request latency.", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.records = Counter("mlops_serving_predicted_records_total", "Records predicted.", registry=r)
        self.batch_rows = Histogram(
            "mlops_serving_batch_rows", "Rows per model call (micro-batches).", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_version = Gauge(
            "mlops_serving_model_version", "Registry version served (0 before a model is loaded).", registry=r
        )
        self.model_info = Gauge(
            "mlops_serving_model_info", "The model served (value 1).", ["name", "version"], registry=r
        )
        self.inference_form = Gauge(
            "mlops_serving_inference_form",
            "How the served model runs (value 1 for the current form): onnx (compiled, parity checked), "
            "exact-arrays (fitted steps on arrays, bit-identical) or pipeline.",
            ["form"],
            registry=r,
        )
        self.reloads = Counter("mlops_serving_reloads_total", "Model loads by result.", ["result"], registry=r)
        self.prediction_log = Counter(
            "mlops_serving_prediction_log_rows_total",
            "Logged prediction rows: written to S3, failed (kept for a retry) or dropped (buffer full).",
            ["result"],
            registry=r,
        )

    def served(self, name: str, version: str, form: str = "pipeline") -> None:
        """Record a swap to `name` v`version`, run in inference `form`."""
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)
        self.model_version.set(float(version) if version.isdigit() else 0)
        for known in INFERENCE_FORMS:
            self.inference_form.labels(form=known).set(1 if known == form else 0)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every request by path and status and times it."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on, then count and time it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
