"""Retraining on drift: run the training deployment, once per cooldown, under a one-slot lock per model.

Prefect-specific (its client, global concurrency limits and `run_deployment`); monitoring's flow calls
the `trigger-retraining` task defined here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prefect import task

from core.drift import MonitoringError
from tasks.retrying import IO

log = logging.getLogger(__name__)

DRIFT_TAG = "drift-triggered"
LOCK_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Trigger:
    """What happened to the retraining: `triggered`, `cooldown` (skipped) or `disabled`."""

    status: Literal["triggered", "cooldown", "disabled", "not-needed"]
    detail: str
    flow_run_id: str | None = None


def model_tag(model_name: str) -> str:
    """Prefect tag naming the model a drift-triggered run retrains."""
    return f"model:{model_name}"


def lock_name(model_name: str) -> str:
    """The one-slot global concurrency limit that check-and-trigger holds: `drift-trigger-<model>`."""
    return f"drift-trigger-{model_name}"


def blocking_runs(runs: list[Any], since: datetime) -> list[Any]:
    """Drift-triggered runs that keep a new trigger back: started (or due) since `since`, or not finished yet."""
    return [
        run
        for run in runs
        if (run.expected_start_time is not None and run.expected_start_time >= since)
        or (run.state is not None and not run.state.is_final())
    ]


def start_retraining(model_name: str, dataset: str, reason: str, cooldown_minutes: float, deployment: str) -> Trigger:
    """Start a run of the training deployment, unless one was drift-triggered within the cooldown.

    Any drift-triggered run of this model due within `cooldown_minutes` blocks a new one whatever its
    state (a failed retrain is not retried by the next check: a person should look), and so does one that
    has not finished. Check and trigger hold a one-slot lock per model, so two checks at once start one run.
    The run gets the deployment's default parameters with `dataset` and `reason` set, and the tags
    `drift-triggered` and `model:<name>`.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    tags = [DRIFT_TAG, model_tag(model_name)]
    lock = lock_name(model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(lock, limit=1)
    with concurrency(lock, occupy=1, strict=True, timeout_seconds=LOCK_TIMEOUT_SECONDS):
        since = datetime.now(UTC) - timedelta(minutes=cooldown_minutes)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=50,
            )
            blocking = blocking_runs(runs, since)
            if blocking:
                run = blocking[0]
                detail = (
                    f"cooldown: drift-triggered run {run.name} ({run.id}, {run.state_name}) of {model_name} is within "
                    f"the last {cooldown_minutes:g} min or unfinished; not starting another"
                )
                log.warning("%s", detail)
                return Trigger("cooldown", detail, str(run.id))
            try:
                defaults = client.read_deployment_by_name(deployment).parameters or {}
            except ObjectNotFound as exc:
                raise MonitoringError(
                    f"deployment {deployment!r} not found on {client.api_url}: deploy it (`mlops deploy`) to retrain"
                ) from exc
        params = dict(defaults.get("params") or {}) | {"dataset": dataset, "reason": reason[:500]}
        run = run_deployment(deployment, parameters={"params": params}, tags=tags, timeout=0)
    detail = f"started {deployment} run {run.name} ({run.id}): {reason}"
    log.info("%s", detail)
    return Trigger("triggered", detail, str(run.id))


@task(name="trigger-retraining", **IO)
def trigger_retraining(model_name: str, dataset: str, reason: str, cooldown_minutes: float, deployment: str) -> Trigger:
    """Prefect task: `start_retraining` (the training deployment, once per cooldown, under the model's lock)."""
    return start_retraining(model_name, dataset, reason, cooldown_minutes, deployment)
