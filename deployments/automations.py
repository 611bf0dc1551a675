"""Alerts and drift retraining as Prefect automations (Prefect UI -> Automations), created by `mlops deploy`.

- `mlops-alert-run-failed`: a `training`, `monitoring`, `scoring` or `rollback` flow run ends Failed or
  Crashed -> a notification with the run's link and its error.
- `mlops-drift-retrain/<model>`, one per catalog model: the `mlops.drift.detected` event of that model
  (resource `mlops.model.<model>`, emitted by its monitoring once the cooldown allows a retrain) -> run
  `training/<model>` with its defaults plus the event's `dataset` and `reason` (templated parameters), and
  a notification with the summary, the reason and the links. So drift retrains exactly the model it was
  found on.
- `mlops-alert-champion-change`: `mlops.champion.promotion`, `.revert` or `.rollback` -> a notification with
  the versions, the reason, the actor and the model card link.
- `mlops-crash-zombie-runs`: a flow run that sent a heartbeat (`prefect.flow-run.heartbeat`, every
  `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` s; the stack's worker sets 30) and then neither another one nor a final
  state within `ZOMBIE_AFTER` -> the run is marked Crashed (its machine died: worker and run killed), which the
  run-failed alert then reports. Prefect's recipe "detect zombie flows"; always created.

Notifications go to the `mlops-alerts` webhook block (`adapters.alerts`), from `MLOPS_ALERT_WEBHOOK_URL`.
Without it the two alert-only automations are not created (and removed if an earlier deploy created them),
the webhook block is removed, and the drift automation only runs the training deployment; the events are
emitted all the same (Prefect UI -> Events).

Idempotent: an automation is found by name, created when missing, updated in place (same id) only when it
differs from the code, and left alone otherwise; one paused in the UI stays paused.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from adapters.alerts import (
    ALERT_ONLY_AUTOMATIONS,
    ALERTED_FLOWS,
    AUTOMATION_TAG,
    CHAMPION_AUTOMATION,
    CHAMPION_EVENT_PREFIX,
    DRIFT_AUTOMATION,
    DRIFT_EVENT,
    REFUSED_AUTOMATION,
    REFUSED_EVENT,
    ROLLOUT_AUTOMATION,
    ROLLOUT_EVENT_PREFIX,
    RUN_EVENTS,
    RUN_FAILED_AUTOMATION,
    delete_webhook_block,
    drift_automation_name,
    model_resource_id,
    save_webhook_block,
)
from adapters.settings import Settings

log = logging.getLogger(__name__)

# Message templates (Jinja, rendered by Prefect's server). They use only the triggering `event` and the `flow`
# it names, so `adapters.alerts.render` can render a message Prefect failed to deliver. `{ui}` and
# `{deployment_id}` are filled in at deploy time.
# Every message ends with its idempotency key, the id of the event that fired it: Prefect's trigger consumer is
# at-least-once (an event it retries may fire its action twice), so a receiver drops a key it has seen.
ALERT_ID = "\nalert id: {{ event.id }}"
RUN_FAILED_SUBJECT = (
    "[mlops] {{ flow.name }}{% for r in event.related %}{% if r['prefect.resource.role'] == 'deployment' %}"
    " of {{ r['prefect.resource.name'] }}{% endif %}{% endfor %} run {{ event.resource['prefect.resource.name'] }} "
    "{{ event.resource['prefect.state-name'] }}"
)
RUN_FAILED_BODY = (
    "error: {{ event.payload.validated_state.message }}\n"
    "run: {ui}/runs/flow-run/{{ event.resource['prefect.resource.id'] | replace('prefect.flow-run.', '') }}" + ALERT_ID
)
DRIFT_SUBJECT = "[mlops] drift on {{ event.payload.model }}: retraining started"
DRIFT_BODY = (
    "{{ event.payload.summary }}\n"
    "reason: {{ event.payload.reason }}\n"
    "retraining: deployment {{ event.payload.deployment }}, dataset {{ event.payload.dataset }}: "
    "{ui}/deployments/deployment/{deployment_id}\n"
    "monitoring run: {{ event.payload.monitoring_run_url or '-' }}\n"
    "report: {{ event.payload.report_link or '-' }}" + ALERT_ID
)
CHAMPION_SUBJECT = (
    "[mlops] {{ event.payload.model }}: {{ event.payload.kind }}, champion "
    "{{ ('v' ~ event.payload.from_version) if event.payload.from_version else 'none' }} -> "
    "{{ ('v' ~ event.payload.to_version) if event.payload.to_version else 'none' }}"
)
CHAMPION_BODY = (
    "reason: {{ event.payload.reason }}\n"
    "by: {{ event.payload.actor }} at {{ event.payload.at }}\n"
    "holdout metrics: {{ event.payload.metrics | tojson }}\n"
    "model card: {{ event.payload.model_card_link or '-' }}\n"
    "MLflow: {{ event.payload.mlflow_model_version or '-' }}\n"
    "Prefect run: {{ event.payload.prefect_flow_run or '-' }}" + ALERT_ID
)
REFUSED_SUBJECT = "[mlops] {{ event.payload.model }} v{{ event.payload.version }} refused by {{ event.payload.where }}"
REFUSED_BODY = "reason: {{ event.payload.reason }}" + ALERT_ID
ROLLOUT_SUBJECT = (
    "[mlops] {{ event.payload.model }} rollout: {{ event.payload.kind }}, challenger v{{ event.payload.version }} "
    "against champion v{{ event.payload.champion }}"
)
ROLLOUT_BODY = (
    "reason: {{ event.payload.reason }}\n"
    "by: {{ event.payload.actor }} at {{ event.payload.at }}\n"
    "live figures: {{ event.payload.figures | tojson }}" + ALERT_ID
)

ZOMBIE_AUTOMATION = "mlops-crash-zombie-runs"
# Three missed heartbeats at the stack's 30 s frequency (Prefect's recipe uses the same margin).
ZOMBIE_AFTER_SECONDS = 90

COMPARED = ("name", "description", "enabled", "tags", "trigger", "actions", "actions_on_trigger", "actions_on_resolve")


def _fill(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def drift_retrain_automation(
    model: str, training_deployment_id: UUID, training_defaults: dict[str, Any], block_id: UUID | None, ui_url: str
) -> Any:
    """Drift of `model` -> run its training deployment with the event's dataset and reason (and notify)."""
    from prefect.automations import AutomationCore, EventTrigger, RunDeployment, SendNotification

    # The deployment's own defaults, with the event's dataset and reason (templated, rendered per event).
    params = dict(training_defaults.get("params") or {}) | {
        "dataset": "{{ event.payload.dataset }}",
        "reason": "{{ event.payload.reason }}",
    }
    actions: list[Any] = [
        RunDeployment(source="selected", deployment_id=training_deployment_id, parameters={"params": params})
    ]
    if block_id is not None:
        body = _fill(DRIFT_BODY, ui=ui_url, deployment_id=str(training_deployment_id))
        actions.append(SendNotification(block_document_id=block_id, subject=DRIFT_SUBJECT, body=body))
    return AutomationCore(
        name=drift_automation_name(model),
        description=f"Drift or decay of {model} found by monitoring (outside the cooldown): run training/{model} "
        "with the event's dataset and reason" + (", and notify." if block_id else "."),
        tags=[AUTOMATION_TAG],
        trigger=EventTrigger(
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": model_resource_id(model)},
            posture="Reactive",
            threshold=1,
        ),
        actions=actions,
    )


