"""Entity features computed from an event history, and the accounting of a point-in-time join (pure).

`history_features` turns raw events (one row per past account event of an applicant) into the feature
table the offline store serves: per entity and event time, the aggregates known at that moment. A
point-in-time join then picks, for each training row, the newest feature row at or before the row's own
time (never after: that would leak the future into training).

Feast's point-in-time join silently drops entity rows whose time is before all feature data of their
entity or older than the feature view's TTL (and leaves rows without features as nulls). `join_report`
counts rows in, rows out and rows without features; `with_join` adds them to the validation report, as a
failure above a configured share.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

import pandas as pd

from core.data.validation import ExpectationFailure, ValidationReport

ENTITY_TIMESTAMP = "event_timestamp"
HISTORY_FEATURES = ["prev_applications", "past_delinquencies", "last_utilization", "mean_utilization_3"]


def history_features(events: pd.DataFrame, entity: str) -> pd.DataFrame:
    """Running aggregates per entity, as of each event: one feature row per event.

    - `prev_applications`: accounts opened so far (events up to and including this one);
    - `past_delinquencies`: how many of them went delinquent;
    - `last_utilization`: the utilisation reported by this event;
    - `mean_utilization_3`: mean utilisation of the last three events.
    """
    ordered = events.sort_values([entity, ENTITY_TIMESTAMP], kind="stable", ignore_index=True)
    grouped = ordered.groupby(entity, sort=False)
    return pd.DataFrame(
        {
            entity: ordered[entity],
            ENTITY_TIMESTAMP: ordered[ENTITY_TIMESTAMP],
            "prev_applications": (grouped.cumcount() + 1).astype("int64"),
            "past_delinquencies": grouped["delinquent"].cumsum().astype("int64"),
            "last_utilization": ordered["utilization"].astype("float64"),
            "mean_utilization_3": grouped["utilization"]
            .rolling(3, min_periods=1)
            .mean()
            .reset_index(level=0, drop=True)
            .astype("float64"),
        }
    )


@dataclass(frozen=True)
class JoinReport:
    """What a point-in-time join did to the training rows: nothing lost silently."""

    feature_service: str
    rows_in: int
    rows_out: int  # rows the store's join returned
    rows_dropped: int  # rows the store's join did not return (before all feature data, or beyond the TTL)
    rows_without_features: int  # rows returned (or put back) with every store feature null
    max_missing_share: float

    @property
    def missing(self) -> int:
        """Rows that reach training without store features (dropped ones are put back with nulls)."""
        return self.rows_dropped + self.rows_without_features

    @property
    def missing_share(self) -> float:
        """`missing` as a share of `rows_in`."""
        return self.missing / self.rows_in if self.rows_in else 0.0

    @property
    def ok(self) -> bool:
        """At most the configured share of rows lacks store features."""
        return self.missing_share <= self.max_missing_share

    def summary(self) -> str:
        """One line for logs, the validation report and the model card."""
        return (
            f"feature service {self.feature_service!r}: {self.rows_in} rows in, {self.rows_out} out of the "
            f"point-in-time join, {self.rows_dropped} dropped by it, {self.rows_without_features} without features; "
            f"{self.missing_share:.1%} without store features (limit {self.max_missing_share:.1%})"
        )

    def to_json(self) -> str:
        """The counts as JSON (stored next to the validation report)."""
        return json.dumps(asdict(self) | {"missing_share": self.missing_share, "ok": self.ok}, indent=2)


def complete_join(
    entity_rows: pd.DataFrame, joined: pd.DataFrame, keys: list[str], features: list[str]
) -> tuple[pd.DataFrame, int, int]:
    """Every entity row once, in its original order, with the store's features (null where it gave none).

    Returns the completed frame, the number of rows the store's join returned and how many entity rows it
    dropped. `keys` identify a row (entity key and event time); `features` are the store's columns.
    """
    returned = joined[[*keys, *features]].drop_duplicates(subset=keys, keep="last")
    completed = entity_rows.merge(returned, on=keys, how="left", validate="many_to_one")
    found = entity_rows[keys].merge(returned[keys], on=keys, how="inner")
    return completed, len(joined), len(entity_rows) - len(found)


@dataclass(frozen=True)
class JoinCounts:
    """Rows of a point-in-time join: sent to the store, returned by it, and dropped by it (`complete_join`)."""

    rows_in: int
    rows_out: int
    dropped: int


def join_report(
    service: str, counts: JoinCounts, completed: pd.DataFrame, features: list[str], max_missing_share: float
) -> JoinReport:
    """Count what the join did (`complete_join`'s outputs) into a `JoinReport`."""
    all_null = int(completed[features].isna().all(axis=1).sum())
    return JoinReport(
        service, counts.rows_in, counts.rows_out, counts.dropped, all_null - counts.dropped, max_missing_share
    )


def with_join(report: ValidationReport, join: JoinReport) -> ValidationReport:
    """`report` with the point-in-time join's counts in its statistics, and a failure when over the limit."""
    failures = list(report.failures)
    if not join.ok:
        failures.append(ExpectationFailure("feature_store_join", None, join.summary()))
    return ValidationReport(
        success=report.success and join.ok,
        n_expectations=report.n_expectations + 1,
        failures=failures,
        statistics=report.statistics | {"feature_join": json.loads(join.to_json())},
        result=report.result,
    )


@dataclass(frozen=True)
class Materialized:
    """One materialization: the views and the window loaded into the online store."""

    views: list[str]
    start: datetime
    end: datetime

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if not self.views:
            return "materialized nothing: the registry holds no online feature view (apply a repository first)"
        return f"materialized {', '.join(self.views)} from {self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"
