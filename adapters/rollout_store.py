"""Rollouts in the registry and S3: the `challenger` alias and the state beside it, cut-offs, the timeline, the logs.

The state of a model's rollout is a registered-model tag (`core.rollout.ROLLOUT_TAG`) next to the
`challenger` alias, so a serving process reads both in the one registry call it makes per poll. A serving process
that cuts the challenger off sets its own tag (`CUT_OFF_TAG`) rather than rewriting the state: two processes
cutting off at once cannot overwrite each other's state. Every step is an event in
`s3://<bucket>/rollouts/<model>/` and a Prefect event `mlops.rollout.<step>` (alerted by `mlops-alert-rollout`).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Any

import pandas as pd

from adapters.alerts import ROLLOUT_EVENT_PREFIX, emit
from adapters.clients import mlflow_client, put_bytes, s3_client
from adapters.history_store import default_actor, read_records
from adapters.settings import Settings
from adapters.store import S3Location
from core.monitoring.prediction_log import SERVING, SHADOW
from core.rollout import (
    CHALLENGER,
    CUT_OFF_TAG,
    EVENTS_PREFIX,
    ROLLOUT_TAG,
    CutOff,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
)

log = logging.getLogger(__name__)


def read_rollout(
    settings: Settings, model_name: str, client: Any = None
) -> tuple[RolloutState | None, CutOff | None, dict[str, str]]:
    """The model's rollout state, its cut-off if any, and its aliases (all empty when the model does not exist).

    One registry call (what a serving process makes per poll, with its own `client`).
    """
    from mlflow.exceptions import MlflowException

    try:
        model = (client or mlflow_client(settings)).get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None, {}
        raise
    tags = model.tags or {}
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    return RolloutState.from_json(tags.get(ROLLOUT_TAG)), CutOff.from_json(tags.get(CUT_OFF_TAG)), aliases


def record_event(settings: Settings, event: RolloutEvent) -> str | None:
    """Store one step of a rollout and emit `mlops.rollout.<kind>`; best-effort (a failure is logged)."""
    uri = None
    try:
        uri = put_bytes(
            settings, S3Location(settings.bucket, event.key()), event.to_json().encode(), "application/json"
        )
    except Exception as exc:
        log.error("could not store the rollout event %s: %s", event.describe(), exc)
    payload = {
        "model": event.model,
        "kind": event.kind,
        "version": event.version,
        "champion": event.champion,
        "reason": event.reason[:2000],
        "actor": event.actor,
        "at": event.at,
        "figures": event.figures,
    }
    try:
        emit(ROLLOUT_EVENT_PREFIX + event.kind, event.model, payload)
    except Exception as exc:
        log.error("could not emit %s%s for %s: %s", ROLLOUT_EVENT_PREFIX, event.kind, event.model, exc)
    log.info("rollout of %s: %s", event.model, event.describe())
    return uri


def list_events(settings: Settings, model_name: str) -> list[RolloutEvent]:
    """Every recorded rollout step of a model, oldest first."""
    return read_records(settings, f"{EVENTS_PREFIX}/{model_name}", RolloutEvent.from_json, "rollout event")


def start_rollout(settings: Settings, state: RolloutState, kind: str = "started", reason: str = "") -> None:
    """Put `state.version` under rollout: its state tag first (naming the version), then the `challenger` alias.

    A cut-off of an earlier rollout is cleared; serving picks both up at its next poll (or `/reload`).
    """
    client = mlflow_client(settings)
    client.set_registered_model_tag(state.model, ROLLOUT_TAG, state.to_json())
    _delete_model_tag(client, state.model, CUT_OFF_TAG)
    client.set_registered_model_alias(state.model, CHALLENGER, state.version)
    why = reason or state.describe()
    event = state.event(kind, why, default_actor())
    record_event(settings, event)


def begin_candidate_rollout(  # noqa: PLR0913 - a rollout's parts, each named
    settings: Settings, model_name: str, version: str, champion: str, policy: RolloutPolicy, run_id: str, reason: str
) -> str:
    """Start a rollout of `version` against `champion` (see `tasks.promotion.begin_rollout`); what happened."""
    current, _, aliases = read_rollout(settings, model_name)
    actor = default_actor()
    if current is not None and aliases.get(CHALLENGER) == current.version:
        if policy.on_new_candidate == "wait":
            why = (
                f"v{current.version} is under rollout since {current.since}: v{version} waits (on_new_candidate: wait)"
            )
            record_event(settings, RolloutEvent(model_name, current.id, "waiting", version, champion, why, actor))
            return f"not rolled out, the champion is unchanged: {why}"
        replaced = f"replaced by v{version} (on_new_candidate: replace)"
        end_rollout(
            settings,
            current,
            current.event("replaced", replaced, actor),
        )
    state = RolloutState.start(model_name, version, champion, policy, run_id)
    start_rollout(settings, state, "started", reason)
    return f"under rollout: {state.describe()}; `rollout/{model_name}` decides on live traffic"


def end_rollout(settings: Settings, state: RolloutState, event: RolloutEvent) -> None:
    """Clear the rollout (the `challenger` alias, if it still names its version, and the tags) and record why."""
    client = mlflow_client(settings)
    current, _, aliases = read_rollout(settings, state.model, client)
    if aliases.get(CHALLENGER) == state.version:
        client.delete_registered_model_alias(state.model, CHALLENGER)
    if current is not None and current.id == state.id:  # a newer rollout's state is left alone
        _delete_model_tag(client, state.model, ROLLOUT_TAG)
        _delete_model_tag(client, state.model, CUT_OFF_TAG)
    record_event(settings, event)


def record_cut_off(settings: Settings, state: RolloutState, cut: CutOff) -> None:
    """A serving process cut the challenger off: tag it (the first cut-off of a rollout is kept), record, alert."""
    client = mlflow_client(settings)
    current = read_rollout(settings, state.model, client)[1]
    if current is not None and current.rollout == state.id:
        return
    client.set_registered_model_tag(state.model, CUT_OFF_TAG, cut.to_json())
    actor = f"serving (pid {cut.pid or os.getpid()})"
    record_event(settings, state.event("cut_off", cut.reason, actor))


def _delete_model_tag(client: Any, model_name: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_tag(model_name, key)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise


def read_rollout_logs(settings: Settings, model_name: str, since: datetime, now: datetime) -> tuple[pd.DataFrame, ...]:
    """The model's prediction log and shadow log from the date `since` falls on to `now` (every row, then filtered)."""
    from adapters.monitoring_store import read_prediction_log

    days = (now.date() - since.date()).days + 1
    frames = []
    for stream in (SERVING, SHADOW):
        read, _ = read_prediction_log(settings, model_name, max(days, 1), now, stream)
        frames.append(read[0] if read else pd.DataFrame())
    return tuple(frames)


