"""Progressive delivery, the pure part: a rollout's policy and state, who answers a record, the evidence, the verdict.

A candidate that clears the offline gates goes to the `challenger` alias instead of `champion` when its model's
rollout mode (dataset config `operations.rollout`, overridable per run) is `shadow` or `canary`:

- **shadow**: the challenger scores every request beside the champion; only the champion answers;
- **canary**: a share of the records is answered by the challenger, sticky by the record's id (the hash of the
  rollout's id and the record's; the request id for a model without an id field), the same in every serving process
  and after a restart; the champion scores those records too, in the shadow log, so every challenger output has the
  champion's beside it.

The rollout flow (`flows/rollout.py`) pairs the two outputs of each record from the prediction logs, measures
(`measure`) and decides (`judge`): promote, roll back or extend. No I/O here.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.data.rollout_policy import Mode, RolloutPolicy
from core.modeling.metrics import LOWER_IS_BETTER
from core.monitoring.drift_statistics import categorical_psi, numeric_psi

CHALLENGER = "challenger"  # the registry alias of the version under rollout
ROLLOUT_TAG = "mlops.rollout"  # registered model tag: the rollout's state (JSON); absent: no rollout
CUT_OFF_TAG = "mlops.rollout.cut_off"  # registered model tag a serving process sets when it cut the challenger off
EVENTS_PREFIX = "rollouts"  # s3://<bucket>/rollouts/<model>/<time>-<kind>-<id>.json: the rollout's timeline

Action = Literal["promote", "rollback", "extend"]
__all__ = ["Mode", "RolloutPolicy"]  # and the rest of the module; the policy is the dataset config's

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


# ------------------------------------------------------------------------------------------ evidence


@dataclass(frozen=True)
class Arm:
    """One side of a rollout on live traffic: its version, records scored, call times (ms)."""

    version: str
    records: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Realised:
    """The paired comparison on labelled records: (challenger - champion) of `metric`, positive when better."""

    metric: str
    labelled: int
    challenger: float
    champion: float
    delta: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class Evidence:
    """What the live traffic says about a challenger against the champion on the same records."""

    seconds: float
    paired: int  # records with both outputs
    champion: Arm
    challenger: Arm
    agreement: float | None = None
    output_psi: float | None = None
    estimated_metric: str | None = None
    estimated: dict[str, float] = field(default_factory=dict)  # "champion"/"challenger" -> estimated metric
    realised: Realised | None = None
    cut_off: str | None = None

    @property
    def p99_ratio(self) -> float | None:
        """Challenger's p99 call time over the champion's."""
        c, h = self.champion.p99_ms, self.challenger.p99_ms
        return None if c is None or h is None or c <= 0 else h / c

    def figures(self) -> dict[str, Any]:
        """Flat figures for events, tags and tables."""
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 1),
            "paired": self.paired,
            "challenger_records": self.challenger.records,
            "champion_records": self.champion.records,
            "champion_p50_ms": self.champion.p50_ms,
            "champion_p99_ms": self.champion.p99_ms,
            "challenger_p50_ms": self.challenger.p50_ms,
            "challenger_p99_ms": self.challenger.p99_ms,
            "agreement": self.agreement,
            "output_psi": self.output_psi,
        }
        if self.estimated_metric:
            out |= {f"estimated_{side}_{self.estimated_metric}": v for side, v in self.estimated.items()}
        if self.realised is not None:
            r = self.realised
            out |= {
                "labelled": r.labelled,
                f"realised_delta_{r.metric}": r.delta,
                "realised_low": r.low,
                "realised_high": r.high,
            }
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def _percentiles(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def arm(version: str, rows: pd.DataFrame, ms_column: str = "call_ms") -> Arm:
    """One side's records and call-time percentiles from its logged rows."""
    ms = rows[ms_column].to_numpy(dtype=float) if ms_column in rows.columns else np.empty(0)
    return Arm(version, len(rows), *_percentiles(ms))


