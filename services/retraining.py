"""Retraining on drift: emit the drift event once per cooldown, under a one-slot lock per model.

The training run itself is started by Prefect: the `mlops-drift-retrain` automation (created by
`mlops deploy`, `deployments/automations.py`) runs the training deployment on every `mlops.drift.detected`
event, with the event's dataset and reason as parameters. This module decides whether the event may be
emitted (the cooldown), emits it, and waits for the run the automation started, so the run can be tagged
(`drift-triggered`, `model:<name>`: what the cooldown looks for) before the lock is released.
Prefect-specific (its client, global concurrency limits, events); monitoring's flow calls the
`trigger-retraining` task defined here.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import task

from adapters.alerts import DriftAlert, drift_automation_name, emit_drift
from core.monitoring.drift import MonitoringError
from core.monitoring.drift_analysis import RetrainScope, Verdict
from core.monitoring.retraining import (
    RetrainRequest,
    Trigger,
    already_retrained_trigger,
    cooldown_trigger,
    retrain_rule,
)
from tasks.retrying import IO

log = logging.getLogger(__name__)

DRIFT_TAG = "drift-triggered"
LOCK_TIMEOUT_SECONDS = 300
# How long to wait for the automation's run after the drift event (it takes about a second).
RUN_WAIT_SECONDS = 120


def model_tag(model_name: str) -> str:
    """Prefect tag naming the model a drift-triggered run retrains."""
    return f"model:{model_name}"


def window_tag(window_key: str) -> str:
    """Prefect tag naming the drifted data a drift-triggered run retrained on (`RetrainScope.window_key`)."""
    return f"drift-window:{window_key}"


def lock_name(model_name: str) -> str:
    """The one-slot global concurrency limit that check-and-trigger holds: `drift-trigger-<model>`."""
    return f"drift-trigger-{model_name}"


def drift_automation(client: Any, deployment_id: Any, deployment: str, model_name: str) -> Any:
    """The model's drift automation, checked to run `deployment`; MonitoringError naming the fix otherwise."""
    from prefect.events.actions import RunDeployment

    name = drift_automation_name(model_name)
    found = client.read_automations_by_name(name)
    if not found:
        raise MonitoringError(
            f"automation {name!r} not found on {client.api_url}: add {model_name} to the catalog "
            f"(`mlops models add`) and create its deployments (`mlops deploy`) to retrain"
        )
    automation = found[0]
    targets = [a.deployment_id for a in automation.actions if isinstance(a, RunDeployment)]
    if deployment_id not in targets:
        raise MonitoringError(
            f"automation {name!r} does not run deployment {deployment!r} ({deployment_id}) but "
            f"{[str(t) for t in targets]}: redeploy (`mlops deploy`) or monitor with the deployment it runs"
        )
    return automation


def started_run(client: Any, deployment_id: Any, automation_id: Any, reason: str, since: datetime) -> Any | None:
    """The run of the deployment the drift automation created since `since` with this reason, if any."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=20,
    )
    for run in runs:
        made_by = run.created_by
        if (
            made_by is not None
            and made_by.type == "AUTOMATION"
            and made_by.id == automation_id
            and run.created is not None
            and run.created >= since
            and (run.parameters.get("params") or {}).get("reason") == reason
        ):
            return run
    return None


def wait_for_started_run(deployment_id: Any, automation: Any, reason: str, since: datetime) -> Any:
    """Poll for the automation's run; MonitoringError (not retried: the event is out) when none shows up."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_WAIT_SECONDS
    problem = "no run yet"
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                run = started_run(client, deployment_id, automation.id, reason, since)
            except Exception as exc:  # a transient API error: keep waiting, never emit again
                problem = repr(exc)
                run = None
            if run is not None:
                return run
            time.sleep(0.5)
    raise MonitoringError(
        f"the drift event was emitted but automation {automation.name!r} started no training run within "
        f"{RUN_WAIT_SECONDS} s ({problem}); see Prefect UI -> Automations and Events. Not retried, so that a "
        "late run is not doubled."
    )


def retrain_if_needed(verdict: Verdict, scope: RetrainScope, request: RetrainRequest, enabled: bool) -> Trigger:
    """Apply the trigger rule (`core.monitoring.retraining.retrain_rule`); retrain when it says so."""
    held_back = retrain_rule(verdict, scope, request, enabled)
    if held_back is None:
        return trigger_retraining(request)
    if held_back.status == "outside-source":
        log.warning("%s", held_back.detail)
    return held_back


