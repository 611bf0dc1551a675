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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prefect import task

from adapters.alerts import DriftAlert, drift_automation_name, emit_drift
from core.drift import MonitoringError
from core.drift_analysis import RetrainScope
from tasks.retrying import IO

log = logging.getLogger(__name__)

DRIFT_TAG = "drift-triggered"
LOCK_TIMEOUT_SECONDS = 300
# How long to wait for the automation's run after the drift event (it takes about a second).
RUN_WAIT_SECONDS = 120


@dataclass(frozen=True)
class Trigger:
    """What happened to the retraining: `triggered`, or why not.

    `cooldown`, `disabled`, `not-needed`, `outside-source` (the drifted data is not in what training reads)
    or `already-retrained` (a drift-triggered run already retrained on the same drifted data).
    """

    status: Literal["triggered", "cooldown", "disabled", "not-needed", "outside-source", "already-retrained"]
    detail: str
    flow_run_id: str | None = None


def model_tag(model_name: str) -> str:
    """Prefect tag naming the model a drift-triggered run retrains."""
    return f"model:{model_name}"


def window_tag(window_key: str) -> str:
    """Prefect tag naming the drifted data a drift-triggered run retrained on (`RetrainScope.window_key`)."""
    return f"drift-window:{window_key}"


def outside_source(scope: RetrainScope) -> Trigger:
    """No retraining: every drifted window is outside the training source, so a retrain would not see it."""
    log.warning("%s", scope.note)
    return Trigger("outside-source", scope.note)


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


def start_retraining(
    model_name: str,
    dataset: str,
    reason: str,
    cooldown_minutes: float,
    deployment: str,
    summary: str = "",
    report_link: str | None = None,
    window_key: str | None = None,
) -> Trigger:
    """Emit the drift event (the automation then runs `deployment`), unless a retrain is within the cooldown.

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
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    tags = [DRIFT_TAG, model_tag(model_name)]
    lock = lock_name(model_name)
    reason = reason[:500]  # TrainingParams.reason's limit
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
            if window_key is not None:
                earlier = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[*tags, window_tag(window_key)])),
                    sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                    limit=1,
                )
                if earlier:
                    run = earlier[0]
                    detail = (
                        f"not retraining: drift-triggered run {run.name} ({run.id}, {run.state_name}) of {model_name} "
                        f"already retrained on this drifted data (window {window_key}); new data is needed"
                    )
                    log.warning("%s", detail)
                    return Trigger("already-retrained", detail, str(run.id))
            try:
                target = client.read_deployment_by_name(deployment)
            except ObjectNotFound as exc:
                raise MonitoringError(
                    f"deployment {deployment!r} not found on {client.api_url}: deploy it (`mlops deploy`) to retrain"
                ) from exc
            automation = drift_automation(client, target.id, deployment, model_name)
            # the server's clock stamps the run; allow for a skew between the two clocks
            emitted_at = datetime.now(UTC) - timedelta(seconds=30)
        event = emit_drift(DriftAlert(model_name, dataset, summary, reason, deployment, report_link))
        if event is None:
            raise MonitoringError("Prefect emits no events here (no API configured?): cannot trigger retraining")
        if not automation.enabled:
            detail = (
                f"drift event {event.id} emitted, but automation {automation.name!r} is paused (Prefect UI -> "
                "Automations): no retraining started"
            )
            log.warning("%s", detail)
            return Trigger("disabled", detail)
        run = wait_for_started_run(target.id, automation, reason, emitted_at)
        try:
            with get_client(sync_client=True) as client:
                marks = {*tags, *([window_tag(window_key)] if window_key is not None else [])}
                client.update_flow_run(run.id, tags=sorted(set(run.tags) | marks))
        except Exception as exc:  # the event is out: a retry would start a second run
            raise MonitoringError(f"training run {run.name} ({run.id}) started but not tagged {tags}: {exc}") from exc
    detail = f"drift event {event.id}: {automation.name} started {deployment} run {run.name} ({run.id}): {reason}"
    log.info("%s", detail)
    return Trigger("triggered", detail, str(run.id))


@task(name="trigger-retraining", **IO)
def trigger_retraining(
    model_name: str,
    dataset: str,
    reason: str,
    cooldown_minutes: float,
    deployment: str,
    summary: str = "",
    report_link: str | None = None,
    window_key: str | None = None,
) -> Trigger:
    """Prefect task: `start_retraining` (the drift event, once per cooldown and drifted data, under the lock)."""
    return start_retraining(model_name, dataset, reason, cooldown_minutes, deployment, summary, report_link, window_key)