def agreement(champion: np.ndarray, challenger: np.ndarray, classes: Sequence[Any], tolerance: float) -> float:
    """Share of records both models agree on: the same class, or values within `tolerance` champion std devs."""
    if len(champion) == 0:
        return float("nan")
    if len(classes):
        return float(np.mean(champion.argmax(axis=1) == challenger.argmax(axis=1)))
    scale = float(np.std(champion)) or 1.0
    return float(np.mean(np.abs(champion - challenger) <= tolerance * scale))


def output_psi(champion: np.ndarray, challenger: np.ndarray, classes: Sequence[Any]) -> float:
    """PSI of the challenger's outputs against the champion's on the same records.

    Binary: the positive class's probability in the champion's decile bins; multiclass: the predicted classes;
    a regressor: its values in deciles.
    """
    if len(classes) == 2:
        return numeric_psi(champion[:, 1], challenger[:, 1])
    if len(classes) > 2:
        labels = np.asarray([str(c) for c in classes], dtype=object)
        return categorical_psi(labels[champion.argmax(axis=1)], labels[challenger.argmax(axis=1)])
    return numeric_psi(np.asarray(champion, dtype=float), np.asarray(challenger, dtype=float))


@dataclass(frozen=True)
class Pairs:
    """The records both models scored during a rollout: the challenger's rows and the two outputs of each."""

    rows: pd.DataFrame  # the challenger's logged rows (inputs, ids), in the order of the outputs
    champion: np.ndarray
    challenger: np.ndarray


LOG_VERSION = "model_version"
PAIR_KEY = ["request_id", "record_index"]


def outputs(rows: pd.DataFrame, classes: Sequence[Any]) -> np.ndarray:
    """A model's logged outputs: probabilities in `classes` order, or a regressor's values."""
    if len(classes):
        return rows[[f"proba_{c}" for c in classes]].to_numpy(dtype=float)
    return rows["predicted"].to_numpy(dtype=float)


def since_start(rows: pd.DataFrame, state: RolloutState) -> pd.DataFrame:
    """The logged rows predicted since the rollout started."""
    if rows.empty or "predicted_at" not in rows.columns:
        return rows
    return rows[pd.to_datetime(rows["predicted_at"], utc=True) >= pd.Timestamp(state.since)]


def pair_outputs(answered: pd.DataFrame, shadow: pd.DataFrame, state: RolloutState, classes: Sequence[Any]) -> Pairs:
    """Each record the challenger scored (answered or in the shadow log) with the champion's output on it.

    Rows are matched on request id and the record's place in its request; answered rows come first, so a record
    answered by the champion after the challenger timed out keeps the champion's answer.
    """
    logged = [frame for frame in (answered, shadow) if not frame.empty]
    if not logged:
        empty = np.empty((0, len(classes))) if len(classes) else np.empty(0)
        return Pairs(pd.DataFrame(), empty, empty)
    rows = pd.concat(logged, ignore_index=True)
    versions = rows[LOG_VERSION].astype(str)
    champion = rows[versions == state.champion].drop_duplicates(PAIR_KEY, keep="first")
    challenger = rows[versions == state.version].drop_duplicates(PAIR_KEY, keep="first")
    merged = challenger.merge(champion, on=PAIR_KEY, how="inner", suffixes=("", "__champion"))
    theirs = merged[[c for c in merged.columns if c.endswith("__champion")]]
    theirs.columns = [c.removesuffix("__champion") for c in theirs.columns]
    mine = merged[[c for c in merged.columns if not c.endswith("__champion")]]
    return Pairs(mine.reset_index(drop=True), outputs(theirs, classes), outputs(mine, classes))


