"""Prometheus metrics of the serving API, aggregated across its worker processes.

One process: one registry per app (several apps can share a process). Several worker processes
(`MLOPS_SERVING_WORKERS`): prometheus_client's multiprocess mode, switched on by `PROMETHEUS_MULTIPROC_DIR`
(a folder under the state dir that `serving.app.run` empties before the workers start). Each process
writes its values to memory-mapped files there and `/metrics`, whichever process answers it, sums
counters and histograms over all of them; gauges say per live process what it serves (`pid` label)
or the most recent value written. Every series of a served model has its `model` label (the request
path of `/models/<name>/...` is templated as `/models/{name}/...`, so series grow with served models, not
with the names clients send).
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
INFERENCE_FORMS = ("onnx", "exact-arrays", "pipeline")
KNOWN_PATHS = frozenset({"/predict", "/invocations", "/health", "/ready", "/model", "/metrics", "/reload", "/models"})
DEFAULT_MODEL_PATHS = frozenset({"/predict", "/invocations", "/model", "/ready"})
MODEL_ACTIONS = frozenset({"predict", "invocations"})


class ServingMetrics:
    """Requests, errors, latency, batch sizes, the served version, reloads and the prediction log, per model.

    Every series of a served model carries its `model` label (`mlops_serving_model_info` names it `name`);
    a request to a path of no model (/health, /metrics, /models, /reload) has `model=""`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess_dir = multiprocess_dir()
        self._served: dict[str, str] = {}  # model -> the version this process serves
        self._forms: dict[str, str] = {}  # model -> its inference form in this process
        # created in this order: the exposition lists them so
        self.requests, self.errors, self.latency, self.records, self.batch_rows = _request_series(r)
        self.model_version, self.model_info, self.inference_form, self.reloads = _model_series(r)
        self.prediction_log, self.spool_bytes, self.worker = _log_and_process_series(r)
        self.rollout_records = Counter(
            "mlops_serving_rollout_records_total",
            "Records of a rollout by role: answered by the challenger, scored by it in shadow, scored by the champion "
            "in shadow (canary), answered by the champion after the challenger failed (fallback).",
            ["model", "version", "role"],
            registry=r,
        )
        self.cut_offs = Counter(
            "mlops_serving_rollout_cut_offs_total", "Challengers cut off in this process.", ["model"], registry=r
        )

    def served(self, name: str, version: str, form: str = "pipeline") -> None:
        """Record a swap of model `name` to v`version`, run in inference `form`."""
        self._unset_info(name)
        self._served[name], self._forms[name] = version, form
        self.model_info.labels(name=name, version=version).set(1)
        self.model_version.labels(name).set(float(version) if version.isdigit() else 0)
        for known in INFERENCE_FORMS:
            self.inference_form.labels(model=name, form=known).set(1 if known == form else 0)

    def not_served(self, name: str) -> None:
        """Record that model `name` is not served any more (its alias is gone)."""
        self._unset_info(name)
        self._served.pop(name, None)
        self.model_version.labels(name).set(0)

    def forget(self, name: str) -> None:
        """Model `name` left the catalog: its served-model gauges say nothing is served (0)."""
        self.not_served(name)
        self.spool_bytes.labels(name).set(0)
        for known in INFERENCE_FORMS:
            self.inference_form.labels(model=name, form=known).set(0)
        self._forms.pop(name, None)

    def _unset_info(self, name: str) -> None:
        """Zero the info series of what this process served of `name` (clear() would keep it in its file)."""
        if name in self._served:
            self.model_info.labels(name, self._served[name]).set(0)

    def count(
        self, model: str, path: str, status: int, seconds: float, children: dict[tuple[str, str, int], Any]
    ) -> None:
        """Count one answered request and time it (`children`: the caller's cache of labelled series)."""
        key = (model, path, status)
        cached = children.get(key)
        if cached is None:
            requests = self.requests.labels(model, path, str(status))
            cached = children[key] = (requests, self.latency.labels(model, path))
        cached[0].inc()
        if status >= 400:
            self.errors.labels(model, path, str(status)).inc()
        cached[1].observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of all worker processes in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)

    def served_by_process(self, name: str) -> dict[int, str]:
        """The version of model `name` each live process serves (pid -> version); processes not serving it left out."""
        return self.snapshot()[1].get(name, {})

    def rollout_volume(self, name: str, version: str) -> dict[str, int]:
        """Records of model `name`'s challenger `version` so far by role, summed over every serving process."""
        if self.multiprocess_dir is None:
            families = self.registry.collect()
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(self.multiprocess_dir))
            families = registry.collect()
        volume: dict[str, int] = {}
        for family in families:
            if family.name != "mlops_serving_rollout_records":
                continue
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_total") and (labels["model"], labels["version"]) == (name, version):
                    volume[labels["role"]] = volume.get(labels["role"], 0) + int(sample.value)
        return volume

    def snapshot(self) -> tuple[set[int], dict[str, dict[int, str]]]:
        """The live serving processes, and per model the version each of them serves (pid -> version).

        Outside multiprocess mode: this process only. A process that died (its files not yet dropped) is
        left out.
        """
        if self.multiprocess_dir is None:
            pid = os.getpid()
            return {pid}, {name: {pid: version} for name, version in self._served.items()}
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        live: set[int] = set()
        served: dict[str, dict[int, str]] = {}
        for family in registry.collect():
            if family.name == "mlops_serving_worker_up":
                live.update(int(s.labels["pid"]) for s in family.samples if s.value == 1)
            elif family.name == "mlops_serving_model_info":
                for sample in family.samples:
                    if sample.value == 1:
                        served.setdefault(sample.labels["name"], {})[int(sample.labels["pid"])] = sample.labels[
                            "version"
                        ]
        served = {name: {pid: v for pid, v in by_pid.items() if _alive(pid)} for name, by_pid in served.items()}
        return {pid for pid in live if _alive(pid)} | {p for by_pid in served.values() for p in by_pid}, served


