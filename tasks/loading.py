"""Prefect tasks: load a data snapshot and a dataset config (the reading itself is `adapters.snapshots`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.settings import get_settings
from adapters.snapshots import Snapshot, read_dataset_config, read_snapshot
from core.dataset import DatasetConfig
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS, retry_unless_permanent


@task(
    name="load",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    timeout_seconds=1800,
    cache_policy=NO_CACHE,
)
def load_snapshot(config: DatasetConfig) -> Snapshot:
    """Prefect task: load the dataset's snapshot from its configured source."""
    return read_snapshot(config.source, config.format, get_settings())


@task(
    name="dataset-config",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def load_dataset_config(ref: str) -> DatasetConfig:
    """Prefect task: a dataset config by bundled name, local YAML path or s3:// URI of a YAML file."""
    return read_dataset_config(ref, get_settings())
