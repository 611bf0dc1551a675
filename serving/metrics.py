"""Prometheus metrics of the serving API, aggregated across its worker processes.

One process: one registry per app (several apps can share a process). Several worker processes
(`MLOPS_SERVING_WORKERS`): prometheus_client's multiprocess mode, switched on by `PROMETHEUS_MULTIPROC_DIR`
(a folder under the state dir that `serving.app.run` empties before the workers start). Each process
writes its values to memory-mapped files there and `/metrics`, whichever process answers it, sums
counters and histograms over all of them; gauges say per live process what it serves (`pid` label)
or the most recent value written.
"""

from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
INFERENCE_FORMS = ("onnx", "exact-arrays", "pipeline")
KNOWN_PATHS = frozenset({"/predict", "/invocations", "/health", "/ready", "/model", "/metrics", "/reload"})


class ServingMetrics:
    """Requests, errors, latency, batch sizes, the served version, reloads and the prediction log."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess_dir = multiprocess_dir()
        self._served: list[tuple[str, str]] = []  # (name, version) this process served last
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
            "mlops_serving_model_version",
            "Registry version served (0 before a model is loaded); across processes the latest swap's.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.model_info = Gauge(
            "mlops_serving_model_info",
            "The model served (value 1; 0 for one served before); across processes one series per pid.",
            ["name", "version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.inference_form = Gauge(
            "mlops_serving_inference_form",
            "How the served model runs (value 1 for the current form): onnx (compiled, parity checked), "
            "exact-arrays (fitted steps on arrays, bit-identical) or pipeline.",
            ["form"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.reloads = Counter("mlops_serving_reloads_total", "Model loads by result.", ["result"], registry=r)
        self.prediction_log = Counter(
            "mlops_serving_prediction_log_rows_total",
            "Logged prediction rows: written to S3, failed (kept for a retry) or dropped (spool or buffer full).",
            ["result"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "mlops_serving_prediction_spool_bytes",
            "Bytes of answered predictions in the spool, not yet confirmed by S3 (summed over live processes).",
            registry=r,
            multiprocess_mode="livesum",
        )

    def served(self, name: str, version: str, form: str = "pipeline") -> None:
        """Record a swap to `name` v`version`, run in inference `form`."""
        if self.multiprocess_dir is None:
            self.model_info.clear()
        else:  # clear() would leave the old value in this process's file: zero it instead
            for labels in self._served:
                self.model_info.labels(*labels).set(0)
        self._served = [(name, version)]
        self.model_info.labels(name=name, version=version).set(1)
        self.model_version.set(float(version) if version.isdigit() else 0)
        for known in INFERENCE_FORMS:
            self.inference_form.labels(form=known).set(1 if known == form else 0)

    def not_served(self) -> None:
        """Record that no model is served any more (the alias is gone)."""
        if self.multiprocess_dir is None:
            self.model_info.clear()
        else:  # clear() would leave the old value in this process's file: zero it instead
            for labels in self._served:
                self.model_info.labels(*labels).set(0)
        self._served = []
        self.model_version.set(0)

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of all worker processes in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)

    def served_by_process(self) -> dict[int, str]:
        """The version each live worker process serves (pid -> version); this process only outside multiprocess."""
        if self.multiprocess_dir is None:
            return {os.getpid(): self._served[0][1]} if self._served else {}
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return {
            int(sample.labels["pid"]): sample.labels["version"]
            for family in registry.collect()
            if family.name == "mlops_serving_model_info"
            for sample in family.samples
            if sample.value == 1
        }


def multiprocess_dir() -> Path | None:
    """The folder of prometheus_client's multiprocess mode, when this process runs in it."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def forget_dead_processes(path: Path) -> list[int]:
    """Drop the live gauges of worker processes that died (a worker killed and restarted); returns their pids."""
    dead = set()
    for name in glob.glob(str(path / "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        mark_process_dead(pid, str(path))
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsMiddleware:
    """Pure ASGI middleware: counts every request by path and status and times it."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # (path, status) -> the request counter's and latency histogram's children: `labels()` takes a
        # lock and builds a key on each call, this is one dict lookup on the request path.
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

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
            children = self._children.get((path, status))
            if children is None:
                requests = self.metrics.requests.labels(path, str(status))
                children = self._children[(path, status)] = (requests, self.metrics.latency.labels(path))
            children[0].inc()
            if status >= 400:
                self.metrics.errors.labels(path, str(status)).inc()
            children[1].observe(time.perf_counter() - started)
