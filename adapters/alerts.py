"""Alerts: the Prefect events the project emits, the webhook block its automations notify, and missed alerts.

Events (Prefect UI -> Events, emitted whether or not a webhook is configured), on the resource
`mlops.model.<name>`:
- `mlops.drift.detected`: monitoring found drift or decay and a retrain may start (the cooldown was
  checked first); payload: model, dataset, summary, reason, the training deployment, the monitoring run and
  report links. The model's `mlops-drift-retrain/<model>` automation runs `training/<model>` with it.
- `mlops.model.refused`: a process refused to load a registered version because its stored artifact is not
  the one training recorded (payload: model, version, reason, where: serving, scoring, training, ...).
- `mlops.rollout.<step>` (started, replaced, waiting, cut_off, extended, promoted, rolled_back): a step of a
  rollout (`adapters/rollout_store.py`); payload: model, version, champion, reason, actor, the live figures.
- `mlops.champion.promotion`, `mlops.champion.revert`, `mlops.champion.rollback`: the `champion` alias moved;
  payload: the versions, reason, actor, the new champion's holdout metrics, the model card and links.
  Emitted best-effort: a failure to emit is logged and never undoes the alias move.

The automations (`deployments/automations.py`, created by `mlops deploy`) notify the webhook block
`mlops-alerts` (a Prefect "Custom Webhook" block posting Slack-compatible JSON `{"text": ...}`; the URL is
kept in the block's secrets, from `MLOPS_ALERT_WEBHOOK_URL`). Their message templates use only the
triggering `event` and the `flow` it names, so a message Prefect failed to deliver can be rendered again here
(`undelivered_alerts`, `redeliver`): Prefect does not retry a notification whose endpoint was down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import SecretStr

from adapters.clients import s3_client
from adapters.settings import Settings, get_settings
from core.promotion.history import ChampionChange

log = logging.getLogger(__name__)

DRIFT_EVENT = "mlops.drift.detected"
CHAMPION_EVENT_PREFIX = "mlops.champion."
RUN_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
# Flows whose Failed or Crashed runs are alerted.
ALERTED_FLOWS = ("training", "monitoring", "scoring", "rollback", "rollout")

WEBHOOK_BLOCK = "mlops-alerts"
RUN_FAILED_AUTOMATION = "mlops-alert-run-failed"
DRIFT_AUTOMATION = "mlops-drift-retrain"
CHAMPION_AUTOMATION = "mlops-alert-champion-change"
REFUSED_EVENT = "mlops.model.refused"
REFUSED_AUTOMATION = "mlops-alert-model-refused"
ROLLOUT_EVENT_PREFIX = "mlops.rollout."
ROLLOUT_AUTOMATION = "mlops-alert-rollout"
ALERT_ONLY_AUTOMATIONS = (RUN_FAILED_AUTOMATION, CHAMPION_AUTOMATION, REFUSED_AUTOMATION, ROLLOUT_AUTOMATION)
AUTOMATION_TAG = "prefect-mlops"

CARD_LINK_SECONDS = 7 * 24 * 3600  # presigned model-card links last a week, like the monitoring report's


def drift_automation_name(model_name: str) -> str:
    """The drift automation of one catalog model: `mlops-drift-retrain/<model>` (runs `training/<model>`)."""
    return f"{DRIFT_AUTOMATION}/{model_name}"


def model_resource_id(model_name: str) -> str:
    """The Prefect event resource of a registered model: `mlops.model.<name>`."""
    return f"mlops.model.{model_name}"


def _model_resource(model_name: str) -> dict[str, str]:
    return {"prefect.resource.id": model_resource_id(model_name), "prefect.resource.name": model_name}


def prefect_api_configured() -> bool:
    """True when Prefect's client points at a server (events need one; without it none is started)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _current_run_url(settings: Settings) -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return f"{settings.prefect_ui_url}/runs/flow-run/{run_id}" if run_id else None


def emit(event: str, model_name: str, payload: dict[str, Any], related: list[dict[str, str]] | None = None) -> Any:
    """Emit one event on `mlops.model.<name>`; returns the Event, or None when Prefect emits no events.

    Inside a flow run Prefect adds the run, flow, deployment and tags as related resources.
    """
    from prefect.events import emit_event

    if not prefect_api_configured():
        log.warning("no Prefect API configured (PREFECT_API_URL): event %s of %s not emitted", event, model_name)
        return None
    return emit_event(event, resource=_model_resource(model_name), payload=payload, related=related or [])


def emit_refused(model_name: str, version: str, reason: str, where: str) -> Any:
    """Emit `mlops.model.refused` (a stored artifact failed its checks); best-effort: a failure is logged."""
    payload = {"model": model_name, "version": version, "reason": reason[:2000], "where": where}
    try:
        return emit(REFUSED_EVENT, model_name, payload)
    except Exception as exc:  # the refusal itself stands; only its alert is lost
        log.error("could not emit %s for %s v%s: %s", REFUSED_EVENT, model_name, version, exc)
        return None


