"""The rollout flow: judge a model's challenger on live traffic, then promote it, roll it back or extend.

Runs on the model's schedule while a rollout is under way (`rollout/<model>`, made by `mlops deploy` for a model
whose `operations.rollout.mode` is shadow or canary), from the Prefect UI, or `mlops rollout check MODEL`. A person
can decide instead (`decide: promote | rollback`, recorded as theirs). The gates are the rollout's policy
(`core.rollout.RolloutPolicy`, as the rollout started with it); every step goes to the rollout's
timeline (`s3://<bucket>/rollouts/<model>/`), the challenger's model card and an alert; a promotion goes through the
same compare-and-set as training's, under the model's promotion lock, into the champion history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from core.rollout import Evidence, RolloutState, Verdict, judge
from services.promotion import promote_checked, promotion_lock
from tasks.loading import load_dataset_config
from tasks.monitoring import load_labels
from tasks.promotion import ensure_promotion_lock
from tasks.rollout import (
    end_rollout,
    gather_evidence,
    publish_timeline,
    read_rollout,
    read_rollout_logs,
    record_step,
)


class RolloutParams(BaseModel):
    """Parameters of one rollout check (shown as a form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(
        "credit-risk",
        title="Dataset",
        description="The model's dataset config: a bundled name, a catalog model, a local YAML path or an s3:// URI.",
    )
    decide: Literal["auto", "promote", "rollback"] = Field(
        "auto",
        title="Decision",
        description="auto: by the rollout's gates; promote or rollback: a person's decision (recorded as theirs).",
    )
    reason: str = Field("", max_length=1000, title="Reason", description="Why a person decides (recorded).")
    labels: str | None = Field(
        None,
        pattern=r"^s3://[^/]+(/.*)?$",
        title="Labels",
        description="s3:// URI of labels that arrived (id column and target), for the realised paired comparison.",
    )
    actor: str = Field("rollout-flow", min_length=1, title="Actor", description="Who decides (recorded).")
    serving_timeout_seconds: float = Field(
        120, gt=0, le=3600, title="Serving check timeout (s)", description="After a promotion (else reverted)."
    )


@dataclass(frozen=True)
class RolloutOutcome:
    """What one check of a rollout did."""

    model: str
    version: str | None
    action: str  # promote, rollback, extend, none
    reasons: list[str]
    promoted: bool = False
    figures: dict[str, Any] = field(default_factory=dict)


@flow(
    name="rollout",
    description="Judge a challenger on live traffic against the champion: promote, roll back or extend.",
    persist_result=False,
)
def rollout(params: RolloutParams = RolloutParams()) -> RolloutOutcome:  # noqa: B008 - a frozen default
    """Gather the rollout's live evidence, decide, act, record."""
    config = load_dataset_config(params.dataset)
    model = config.model_name
    actor = f"{params.actor} (flow run {flow_run.get_name()})" if flow_run.get_id() else params.actor
    state, cut_off, champion = read_rollout(model)
    if state is None:
        return RolloutOutcome(model, None, "none", ["no rollout under way"])
    if champion != state.champion:
        why = f"the champion moved to v{champion} since the rollout started against v{state.champion}"
        end_rollout(state, "rolled_back", why, None, actor)
        return _finish(state, Verdict("rollback", [why]), None, False)
    labels = load_labels(params.labels, config) if params.labels else None
    evidence = gather_evidence(state, read_rollout_logs(state), cut_off, config, labels)
    verdict = judge(evidence, state.rules)
    if params.decide != "auto":
        action = "promote" if params.decide == "promote" else "rollback"
        verdict = Verdict(action, [f"decided by {params.actor}: {params.reason or 'no reason given'}"], verdict.checks)
    if verdict.action == "extend":
        record_step(state, "extended", "; ".join(verdict.reasons), evidence, actor)
        return _finish(state, verdict, evidence, False)
    if verdict.action == "rollback":
        end_rollout(state, "rolled_back", "; ".join(verdict.reasons), evidence, actor)
        return _finish(state, verdict, evidence, False)
    promoted, why = _promote(state, verdict, params)
    end_rollout(state, "promoted" if promoted else "rolled_back", why, evidence, actor)
    return _finish(state, verdict if promoted else Verdict("rollback", [why]), evidence, promoted)


def _promote(state: RolloutState, verdict: Verdict, params: RolloutParams) -> tuple[bool, str]:
    """Promote the challenger (compare-and-set against the rollout's champion, then the serving check)."""
    reason = "rollout: " + "; ".join(verdict.reasons)
    with promotion_lock(ensure_promotion_lock(state.model)):
        promotion, error, _ = promote_checked(
            state.model, state.version, state.champion, params.serving_timeout_seconds, None, reason
        )
    if promotion is None:
        return False, f"promotion failed: {type(error).__name__}: {error}"
    return True, reason


def _finish(state: RolloutState, verdict: Verdict, evidence: Evidence | None, promoted: bool) -> RolloutOutcome:
    """Put the timeline on the challenger's card and in the run; the outcome."""
    publish_timeline(state, verdict)
    figures = evidence.figures() if evidence is not None else {}
    return RolloutOutcome(state.model, state.version, verdict.action, verdict.reasons, promoted, figures)
