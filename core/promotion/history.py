"""Champion history, the pure part: one record per move of the `champion` alias, its key and its display.

Each change (a promotion, a revert of a promotion the serving API did not confirm, a rollback) is stored
as `s3://<bucket>/history/<model>/<sortable UTC timestamp>-<uuid>.json`, so the history is ordered by its
keys and an append never rewrites an earlier record. Storing and listing are `adapters.history_store`.

Before the alias moves, the change is written down as a `PendingChange` (the intent: the record itself, the
aliases before and after, the tags to set), under `history-pending/<model>/`. Once the move is done and the
record stored, the intent is deleted; an intent left behind by a crash is completed (or, when its move never
happened, discarded) by the next promotion, rollback or `mlops history` (`adapters.promotion.reconcile`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

PREFIX = "history"
PENDING_PREFIX = "history-pending"
ChangeKind = Literal["promotion", "rollback", "revert"]


@dataclass(frozen=True)
class ChampionChange:
    """One move of the `champion` alias of a registered model.

    Attributes:
        at: When (UTC, ISO 8601 with microseconds).
        model: Registered model name.
        from_version: Champion before the change (None: there was none).
        to_version: Champion after the change (None: the alias was removed, e.g. a reverted cold start).
        kind: `promotion`, `rollback` or `revert`.
        reason: Why (the promotion decision and the run's reason, the rollback reason, ...).
        actor: Who (an OS user, a Prefect flow run, `prefect-ui`).
        metrics: Holdout metrics of the new champion (empty when there is none).
        run_id: MLflow run of the new champion.
        links: Name -> URL (MLflow model version, Prefect flow run).
        id: Unique id of the record.
    """

    at: str
    model: str
    from_version: str | None
    to_version: str | None
    kind: ChangeKind
    reason: str
    actor: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    links: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChampionChange:
        """Parse a stored record (unknown keys of later versions are ignored)."""
        raw = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def describe(self) -> str:
        """One line for people: `2026-11-24T13:00:00Z promotion v1 -> v2 by alice: reason`."""
        before = f"v{self.from_version}" if self.from_version else "none"
        after = f"v{self.to_version}" if self.to_version else "none"
        return f"{self.at} {self.kind} {before} -> {after} by {self.actor}: {self.reason}"


@dataclass(frozen=True)
class PendingChange:
    """A champion change written down before its alias move: enough to finish it after a crash.

    Attributes:
        change: The history record to store once the move is done (its id and time are fixed here, so
            storing it twice writes the same object).
        before: `champion` and `previous` as they were (None: absent).
        after: What the aliases must become; `champion` is the move itself, the others follow it. A missing
            key leaves that alias alone; None removes it.
        tags: Version -> tag -> value to set once the champion moved (None deletes the tag).
    """

    change: ChampionChange
    before: dict[str, str | None]
    after: dict[str, str | None]
    tags: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {"change": asdict(self.change), "before": self.before, "after": self.after, "tags": self.tags},
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PendingChange:
        """Parse a stored intent."""
        raw = json.loads(text)
        change = ChampionChange.from_json(json.dumps(raw["change"]))
        return cls(change, raw["before"], raw["after"], raw.get("tags", {}))

    @property
    def champion_after(self) -> str | None:
        """The version the `champion` alias points at once the change is done (None: no champion)."""
        return self.after.get("champion")


def happened(pending: list[PendingChange], champion: str | None) -> list[bool]:
    """Which of the intents (oldest first) had their alias move done, given the champion now.

    The newest intent happened when the champion is its target. An older one happened when the champion is
    its target, or when a later intent started from its target (that later change saw it done). Intents are
    only written under the model's promotion lock, after the earlier ones were completed or discarded, so no
    other move can fall between them.
    """
    done = []
    for i, intent in enumerate(pending):
        later_saw_it = any(after.before.get("champion") == intent.champion_after for after in pending[i + 1 :])
        done.append(intent.champion_after == champion or later_saw_it)
    return done


def history_prefix(model_name: str) -> str:
    """Key prefix of a model's history."""
    return f"{PREFIX}/{model_name}/"


def record_key(change: ChampionChange) -> str:
    """Object key of a change: sortable by time, unique by the record id."""
    stamp = datetime.fromisoformat(change.at).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{history_prefix(change.model)}{stamp}-{change.id}.json"


def pending_prefix(model_name: str) -> str:
    """Key prefix of a model's unfinished changes (also the folder name under the local state dir)."""
    return f"{PENDING_PREFIX}/{model_name}/"


def pending_key(change: ChampionChange) -> str:
    """Object key of the intent of `change` (sortable by time, like its record)."""
    return pending_prefix(change.model) + record_key(change).removeprefix(history_prefix(change.model))


def history_table(changes: list[ChampionChange], metric: str = "roc_auc") -> list[dict[str, Any]]:
    """Rows for display: when, kind, from, to, the new champion's metric, actor, reason."""
    return [
        {
            "at": change.at[:19].replace("T", " "),
            "kind": change.kind,
            "from": f"v{change.from_version}" if change.from_version else "-",
            "to": f"v{change.to_version}" if change.to_version else "-",
            metric: f"{change.metrics[metric]:.4f}" if metric in change.metrics else "",
            "actor": change.actor,
            "reason": change.reason,
        }
        for change in changes
    ]