@dataclass(frozen=True)
class DriftAlert:
    """What the drift event carries (the automation passes `dataset` and `reason` to the training run)."""

    model: str
    dataset: str
    summary: str
    reason: str
    deployment: str
    report_link: str | None = None


def emit_drift(alert: DriftAlert, settings: Settings | None = None) -> Any:
    """Emit `mlops.drift.detected`; returns the Event (None: not emitted). Not best-effort: the caller checks."""
    settings = settings or get_settings()
    payload = {
        "model": alert.model,
        "dataset": alert.dataset,
        "summary": alert.summary,
        "reason": alert.reason,
        "deployment": alert.deployment,
        "monitoring_run_url": _current_run_url(settings),
        "report_link": alert.report_link,
    }
    return emit(DRIFT_EVENT, alert.model, payload)


def card_location(settings: Settings, model_name: str, version: str) -> tuple[str, str]:
    """The HTML model card of a version: its S3 URI and a presigned link (7 days).

    The key is the one `tasks/reports.py` writes (`model-cards/<model>/<version>/model_card.html`); at a
    promotion the card is written at the end of the run, so the link works once the run has finished.
    """
    key = f"model-cards/{model_name}/{version}/model_card.html"
    link = s3_client(settings).generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": key}, ExpiresIn=CARD_LINK_SECONDS
    )
    return f"s3://{settings.bucket}/{key}", link


def champion_payload(change: ChampionChange, history_uri: str | None, settings: Settings) -> dict[str, Any]:
    """The payload of a champion-change event (versions, reason, actor, metrics, model card and links)."""
    card_uri, card_link = (
        card_location(settings, change.model, change.to_version) if change.to_version else (None, None)
    )
    return {
        "model": change.model,
        "kind": change.kind,
        "from_version": change.from_version,
        "to_version": change.to_version,
        "reason": change.reason,
        "actor": change.actor,
        "at": change.at,
        "metrics": change.metrics,
        "model_card": card_uri,
        "model_card_link": card_link,
        "mlflow_model_version": change.links.get("mlflow_model_version"),
        "prefect_flow_run": change.links.get("prefect_flow_run"),
        "history": history_uri,
        "change_id": change.id,
    }


def announce_change(change: ChampionChange, history_uri: str | None = None) -> None:
    """Emit `mlops.champion.<kind>` for a move of the champion alias; best-effort (a failure is only logged)."""
    try:
        settings = get_settings()
        emit(CHAMPION_EVENT_PREFIX + change.kind, change.model, champion_payload(change, history_uri, settings))
    except Exception:
        log.exception(
            "ALERT EVENT NOT EMITTED for %s (%s v%s -> v%s): the change itself stands",
            change.model,
            change.kind,
            change.from_version,
            change.to_version,
        )


# --- the webhook block -------------------------------------------------------------------------------------

SLACK_JSON = {"text": "{{subject}}\n{{body}}"}


def _webhook_block(url: SecretStr) -> Any:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    # The URL (which may carry a token) lives in the block's secrets, shown obfuscated in the UI and the API.
    return CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK,
        url="{{webhook_url}}",
        method="POST",
        json_data=SLACK_JSON,
        secrets={"webhook_url": url.get_secret_value()},
        timeout=10,
    )


def save_webhook_block(url: SecretStr) -> UUID:
    """Create or update (in place, only when it differs) the `mlops-alerts` block; returns its document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    wanted = _webhook_block(url)
    try:
        current = CustomWebhookNotificationBlock.load(WEBHOOK_BLOCK)
    except ValueError:  # no such block yet
        current = None
    if current is not None and _same_block(current, wanted):
        return current._block_document_id
    block_id = wanted.save(WEBHOOK_BLOCK, overwrite=True)
    log.info("webhook block %r %s", WEBHOOK_BLOCK, "updated" if current is not None else "created")
    return block_id


def _same_block(current: Any, wanted: Any) -> bool:
    def fields(block: Any) -> dict[str, Any]:
        data = block.model_dump(exclude={"secrets"})
        return {k: v for k, v in data.items() if not k.startswith("_")} | {"secrets": block.secrets.get_secret_value()}

    return fields(current) == fields(wanted)


def delete_webhook_block() -> bool:
    """Remove the `mlops-alerts` block (no webhook configured any more); True when there was one."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(WEBHOOK_BLOCK, block_type_slug="custom-webhook")
        except ObjectNotFound:
            return False
        client.delete_block_document(document.id)
    log.info("webhook block %r removed (MLOPS_ALERT_WEBHOOK_URL is not set)", WEBHOOK_BLOCK)
    return True


# --- alerts Prefect did not deliver ------------------------------------------------------------------------


