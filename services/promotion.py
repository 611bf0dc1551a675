"""Promotion as the training flow carries it out.

The champion as the decision sees it (scored on the same holdout), then promote, confirm that the serving API
answers with the new version, or revert.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from adapters.locks import Held, hold
from adapters.promotion import Promotion
from adapters.serving_api import ServingCheck, ServingCheckFailed
from core.dataset import DatasetConfig
from core.decision import Decision
from tasks.evaluation import evaluate_candidate
from tasks.promotion import find_champion, load_champion, promote, revert
from tasks.review import champion_schema
from tasks.serving_check import check_serving

log = logging.getLogger(__name__)

PROMOTION_LOCK_TIMEOUT_SECONDS = 3600


def promotion_lock(lock: str, timeout_seconds: float = PROMOTION_LOCK_TIMEOUT_SECONDS) -> AbstractContextManager[Held]:
    """Hold the model's one-slot promotion lock while deciding and promoting.

    So no run promotes against a stale champion (`tasks.promotion.ensure_promotion_lock` makes the lock); the
    `Held` says how long it was waited for.
    """
    return hold(lock, timeout_seconds=timeout_seconds)


def promote_checked(
    model_name: str,
    version: str,
    expected_champion: str | None,
    serving_timeout: float,
    decision: Decision | None = None,
    run_reason: str = "",
) -> tuple[Promotion | None, Exception | None, ServingCheck | None]:
    """Promote, then keep the promotion only once the serving API answers with it (else revert it).

    The champion history records why: the run's reason (`TrainingParams.reason`) and the decision's reasons.
    Returns the promotion that stands (or None), the error that stopped it, and the serving check.
    """
    why = ([f"run reason: {run_reason}"] if run_reason else []) + (decision.reasons if decision else [])
    try:
        promotion = promote(model_name, version, expected_champion, " | ".join(why))
    except Exception as exc:  # recorded by the caller, then the run fails
        return None, exc, None
    serving = check_serving(model_name, version, serving_timeout)
    if serving.ok:
        return promotion, None, serving
    revert(promotion, serving.detail)
    return None, ServingCheckFailed(f"promotion of v{version} reverted: {serving.detail}"), serving


@dataclass(frozen=True)
class ChampionState:
    """The current champion as the decision sees it: holdout metrics and probabilities, inputs, or the error."""

    version: str | None = None
    proba: Any = None
    metrics: dict[str, float] | None = None
    schema: dict[str, str] | None = None
    error: str | None = None


def current_champion(config: DatasetConfig, holdout: Any) -> ChampionState:
    """Find, load and score the champion on the holdout; a failure is recorded (it blocks promotion)."""
    version = find_champion(config.model_name)
    if version is None:
        return ChampionState()
    try:
        model = load_champion(config.model_name, version)
        scored = evaluate_candidate(model, holdout, config, figures=False)
        schema = champion_schema(config.model_name, version)
    except Exception as exc:  # the decision records why; promotion is then blocked
        return ChampionState(version, error=f"{type(exc).__name__}: {exc}")
    return ChampionState(version, scored.proba, scored.metrics, schema)
