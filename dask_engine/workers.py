"""On the cluster's workers: the registered model loaded once per worker process, and each worker's memory.

Scoring and drift tasks on the same worker share the model (a cache keyed by tracking server, model and
version, `worker_model`) instead of loading it once per partition; each run records every worker's memory
limit and peak resident memory (`worker_memory`).
"""

from __future__ import annotations

import resource
import sys
import threading
from typing import Any

from adapters import registry
from adapters.settings import Settings

MODELS_KEPT = 2  # models a worker keeps (the newest used); a long-lived cluster does not fill up with old versions
_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()
_LOADS: list[tuple[str, str]] = []  # every load this process did: (model, version), for the tests and logs


def worker_model(model_name: str, version: str, settings: Settings) -> Any:
    """The registered model, loaded at most once per worker process (tasks on the worker share it)."""
    key = (settings.mlflow_tracking_uri, model_name, version)
    with _MODELS_LOCK:
        if key not in _MODELS:
            while len(_MODELS) >= MODELS_KEPT:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = registry.load_model(model_name, version, settings, where="scoring on the cluster")
            _LOADS.append((model_name, version))
        return _MODELS[key]


def model_loads() -> list[tuple[str, str]]:
    """The models this process loaded (run on each worker with `Client.run`)."""
    return list(_LOADS)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def _worker_memory(dask_worker: Any) -> dict[str, float]:
    limit = dask_worker.memory_manager.memory_limit or 0
    return {"limit_mb": round(limit / 2**20, 1), "peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1)}


def worker_memory(client: Any) -> dict[str, dict[str, float]]:
    """Each worker's memory limit and peak resident memory since it started (MB), by worker address."""
    return client.run(_worker_memory)