def wanted_automations(
    training: dict[str, tuple[UUID, dict[str, Any]]], block_id: UUID | None, ui_url: str
) -> list[Any]:
    """The automations for these models (name -> training deployment id and defaults) and settings.

    The zombie-run one and one drift automation per model always; the alert-only ones with a webhook block.
    """
    from prefect.automations import AutomationCore, EventTrigger, SendNotification

    automations = [
        zombie_automation(),
        *(
            drift_retrain_automation(model, deployment_id, defaults, block_id, ui_url)
            for model, (deployment_id, defaults) in sorted(training.items())
        ),
    ]
    if block_id is None:
        return automations
    return [
        AutomationCore(
            name=RUN_FAILED_AUTOMATION,
            description=f"Notify when a run of {', '.join(ALERTED_FLOWS)} ends Failed or Crashed.",
            tags=[AUTOMATION_TAG],
            trigger=EventTrigger(
                expect=set(RUN_EVENTS),
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(ALERTED_FLOWS)},
                posture="Reactive",
                threshold=1,
            ),
            actions=[
                SendNotification(
                    block_document_id=block_id, subject=RUN_FAILED_SUBJECT, body=_fill(RUN_FAILED_BODY, ui=ui_url)
                )
            ],
        ),
        *automations,
        AutomationCore(
            name=CHAMPION_AUTOMATION,
            description="Notify when the champion alias moves: a promotion, a revert or a rollback.",
            tags=[AUTOMATION_TAG],
            trigger=EventTrigger(
                expect={CHAMPION_EVENT_PREFIX + "*"},
                match={"prefect.resource.id": "mlops.model.*"},
                posture="Reactive",
                threshold=1,
            ),
            actions=[SendNotification(block_document_id=block_id, subject=CHAMPION_SUBJECT, body=CHAMPION_BODY)],
        ),
        AutomationCore(
            name=REFUSED_AUTOMATION,
            description="Notify when a registered version's stored artifact is refused (not the one recorded).",
            tags=[AUTOMATION_TAG],
            trigger=EventTrigger(
                expect={REFUSED_EVENT},
                match={"prefect.resource.id": "mlops.model.*"},
                posture="Reactive",
                threshold=1,
            ),
            actions=[SendNotification(block_document_id=block_id, subject=REFUSED_SUBJECT, body=REFUSED_BODY)],
        ),
        AutomationCore(
            name=ROLLOUT_AUTOMATION,
            description="Notify at each step of a rollout: started, cut off, extended, promoted, rolled back.",
            tags=[AUTOMATION_TAG],
            trigger=EventTrigger(
                expect={ROLLOUT_EVENT_PREFIX + "*"},
                match={"prefect.resource.id": "mlops.model.*"},
                posture="Reactive",
                threshold=1,
            ),
            actions=[SendNotification(block_document_id=block_id, subject=ROLLOUT_SUBJECT, body=ROLLOUT_BODY)],
        ),
    ]


