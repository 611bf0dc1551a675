"""Champion history in S3: record a change (with the new champion's metrics and links), list a model's changes.

Recording a change also announces it as a Prefect event (`adapters.alerts.announce_change`), best-effort.

The record, its key and its display are `core.history`; `mlops history` lists what is stored here.
"""

from __future__ import annotations

import getpass
import logging
from datetime import UTC, datetime

from adapters.alerts import announce_change
from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import run_holdout_metrics
from adapters.settings import Settings, get_settings
from adapters.store import list_keys
from core.history import ChampionChange, ChangeKind, history_prefix, record_key

log = logging.getLogger(__name__)


def default_actor() -> str:
    """Who acts: the Prefect flow run (`flow-run/<name>`) when inside one, else the OS user."""
    from prefect.runtime import flow_run

    name = flow_run.get_name() if flow_run.get_id() else None
    if name:
        return f"flow-run/{name}"
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers): still say something useful
        return "unknown-user"


def version_facts(settings: Settings, model_name: str, version: str | None) -> tuple[dict[str, float], str | None]:
    """Holdout metrics and run id of a model version (empty when unknown; never raises)."""
    if version is None:
        return {}, None
    try:
        client = mlflow_client(settings)
        run_id = client.get_model_version(model_name, version).run_id
        return run_holdout_metrics(client, run_id), run_id
    except Exception as exc:  # history is informative: a missing figure must not block a change
        log.warning("metrics of %s v%s unavailable for the history: %s", model_name, version, exc)
        return {}, None


def change_links(settings: Settings, model_name: str, version: str | None) -> dict[str, str]:
    """Links to the new champion in the MLflow UI and to the acting Prefect flow run, when there is one."""
    from prefect.runtime import flow_run

    links = {}
    if version is not None:
        links["mlflow_model_version"] = f"{settings.mlflow_tracking_uri}/#/models/{model_name}/versions/{version}"
    run_id = flow_run.get_id()
    if run_id:
        links["prefect_flow_run"] = f"{settings.prefect_ui_url}/runs/flow-run/{run_id}"
    return links


def make_change(
    model_name: str,
    from_version: str | None,
    to_version: str | None,
    kind: ChangeKind,
    reason: str,
    actor: str | None = None,
    settings: Settings | None = None,
) -> ChampionChange:
    """A change record with the new champion's metrics, run id and links filled in."""
    settings = settings or get_settings()
    metrics, run_id = version_facts(settings, model_name, to_version)
    return ChampionChange(
        at=datetime.now(UTC).isoformat(timespec="microseconds"),
        model=model_name,
        from_version=from_version,
        to_version=to_version,
        kind=kind,
        reason=reason,
        actor=actor or default_actor(),
        metrics=metrics,
        run_id=run_id,
        links=change_links(settings, model_name, to_version),
    )


def record_change(change: ChampionChange, settings: Settings | None = None) -> str:
    """Store one change in S3; returns its URI. Raises on failure (callers decide how loud to be)."""
    settings = settings or get_settings()
    location = S3Location(settings.bucket, record_key(change))
    uri = put_bytes(settings, location, change.to_json().encode(), "application/json")
    log.info("history of %s: %s (%s)", change.model, change.describe(), uri)
    return uri


def record_change_safely(change: ChampionChange) -> str | None:
    """`record_change`, but a failure is logged loudly and returns None: the alias move it records stands.

    Then the change is announced as the Prefect event `mlops.champion.<kind>` (what the champion-change alert
    automation notifies), whether or not the record was stored; that is best-effort too.
    """
    uri = None
    try:
        uri = record_change(change)
    except Exception:
        log.exception(
            "HISTORY NOT RECORDED for %s (%s v%s -> v%s): the change itself stands; record it by hand if needed",
            change.model,
            change.kind,
            change.from_version,
            change.to_version,
        )
    announce_change(change, uri)
    return uri


def list_changes(model_name: str, settings: Settings | None = None) -> list[ChampionChange]:
    """Every recorded champion change of `model_name`, oldest first (empty when there is none)."""
    settings = settings or get_settings()
    client = s3_client(settings)
    changes = []
    for key in list_keys(settings, S3Location(settings.bucket, history_prefix(model_name)), (".json",)):
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        try:
            changes.append(ChampionChange.from_json(body.decode()))
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable history record s3://%s/%s: %s", settings.bucket, key, exc)
    return changes
