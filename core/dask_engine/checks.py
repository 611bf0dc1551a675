"""Full-data checks of a big snapshot, computed partition by partition and merged (pure).

The Dask engine cannot hand a whole snapshot to Great Expectations, so GX checks a sample and these
checks cover every row: each partition is summarised by `partition_stats` (counts, min/max, values
outside the allowed set) on the cluster, the summaries are merged by `merge_stats` (associative, so a
tree reduction gives the same answer as one pass), and `full_data_failures` turns the merged summary
into failures worded like GX's. Id uniqueness is not mergeable per partition: the caller counts the
duplicated ids on the cluster and passes the number in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig, Feature, FeatureType
from core.data.validation import ExpectationFailure, ValidationReport

_MAX_BAD_VALUES = 20  # distinct unexpected categories kept per column (with their counts)

Stats = dict[str, Any]


def _tolerance(config: DatasetConfig, name: str) -> float:
    for feature in config.features:
        if feature.name == name and feature.max_null_fraction is not None:
            return feature.max_null_fraction
    return config.max_null_fraction


def _labels(values: pd.Series) -> pd.Series:
    """Values as the text compared with a config's classes or categories: a whole float as its integer.

    A column of 0/1 with one null is float (0.0, 1.0), and GX counts 1.0 as in the set [0, 1]: so do these checks.
    """
    text = values.astype(str)
    if pd.api.types.is_float_dtype(values.dtype):
        whole = np.isfinite(values) & (values == np.floor(values)) & (values.abs() < 2**53)
        text[whole] = values[whole].astype("int64").astype(str)
    return text


def partition_stats(frame: pd.DataFrame, config: DatasetConfig) -> Stats:
    """Counts and extremes of one partition: rows, nulls, out-of-range values, values outside the allowed sets."""
    stats: Stats = {"rows": len(frame), "nulls": {}, "numeric": {}, "outside_set": {}, "target_values": {}}
    for column in (config.id_column, config.target, *config.feature_names):
        if column in frame.columns:
            stats["nulls"][column] = int(frame[column].isna().sum())
    for feature in config.features:
        if feature.name not in frame.columns:
            continue
        values = frame[feature.name]
        if feature.type is FeatureType.numeric:
            if not pd.api.types.is_numeric_dtype(values.dtype):
                stats["numeric"][feature.name] = {"non_numeric": True}
                continue
            present = values.dropna()
            stats["numeric"][feature.name] = {
                "min": float(present.min()) if len(present) else None,
                "max": float(present.max()) if len(present) else None,
                "below": int((present < feature.min).sum()) if feature.min is not None else 0,
                "above": int((present > feature.max).sum()) if feature.max is not None else 0,
            }
        elif feature.categories is not None:
            bad = _labels(values.dropna())
            bad = bad[~bad.isin([str(c) for c in feature.categories])]
            stats["outside_set"][feature.name] = {str(k): int(v) for k, v in bad.value_counts().items()}
    if config.target in frame.columns:
        target = frame[config.target].dropna()
        if config.task.is_classification:
            stats["target_values"] = {str(k): int(v) for k, v in _labels(target).value_counts().items()}
        else:
            numbers = pd.to_numeric(target, errors="coerce").dropna()
            stats["target_range"] = [float(numbers.min()), float(numbers.max())] if len(numbers) else None
    return stats


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def _extreme(a: float | None, b: float | None, pick: Any) -> float | None:
    known = [v for v in (a, b) if v is not None]
    return pick(known) if known else None


def _merge_numeric(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if a.get("non_numeric") or b.get("non_numeric"):
        return {"non_numeric": True}
    return {
        "min": _extreme(a.get("min"), b.get("min"), min),
        "max": _extreme(a.get("max"), b.get("max"), max),
        "below": a.get("below", 0) + b.get("below", 0),
        "above": a.get("above", 0) + b.get("above", 0),
    }


def merge_stats(a: Stats, b: Stats) -> Stats:
    """The summary of two partitions together (associative and commutative)."""
    merged: Stats = {
        "rows": a["rows"] + b["rows"],
        "nulls": _add_counts(a["nulls"], b["nulls"]),
        "numeric": {
            k: _merge_numeric(a["numeric"].get(k, {}), b["numeric"].get(k, {}))
            for k in a["numeric"].keys() | b["numeric"].keys()
        },
        "outside_set": {
            k: _add_counts(a["outside_set"].get(k, {}), b["outside_set"].get(k, {}))
            for k in a["outside_set"].keys() | b["outside_set"].keys()
        },
        "target_values": _add_counts(a["target_values"], b["target_values"]),
    }
    if "target_range" in a or "target_range" in b:
        ranges = [r for r in (a.get("target_range"), b.get("target_range")) if r]
        merged["target_range"] = [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None
    return merged


def _share(count: int, rows: int) -> str:
    return f"{count} value(s) ({100 * count / max(rows, 1):.1f} %)"


def _sample(counts: dict[str, int]) -> list[str]:
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:5]


@dataclass
class _Findings:
    """The checks made so far and the failures among them, in the order GX lists them."""

    checks: int = 0
    failures: list[ExpectationFailure] = field(default_factory=list)

    def add(self, expectation: str, column: str | None, failure: str | None) -> None:
        """Count one check; `failure` (its detail) when it failed, None when it passed."""
        self.checks += 1
        if failure is not None:
            self.failures.append(ExpectationFailure(expectation, column, failure))


def full_data_failures(
    stats: Stats, config: DatasetConfig, columns: list[str], duplicated_ids: int
) -> tuple[int, list[ExpectationFailure]]:
    """(number of checks, failures) of the merged summary of every partition; details say "full data"."""
    rows, found = stats["rows"], _Findings()
    found.add(
        "expect_table_row_count_to_be_between",
        None,
        f"{rows} rows, need at least {config.min_rows}" if rows < config.min_rows else None,
    )
    for column in (config.id_column, config.target, *config.feature_names):
        found.add("expect_column_to_exist", column, None if column in columns else "column is missing")
    present = set(columns)
    _check_id_and_target(found, stats, config, present, duplicated_ids)
    for feature in config.features:
        if feature.name in present:
            _check_feature(found, stats, config, feature)
    return found.checks, found.failures


def _check_id_and_target(
    found: _Findings, stats: Stats, config: DatasetConfig, present: set[str], duplicated_ids: int
) -> None:
    rows = stats["rows"]
    for column in (config.id_column, config.target):
        if column in present:
            nulls = stats["nulls"].get(column, 0)
            found.add("expect_column_values_to_not_be_null", column, f"{_share(nulls, rows)} null" if nulls else None)
    if config.id_column in present:
        duplicated = f"{duplicated_ids} duplicated id value(s)" if duplicated_ids else None
        found.add("expect_column_values_to_be_unique", config.id_column, duplicated)
    if config.target not in present:
        return
    distinct = len(stats["target_values"]) if config.task.is_classification else _range_distinct(stats)
    too_few = f"{distinct} distinct value(s), need at least 2" if distinct < 2 else None
    found.add("expect_column_unique_value_count_to_be_between", config.target, too_few)
    if config.classes is not None:
        allowed = {str(c) for c in config.classes}
        bad = {k: v for k, v in stats["target_values"].items() if k not in allowed}
        found.add("expect_column_values_to_be_in_set", config.target, _not_allowed(bad, rows) if bad else None)


def _check_feature(found: _Findings, stats: Stats, config: DatasetConfig, feature: Feature) -> None:
    rows, name = stats["rows"], feature.name
    tolerance = _tolerance(config, name)
    nulls = stats["nulls"].get(name, 0)
    too_many = (
        f"{_share(nulls, rows)} null (at most {100 * tolerance:.1f} % allowed)" if nulls > tolerance * rows else None
    )
    found.add("expect_column_values_to_not_be_null", name, too_many)
    numeric = stats["numeric"].get(name)
    if feature.type is FeatureType.numeric and numeric is not None:
        found.add(
            "expect_column_values_to_be_in_type_list", name, "not numeric" if numeric.get("non_numeric") else None
        )
        if numeric.get("non_numeric"):
            return
        if feature.min is not None or feature.max is not None:
            found.add("expect_column_values_to_be_between", name, _out_of_range(numeric, feature, rows))
    outside = stats["outside_set"].get(name)
    if outside is not None:
        found.add("expect_column_values_to_be_in_set", name, _not_allowed(outside, rows) if outside else None)


def _out_of_range(numeric: dict[str, Any], feature: Feature, rows: int) -> str | None:
    bad = numeric["below"] + numeric["above"]
    if not bad:
        return None
    return (
        f"{_share(bad, rows)} outside [{feature.min}, {feature.max}] ({numeric['below']} below, "
        f"{numeric['above']} above; observed min {numeric['min']}, max {numeric['max']})"
    )


def _not_allowed(counts: dict[str, int], rows: int) -> str:
    return f"{_share(sum(counts.values()), rows)} not in the allowed values; e.g. {_sample(counts)}"


def _range_distinct(stats: Stats) -> int:
    span = stats.get("target_range")
    if not span:
        return 0
    return 1 if span[0] == span[1] else 2


def combined_report(
    sample_report: ValidationReport, sample_rows: int, stats: Stats, checks: int, failures: list[ExpectationFailure]
) -> ValidationReport:
    """GX's report on the sample plus the full-data checks: one report, failures saying which they come from."""
    sampled = [replace(f, detail=f"{f.detail} [GX on a sample of {sample_rows} rows]") for f in sample_report.failures]
    full = [replace(f, detail=f"{f.detail} [full data, {stats['rows']} rows]") for f in failures]
    stats_out = {k: v for k, v in stats.items() if k != "outside_set"} | {
        "outside_set": {k: dict(list(v.items())[:_MAX_BAD_VALUES]) for k, v in stats["outside_set"].items()}
    }
    return ValidationReport(
        success=sample_report.success and not failures,
        n_expectations=sample_report.n_expectations + checks,
        failures=sampled + full,
        statistics={"sample": sample_report.statistics, "sample_rows": sample_rows, "full_data": stats_out},
        result=sample_report.result,
    )
