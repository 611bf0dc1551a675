"""Prefect tasks of frozen data versions: freeze a snapshot, read a frozen one, record what a run was given.

A snapshot is frozen by the `load` task (`tasks/loading.py`), before validation, with `freeze_objects`; the
S3 side is `adapters/data_versions.py`, the layout and rules `core/data/data_versions.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import yaml
from prefect import task
from prefect.runtime import flow_run

from adapters.clients import mlflow_client
from adapters.data_versions import Frozen, freeze, read_frozen
from adapters.settings import get_settings
from core.data.data_versions import TamperedDataError, build_manifest
from core.data.dataset import DatasetConfig
from core.data.fingerprint import Fingerprint, canonical_hash, params_version
from tasks.retrying import IO
from tasks.tracking import code_fingerprint

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "dataset/config.yaml"  # the dataset config as the run used it
PARAMS_ARTIFACT = "dataset/params.json"  # the run's parameters (TrainingParams), as JSON


def freeze_objects(
    config: DatasetConfig, fmt: str, objects: Sequence[tuple[str, bytes]], frame: pd.DataFrame
) -> Frozen:
    """Keep a snapshot's (name, bytes) objects as the model's data version, content-addressed (before validation).

    Generic over the objects: files of a folder, one file, or one Parquet object of a query's result.

    Raises:
        FreezeError: S3 failed (the `load` task retries it, then the run fails with the message).
    """
    manifest = build_manifest(
        config.model_name,
        config.source,
        fmt,
        objects,
        rows=len(frame),
        columns=list(frame.columns),
        created_at=datetime.now(UTC),
        first_run_id=_flow_run_id(),
        experiment=config.name,
    )
    return freeze(get_settings(), manifest, objects)


def frozen_objects(config: DatasetConfig, data_version: str) -> tuple[str, str, list[tuple[str, bytes]]]:
    """A frozen version of the model's data: (source, format, (path, bytes) objects), each blob's hash checked.

    Raises:
        UnknownDataVersionError: No such frozen version of the model (lists those there are).
        TamperedDataError: A blob is missing or altered (names it).
    """
    manifest, objects = read_frozen(get_settings(), config.model_name, data_version)
    return manifest.source, manifest.format, objects


def check_frozen_version(expected: str, actual: str, model_name: str) -> None:
    """The snapshot parsed from a frozen version must carry that version.

    Raises:
        TamperedDataError: It does not.
    """
    if expected != actual:
        raise TamperedDataError(f"frozen data version {expected} of {model_name} reads back as {actual}")


def _flow_run_id() -> str | None:
    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


@task(name="record-run-inputs", **IO)
def log_run_inputs(run_id: str, config: DatasetConfig, params: dict[str, Any]) -> None:
    """Prefect task: the dataset config and the parameters as the run used them (`mlops reproduce` reads them)."""
    client = mlflow_client(get_settings())
    client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), CONFIG_ARTIFACT)
    client.log_dict(run_id, params, PARAMS_ARTIFACT)


@task(name="fingerprint-frozen", **IO)
def frozen_fingerprint(config: DatasetConfig, params: dict[str, Any], data_version: str) -> Fingerprint:
    """Prefect task: a run on a frozen data version depends on that version, not on the source's listing."""
    return Fingerprint(
        data=canonical_hash({"frozen_data_version": data_version}),
        config=canonical_hash(config.model_dump(mode="json")),
        params=params_version(params),
        code=code_fingerprint(),
    )
