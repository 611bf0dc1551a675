"""Champion history: every move of the `champion` alias, as one JSON object per change in S3.

Each change (a promotion, a revert of a promotion the serving API did not confirm, a rollback) is written
to `s3://<bucket>/history/<model>/<sortable UTC timestamp>-<uuid>.json`, so the history survives restarts,
is ordered by its keys, and an append never rewrites an earlier record. `mlops history` lists it.
"""

from __future__ import annotations

import getpass
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import run_holdout_metrics
from adapters.settings import Settings, get_settings

log = logging.getLogger(__name__)

PREFIX = "history"
ChangeKind = Literal["promotion", "rollback", "revert"]


@dataclass(frozen=True)
class ChampionChange:
    """One move of the `champion` alias of a registered model.

    Attributes:
        at: When (UTC, ISO 8601 with microseconds).
        model: Registered model name.
        from_version: Champion before the change (None: there was none).
        to_version: Champion after the change (None: the alias was removed, e.g. a reverted cold start).
        kind: `promotion`, `rollback` or `revert`.
        reason: Why (the promotion decision and the run's reason, the rollback reason, ...).
        actor: Who (an OS user, a Prefect flow run, `prefect-ui`).
        metrics: Holdout metrics of the new champion (empty when there is none).
        run_id: MLflow run of the new champion.
        links: Name -> URL (MLflow model version, Prefect flow run).
        id: Unique id of the record.
    """

    at: str
    model: str
    from_version: str | None
    to_version: str | None
    kind: ChangeKind
    reason: str
    actor: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    links: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChampionChange:
        """Parse a stored record (unknown keys of later versions are ignored)."""
        raw = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def describe(self) -> str:
        """One line for people: `2026-11-24T13:00:00Z promotion v1 -> v2 by alice: reason`."""
        before = f"v{self.from_version}" if self.from_version else "none"
        after = f"v{self.to_version}" if self.to_version else "none"
        return f"{self.at} {self.kind} {before} -> {after} by {self.actor}: {self.reason}"


def history_prefix(model_name: str) -> str:
    """Key prefix of a model's history."""
    return f"{PREFIX}/{model_name}/"


def record_key(change: ChampionChange) -> str:
    """Object key of a change: sortable by time, unique by the record id."""
    stamp = datetime.fromisoformat(change.at).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{history_prefix(change.model)}{stamp}-{change.id}.json"


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
    """`record_change`, but a failure is logged loudly and returns None: the alias move it records stands."""
    try:
        return record_change(change)
    except Exception:
        log.exception(
            "HISTORY NOT RECORDED for %s (%s v%s -> v%s): the change itself stands; record it by hand if needed",
            change.model,
            change.kind,
            change.from_version,
            change.to_version,
        )
        return None


def list_changes(model_name: str, settings: Settings | None = None) -> list[ChampionChange]:
    """Every recorded champion change of `model_name`, oldest first (empty when there is none)."""
    settings = settings or get_settings()
    client = s3_client(settings)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=settings.bucket, Prefix=history_prefix(model_name)
    ):
        keys += [obj["Key"] for obj in page.get("Contents", []) if obj["Key"].endswith(".json")]
    changes = []
    for key in sorted(keys):
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        try:
            changes.append(ChampionChange.from_json(body.decode()))
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable history record s3://%s/%s: %s", settings.bucket, key, exc)
    return changes


def history_table(changes: list[ChampionChange], metric: str = "roc_auc") -> list[dict[str, Any]]:
    """Rows for display: when, kind, from, to, the new champion's metric, actor, reason."""
    return [
        {
            "at": change.at[:19].replace("T", " "),
            "kind": change.kind,
            "from": f"v{change.from_version}" if change.from_version else "-",
            "to": f"v{change.to_version}" if change.to_version else "-",
            metric: f"{change.metrics[metric]:.4f}" if metric in change.metrics else "",
            "actor": change.actor,
            "reason": change.reason,
        }
        for change in changes
    ]
