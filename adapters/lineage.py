"""Read a model version's lineage: the registry, its frozen data manifest, the alias history, scoring and log objects.

The assembly and its display are `core.promotion.lineage`; `mlops models lineage NAME VERSION` shows it.

What is read, and where:
- the version in the MLflow registry (its run, `data_version` tag, creation time, aliases);
- the data version's manifest, `s3://<bucket>/data-versions/<model>/<data_version>.json`;
- the champion history (`adapters.history_store.list_changes`);
- batch-scoring summaries under the default outputs, `s3://<bucket>/predictions/batch/<model>/` (an output given
  elsewhere with the scoring flow's `output` parameter is not searched); each summary names the version that
  scored it;
- the serving prediction log's date folders `s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/` of the
  days the version was champion, reading only the `model_version` column of each object to count its rows.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from adapters.clients import S3Location, mlflow_client, s3_client
from adapters.history_store import list_changes
from adapters.settings import Settings
from adapters.store import list_keys, s3_filesystem
from core.inference.scoring import MANIFEST_NAME, SUMMARY_NAME, VERSIONS_FOLDER
from core.monitoring.prediction_log import day_prefix
from core.promotion.lineage import (
    DataFacts,
    Lineage,
    LogPartition,
    ScoringOutput,
    assemble,
    champion_periods,
    log_days,
    manifest_uri,
)

log = logging.getLogger(__name__)


class LineageError(LookupError):
    """No such registered model version (the message names it)."""


def read_lineage(settings: Settings, model_name: str, version: str, now: datetime | None = None) -> Lineage:
    """The lineage of one registered model version, read from the registry and S3.

    Raises:
        LineageError: The model or version is not registered.
    """
    now = now or datetime.now(UTC)
    notes: list[str] = []
    registry = _registry_facts(settings, model_name, version)
    data_version = registry.get("data_version")
    uri = manifest_uri(settings.bucket, model_name, data_version) if data_version else None
    manifest = _read_json(settings, uri) if uri else None
    if data_version and manifest is None:
        notes.append(f"no frozen manifest at {uri} (trained before snapshots were frozen, or removed by retention)")
    changes = list_changes(model_name, settings)
    scoring = _scoring_outputs(settings, model_name, version)
    days = log_days(champion_periods(changes, version), now)
    partitions = [p for p in (_log_partition(settings, model_name, version, day) for day in days) if p is not None]
    return assemble(
        model_name,
        version,
        DataFacts.from_manifest(data_version, uri, manifest),
        registry,
        changes,
        scoring,
        partitions,
        now,
        notes,
    )


def _registry_facts(settings: Settings, model_name: str, version: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException as exc:
        raise LineageError(f"model {model_name!r} has no registered version {version!r}") from exc
    run_id = found.tags.get("run_id") or found.run_id
    run_url = None
    if run_id:
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
            run_url = f"{settings.mlflow_tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}"
        except MlflowException:
            log.warning("run %s of %s v%s is gone from MLflow", run_id, model_name, version)
    created = (
        datetime.fromtimestamp(found.creation_timestamp / 1000, UTC).isoformat() if found.creation_timestamp else None
    )
    return {
        "run_id": run_id,
        "run_url": run_url,
        "registered_at": created,
        "aliases": list(getattr(found, "aliases", []) or []),
        "data_version": found.tags.get("data_version"),
    }


def _read_json(settings: Settings, uri: str) -> dict[str, Any] | None:
    location = S3Location.parse(uri)
    client = s3_client(settings)
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    except (client.exceptions.NoSuchKey, client.exceptions.NoSuchBucket):
        return None
    try:
        found = json.loads(body)
    except ValueError:
        log.warning("%s is not JSON: left out of the lineage", uri)
        return None
    return found if isinstance(found, dict) else None


def _scoring_outputs(settings: Settings, model_name: str, version: str) -> list[ScoringOutput]:
    """Every stored batch-scoring summary under the model's default outputs whose model version is `version`."""
    root = S3Location(settings.bucket, f"predictions/batch/{model_name}/")
    found: list[ScoringOutput] = []
    current: dict[str, str | None] = {}
    for key in list_keys(settings, root, (SUMMARY_NAME,)):
        if f"/{VERSIONS_FOLDER}" not in key:
            continue
        summary = _read_json(settings, f"s3://{settings.bucket}/{key}")
        if summary is None or str(summary.get("model_version")) != str(version):
            continue
        output_key, run_version = key.rsplit(f"/{VERSIONS_FOLDER}", 1)
        output = f"s3://{settings.bucket}/{output_key}/"
        if output not in current:
            manifest = _read_json(settings, output + MANIFEST_NAME)
            current[output] = manifest.get("version") if manifest else None
        run_version = run_version.removesuffix(f"/{SUMMARY_NAME}")
        found.append(
            ScoringOutput(
                output=output,
                run_version=run_version,
                scored_at=str(summary.get("scored_at", "")),
                rows=int(summary.get("rows", 0)),
                source=str(summary.get("source", "")),
                current=current[output] == run_version,
            )
        )
    return found


def _log_partition(settings: Settings, model_name: str, version: str, day: Any) -> LogPartition | None:
    """One date folder of the serving log: its objects, and how many rows `version` predicted (None: no folder)."""
    import pyarrow.parquet as pq

    prefix = day_prefix(model_name, day)
    keys = list_keys(settings, S3Location(settings.bucket, prefix), (".parquet",))
    if not keys:
        return None
    filesystem = s3_filesystem(settings)
    rows = mine = 0
    for key in keys:
        column = pq.read_table(f"{settings.bucket}/{key}", columns=["model_version"], filesystem=filesystem)
        values = column.column("model_version").to_pylist()
        rows += len(values)
        mine += sum(1 for v in values if str(v) == str(version))
    return LogPartition(f"s3://{settings.bucket}/{prefix}", day.isoformat(), len(keys), mine, rows)