def _request_series(r: CollectorRegistry) -> tuple[Counter, Counter, Histogram, Counter, Histogram]:
    """Requests, errors and latency per model, path (and status); records predicted and rows per model call."""
    by_path = ["model", "path", "status"]
    requests = Counter("mlops_serving_requests_total", "HTTP requests.", by_path, registry=r)
    errors = Counter("mlops_serving_errors_total", "Requests answered with a 4xx or 5xx status.", by_path, registry=r)
    latency = Histogram(
        "mlops_serving_request_seconds",
        "Request latency.",
        ["model", "path"],
        buckets=LATENCY_BUCKETS,
        registry=r,
    )
    records = Counter("mlops_serving_predicted_records_total", "Records predicted.", ["model"], registry=r)
    batch_rows = Histogram(
        "mlops_serving_batch_rows",
        "Rows per model call (micro-batches).",
        ["model"],
        buckets=BATCH_BUCKETS,
        registry=r,
    )
    return requests, errors, latency, records, batch_rows


def _model_series(r: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge, Counter]:
    """What each model serves: its version, its info series, its inference form; its loads by result."""
    model_version = Gauge(
        "mlops_serving_model_version",
        "Registry version served (0 before a model is loaded); across processes the latest swap's.",
        ["model"],
        registry=r,
        multiprocess_mode="livemostrecent",
    )
    model_info = Gauge(
        "mlops_serving_model_info",
        "The model served (value 1; 0 for one served before); across processes one series per pid.",
        ["name", "version"],
        registry=r,
        multiprocess_mode="liveall",
    )
    inference_form = Gauge(
        "mlops_serving_inference_form",
        "How the served model runs (value 1 for the current form): onnx (compiled, parity checked), "
        "exact-arrays (fitted steps on arrays, bit-identical) or pipeline.",
        ["model", "form"],
        registry=r,
        multiprocess_mode="liveall",
    )
    reloads = Counter("mlops_serving_reloads_total", "Model loads by result.", ["model", "result"], registry=r)
    return model_version, model_info, inference_form, reloads


def _log_and_process_series(r: CollectorRegistry) -> tuple[Counter, Gauge, Gauge]:
    """The prediction log's rows by result and its spool's bytes per model; each live serving process."""
    prediction_log = Counter(
        "mlops_serving_prediction_log_rows_total",
        "Logged prediction rows: written to S3, failed (kept for a retry) or dropped (spool or buffer full).",
        ["model", "result"],
        registry=r,
    )
    spool_bytes = Gauge(
        "mlops_serving_prediction_spool_bytes",
        "Bytes of answered predictions in the spool, not yet confirmed by S3 (summed over live processes).",
        ["model"],
        registry=r,
        multiprocess_mode="livesum",
    )
    worker = Gauge(
        "mlops_serving_worker_up",
        "1 for each live serving process (one series per pid across processes).",
        registry=r,
        multiprocess_mode="liveall",
    )
    return prediction_log, spool_bytes, worker


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


def route_of(path: str, default: str, served: Container[str]) -> tuple[str, str]:
    """The (model, path) labels of a request path: paths of a model templated, unknown paths as `other`.

    `/predict`, `/invocations`, `/model` and `/ready` are the default model's; `/models/<name>[/predict|
    /invocations]` is `<name>`'s when it is served, else `model=""` (a label per unknown name would let any
    client grow the series without bound).
    """
    if path in DEFAULT_MODEL_PATHS:
        return default, path
    if path in KNOWN_PATHS:
        return "", path
    if path.startswith("/models/"):
        name, _, rest = path[len("/models/") :].partition("/")
        if (not rest or rest in MODEL_ACTIONS) and name:
            return (name if name in served else ""), "/models/{name}" + (f"/{rest}" if rest else "")
    return "", "other"


class MetricsMiddleware:
    """Pure ASGI middleware: counts every request by model, path and status and times it.

    Args:
        app: The ASGI app it wraps.
        metrics: Where it counts.
        default: The default model's name (the label of /predict, /model, ...).
        served: The names of the models served now (a live view, e.g. the runtime's dict of them).
    """

    def __init__(self, app: Any, metrics: ServingMetrics, default: str = "", served: Container[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.default = default
        self.served = served
        # (model, path, status) -> the request counter's and latency histogram's children: `labels()` takes a
        # lock and builds a key on each call, this is one dict lookup on the request path.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

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
            model, path = route_of(scope["path"], self.default, self.served)
            self.metrics.count(model, path, status, time.perf_counter() - started, self._children)
