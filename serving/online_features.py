"""Online features for serving: a record may carry only its entity id and the request-time fields.

A model trained with a feature service (version tag `feature_service`) needs the store's features at
prediction time too. Store features absent from a record are looked up in the online store by the
record's id (`LoadedModel.id_field`), so training and serving read the same definitions: the offline
store point-in-time for training, the online store (materialized newest values) for serving. Values a
record carries itself are kept.

Unknown entity (nothing in the online store for that id): a 422 naming the record and the id, never a
silently imputed zero. Lookup latency is the `mlops_serving_feature_lookup_seconds` histogram in /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from adapters.feature_store import feature_store, online_features, service_features
from adapters.settings import Settings
from serving.forms import MAX_ERRORS

log = logging.getLogger(__name__)

SERVICE_REFRESH_SECONDS = 60.0  # as the registry cache: a re-applied service is seen within a minute
LOOKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FeatureLookupError(Exception):
    """Records whose store features cannot be found: each error names the record and the id (a 422)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"])
        self.errors = errors


def _error(key: str, index: int, field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": [key, index, field], "msg": f"{key}[{index}].{field}: {msg}", "type": kind}


class OnlineFeatures:
    """Fills records' store features from the online store; one Feast store per app, built on first use."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.latency = Histogram(
            "mlops_serving_feature_lookup_seconds",
            "Online feature store lookup latency (one lookup per request batch).",
            buckets=LOOKUP_BUCKETS,
            registry=registry,
        )
        self.entities = Counter(
            "mlops_serving_feature_entities_total", "Entities looked up, by result.", ["result"], registry=registry
        )
        self._store: Any = None
        self._services: dict[str, tuple[float, Any, list[str]]] = {}  # name -> (read at, service, columns)
        self._lock = threading.Lock()

    def _features(self, service: str) -> tuple[Any, Any, list[str]]:
        """The store, the service and its columns; the service is re-read from the registry every minute."""
        with self._lock:
            if self._store is None:
                self._store = feature_store(self.settings)
            read_at = self._services.get(service, (float("-inf"),))[0]
            if time.monotonic() - read_at > SERVICE_REFRESH_SECONDS:
                self._services[service] = (time.monotonic(), *service_features(self._store, service))
            _, found, columns = self._services[service]
            return self._store, found, columns

    def _fill(self, service: str, id_field: str, key: str, records: list[Any]) -> list[Any]:
        store, found_service, columns = self._features(service)
        wanting = [i for i, r in enumerate(records) if isinstance(r, dict) and any(c not in r for c in columns)]
        if not wanting:
            return records
        errors = []
        for i in wanting:
            value = records[i].get(id_field)
            if value is None or isinstance(value, bool) or not isinstance(value, str | int):
                msg = f"needed to look up the store features {columns} (send it, or send the features)"
                errors.append(_error(key, i, id_field, msg, "missing" if value is None else "id_type"))
                if len(errors) == MAX_ERRORS:  # an answer names no more: building more costs for nothing
                    break
        if errors:
            raise FeatureLookupError(errors)
        ids = [str(records[i][id_field]) for i in wanting]
        started = time.perf_counter()
        found = online_features(store, found_service, ids)
        self.latency.observe(time.perf_counter() - started)
        filled, unknown = list(records), 0
        for position, i in enumerate(wanting):
            values = {c: found[c][position] for c in columns}
            if all(v is None for v in values.values()):
                msg = (
                    f"unknown entity {ids[position]!r}: the online store has no features for it (feature service "
                    f"{service!r}); materialize the store, or send the features {columns} in the record"
                )
                if len(errors) < MAX_ERRORS:
                    errors.append(_error(key, i, id_field, msg, "unknown_entity"))
                unknown += 1
                continue
            filled[i] = {c: v for c, v in values.items() if c not in records[i]} | records[i]
        self.entities.labels("unknown").inc(unknown)
        self.entities.labels("found").inc(len(wanting) - unknown)
        if errors:
            raise FeatureLookupError(errors)
        return filled

    async def enrich(self, service: str, id_field: str | None, key: str, records: list[Any]) -> list[Any]:
        """`records` with the service's missing features filled in; raises FeatureLookupError (422) otherwise."""
        if id_field is None:
            raise FeatureLookupError(
                [{"loc": [key], "msg": f"{key}: the model has no id field to look its features up by", "type": "id"}]
            )
        return await asyncio.to_thread(self._fill, service, id_field, key, records)
