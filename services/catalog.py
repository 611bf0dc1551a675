"""The model catalog's operations: add a model (checked first), remove it, and say what each model's loop is doing.

`add_model` checks everything a run would trip over later, before anything is stored: the config parses
(errors name the field), its gates resolve for its task, its sources can be read, its feature repository
applies and defines its feature service, and its model name is free (or `replace` is asked). Nothing is
stored when a check fails. `remove_model` deletes the model's deployments (cancelling its runs in flight) and
its catalog entry; its registry versions, data and logs stay. `model_status` gathers one `mlops models list`
line from the registry, Prefect, the monitoring reports and the serving API.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any
from uuid import UUID

from adapters.catalog import (
    CatalogEntry,
    CatalogError,
    delete_entry,
    get_entry,
    put_entry,
    read_config_text,
    taken,
)
from adapters.clients import mlflow_client, s3_client
from adapters.registry import CHAMPION, aliases_of, run_holdout_metrics
from adapters.serving_status import served_versions
from adapters.settings import Settings
from adapters.snapshot_listing import snapshot_listing
from adapters.snapshots import DataLoadError, StoreUnavailableError
from core.catalog import CatalogConfigError, ModelStatus, checked_gates, checked_search
from core.data.dataset import DatasetConfig, DatasetConfigError, parse_dataset_config

log = logging.getLogger(__name__)

MODEL_TAG_PREFIX = "model:"


def model_tag(model: str) -> str:
    """The tag on a model's deployments (and so on their runs): `model:<name>`."""
    return MODEL_TAG_PREFIX + model


def model_deployment_ids(model: str, work_pool: str | None = None) -> dict[str, UUID]:
    """`<flow>/<deployment>` -> id of the deployments tagged `model:<model>` (on `work_pool` when given)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[model_tag(model)]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
    return {
        f"{flows.get(d.flow_id, '?')}/{d.name}": d.id
        for d in found
        if work_pool is None or d.work_pool_name == work_pool
    }


def delete_model_deployments(model: str, work_pool: str | None = None, cancel_runs: bool = True) -> list[str]:
    """Delete a model's deployments (their scheduled runs go with them); in-flight runs are cancelled first.

    A run cancelled here ends Cancelled before it registers anything (Prefect stops its process), so a
    removed model gets no new version from a run that was under way. Returns the deleted names.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    found = model_deployment_ids(model, work_pool)
    if not found:
        return []
    with get_client(sync_client=True) as client:
        if cancel_runs:
            running = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(found.values()))),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.PAUSED])
                    )
                ),
            )
            for run in running:
                client.set_flow_run_state(run.id, Cancelling(message=f"model {model!r} was removed from the catalog"))
                log.warning("cancelled run %s (%s): model %s was removed", run.name, run.id, model)
        for name, deployment_id in found.items():
            client.delete_deployment(deployment_id)
            log.info("deleted deployment %s (%s)", name, deployment_id)
    return sorted(found)


def _check_readable(model: str, field: str, source: str, fmt: str, settings: Settings) -> None:
    try:
        snapshot_listing(source, fmt, settings)
    except (DataLoadError, StoreUnavailableError) as exc:
        raise CatalogError(f"model {model!r}: {field} {source!r} cannot be read: {exc}") from exc


def _check_query(config: DatasetConfig) -> None:
    """A SQL source: the server answers, the password (from `password_env`) is accepted, the query plans."""
    from adapters.sql_source import SqlSourceError, check_query

    try:
        check_query(config.source, config.query or "", config.password_env)
    except SqlSourceError as exc:
        raise CatalogError(f"model {config.model_name!r}: source cannot be queried: {exc}") from exc


def _apply_feature_repo(config: DatasetConfig, origin: str, settings: Settings) -> None:
    from adapters.feature_store import FeatureRepoError, apply_repository, has_service, resolve_repository

    model, repo = config.model_name, None
    if config.feature_repo:
        try:
            repo = resolve_repository(config.feature_repo, origin)
            apply_repository(settings, repo)
        except FeatureRepoError as exc:
            raise CatalogError(f"model {model!r}: feature_repo: {exc}") from exc
        except Exception as exc:  # Feast's own errors about the repository's objects
            raise CatalogError(f"model {model!r}: feature_repo {repo} did not apply: {exc}") from exc
    if config.feature_service and not has_service(settings, config.feature_service):
        where = f"in feature_repo {repo}" if repo else "in the feature store's registry (no feature_repo given)"
        raise CatalogError(f"model {model!r}: feature_service {config.feature_service!r} is not defined {where}")


