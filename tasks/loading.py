"""Prefect tasks: load a data snapshot and a dataset config (the reading itself is `adapters.snapshots`)."""

from __future__ import annotations

from prefect import task

from adapters.catalog import ModelRemovedError, entry_uri, get_entry
from adapters.settings import get_settings
from adapters.snapshots import Snapshot, read_dataset_config, read_snapshot
from core.data.dataset import DatasetConfig
from tasks.retrying import IO


@task(name="load", **IO, timeout_seconds=1800)
def load_snapshot(config: DatasetConfig) -> Snapshot:
    """Prefect task: load the dataset's snapshot from its configured source."""
    return read_snapshot(config.source, config.format, get_settings())


@task(name="dataset-config", **IO)
def load_dataset_config(ref: str) -> DatasetConfig:
    """Prefect task: a dataset config by bundled name, local YAML path or s3:// URI of a YAML file."""
    return read_dataset_config(ref, get_settings())


@task(name="still-in-catalog", **IO)
def check_still_in_catalog(ref: str, model_name: str) -> None:
    """Prefect task: a run of a catalog model stops before registering when the model was removed meanwhile.

    Raises:
        ModelRemovedError: `ref` is the model's catalog entry and it is gone (`mlops models remove`).
    """
    settings = get_settings()
    if ref == entry_uri(settings, model_name) and get_entry(settings, model_name) is None:
        raise ModelRemovedError(
            f"model {model_name!r} was removed from the catalog while this run was in flight: nothing registered"
        )
