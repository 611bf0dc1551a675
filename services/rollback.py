"""Rollback: put `champion` back on an earlier version (the `previous` alias by default), and say why.

A compare-and-set like a promotion: the move happens under the model's promotion lock (the one training
takes to decide and promote), after any change a crash left unfinished is completed (`adapters.promotion.
reconcile`). The replaced champion becomes `previous`, so a second rollback undoes the first. The version
that was rolled back gets a `rolled_back` tag, and the change goes to the champion history (via its intent,
so a crash never loses it).

A rollback to a version the gates rejected, or that was never champion, is refused unless forced, and the
refusal says which gates failed or that it never held the alias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.clients import mlflow_client
from adapters.history_store import list_changes, make_change
from adapters.locks import ensure_lock, hold, promotion_lock_name
from adapters.model_store import version_exists
from adapters.promotion import apply_change, reconcile
from adapters.registry import CHAMPION, PREVIOUS, aliases_of
from adapters.serving_api import ServingCheck, check_configured_serving
from adapters.settings import get_settings
from core.errors import PermanentError
from core.promotion.history import ChampionChange, PendingChange
from tasks.retrying import IO

log = logging.getLogger(__name__)


class RollbackError(PermanentError):
    """The rollback cannot be done as asked (no champion, unknown version, already champion); names why."""


def resolve_target(model_name: str, to_version: str | None) -> tuple[str, str]:
    """The current champion and the version to roll back to; raises RollbackError naming the problem."""
    client = mlflow_client(get_settings())
    aliases = aliases_of(client, model_name)
    current = aliases.get(CHAMPION)
    if current is None:
        raise RollbackError(f"{model_name!r} has no champion (no such registered model, or no `champion` alias)")
    if to_version is None:
        previous = aliases.get(PREVIOUS)
        if previous is None:
            raise RollbackError(
                f"{model_name!r} has no `{PREVIOUS}` alias to roll back to; name a version (--to VERSION)"
            )
        to_version = str(previous)
    if not version_exists(get_settings(), model_name, to_version):
        raise RollbackError(f"{model_name!r} has no version {to_version!r}: nothing to roll back to")
    if to_version == current:
        raise RollbackError(f"{model_name!r} v{to_version} is already the champion: nothing to roll back")
    return current, to_version


def objections(model_name: str, version: str) -> list[str]:
    """Why `version` should not become champion again: the gates rejected it, or it was never champion.

    Having been champion is read from the registry and the history: the `previous` alias, a `promoted_at` or
    `rolled_back` tag, or a recorded change that made it champion.
    """
    client = mlflow_client(get_settings())
    tags: dict[str, Any] = client.get_model_version(model_name, version).tags
    found = []
    if tags.get("decision") == "reject":
        failed = tags.get("decision.failed_gates", "none")
        why = tags.get("decision.reasons", "")[:300]
        found.append(f"the gates rejected v{version} (failed gates: {failed}; {why})")
    was_champion = (
        aliases_of(client, model_name).get(PREVIOUS) == version
        or "promoted_at" in tags
        or "rolled_back" in tags
        or any(change.to_version == version for change in list_changes(model_name))
    )
    if not was_champion:
        found.append(f"v{version} was never champion (no promotion or rollback to it in the history or the registry)")
    return found


def rollback(model_name: str, to_version: str | None, reason: str, actor: str, force: bool = False) -> ChampionChange:
    """Move `champion` of `model_name` to `to_version` (default: the `previous` alias) and record why.

    Args:
        model_name: Registered model.
        to_version: Version to make champion again; None means the `previous` alias.
        reason: Why (required: it goes to the history and to a tag on the rolled-back version).
        actor: Who asked (an OS user, `prefect-ui`, a flow run).
        force: Roll back even to a version the gates rejected or that was never champion (the objections
            are recorded with the reason).

    Returns:
        The recorded change (also while its history record waits for S3: its intent keeps it).

    Raises:
        RollbackError: No champion, no such version, the version is already champion, no reason given, or
            (without `force`) a version the gates rejected or that was never champion.
    """
    if not reason.strip():
        raise RollbackError("a rollback needs a reason (it is recorded in the champion history)")
    with hold(ensure_lock(promotion_lock_name(model_name)), timeout_seconds=600):
        for intent in reconcile(model_name):  # an earlier attempt of this same rollback moved the alias
            change = intent.change
            same_request = change.reason == reason or change.reason.startswith(f"{reason} [forced: ")
            if change.kind == "rollback" and change.actor == actor and same_request:
                log.warning("%s: this rollback was done by an earlier attempt; finished it", model_name)
                return change
        current, target = resolve_target(model_name, to_version)
        found = objections(model_name, target)
        if found and not force:
            raise RollbackError(
                f"refusing to roll {model_name!r} back to v{target}: {'; '.join(found)}. "
                "Roll back anyway with --force (CLI) or force=true (rollback flow)."
            )
        recorded = f"{reason} [forced: {'; '.join(found)}]" if found else reason
        client = mlflow_client(get_settings())
        change = make_change(model_name, current, target, "rollback", recorded, actor)
        at = datetime.fromisoformat(change.at).isoformat(timespec="seconds")
        intent = PendingChange(
            change,
            before={CHAMPION: current, PREVIOUS: aliases_of(client, model_name).get(PREVIOUS)},
            after={CHAMPION: target, PREVIOUS: current},
            tags={current: {"rolled_back": f"{at} by {actor}: {recorded}"}, target: {"promoted_at": at}},
        )
        apply_change(client, intent)
    log.warning("%s: rolled back, champion v%s -> v%s by %s: %s", model_name, current, target, actor, recorded)
    return change


@task(name="rollback", **IO)
def rollback_champion(
    model_name: str, to_version: str | None, reason: str, actor: str, force: bool = False
) -> ChampionChange:
    """Prefect task: roll the champion back (see `rollback`)."""
    return rollback(model_name, to_version, reason, actor, force)


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