def _model_named(text: str) -> str:
    """`model 'x': ` when the YAML names its model, else nothing (the error names the file)."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    name = raw.get("model_name") if isinstance(raw, dict) else None
    return f"model {name!r}: " if isinstance(name, str) else ""


def check_config(text: str, origin: str, settings: Settings) -> DatasetConfig:
    """Parse and check a config the way `add_model` does, storing nothing; CatalogError names model and field."""
    try:
        config = parse_dataset_config(text, origin)
        checked_gates(config)
        checked_search(config)
    except CatalogConfigError as exc:
        raise CatalogError(str(exc)) from exc
    except DatasetConfigError as exc:  # named by the model when the text says which
        raise CatalogError(f"{_model_named(text)}{exc}") from exc
    model, ops = config.model_name, config.operations
    if config.format == "sql":
        _check_query(config)
    else:
        _check_readable(model, "source", config.source, config.format, settings)
    if ops.scoring_source:
        _check_readable(model, "operations.scoring_source", ops.scoring_source, "parquet", settings)
    if ops.monitoring_partition:
        _check_readable(model, "operations.monitoring_partition", ops.monitoring_partition, config.format, settings)
    if not config.source.startswith("s3://") and config.format != "sql":
        log.warning("model %s reads a local source (%s): only workers on this machine can train it", model, origin)
    return config


def add_model(ref: str, settings: Settings, replace: bool = False) -> CatalogEntry:
    """Check the config at `ref` (bundled name, path or s3:// URI) and store it as its model's catalog entry."""
    text, origin = read_config_text(ref, settings)
    config = check_config(text, origin, settings)
    if not replace and (found := get_entry(settings, config.model_name)) is not None:
        raise taken(config.model_name, found.uri)  # before the feature repository is applied
    _apply_feature_repo(config, origin, settings)
    return put_entry(settings, config, text, replace=replace)


def remove_model(name: str, settings: Settings) -> tuple[str, list[str]]:
    """Delete the model's deployments (cancelling its runs in flight) and its entry; returns (kept config, deleted).

    The registry versions, the data, the reports and the prediction logs stay. The serving API drops the
    model's routes at its next catalog read.
    """
    if get_entry(settings, name) is None:
        raise CatalogError(f"model {name!r} is not in the catalog: `mlops models list` shows what is")
    deleted = delete_model_deployments(name)
    return delete_entry(settings, name), deleted


def _champion(entry: CatalogEntry, settings: Settings) -> tuple[str | None, str, float | None]:
    client = mlflow_client(settings)
    version = aliases_of(client, entry.name).get(CHAMPION)
    metric = str(checked_gates(entry.config).primary_metric)
    if version is None:
        return None, metric, None
    run_id = client.get_model_version(entry.name, version).run_id
    return version, metric, run_holdout_metrics(client, run_id).get(metric)


def _runs(client: Any, flow: str, model: str, states: list[Any] | None, ascending: bool, limit: int = 1) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=states)) if states else None
    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[MODEL_TAG_PREFIX + model]), state=state),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC if ascending else FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=limit,
    )


def _prefect_status(model: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    done = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, StateType.RUNNING]
    with get_client(sync_client=True) as client:
        trained = _runs(client, "training", model, done, ascending=False)
        upcoming = _runs(client, "training", model, [StateType.SCHEDULED], ascending=True)
    status: dict[str, Any] = {}
    if trained:
        run = trained[0]
        status["last_training"] = (run.state_name or "?").lower()
        status["last_training_at"] = run.end_time or run.start_time or run.expected_start_time
    if upcoming:
        status["next_training_at"] = upcoming[0].expected_start_time
    return status


def last_monitoring(model: str, settings: Settings) -> tuple[str, datetime] | None:
    """The newest monitoring report's verdict of `model` ('drift' or 'ok') and its time, from `result.json`."""
    client = s3_client(settings)
    prefix = f"reports/monitoring/{model}/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
    keys = sorted(
        item["Key"] for page in pages for item in page.get("Contents", []) if item["Key"].endswith("result.json")
    )
    if not keys:
        return None
    key = keys[-1]
    body = json.loads(client.get_object(Bucket=settings.bucket, Key=key)["Body"].read())
    verdict = "drift" if (body.get("verdict") or {}).get("triggered") else "ok"
    stamp = key.removeprefix(prefix).split("-", 1)[0]
    return verdict, datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")


def model_status(entry: CatalogEntry, settings: Settings, served: dict[str, str | None] | None) -> ModelStatus:
    """One catalog model's line: champion and metric, last and next training, last monitoring, serving."""
    champion, metric, value = _champion(entry, settings)
    fields: dict[str, Any] = {"champion": champion, "metric": metric, "metric_value": value}
    fields |= _prefect_status(entry.name)
    if (monitored := last_monitoring(entry.name, settings)) is not None:
        fields["monitoring"], fields["monitoring_at"] = monitored
    fields["serving"] = serving_cell(entry, champion, served)
    return ModelStatus(entry.name, **fields)


def serving_cell(entry: CatalogEntry, champion: str | None, served: dict[str, str | None] | None) -> str:
    """Whether the serving API answers with the champion: `yes (vN)`, `no (...)`, `not served` or `unreachable`."""
    if not entry.config.operations.served:
        return "not served"
    if served is None:
        return "unreachable"
    if entry.name not in served:
        return "no (not listed)"
    version = served[entry.name]
    if champion is not None and version == champion:
        return f"yes (v{version})"
    return f"no ({'v' + version if version else 'nothing loaded'})"


def serving_now(settings: Settings) -> dict[str, str | None] | None:
    """What the serving API serves now (None: unreachable or not configured)."""
    return served_versions(settings)
