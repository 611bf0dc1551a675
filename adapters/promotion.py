"""Promotion in the registry: the compare-and-set alias move, its history record, and its exact undo."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from adapters.clients import mlflow_client
from adapters.registry import CHAMPION, PREVIOUS, aliases_of, champion_version, move_champion
from adapters.settings import get_settings
from core.errors import PermanentError

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


def promote_version(
    model_name: str, version: str, expected_champion: str | None, reason: str = "", actor: str | None = None
) -> Promotion:
    """Move `champion` to `version` and `previous` to the replaced champion.

    Compare-and-set: if the champion is no longer `expected_champion` (another run promoted since the
    decision), nothing changes and `PromotionConflict` is raised. The champion alias moves in one call;
    if recording `previous` then fails, the champion is put back, so a failure leaves the old champion.
    The version gets a `promoted_at` tag (UTC, ISO 8601), which the serving API reports. The change is
    recorded in the champion history (`adapters.history_store`) with `reason` and `actor` (default: the flow run
    or the OS user); a failure to record it is logged loudly and does not undo the promotion.
    """
    from adapters.history_store import make_change, record_change_safely

    client = mlflow_client(get_settings())
    current = champion_version(model_name)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name!r} is v{current}, not v{expected_champion} as when the decision was "
            "made; not promoting against a stale champion"
        )
    old_previous = aliases_of(client, model_name).get(PREVIOUS)
    promoted_at = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, version, "promoted_at", promoted_at)
    move_champion(client, model_name, version, current)
    log.info("%s: champion v%s -> v%s", model_name, current, version)
    try:
        record_change_safely(make_change(model_name, current, version, "promotion", reason, actor))
    except Exception:  # building the record failed: the promotion stands all the same
        log.exception("HISTORY NOT RECORDED for %s: promotion v%s -> v%s stands", model_name, current, version)
    return Promotion(model_name, version, current, None if old_previous is None else str(old_previous), promoted_at)


def revert_promotion(promotion: Promotion, reason: str, actor: str | None = None) -> None:
    """Undo `promotion`: `champion` and `previous` go back to where they were; the reason is tagged.

    Compare-and-set again: if the champion moved since (another promotion or a rollback), nothing is
    undone and `PromotionConflict` says so. After a cold-start promotion the `champion` alias is removed.
    The revert is recorded in the champion history (a failure to record it is logged, not raised).
    """
    from adapters.history_store import make_change, record_change_safely

    client = mlflow_client(get_settings())
    name, version = promotion.model_name, promotion.version
    current = champion_version(name)
    if current != version:
        raise PromotionConflict(f"champion of {name!r} is v{current}, not v{version}: not reverting its promotion")
    for alias, target in ((CHAMPION, promotion.replaced), (PREVIOUS, promotion.replaced_previous)):
        if target is None:
            with contextlib.suppress(Exception):  # absent already
                client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, target)
    client.delete_model_version_tag(name, version, "promoted_at")
    client.set_model_version_tag(name, version, "rolled_back", reason[:4900])
    log.warning("%s: promotion of v%s reverted (champion back to v%s): %s", name, version, promotion.replaced, reason)
    try:
        record_change_safely(make_change(name, version, promotion.replaced, "revert", reason, actor))
    except Exception:  # building the record failed: the revert stands all the same
        log.exception("HISTORY NOT RECORDED for %s: revert v%s -> v%s stands", name, version, promotion.replaced)
