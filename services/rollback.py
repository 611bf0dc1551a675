"""Rollback: put `champion` back on an earlier version (the `previous` alias by default), and say why.

A compare-and-set like a promotion: the move happens under the model's promotion lock (the one training
takes to decide and promote), and only if the champion is still the version seen when the rollback was
asked for. The replaced champion becomes `previous`, so a second rollback undoes the first. The version
that was rolled back gets a `rolled_back` tag, and the change goes to the champion history.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.clients import mlflow_client
from adapters.history_store import make_change, record_change_safely
from adapters.locks import ensure_lock, hold, promotion_lock_name
from adapters.promotion import PromotionConflict
from adapters.registry import PREVIOUS, aliases_of, champion_version, move_champion
from adapters.serving_api import ServingCheck, check_configured_serving
from adapters.settings import get_settings
from core.errors import PermanentError
from core.history import ChampionChange
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS, retry_unless_permanent

log = logging.getLogger(__name__)


class RollbackError(PermanentError):
    """The rollback cannot be done as asked (no champion, unknown version, already champion); names why."""


def resolve_target(model_name: str, to_version: str | None) -> tuple[str, str]:
    """The current champion and the version to roll back to; raises RollbackError naming the problem."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(get_settings())
    current = champion_version(model_name)
    if current is None:
        raise RollbackError(f"{model_name!r} has no champion (no such registered model, or no `champion` alias)")
    if to_version is None:
        previous = aliases_of(client, model_name).get(PREVIOUS)
        if previous is None:
            raise RollbackError(
                f"{model_name!r} has no `{PREVIOUS}` alias to roll back to; name a version (--to VERSION)"
            )
        to_version = str(previous)
    try:
        client.get_model_version(model_name, to_version)
    except MlflowException as exc:
        raise RollbackError(f"{model_name!r} has no version {to_version!r}: nothing to roll back to") from exc
    if to_version == current:
        raise RollbackError(f"{model_name!r} v{to_version} is already the champion: nothing to roll back")
    return current, to_version


def rollback(model_name: str, to_version: str | None, reason: str, actor: str) -> ChampionChange:
    """Move `champion` of `model_name` to `to_version` (default: the `previous` alias) and record why.

    Args:
        model_name: Registered model.
        to_version: Version to make champion again; None means the `previous` alias.
        reason: Why (required: it goes to the history and to a tag on the rolled-back version).
        actor: Who asked (an OS user, `prefect-ui`, a flow run).

    Returns:
        The recorded change (also when writing the history failed, which is logged loudly).

    Raises:
        RollbackError: No champion, no such version, the version is already champion, or no reason given.
        PromotionConflict: The champion moved while the rollback waited for the lock; nothing changed.
    """
    if not reason.strip():
        raise RollbackError("a rollback needs a reason (it is recorded in the champion history)")
    current, target = resolve_target(model_name, to_version)
    with hold(ensure_lock(promotion_lock_name(model_name)), timeout_seconds=600):
        now = champion_version(model_name)
        if now != current:
            raise PromotionConflict(
                f"champion of {model_name!r} moved from v{current} to v{now} while the rollback waited: not done"
            )
        client = mlflow_client(get_settings())
        at = datetime.now(UTC).isoformat(timespec="seconds")
        move_champion(client, model_name, target, current)
        for version, key, value in (
            (current, "rolled_back", f"{at} by {actor}: {reason}"),
            (target, "promoted_at", at),
        ):
            try:  # informative tags: the alias move stands without them
                client.set_model_version_tag(model_name, version, key, value[:4900])
            except Exception as exc:
                log.warning("tag %s on %s v%s not set: %s", key, model_name, version, exc)
    log.warning("%s: rolled back, champion v%s -> v%s by %s: %s", model_name, current, target, actor, reason)
    change = make_change(model_name, current, target, "rollback", reason, actor)
    record_change_safely(change)
    return change


@task(
    name="rollback",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def rollback_champion(model_name: str, to_version: str | None, reason: str, actor: str) -> ChampionChange:
    """Prefect task: roll the champion back (see `rollback`)."""
    return rollback(model_name, to_version, reason, actor)


@dataclass(frozen=True)
class RollbackOutcome:
    """The change, and whether the serving API follows it."""

    change: ChampionChange
    serving: ServingCheck


def serving_after_rollback(model_name: str, version: str, timeout: float) -> ServingCheck:
    """Wait for the configured serving API (MLOPS_SERVING_URL) to serve `version`; a miss is reported, not undone."""
    return check_configured_serving(model_name, version, timeout)


@task(name="check-serving-after-rollback", cache_policy=NO_CACHE)
def check_rollback_serving(model_name: str, version: str, timeout: float) -> ServingCheck:
    """Prefect task: wait for the serving API to serve the restored champion (see `serving_after_rollback`)."""
    return serving_after_rollback(model_name, version, timeout)


def rollback_markdown(change: ChampionChange, serving: ServingCheck) -> str:
    """A readable summary of a rollback (Prefect artifact)."""
    links = "".join(f"- {name}: {url}\n" for name, url in change.links.items())
    return (
        f"# Rollback of `{change.model}`: v{change.from_version} -> **v{change.to_version}**\n\n"
        f"- by {change.actor} at {change.at}\n- reason: {change.reason}\n- serving: {serving.detail}\n{links}"
    )


@task(name="publish-rollback", cache_policy=NO_CACHE)
def publish_rollback(change: ChampionChange, serving: ServingCheck) -> None:
    """Prefect task: the rollback as the run's `rollback` markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=rollback_markdown(change, serving), key="rollback", description="Champion rollback"
    )
