"""Prefect tasks of promotion: the per-model lock, finding and loading the champion, promote and revert."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect import task

from adapters.locks import ensure_lock, promotion_lock_name
from adapters.promotion import Promotion, promote_version, revert_promotion
from adapters.registry import champion_version, load_model
from tasks.retrying import IO, IO_ANY_ERROR

if TYPE_CHECKING:
    from core.data.rollout_policy import RolloutPolicy

log = logging.getLogger(__name__)


@task(name="promotion-lock", **IO_ANY_ERROR)
def ensure_promotion_lock(model_name: str) -> str:
    """Prefect task: make sure the one-slot concurrency limit for this model exists; returns its name."""
    return ensure_lock(promotion_lock_name(model_name))


@task(name="find-champion", **IO_ANY_ERROR)
def find_champion(model_name: str) -> str | None:
    """Prefect task: the current champion's version, if any."""
    return champion_version(model_name)


@task(name="load-champion", **IO)
def load_champion(model_name: str, version: str) -> Any:
    """Prefect task: the champion's fitted pipeline, after its artifact checks (a refused artifact is not retried)."""
    return load_model(model_name, version, where="training (the champion)")


@task(name="promote", **IO)
def promote(
    model_name: str, version: str, expected_champion: str | None, reason: str = "", actor: str | None = None
) -> Promotion:
    """Prefect task: atomic, compare-and-set promotion, recorded in the champion history (see `promote_version`)."""
    return promote_version(model_name, version, expected_champion, reason, actor)


@task(name="revert-promotion", **IO)
def revert(promotion: Promotion, reason: str) -> None:
    """Prefect task: undo a promotion (see `revert_promotion`)."""
    revert_promotion(promotion, reason)


@task(name="begin-rollout", **IO)
def begin_rollout(model_name: str, version: str, champion: str, policy: RolloutPolicy, run_id: str, reason: str) -> str:
    """Prefect task: make `version` the challenger (shadow or canary); one line saying what became of it.

    With a rollout already under way, `policy.on_new_candidate` says: `wait` (it stays registered, not rolled out)
    or `replace` (the old challenger is rolled back, recorded, and this one starts).
    """
    from adapters.rollout_store import begin_candidate_rollout
    from adapters.settings import get_settings

    return begin_candidate_rollout(get_settings(), model_name, version, champion, policy, run_id, reason)