def measure(
    answered: pd.DataFrame,
    shadow: pd.DataFrame,
    state: RolloutState,
    classes: Sequence[Any],
    now: datetime,
    cut_off: CutOff | None = None,
) -> tuple[Evidence, Pairs]:
    """The rollout's live evidence from its logged rows (since it started): volume, call times, agreement, shift.

    Estimated and realised performance are added by the caller, which holds the estimators and the labels.
    """
    answered, shadow = since_start(answered, state), since_start(shadow, state)
    pairs = pair_outputs(answered, shadow, state, classes)
    logged = pd.concat([f for f in (answered, shadow) if not f.empty] or [pd.DataFrame({LOG_VERSION: []})])
    versions = logged[LOG_VERSION].astype(str)
    policy = state.rules
    enough = len(pairs.rows) >= 2
    return (
        Evidence(
            seconds=state.age_seconds(now),
            paired=len(pairs.rows),
            champion=arm(state.champion, logged[versions == state.champion]),
            challenger=arm(state.version, logged[versions == state.version]),
            agreement=agreement(pairs.champion, pairs.challenger, classes, policy.agreement_tolerance)
            if enough
            else None,
            output_psi=output_psi(pairs.champion, pairs.challenger, classes) if enough else None,
            cut_off=cut_off.reason if cut_off is not None and cut_off.rollout == state.id else None,
        ),
        pairs,
    )


# ------------------------------------------------------------------------------------------ verdict


@dataclass(frozen=True)
class Verdict:
    """What to do with a rollout now, and why (each gate's outcome: True passed, False failed, None not judged)."""

    action: Action
    reasons: list[str]
    checks: dict[str, bool | None] = field(default_factory=dict)


def _worse_by(metric: str, champion: float, challenger: float) -> float:
    """How much worse the challenger is (positive: worse); relative for lower-is-better metrics."""
    if metric in LOWER_IS_BETTER:
        return (challenger - champion) / abs(champion) if champion else challenger - champion
    return champion - challenger


def _gate_checks(evidence: Evidence, policy: RolloutPolicy) -> tuple[dict[str, bool | None], list[str]]:
    """Each live gate's outcome and the failures' reasons (judged only with enough paired records)."""
    checks: dict[str, bool | None] = {}
    failed: list[str] = []
    enough = evidence.paired >= policy.min_records

    def gate(name: str, limit: float | None, value: float | None, ok: bool, text: str) -> None:
        if limit is None or value is None or not math.isfinite(value) or not enough:
            checks[name] = None
            return
        checks[name] = ok
        if not ok:
            failed.append(text)

    ratio = evidence.p99_ratio
    gate(
        "latency",
        policy.max_p99_ratio,
        ratio,
        ratio is not None and policy.max_p99_ratio is not None and ratio <= policy.max_p99_ratio,
        f"p99 call time {evidence.challenger.p99_ms} ms is {ratio:.2f}x the champion's (max {policy.max_p99_ratio}x)"
        if ratio is not None
        else "",
    )
    a = evidence.agreement
    gate(
        "agreement",
        policy.min_agreement,
        a,
        a is not None and policy.min_agreement is not None and a >= policy.min_agreement,
        f"agreement with the champion {a:.3f} below {policy.min_agreement}" if a is not None else "",
    )
    psi = evidence.output_psi
    gate(
        "output_shift",
        policy.max_output_psi,
        psi,
        psi is not None and policy.max_output_psi is not None and psi <= policy.max_output_psi,
        f"output shift PSI {psi:.3f} above {policy.max_output_psi}" if psi is not None else "",
    )
    metric = evidence.estimated_metric
    if metric and {"champion", "challenger"} <= set(evidence.estimated):
        worse = _worse_by(metric, evidence.estimated["champion"], evidence.estimated["challenger"])
        gate(
            "estimated",
            policy.max_estimated_drop,
            worse,
            policy.max_estimated_drop is not None and worse <= policy.max_estimated_drop,
            f"estimated {metric} {evidence.estimated['challenger']:.4f} against the champion's "
            f"{evidence.estimated['champion']:.4f}: worse by more than {policy.max_estimated_drop}",
        )
    else:
        checks["estimated"] = None
    realised = evidence.realised
    if realised is not None and realised.labelled >= policy.min_labelled:
        ok = realised.high >= -policy.max_realised_drop
        checks["realised"] = ok
        if not ok:
            failed.append(
                f"realised {realised.metric} worse on {realised.labelled} labelled records: (challenger - champion) "
                f"{realised.delta:+.4f}, {realised.confidence:.0%} CI {realised.low:+.4f} to {realised.high:+.4f}"
            )
    else:
        checks["realised"] = None
    return checks, failed