def start_retraining(request: RetrainRequest) -> Trigger:
    """Emit the drift event (the automation then runs the deployment), unless a retrain is within the cooldown.

    With `window_key` (the drifted data's key, `RetrainScope.window_key`), a drift-triggered run of this
    model that already retrained on the same data, whenever it ran, also holds a new one back
    (`already-retrained`): retraining on unchanged data would not change the verdict, and the drift would
    fire again after every cooldown. The started run is tagged with the key.

    Any drift-triggered run of this model due within `cooldown_minutes` blocks a new one whatever its
    state (a failed retrain is not retried by the next check: a person should look), and so does one that
    has not finished. Check, event and tagging hold a one-slot lock per model, so two checks at once start
    one run. The automation runs the deployment with the defaults `mlops deploy` gave it plus the event's
    `dataset` and `reason`; the run is then tagged `drift-triggered` and `model:<name>`.
    With the automation paused in the Prefect UI the event is still emitted (visible under Events) and
    nothing starts (`disabled`).
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    lock = lock_name(request.model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(lock, limit=1)
    with concurrency(lock, occupy=1, strict=True, timeout_seconds=LOCK_TIMEOUT_SECONDS):
        with get_client(sync_client=True) as client:
            held_back = _held_back(client, request)
            if held_back is not None:
                log.warning("%s", held_back.detail)
                return held_back
            target, automation = _target(client, request)
            # the server's clock stamps the run; allow for a skew between the two clocks
            emitted_at = datetime.now(UTC) - timedelta(seconds=30)
        event = emit_drift(
            DriftAlert(
                request.model_name,
                request.dataset,
                request.summary,
                request.reason,
                request.deployment,
                request.report_link,
            )
        )
        if event is None:
            raise MonitoringError("Prefect emits no events here (no API configured?): cannot trigger retraining")
        if not automation.enabled:
            detail = (
                f"drift event {event.id} emitted, but automation {automation.name!r} is paused (Prefect UI -> "
                "Automations): no retraining started"
            )
            log.warning("%s", detail)
            return Trigger("disabled", detail)
        run = wait_for_started_run(target.id, automation, request.reason, emitted_at)
        _tag(run, request)
    detail = (
        f"drift event {event.id}: {automation.name} started {request.deployment} run {run.name} ({run.id}): "
        f"{request.reason}"
    )
    log.info("%s", detail)
    return Trigger("triggered", detail, str(run.id))


def _tags(request: RetrainRequest) -> list[str]:
    return [DRIFT_TAG, model_tag(request.model_name)]


def _held_back(client: Any, request: RetrainRequest) -> Trigger | None:
    """The cooldown, then the already-retrained rule, on the model's drift-triggered runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    def runs(tags: list[str], limit: int) -> list[Any]:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )

    since = datetime.now(UTC) - timedelta(minutes=request.cooldown_minutes)
    cooldown = cooldown_trigger(runs(_tags(request), 50), since, request)
    if cooldown is not None or request.window_key is None:
        return cooldown
    return already_retrained_trigger(runs([*_tags(request), window_tag(request.window_key)], 1), request)


def _target(client: Any, request: RetrainRequest) -> tuple[Any, Any]:
    """The training deployment and the model's drift automation that runs it (checked)."""
    from prefect.exceptions import ObjectNotFound

    try:
        target = client.read_deployment_by_name(request.deployment)
    except ObjectNotFound as exc:
        raise MonitoringError(
            f"deployment {request.deployment!r} not found on {client.api_url}: deploy it (`mlops deploy`) to retrain"
        ) from exc
    return target, drift_automation(client, target.id, request.deployment, request.model_name)


def _tag(run: Any, request: RetrainRequest) -> None:
    """Tag the started run drift-triggered, with its model and drifted data (what the cooldown looks for)."""
    from prefect.client.orchestration import get_client

    marks = {*_tags(request), *([window_tag(request.window_key)] if request.window_key is not None else [])}
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, tags=sorted(set(run.tags) | marks))
    except Exception as exc:  # the event is out: a retry would start a second run
        raise MonitoringError(
            f"training run {run.name} ({run.id}) started but not tagged {sorted(marks)}: {exc}"
        ) from exc


@task(name="trigger-retraining", **IO)
def trigger_retraining(request: RetrainRequest) -> Trigger:
    """Prefect task: `start_retraining` (the drift event, once per cooldown and drifted data, under the lock)."""
    return start_retraining(request)