@dataclass(frozen=True)
class MissedAlert:
    """A notification an automation was triggered for but never delivered (no `action.executed` recorded)."""

    automation: str
    automation_resource: str
    event: str
    occurred: datetime
    triggering_event: dict[str, Any]
    subject: str
    body: str


def render(template: str, triggering_event: dict[str, Any]) -> str:
    """Render an automation's message template from its triggering event, as Prefect's server does.

    The project's templates use only `event` and `flow` (the flow named by the event), so this context is
    enough; anything else renders empty, as undefined values do on the server.
    """
    from jinja2 import ChainableUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    related = triggering_event.get("related") or []
    flow_name = next(
        (r.get("prefect.resource.name") for r in related if r.get("prefect.resource.role") == "flow"), None
    )
    environment = ImmutableSandboxedEnvironment(undefined=ChainableUndefined)
    return environment.from_string(template).render(event=triggering_event, flow={"name": flow_name})


def _read_events(client: Any, names: list[str], resource_ids: list[str] | None, since: datetime) -> list[Any]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=names),
            resource=EventResourceFilter(id=resource_ids) if resource_ids else None,
        ),
        limit=50,  # the API's largest page
    )
    events = list(page.events)
    while page.next_page:
        page = client.read_events_page(page.next_page)
        events += page.events
    return events


TRIGGERING = "triggering-event"


def _triggering_event_id(event: Any) -> str | None:
    for related in event.related:
        if related.role == TRIGGERING:
            return related.id.removeprefix("prefect.event.")
    return None


REDELIVERED_EVENT = "mlops.alert.redelivered"


def undelivered_alerts(since: datetime, grace: timedelta = timedelta(seconds=30)) -> list[MissedAlert]:
    """Notifications of the project's automations triggered since `since` that were never delivered.

    Prefect records `prefect.automation.triggered` (with the triggering event) for every firing, and
    `prefect.automation.action.executed` once a notification was sent; a notification whose endpoint was
    down is tried a few times at once and then dropped (dead-lettered on the server), without an event of
    its own. A firing older than `grace` whose notification has neither an `executed` event nor an
    `mlops.alert.redelivered` one is returned, with the message rendered from the automation's own templates.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification

    with get_client(sync_client=True) as client:
        notifying = {}
        for automation in client.read_automations():
            name = automation.name
            if name not in ALERT_ONLY_AUTOMATIONS and not name.startswith(DRIFT_AUTOMATION):
                continue
            actions = [a for a in automation.actions if isinstance(a, SendNotification)]
            if actions:
                notifying[f"prefect.automation.{automation.id}"] = (name, actions[0])
        if not notifying:
            return []
        ids = list(notifying)
        fired = _read_events(client, ["prefect.automation.triggered"], ids, since)
        done = _read_events(client, ["prefect.automation.action.executed"], ids, since)
        resent = _read_events(client, [REDELIVERED_EVENT], None, since)
    delivered = {
        (event.resource.id, _triggering_event_id(event))
        for event in done
        if event.payload.get("action_type") == "send-notification"
    } | {(event.payload.get("automation_resource"), _triggering_event_id(event)) for event in resent}
    cutoff = datetime.now(UTC) - grace
    missed, seen = [], set()
    for event in fired:
        trigger = event.payload.get("triggering_event") or {}
        key = (event.resource.id, trigger.get("id"))
        # one alert per automation and triggering event (its idempotency key): Prefect may record a firing twice
        if key in delivered or key in seen or event.occurred > cutoff:
            continue
        seen.add(key)
        name, action = notifying[event.resource.id]
        missed.append(
            MissedAlert(
                automation=name,
                automation_resource=event.resource.id,
                event=str(trigger.get("event")),
                occurred=event.occurred,
                triggering_event=trigger,
                subject=render(action.subject, trigger),
                body=render(action.body, trigger),
            )
        )
    return sorted(missed, key=lambda alert: alert.occurred)


def redeliver(alerts: list[MissedAlert]) -> int:
    """Send missed alerts through the `mlops-alerts` block, marked `[redelivered]`; returns how many were sent.

    Each one sent is recorded as an `mlops.alert.redelivered` event, so `undelivered_alerts` stops listing it.
    A failure to send raises (what was sent before it stays recorded).
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events import emit_event

    block = CustomWebhookNotificationBlock.load(WEBHOOK_BLOCK)
    for alert in alerts:
        block.notify(body=alert.body, subject=f"[redelivered] {alert.subject}")
        trigger_id = alert.triggering_event.get("id")
        emit_event(
            REDELIVERED_EVENT,
            resource={"prefect.resource.id": f"mlops.alert.{trigger_id}", "prefect.resource.name": alert.subject},
            related=[{"prefect.resource.id": f"prefect.event.{trigger_id}", "prefect.resource.role": TRIGGERING}],
            payload={"automation": alert.automation, "automation_resource": alert.automation_resource},
        )
        log.info("redelivered: %s", alert.subject)
    return len(alerts)
