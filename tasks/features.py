"""Prefect tasks of the feature store: apply a repository, materialize, join training rows point-in-time.

Joining and materializing read the definitions from the registry by feature service name only: a worker
needs no repository code. Applying parses a repository folder (where one is given, e.g. a local run).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pandas as pd
from prefect import task

from adapters.feature_store import (
    Materialized,
    apply_repository,
    historical_features,
    materialize,
    resolve_repository,
)
from adapters.settings import get_settings
from adapters.snapshots import read_snapshot
from core.data.dataset import DatasetConfig
from core.data.feature_history import ENTITY_TIMESTAMP, JoinCounts, JoinReport, complete_join, join_report
from core.monitoring.drift_analysis import Window, partition_window
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="features-apply", **IO)
def apply_features(repo: str | None = None) -> list[str]:
    """Prefect task: register a Feast repository folder's entities, views and services in the registry.

    Args:
        repo: The repository folder (`adapters.feature_store.resolve_repository` rules); default the bundled
            example repository.

    Returns:
        Names of the applied objects.
    """
    folder = resolve_repository(repo) if repo else None
    names = apply_repository(get_settings(), Path(folder) if folder else None)
    log.info("feature repository %s applied: %s", folder or "(bundled example)", ", ".join(names))
    return names


@task(name="features-materialize", timeout_seconds=3600, **IO)
def materialize_features(end: datetime | None = None) -> Materialized:
    """Prefect task: load the newest feature values up to `end` (default now) into the online store."""
    done = materialize(get_settings(), end)
    log.info(done.summary())
    return done


def entity_rows(frame: pd.DataFrame, config: DatasetConfig) -> pd.DataFrame:
    """The join's entity rows: the id and, as `event_timestamp`, each row's own time in UTC."""
    if config.time_column is None:
        raise ValueError(f"dataset {config.name!r} names a feature service but no time_column to join as of")
    return pd.DataFrame(
        {
            config.id_column: frame[config.id_column],
            ENTITY_TIMESTAMP: pd.to_datetime(frame[config.time_column], utc=True),
        }
    )


@task(name="features-join", timeout_seconds=3600, **IO)
def join_features(frame: pd.DataFrame, config: DatasetConfig) -> tuple[pd.DataFrame, JoinReport]:
    """Prefect task: the snapshot with its feature service's values as of each row's time, and the counts.

    Rows the store drops or leaves without features keep their place with nulls (the pipeline imputes
    them) and are counted; the flow stores the counts, then fails above `config.max_missing_feature_share`.
    """
    service = config.feature_service
    if service is None:
        raise ValueError(f"dataset {config.name!r} names no feature service")
    rows = entity_rows(frame, config)
    # The service, its views and entity from the registry (by name); the id column stands for the join key.
    joined = historical_features(get_settings(), rows, service, id_column=config.id_column)
    store_columns = config.store_features
    keys = [config.id_column, ENTITY_TIMESTAMP]
    completed, rows_out, dropped = complete_join(rows, joined, keys, store_columns)
    counts = JoinCounts(len(rows), rows_out, dropped)
    report = join_report(service, counts, completed, store_columns, config.max_missing_feature_share)
    log.info(report.summary())
    enriched = frame.reset_index(drop=True).copy()
    for column in store_columns:
        enriched[column] = completed[column].to_numpy()
    return enriched, report


@task(name="load-partition-with-features", timeout_seconds=3600, **IO)
def load_partition_with_features(uri: str, config: DatasetConfig) -> Window:
    """Prefect task: a recent partition joined with its feature service as of each row's time (drift window).

    The drift of the store's features is then measured against the training reference, which holds them
    too; the join's counts are logged (a window is compared, not trained on: no limit applies).
    """
    frame = read_snapshot(uri, config.format, get_settings()).frame
    enriched, report = join_features.fn(frame, config)
    log.info("drift window %s: %s", uri, report.summary())
    return partition_window(enriched, uri, config)