CARD_START, CARD_END = "<!-- rollout -->", "<!-- /rollout -->"


def annotate_card(settings: Settings, model_name: str, version: str, events: list[RolloutEvent]) -> str | None:
    """Put the rollout's timeline on the version's model card (its Markdown and HTML in S3); the HTML URI.

    The section sits between markers, so a later step replaces it. None (logged) when the version has no card.
    """
    import html as html_lib

    from core.rollout import timeline_markdown

    client = s3_client(settings)
    folder = S3Location(settings.bucket, f"model-cards/{model_name}/{version}")
    section_md = f"{CARD_START}\n## Rollout on live traffic\n\n{timeline_markdown(events)}\n{CARD_END}\n"
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html_lib.escape(str(c))}</td>" for c in (e.at[:19], e.kind, e.actor, e.reason))
        + "</tr>"
        for e in events
    )
    section_html = (
        f"{CARD_START}<section><h2>Rollout on live traffic</h2><table><tr><th>time (UTC)</th><th>step</th>"
        f"<th>by</th><th>why</th></tr>{rows}</table></section>{CARD_END}"
    )
    uri = None
    for name, section, before in (("model_card.md", section_md, None), ("model_card.html", section_html, "</body>")):
        location = folder.child(name)
        try:
            text = client.get_object(Bucket=settings.bucket, Key=location.key)["Body"].read().decode()
        except Exception as exc:
            log.warning("no model card at %s to put the rollout on: %s", location.uri, exc)
            return None
        if CARD_START in text and CARD_END in text:
            head, rest = text.split(CARD_START, 1)
            text = head + section + rest.split(CARD_END, 1)[1]
        elif before and before in text:
            text = text.replace(before, section + before, 1)
        else:
            text = text.rstrip() + "\n\n" + section
        kind = "text/html; charset=utf-8" if name.endswith(".html") else "text/markdown; charset=utf-8"
        written = put_bytes(settings, location, text.encode(), kind)
        uri = written if name.endswith(".html") else uri
    return uri
