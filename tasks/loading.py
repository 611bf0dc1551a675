"""Prefect tasks: load a data snapshot (and freeze it as a data version) and a dataset config.

The reading itself is `adapters.snapshots`; freezing and reading frozen versions is `tasks.data_versions`.
"""

from __future__ import annotations

from prefect import task

from adapters.catalog import ModelRemovedError, entry_uri, get_entry
from adapters.settings import get_settings
from adapters.snapshots import Snapshot, fetch_objects, read_dataset_config, snapshot_from_objects
from core.data.dataset import DatasetConfig
from tasks.data_versions import check_frozen_version, freeze_objects, frozen_objects
from tasks.retrying import IO


@task(name="load", **IO, timeout_seconds=1800)
def load_snapshot(config: DatasetConfig, data_version: str | None = None) -> Snapshot:
    """Prefect task: load the dataset's snapshot and freeze it as the model's data version, before validation.

    With `data_version`, the model's frozen version of that name instead of the source (each blob's SHA-256
    checked as it is read). A failure to freeze fails the task (S3 errors are retried like any read).
    """
    if data_version:
        source, fmt, objects = frozen_objects(config, data_version)
        snapshot = snapshot_from_objects(objects, source, fmt)
        check_frozen_version(data_version, snapshot.data_version, config.model_name)
        return snapshot
    objects, fmt = fetch_objects(
        config.source, config.format, get_settings(), query=config.query, password_env=config.password_env
    )
    snapshot = snapshot_from_objects(objects, config.source, fmt)
    freeze_objects(config, fmt, objects, snapshot.frame)  # fmt: how the objects parse (a query: parquet)
    return snapshot


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
