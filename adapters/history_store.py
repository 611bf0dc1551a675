"""Champion history in S3: record a change (with the new champion's metrics and links), list a model's changes.

Once recorded, a change is announced as a Prefect event (`adapters.alerts.announce_change`, by `adapters.promotion`).
The intent of a change (`core.promotion.history.PendingChange`) is stored before its alias move, in S3 or, when S3
cannot take it, in the local state folder (`<state_dir>/history-pending/<model>/`), so a crash never loses it.

The record, its key and its display are `core.promotion.history`; `mlops history` lists what is stored here.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import run_holdout_metrics
from adapters.settings import Settings, get_settings
from adapters.store import list_keys
from core.promotion.history import (
    ChampionChange,
    ChangeKind,
    PendingChange,
    history_prefix,
    pending_key,
    pending_prefix,
    record_key,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        found = client.get_model_version(model_name, version)
        # the training flow tags each version with its own run; the registry's run_id is the fallback
        run_id = found.tags.get("run_id") or found.run_id
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
) -> ChampionChange:
    """A change record with the new champion's metrics, run id and links filled in (the settings' servers)."""
    settings = get_settings()
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


def list_changes(model_name: str, settings: Settings | None = None) -> list[ChampionChange]:
    """Every recorded champion change of `model_name`, oldest first (empty when there is none)."""
    settings = settings or get_settings()
    return read_records(settings, history_prefix(model_name), ChampionChange.from_json, "history record")


def read_records(settings: Settings, prefix: str, parse: Callable[[str], T], what: str) -> list[T]:
    """Every JSON record under `prefix` in the bucket, in key order (time order for time-stamped keys).

    One that does not parse is skipped with a warning naming it (`what` says what it is), so one bad object never
    hides the others.
    """
    client = s3_client(settings)
    records = []
    for key in list_keys(settings, S3Location(settings.bucket, prefix), (".json",)):
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        try:
            records.append(parse(body.decode()))
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable %s s3://%s/%s: %s", what, settings.bucket, key, exc)
    return records


def _local_pending(settings: Settings, change: ChampionChange) -> Path:
    return settings.state_dir.resolve() / pending_key(change)


def store_pending(pending: PendingChange, settings: Settings | None = None) -> str:
    """Write the intent of a change before its alias moves: to S3, else to the local state folder.

    Returns where it went. Raises when neither took it, so nothing moves without a durable record.
    """
    settings = settings or get_settings()
    body = pending.to_json().encode()
    try:
        return put_bytes(settings, S3Location(settings.bucket, pending_key(pending.change)), body, "application/json")
    except Exception as exc:
        path = _local_pending(settings, pending.change)
        log.warning("intent of %s not stored in S3 (%s); keeping it in %s", pending.change.describe(), exc, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(body)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(path)
        return str(path)


def list_pending(model_name: str, settings: Settings | None = None) -> list[PendingChange]:
    """The unfinished changes of `model_name` (S3 and the local state folder), oldest first.

    Raises when S3 cannot be listed: deciding what happened on half the intents would be wrong.
    """
    settings = settings or get_settings()
    found: dict[str, PendingChange] = {}
    client = s3_client(settings)
    for key in list_keys(settings, S3Location(settings.bucket, pending_prefix(model_name)), (".json",)):
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        intent = PendingChange.from_json(body.decode())
        found[intent.change.id] = intent
    local = settings.state_dir.resolve() / pending_prefix(model_name)
    for path in sorted(local.glob("*.json")) if local.is_dir() else []:
        intent = PendingChange.from_json(path.read_text())
        found[intent.change.id] = intent
    return sorted(found.values(), key=lambda intent: intent.change.at)


def delete_pending(pending: PendingChange, settings: Settings | None = None) -> None:
    """Remove the intent of a finished (or abandoned) change, wherever it was stored."""
    settings = settings or get_settings()
    s3_client(settings).delete_object(Bucket=settings.bucket, Key=pending_key(pending.change))
    _local_pending(settings, pending.change).unlink(missing_ok=True)
