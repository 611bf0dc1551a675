"""What live traffic says about a challenger against the champion, on the same records.

Each record's two outputs paired from the logs, call times, agreement, output shift, and the realised paired
comparison once labels arrive. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from core.monitoring.drift_statistics import categorical_psi, numeric_psi
from core.rollout.state import CutOff, RolloutState

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
