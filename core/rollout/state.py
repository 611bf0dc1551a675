"""A rollout's state as the registry holds it, a cut-off, who answers a canary record, and the timeline's steps.

No I/O.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from core.data.rollout_policy import Mode, RolloutPolicy

CHALLENGER = "challenger"  # the registry alias of the version under rollout
ROLLOUT_TAG = "mlops.rollout"  # registered model tag: the rollout's state (JSON); absent: no rollout
CUT_OFF_TAG = "mlops.rollout.cut_off"  # registered model tag a serving process sets when it cut the challenger off
EVENTS_PREFIX = "rollouts"  # s3://<bucket>/rollouts/<model>/<time>-<kind>-<id>.json: the rollout's timeline

EventKind = Literal["started", "replaced", "waiting", "cut_off", "extended", "promoted", "rolled_back"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class RolloutState:
    """The rollout under way for a model, as the registry holds it (`ROLLOUT_TAG`)."""

    model: str
    version: str  # the challenger
    champion: str  # the champion it is compared with (a rollout stops applying when the champion moves)
    mode: Mode
    share: float  # of records the challenger answers (0 in shadow)
    since: str  # UTC, ISO 8601
    policy: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def start(
        cls, model: str, version: str, champion: str, policy: RolloutPolicy, run_id: str | None = None
    ) -> RolloutState:
        """A rollout of `version` against `champion` starting now."""
        share = policy.canary_share if policy.mode == "canary" else 0.0
        return cls(model, version, champion, policy.mode, share, _now(), policy.model_dump(), run_id)

    def to_json(self) -> str:
        """The tag's value."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> RolloutState | None:
        """The state a tag holds; None when absent or unreadable (a rollout is then not applied)."""
        return _parsed(cls, text)

    @property
    def rules(self) -> RolloutPolicy:
        """The policy it started with."""
        return RolloutPolicy.model_validate(self.policy) if self.policy else RolloutPolicy(mode=self.mode)

    def age_seconds(self, now: datetime) -> float:
        """Seconds since it started."""
        return (now - datetime.fromisoformat(self.since)).total_seconds()

    def describe(self) -> str:
        """One line: `canary 10% of v3 against v2 since ...`."""
        what = f"canary {self.share:.0%}" if self.mode == "canary" else self.mode
        return f"{what} of v{self.version} against champion v{self.champion} since {self.since}"

    def event(self, kind: str, reason: str, actor: str, figures: dict[str, Any] | None = None) -> RolloutEvent:
        """A step of this rollout, of its challenger against its champion."""
        return RolloutEvent(self.model, self.id, kind, self.version, self.champion, reason, actor, figures or {})  # type: ignore[arg-type]


@dataclass(frozen=True)
class CutOff:
    """A serving process stopped using the challenger for the rest of a rollout: why, when, where."""

    rollout: str
    reason: str
    at: str = field(default_factory=_now)
    pid: int = 0

    def to_json(self) -> str:
        """The tag's value."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> CutOff | None:
        """The cut-off a tag holds; None when absent or unreadable."""
        return _parsed(cls, text)


def _known(cls: Any, raw: dict[str, Any]) -> Any:
    """An instance of dataclass `cls` from the keys it knows (those of later versions are ignored)."""
    return cls(**{k: v for k, v in raw.items() if k in set(cls.__dataclass_fields__)})


def _parsed(cls: Any, text: str | None) -> Any:
    """`_known` of a tag's JSON; None when absent or unreadable (what a tag left by anything else reads as)."""
    if not text:
        return None
    try:
        return _known(cls, json.loads(text))
    except (ValueError, TypeError, AttributeError):
        return None


def takes_challenger(rollout_id: str, key: str, share: float) -> bool:
    """Whether the challenger answers the record keyed `key` in rollout `rollout_id` (canary).

    A hash of both, read as a number in [0, 1): the same record goes to the same side in every process and after a
    restart; another rollout draws anew. Uniform, so the challenger's share of distinct keys is `share`.
    """
    digest = hashlib.blake2b(f"{rollout_id}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


# ------------------------------------------------------------------------------------------ timeline


@dataclass(frozen=True)
class RolloutEvent:
    """One step of a rollout, kept in its timeline (`EVENTS_PREFIX`) and shown on the card."""

    model: str
    rollout: str
    kind: EventKind
    version: str
    champion: str | None
    reason: str
    actor: str
    figures: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=_now)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RolloutEvent:
        """Parse a stored event (unknown keys of later versions ignored); raises ValueError or TypeError."""
        return _known(cls, json.loads(text))

    def key(self) -> str:
        """Its S3 key: sorted by time under the model's folder."""
        stamp = datetime.fromisoformat(self.at).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{EVENTS_PREFIX}/{self.model}/{stamp}-{self.kind}-{self.id}.json"

    def describe(self) -> str:
        """One line for people."""
        return f"{self.at[:19]}Z {self.kind} v{self.version} (champion v{self.champion}) by {self.actor}: {self.reason}"


def timeline_markdown(events: Sequence[RolloutEvent]) -> str:
    """A rollout's events as a Markdown table (time, step, records, agreement, shift, p99s, why)."""
    if not events:
        return "_No rollout recorded._"
    head = "| time (UTC) | step | version | paired | agreement | output PSI | p99 ms (chal./champ.) | labelled | why |"
    lines = [head, "|" + "---|" * 9]
    for e in events:
        f = e.figures
        p99 = f"{_fmt(f.get('challenger_p99_ms'))} / {_fmt(f.get('champion_p99_ms'))}"
        cells = [e.at[:19].replace("T", " "), e.kind, f"v{e.version}", _fmt(f.get("paired")), _fmt(f.get("agreement"))]
        cells += [_fmt(f.get("output_psi")), p99, _fmt(f.get("labelled")), e.reason.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