def zombie_automation() -> Any:
    """Mark Crashed a flow run whose heartbeats stopped without a final state (its process or machine died)."""
    from datetime import timedelta

    from prefect.automations import AutomationCore, EventTrigger
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run whose heartbeats stopped for {ZOMBIE_AFTER_SECONDS} s without a final state "
        "(its worker or machine died) is marked Crashed.",
        tags=[AUTOMATION_TAG],
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture="Proactive",
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {ZOMBIE_AFTER_SECONDS} s: the run's process (or machine) died",
            )
        ],
    )


def _fields(automation: Any) -> dict[str, Any]:
    return automation.model_dump(include=set(COMPARED))


def upsert(client: Any, wanted: Any) -> tuple[UUID, str]:
    """Create `wanted` or bring the automation of that name in line (in place); returns its id and what was done.

    A duplicate of the same name (e.g. made by hand) is removed; an automation paused in the UI stays paused.
    """
    found = client.read_automations_by_name(wanted.name)  # the most recently updated first
    if not found:
        return client.create_automation(wanted), "created"
    current, *duplicates = found
    for duplicate in duplicates:
        client.delete_automation(duplicate.id)
    wanted = wanted.model_copy(update={"enabled": current.enabled})
    if _fields(current) == _fields(wanted):
        return current.id, "unchanged" if not duplicates else "duplicates removed"
    client.update_automation(current.id, wanted)
    return current.id, "updated"


def remove(client: Any, name: str) -> bool:
    """Delete every automation called `name`; True when there was one."""
    found = client.read_automations_by_name(name)
    for automation in found:
        client.delete_automation(automation.id)
    return bool(found)


def remove_model_automations(model: str) -> bool:
    """Delete a model's drift automation (its model left the catalog); True when there was one."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return remove(client, drift_automation_name(model))


def deploy_automations(training: dict[str, UUID], settings: Settings) -> dict[str, str]:
    """Create or update the project's automations (and the webhook block); returns automation name -> id.

    `training` maps each catalog model to its training deployment's id. The legacy single drift automation
    (`mlops-drift-retrain`, which retrained one deployment on any model's drift) is removed.
    """
    from prefect.client.orchestration import get_client

    url = settings.alert_webhook_url
    if url is not None and not url.get_secret_value():
        url = None
    block_id = save_webhook_block(url) if url is not None else None
    with get_client(sync_client=True) as client:
        defaults = {
            model: (deployment_id, client.read_deployment(deployment_id).parameters or {})
            for model, deployment_id in training.items()
        }
        remove(client, DRIFT_AUTOMATION)
        ids = {}
        for automation in wanted_automations(defaults, block_id, settings.prefect_ui_url):
            automation_id, done = upsert(client, automation)
            ids[automation.name] = str(automation_id)
            log.info(
                "automation %s: %s (%s/automations/automation/%s)",
                automation.name,
                done,
                settings.prefect_ui_url,
                automation_id,
            )
        if block_id is None:
            removed = [name for name in ALERT_ONLY_AUTOMATIONS if remove(client, name)]
            log.warning(
                "MLOPS_ALERT_WEBHOOK_URL is not set: no notifications. The alert-only automations %s are not "
                "created%s; drift still retrains, and the events are emitted (Prefect UI -> Events).",
                ", ".join(ALERT_ONLY_AUTOMATIONS),
                f" (removed: {', '.join(removed)})" if removed else "",
            )
    if block_id is None:
        delete_webhook_block()
    return ids