def judge(evidence: Evidence, policy: RolloutPolicy) -> Verdict:
    """Promote, roll back or extend a rollout on its evidence (see `RolloutPolicy` for every gate).

    Rolled back at once when serving cut the challenger off; rolled back when a gate fails on enough records;
    extended while records or time are short, while the realised interval is undecided, or while labels are
    required and missing; rolled back when still undecided after `max_seconds`; else promoted.
    """
    if evidence.cut_off:
        return Verdict("rollback", [f"cut off in serving: {evidence.cut_off}"], {"serving": False})
    checks, failed = _gate_checks(evidence, policy)
    checks["serving"] = True
    if failed:
        return Verdict("rollback", failed, checks)
    waiting = []
    if evidence.paired < policy.min_records:
        waiting.append(f"{evidence.paired} of {policy.min_records} records scored by both so far")
    if evidence.seconds < policy.min_seconds:
        waiting.append(f"{evidence.seconds:.0f} of {policy.min_seconds} s so far")
    realised = evidence.realised
    judged = realised is not None and realised.labelled >= policy.min_labelled
    if policy.require_labels and not judged:
        labelled = realised.labelled if realised is not None else 0
        waiting.append(f"{labelled} of {policy.min_labelled} labelled records so far")
    if judged and realised is not None and realised.low < -policy.max_realised_drop:
        waiting.append(
            f"realised {realised.metric} undecided: (challenger - champion) {realised.delta:+.4f}, "
            f"CI {realised.low:+.4f} to {realised.high:+.4f}"
        )
    if waiting and evidence.seconds >= policy.max_seconds:
        return Verdict("rollback", [f"undecided after {policy.max_seconds} s: " + "; ".join(waiting)], checks)
    if waiting:
        return Verdict("extend", waiting, checks)
    passed = [name for name, ok in checks.items() if ok]
    return Verdict("promote", [f"live gates passed on {evidence.paired} records: {', '.join(sorted(passed))}"], checks)


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


TIMELINE_FIGURES = ("paired", "agreement", "output_psi", "challenger_p99_ms", "champion_p99_ms", "labelled")


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


# ------------------------------------------------------------------------------------------ performance


def primary_metric(classes: Sequence[Any]) -> str:
    """The metric compared live: ROC AUC (macro for multiclass) for a classifier, RMSE for a regressor."""
    return "roc_auc" if len(classes) else "rmse"


def estimated_pair(expected: dict[str, dict[str, float]], metric: str) -> dict[str, float]:
    """`{"champion": x, "challenger": y}` of one metric from each side's expected metrics (finite values only)."""
    return {side: float(v[metric]) for side, v in expected.items() if math.isfinite(v.get(metric, float("nan")))}


def realised_comparison(
    y: np.ndarray, pairs: Pairs, classes: Sequence[Any], confidence: float = 0.95, seed: int = 0
) -> Realised | None:
    """The paired bootstrap of (challenger - champion) on the labelled records (`y` NaN/None where none arrived).

    None when fewer than 10 records are labelled or a class is missing among them.
    """
    from core.evaluation.significance import BootstrapSettings, paired_bootstrap

    known = pd.notna(pd.Series(y, dtype=object)).to_numpy()
    if known.sum() < 10:
        return None
    truth = np.asarray(y, dtype=object)[known]
    truth = truth.astype(np.asarray(classes).dtype) if len(classes) else truth.astype(float)
    if len(classes) and len(set(truth.tolist())) < len(classes):
        return None
    metric = primary_metric(classes)
    interval = paired_bootstrap(
        truth,
        pairs.challenger[known],
        pairs.champion[known],
        list(classes),
        metric,
        settings=BootstrapSettings(n_resamples=1000, confidence=confidence, seed=seed),
    )
    return Realised(
        metric,
        int(known.sum()),
        interval.candidate,
        interval.champion,
        interval.delta,
        interval.low,
        interval.high,
        confidence,
    )
