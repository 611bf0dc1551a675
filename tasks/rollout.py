"""Prefect tasks of a rollout: read its state and logs, gather the evidence, and promote, roll back or extend."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters import rollout_store
from adapters.monitoring_store import load_version
from adapters.registry import CHAMPION
from adapters.settings import get_settings
from core.data.dataset import DatasetConfig
from core.monitoring.drift_analysis import join_labels, with_estimator
from core.monitoring.estimation import estimate_sums
from core.monitoring.prediction_log import LOG_KEY, prediction_log_key
from core.rollout import (
    CutOff,
    Evidence,
    Pairs,
    RolloutEvent,
    RolloutState,
    Verdict,
    estimated_pair,
    measure,
    primary_metric,
    realised_comparison,
    timeline_markdown,
)
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="read-rollout", **IO)
def read_rollout(model_name: str) -> tuple[RolloutState | None, CutOff | None, str | None]:
    """Prefect task: the model's rollout state, cut-off and champion version from the registry."""
    state, cut_off, aliases = rollout_store.read_rollout(get_settings(), model_name)
    return state, cut_off, aliases.get(CHAMPION)


@task(name="read-rollout-logs", **IO)
def read_rollout_logs(state: RolloutState) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prefect task: the prediction log and the shadow log since the rollout started."""
    answered, shadow = rollout_store.read_rollout_logs(
        get_settings(), state.model, datetime.fromisoformat(state.since), datetime.now(UTC)
    )
    log.info("rollout logs: %d answered rows, %d shadow rows", len(answered), len(shadow))
    return answered, shadow


@task(name="gather-evidence", cache_policy=NO_CACHE)
def gather_evidence(
    state: RolloutState,
    logs: tuple[pd.DataFrame, pd.DataFrame],
    cut_off: CutOff | None,
    config: DatasetConfig,
    labels: pd.DataFrame | None = None,
    estimate: bool = True,
) -> Evidence:
    """Prefect task: the live evidence, estimated performance (each version's estimator), realised when labelled."""
    settings = get_settings()
    champion = load_version(settings, state.model, state.champion, where="rollout")
    classes = champion.classes
    evidence, pairs = measure(*logs, state, classes, datetime.now(UTC), cut_off)
    if pairs.rows.empty:
        return evidence
    if estimate:
        evidence = _with_estimates(
            evidence, pairs, [champion, load_version(settings, state.model, state.version)], config
        )
    if labels is not None:
        y = join_labels(
            pairs.rows.assign(**{LOG_KEY: prediction_log_key(pairs.rows)}),
            LOG_KEY,
            labels,
            config.id_column or "",
            config.target,
        )
        realised = realised_comparison(y.to_numpy(), pairs, classes, state.rules.model_dump().get("confidence", 0.95))
        evidence = replace(evidence, realised=realised)
    return evidence


def _with_estimates(evidence: Evidence, pairs: Pairs, versions: list[Any], config: DatasetConfig) -> Evidence:
    """Each version's expected primary metric on the paired records (skipped, with a note, without labels)."""
    metric = primary_metric(versions[0].classes)
    expected: dict[str, dict[str, float]] = {}
    features = pairs.rows[[f for f in config.feature_names if f in pairs.rows.columns]]
    for side, version, scores in zip(
        ("champion", "challenger"), versions, (pairs.champion, pairs.challenger), strict=True
    ):
        fitted = with_estimator(version, config)
        if fitted.estimator is None:
            log.info("no estimate for v%s: its reference has no labels", version.version)
            return evidence
        expected[side] = estimate_sums(fitted.estimator, features, np.asarray(scores))
    return replace(evidence, estimated_metric=metric, estimated=estimated_pair(expected, metric))


@task(name="record-rollout-step", **IO)
def record_step(state: RolloutState, kind: str, reason: str, evidence: Evidence | None, actor: str) -> RolloutEvent:
    """Prefect task: store one step (extended) of the rollout and alert it."""
    event = state.event(kind, reason, actor, evidence.figures() if evidence is not None else None)
    rollout_store.record_event(get_settings(), event)
    return event


@task(name="end-rollout", **IO)
def end_rollout(state: RolloutState, kind: str, reason: str, evidence: Evidence | None, actor: str) -> RolloutEvent:
    """Prefect task: clear the challenger and the rollout's state, and record why (promoted or rolled back)."""
    event = state.event(kind, reason, actor, evidence.figures() if evidence is not None else None)
    rollout_store.end_rollout(get_settings(), state, event)
    return event


@task(name="publish-rollout-timeline", **IO)
def publish_timeline(state: RolloutState, verdict: Verdict) -> str:
    """Prefect task: the rollout's timeline on the challenger's model card and in the run; its Markdown."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    settings = get_settings()
    events = [e for e in rollout_store.list_events(settings, state.model) if e.rollout == state.id]
    card = rollout_store.annotate_card(settings, state.model, state.version, events)
    markdown = (
        f"# Rollout of {state.model} v{state.version}: {verdict.action}\n\n{state.describe()}\n\n"
        + "\n".join(f"- {r}" for r in verdict.reasons)
        + f"\n\n## Timeline\n\n{timeline_markdown(events)}\n"
        + (f"\nOn the model card: `{card}`\n" if card else "")
    )
    if flow_run.get_id():
        create_markdown_artifact(markdown=markdown, key="rollout", description=f"Rollout of {state.model}")
    return markdown
