"""When monitoring retrains: the trigger rule, the cooldown and the already-retrained rule (pure).

Monitoring's verdict says whether a threshold was crossed; the scope whether the drifted data is in what
training reads. `retrain_rule` turns them into a request to retrain or the reason not to; the service
(`services/retraining.py`) then holds the model's lock, applies `cooldown_trigger` and
`already_retrained_trigger` to the runs Prefect lists, and emits the drift event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from core.monitoring.drift_analysis import RetrainScope, Verdict

REASON_LIMIT = 500  # TrainingParams.reason's limit


@dataclass(frozen=True)
class Trigger:
    """What happened to the retraining: `triggered`, or why not.

    `cooldown`, `disabled`, `not-needed`, `outside-source` (the drifted data is not in what training reads)
    or `already-retrained` (a drift-triggered run already retrained on the same drifted data).
    """

    status: Literal["triggered", "cooldown", "disabled", "not-needed", "outside-source", "already-retrained"]
    detail: str
    flow_run_id: str | None = None


@dataclass(frozen=True)
class RetrainRequest:
    """A retraining monitoring asks for.

    Attributes:
        model_name: The model to retrain.
        dataset: Its dataset config (the training run's `dataset` parameter).
        reason: Why (the training run's reason, cut to its limit).
        cooldown_minutes: No new retraining while one is due within this window or unfinished.
        deployment: `<flow>/<deployment>` that the model's drift automation runs.
        summary: The verdict in one line (for the alert).
        report_link: The monitoring report's link (for the alert).
        window_key: The drifted data's key (`RetrainScope.window_key`): the same data is retrained on once.
    """

    model_name: str
    dataset: str
    reason: str
    cooldown_minutes: float
    deployment: str
    summary: str = ""
    report_link: str | None = None
    window_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", self.reason[:REASON_LIMIT])


def retrain_rule(verdict: Verdict, scope: RetrainScope, request: RetrainRequest, enabled: bool) -> Trigger | None:
    """None when `request` should go ahead; otherwise the trigger that says why not.

    Nothing crossed a threshold: `not-needed`. Every drifted window is outside the training source (a retrain
    would not see it): `outside-source`. Triggering turned off: `disabled`.
    """
    if not verdict.triggered:
        return Trigger("not-needed", "no threshold crossed: nothing to retrain")
    if not scope.retrain:
        return Trigger("outside-source", scope.note)
    if not enabled:
        return Trigger("disabled", f"would retrain ({verdict.summary}), but triggering is off")
    return None


def blocking_runs(runs: list[Any], since: datetime) -> list[Any]:
    """Drift-triggered runs that keep a new trigger back: started (or due) since `since`, or not finished yet."""
    return [
        run
        for run in runs
        if (run.expected_start_time is not None and run.expected_start_time >= since)
        or (run.state is not None and not run.state.is_final())
    ]


def cooldown_trigger(runs: list[Any], since: datetime, request: RetrainRequest) -> Trigger | None:
    """`cooldown` when a drift-triggered run of the model is due since `since` or unfinished (newest first)."""
    blocking = blocking_runs(runs, since)
    if not blocking:
        return None
    run = blocking[0]
    return Trigger(
        "cooldown",
        f"cooldown: drift-triggered run {run.name} ({run.id}, {run.state_name}) of {request.model_name} is within "
        f"the last {request.cooldown_minutes:g} min or unfinished; not starting another",
        str(run.id),
    )


def already_retrained_trigger(earlier: list[Any], request: RetrainRequest) -> Trigger | None:
    """`already-retrained` when a drift-triggered run of the model already retrained on the same drifted data."""
    if not earlier:
        return None
    run = earlier[0]
    return Trigger(
        "already-retrained",
        f"not retraining: drift-triggered run {run.name} ({run.id}, {run.state_name}) of {request.model_name} "
        f"already retrained on this drifted data (window {request.window_key}); new data is needed",
        str(run.id),
    )
