"""The Feast feature store, built from settings: registry on S3 (or SQL), offline Parquet on S3, online SQLite or Redis.

No `feature_store.yaml`: the repository config is made here from the stack's settings, so the CLI, the
flows and the serving API all reach the same store. Feast's S3 clients (the registry's boto3, the file
offline store's pyarrow/s3fs) read the endpoint and credentials from the environment only, so
`feature_store` exports them (`FEAST_S3_ENDPOINT_URL`, `AWS_*`) into this process before building it.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from adapters.clients import S3Location, put_bytes
from adapters.settings import Settings
from core.feature_history import ENTITY_TIMESTAMP, history_features
from core.feature_repo import ENTITY_KEY, FEATURE_SERVICES, HISTORY_TABLE, HISTORY_TTL, definitions

log = logging.getLogger(__name__)


def history_uri(settings: Settings) -> str:
    """Where the offline history table lives (the bucket's `features/` prefix)."""
    return f"s3://{settings.bucket}/{HISTORY_TABLE}"


def _registry(settings: Settings) -> dict[str, Any]:
    if settings.feast_registry is None:
        return {"path": f"s3://{settings.bucket}/features/registry.db", "cache_ttl_seconds": 60}
    url = settings.feast_registry.get_secret_value()
    if url.startswith("s3://"):
        return {"path": url, "cache_ttl_seconds": 60}
    return {"registry_type": "sql", "path": url, "cache_ttl_seconds": 60}


def _online(settings: Settings) -> dict[str, Any]:
    if settings.feast_redis is not None:
        return {"type": "redis", "connection_string": settings.feast_redis.get_secret_value()}
    settings.feast_online_path.parent.mkdir(parents=True, exist_ok=True)
    return {"type": "sqlite", "path": str(settings.feast_online_path.resolve())}


def describe_store(settings: Settings) -> dict[str, str]:
    """Where the store's parts live, for the CLI (no secret: SQL and Redis strings are named, not shown)."""
    registry = settings.feast_registry
    shown_registry = (
        registry.get_secret_value()
        if registry is not None and registry.get_secret_value().startswith("s3://")
        else ("SQL (MLOPS_FEAST_REGISTRY)" if registry is not None else _registry(settings)["path"])
    )
    online = "Redis (MLOPS_FEAST_REDIS)" if settings.feast_redis else f"SQLite {settings.feast_online_path}"
    return {
        "project": settings.feast_project,
        "registry": shown_registry,
        "offline": history_uri(settings),
        "online": online,
    }


def feature_store(settings: Settings) -> Any:
    """A Feast `FeatureStore` for the stack (the repository is applied by `apply_repository`)."""
    from feast import FeatureStore, RepoConfig

    # Feast reads these from the environment only (registry: boto3; offline files: pyarrow/s3fs).
    os.environ["FEAST_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    os.environ["AWS_ENDPOINT_URL_S3"] = settings.s3_endpoint_url
    os.environ["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id
    os.environ["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()
    os.environ["AWS_DEFAULT_REGION"] = settings.aws_region
    config = RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=_registry(settings),
        online_store=_online(settings),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    return FeatureStore(config=config)


def write_history(settings: Settings, events: pd.DataFrame) -> tuple[str, int]:
    """Turn raw events into the history feature table and write it as the offline source; (URI, rows)."""
    table = history_features(events, ENTITY_KEY)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    uri = put_bytes(settings, S3Location.parse(history_uri(settings)), buffer.getvalue(), "application/x-parquet")
    log.info("wrote %s history feature rows (%s events) to %s", len(table), len(events), uri)
    return uri, len(table)


def apply_repository(settings: Settings) -> list[str]:
    """Register the repository's entities, views and services (idempotent); returns their names."""
    store = feature_store(settings)
    objects = definitions(history_uri(settings), settings.s3_endpoint_url)
    store.apply(objects)
    return [getattr(o, "name", str(o)) for o in objects]


@dataclass(frozen=True)
class Materialized:
    """One materialization: the views and the window loaded into the online store."""

    views: list[str]
    start: datetime
    end: datetime

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return f"materialized {', '.join(self.views)} from {self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"


def materialize(settings: Settings, end: datetime | None = None) -> Materialized:
    """Load the newest feature values up to `end` (default now) into the online store (the TTL window)."""
    store = feature_store(settings)
    end = end or datetime.now(UTC)
    start = end - HISTORY_TTL
    views = [v.name for v in store.list_feature_views()]
    store.materialize(start_date=start, end_date=end, feature_views=views)
    return Materialized(views, start, end)


def list_repository(settings: Settings) -> dict[str, list[str]]:
    """Names of the registered entities, feature views (with their features) and services."""
    store = feature_store(settings)
    return {
        "entities": sorted(e.name for e in store.list_entities()),
        "feature_views": sorted(
            f"{v.name}: {', '.join(f.name for f in v.features)}" for v in store.list_feature_views()
        ),
        "feature_services": sorted(s.name for s in store.list_feature_services()),
    }


def service_features(store: Any, service: str) -> tuple[Any, list[str]]:
    """A service from the registry and the feature columns it returns (plain names, as in training frames)."""
    if service not in FEATURE_SERVICES:
        raise KeyError(f"unknown feature service {service!r}; known: {sorted(FEATURE_SERVICES)}")
    found = store.get_feature_service(service)
    return found, [f.name for projection in found.feature_view_projections for f in projection.features]


def historical_features(settings: Settings, entity_rows: pd.DataFrame, service: str) -> pd.DataFrame:
    """Point-in-time join of `entity_rows` (entity key and `event_timestamp`) with a feature service.

    Returns what Feast returned, as it returned it (rows it dropped are absent): the caller counts.
    """
    store = feature_store(settings)
    rows = entity_rows[[ENTITY_KEY, ENTITY_TIMESTAMP]].copy()
    job = store.get_historical_features(entity_df=rows, features=store.get_feature_service(service))
    joined = job.to_df()
    joined[ENTITY_TIMESTAMP] = pd.to_datetime(joined[ENTITY_TIMESTAMP], utc=True)
    return joined


def online_features(store: Any, service: Any, ids: list[str]) -> dict[str, list[Any]]:
    """Newest feature values of entities `ids` from the online store (None where it has none).

    `service`: a service name, or the `FeatureService` object itself (reading it from the registry costs
    ~20 ms, far more than the lookup: the serving API keeps it).
    """
    found = store.get_feature_service(service) if isinstance(service, str) else service
    response = store.get_online_features(features=found, entity_rows=[{ENTITY_KEY: i} for i in ids])
    return response.to_dict()
