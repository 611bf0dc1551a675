"""Promotion in the registry: the compare-and-set alias move, its history record, and its exact undo.

Every move of `champion` (promotion, revert, rollback) goes through `apply_change`, which makes it safe to
retry and to crash in the middle of:

1. the intent (`core.promotion.history.PendingChange`: the record, the aliases before and after, the tags) is stored
   first (S3, else the local state folder); without it nothing moves;
2. the `champion` alias moves, compare-and-set: right before it, the holder renews its promotion lock's lease
   (`adapters.locks.confirm_held`: a holder whose lease lapsed, while another may have taken the lock, stops
   here) and reads the champion back (a champion that is no longer the one the intent replaces stops it too;
   the intent is dropped, nothing moved); when the move's call fails (a client timeout, MLflow died after
   applying it) the alias is read back, and the move is accepted when it holds;
3. then `previous` and the tags (`promoted_at`, `rolled_back`) follow, the history record is stored under the
   intent's id (so storing it twice writes the same object) and the intent is deleted.

An intent left behind (the process or MLflow died between 1 and 3) is finished by `reconcile`, which the next
promotion, revert, rollback and `mlops history` run first under the model's promotion lock: a change whose
move happened is completed (aliases, tags, record), one whose move never happened is discarded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapters.clients import mlflow_client
from adapters.locks import confirm_held, pause_at, promotion_lock_name
from adapters.registry import CHAMPION, PREVIOUS, aliases_of, set_alias
from adapters.settings import get_settings
from core.errors import PermanentError
from core.promotion.history import ChampionChange, PendingChange, happened

log = logging.getLogger(__name__)


class PromotionConflict(PermanentError):
    """The champion changed between the decision and the promotion; nothing was changed."""


@dataclass(frozen=True)
class Promotion:
    """An alias move that happened: enough to undo it exactly."""

    model_name: str
    version: str
    replaced: str | None
    replaced_previous: str | None
    promoted_at: str


def _champion_holds(client: Any, model_name: str, version: str | None) -> bool:
    """Read the alias back: True when `champion` points at `version` (None: no champion). Raises when unreadable."""
    return aliases_of(client, model_name).get(CHAMPION) == version


def _complete(client: Any, pending: PendingChange) -> str | None:
    """The steps after the champion moved: the other aliases, the tags, the record; then drop the intent.

    Alias and tag failures raise (the intent stays, so a retry or `reconcile` finishes the job). A history
    record S3 refuses is logged loudly and the intent kept for the next `reconcile`; returns the record's URI.
    """
    from adapters.alerts import announce_change
    from adapters.history_store import delete_pending, record_change

    change = pending.change
    for alias, target in pending.after.items():
        if alias != CHAMPION:
            set_alias(client, change.model, alias, target)
    for version, tags in pending.tags.items():
        for key, value in tags.items():
            if value is None:
                _delete_tag(client, change.model, version, key)
            else:
                client.set_model_version_tag(change.model, version, key, value[:4900])
    try:
        uri = record_change(change)
    except Exception:
        log.exception(
            "HISTORY NOT RECORDED YET for %s (%s): the change stands; its intent is kept and the next "
            "promotion, rollback or `mlops history` records it",
            change.model,
            change.describe(),
        )
        return None
    try:
        delete_pending(pending)
    except Exception as exc:  # the record is stored; a later reconcile writes the same object again
        log.warning("intent of %s not deleted (%s); the next reconcile drops it", change.describe(), exc)
    announce_change(change, uri)
    return uri


def _delete_tag(client: Any, model_name: str, version: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version_tag(model_name, version, key)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def apply_change(client: Any, pending: PendingChange) -> str | None:
    """Carry out one champion change: intent, champion move (read back on failure), then `_complete`.

    Returns the history record's URI (None while it waits for S3). Raises, with the intent stored, when the
    move cannot be confirmed; the next attempt or `reconcile` then finds out whether it happened.
    """
    from adapters.history_store import delete_pending, store_pending

    change = pending.change
    store_pending(pending)
    pause_at("before-champion-move")
    try:
        confirm_held(promotion_lock_name(change.model))
        expected = pending.before.get(CHAMPION)
        if not _champion_holds(client, change.model, expected):
            raise PromotionConflict(
                f"champion of {change.model!r} is no longer v{expected} (it changed while this change was "
                f"prepared): not moving it to v{pending.champion_after}"
            )
    except PermanentError:  # nothing moved: the intent goes (else the next reconcile finds it never happened)
        try:
            delete_pending(pending)
        except Exception as exc:
            log.warning("intent of %s not deleted (%s); the next reconcile drops it", change.describe(), exc)
        raise
    target = pending.champion_after
    try:
        set_alias(client, change.model, CHAMPION, target)
    except Exception as exc:
        if not _champion_holds(client, change.model, target):  # raises too when MLflow cannot be read
            raise
        log.warning("%s: the alias write failed (%s) but champion is v%s: accepted", change.model, exc, target)
    log.info("%s: champion v%s -> v%s (%s)", change.model, change.from_version, target, change.kind)
    pause_at("after-champion-move")
    return _complete(client, pending)


def reconcile(model_name: str) -> list[PendingChange]:
    """Finish or discard the changes of `model_name` left unfinished by a crash; returns those that happened.

    Call it holding the model's promotion lock (`adapters.locks`), so no change is in flight meanwhile.
    Raises when MLflow or S3 cannot be read (deciding on a partial view would be wrong).
    """
    from adapters.history_store import delete_pending, list_pending

    pending = list_pending(model_name)
    if not pending:
        return []
    client = mlflow_client(get_settings())
    champion = aliases_of(client, model_name).get(CHAMPION)
    done = []
    for intent, moved in zip(pending, happened(pending, champion), strict=True):
        if moved:
            log.warning("%s: finishing an interrupted change: %s", model_name, intent.change.describe())
            _complete(client, intent)
            done.append(intent)
        else:
            log.warning("%s: discarding an intent whose move never happened: %s", model_name, intent.change.describe())
            delete_pending(intent)
    return done


def promote_version(
    model_name: str, version: str, expected_champion: str | None, reason: str = "", actor: str | None = None
) -> Promotion:
    """Move `champion` to `version` and `previous` to the replaced champion, then tag and record it.

    Compare-and-set: if the champion is no longer `expected_champion` (another run promoted since the
    decision), nothing changes and `PromotionConflict` is raised. Idempotent: when an earlier attempt of
    the same promotion moved the alias and then failed (a timeout, MLflow died), this call finds its intent,
    finishes it and returns it instead of raising a conflict. The version gets a `promoted_at` tag (UTC,
    ISO 8601) after the move, which the serving API reports. The change is recorded in the champion history
    with `reason`, `actor` (default: the flow run or the OS user) and the new champion's holdout metrics.
    """
    from adapters.history_store import make_change

    pause_at("before-promote")
    client = mlflow_client(get_settings())
    for intent in reconcile(model_name):
        if _same(intent.change, "promotion", expected_champion, version):
            log.warning("%s: v%s was promoted by an earlier attempt; finished it", model_name, version)
            return _promotion(intent)
    aliases = aliases_of(client, model_name)
    current = aliases.get(CHAMPION)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name!r} is v{current}, not v{expected_champion} as when the decision was "
            "made; not promoting against a stale champion"
        )
    change = make_change(model_name, current, version, "promotion", reason, actor)  # metrics read before the move
    promoted_at = datetime.fromisoformat(change.at).isoformat(timespec="seconds")
    intent = PendingChange(
        change,
        before={CHAMPION: current, PREVIOUS: aliases.get(PREVIOUS)},
        after={CHAMPION: version} | ({PREVIOUS: current} if current is not None else {}),
        tags={version: {"promoted_at": promoted_at}},
    )
    apply_change(client, intent)
    return _promotion(intent)


def _same(change: ChampionChange, kind: str, from_version: str | None, to_version: str | None) -> bool:
    return (change.kind, change.from_version, change.to_version) == (kind, from_version, to_version)


def _promotion(intent: PendingChange) -> Promotion:
    change = intent.change
    promoted_at = datetime.fromisoformat(change.at).isoformat(timespec="seconds")
    return Promotion(
        change.model, str(change.to_version), change.from_version, intent.before.get(PREVIOUS), promoted_at
    )


def revert_promotion(promotion: Promotion, reason: str, actor: str | None = None) -> None:
    """Undo `promotion`: `champion` and `previous` go back to where they were; the reason is tagged.

    Compare-and-set again: if the champion moved since (another promotion or a rollback), nothing is
    undone and `PromotionConflict` says so. After a cold-start promotion the `champion` alias is removed.
    Idempotent like `promote_version`, and recorded in the champion history the same way.
    """
    from adapters.history_store import make_change

    client = mlflow_client(get_settings())
    name, version = promotion.model_name, promotion.version
    for intent in reconcile(name):
        if _same(intent.change, "revert", version, promotion.replaced):
            return
    aliases = aliases_of(client, name)
    if aliases.get(CHAMPION) != version:
        raise PromotionConflict(
            f"champion of {name!r} is v{aliases.get(CHAMPION)}, not v{version}: not reverting its promotion"
        )
    intent = PendingChange(
        make_change(name, version, promotion.replaced, "revert", reason, actor),
        before={CHAMPION: version, PREVIOUS: aliases.get(PREVIOUS)},
        after={CHAMPION: promotion.replaced, PREVIOUS: promotion.replaced_previous},
        tags={version: {"promoted_at": None, "rolled_back": reason}},
    )
    apply_change(client, intent)
    log.warning("%s: promotion of v%s reverted (champion back to v%s): %s", name, version, promotion.replaced, reason)


def reconcile_now(model_name: str, lock_timeout: float = 15) -> str | None:
    """`reconcile` under the model's promotion lock, for readers (`mlops history`); returns a warning or None.

    When the lock stays busy (a promotion or rollback is running, and will reconcile itself) or a server is
    unreachable, nothing is changed and the warning says so.
    """
    from adapters.locks import ensure_lock, hold, promotion_lock_name

    try:
        with hold(ensure_lock(promotion_lock_name(model_name)), timeout_seconds=lock_timeout):
            done = reconcile(model_name)
    except Exception as exc:
        return f"unfinished champion changes of {model_name} not checked ({type(exc).__name__}: {exc})"
    if done:
        return f"finished {len(done)} interrupted champion change(s) of {model_name}: " + "; ".join(
            intent.change.describe() for intent in done
        )
    return None
