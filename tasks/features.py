"""Prefect tasks of the feature store: apply the repository, materialize, join training rows point-in-time."""

from __future__ import annotations

import logging
from datetime import datetime

import pandas as pd
from prefect import task

from adapters.feature_store import Materialized, apply_repository, historical_features, materialize
from adapters.settings import get_settings
from adapters.snapshots import read_snapshot
from core.dataset import DatasetConfig
from core.drift_analysis import Window, partition_window
from core.feature_history import ENTITY_TIMESTAMP, JoinReport, complete_join, join_report
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="features-apply", **IO)
def apply_features() -> list[str]:
    """Prefect task: register the feature repository (entities, views, services) in the registry."""
    names = apply_repository(get_settings())
    log.info("feature repository applied: %s", ", ".join(names))
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
    joined = historical_features(get_settings(), rows, service)
    store_columns = config.store_features
    keys = [config.id_column, ENTITY_TIMESTAMP]
    completed, rows_out, dropped = complete_join(rows, joined, keys, store_columns)
    report = join_report(
        service, len(rows), rows_out, dropped, completed, store_columns, config.max_missing_feature_share
    )
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
