"""Full-data checks of a big snapshot, computed partition by partition and merged (pure).

The Dask engine cannot hand a whole snapshot to Great Expectations, so GX checks a sample and these
checks cover every row: each partition is summarised by `partition_stats` (counts, min/max, values
outside the allowed set) on the cluster, the summaries are merged by `merge_stats` (associative, so a
tree reduction gives the same answer as one pass), and `full_data_failures` turns the merged summary
into failures worded like GX's. Id uniqueness is not mergeable per partition: the caller counts the
duplicated ids on the cluster and passes the number in.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pandas as pd

from core.dataset import DatasetConfig, FeatureType
from core.split import holdout_threshold
from core.validation import ExpectationFailure, ValidationReport

_MAX_BAD_VALUES = 20  # distinct unexpected categories kept per column (with their counts)
_BUCKETS = 10_000

Stats = dict[str, Any]


def choose_engine(config: DatasetConfig, rows: int | None) -> str:
    """`pandas` or `dask` for a snapshot of `rows` rows (None: unknown, e.g. CSV without metadata)."""
    if config.engine != "auto":
        return config.engine
    return "dask" if rows is not None and rows >= config.dask_min_rows else "pandas"


def evaluation_threshold(config: DatasetConfig, rows: int) -> int:
    """Buckets below this are the evaluated holdout: a subset of the frozen holdout of about `max_holdout_rows`.

    The frozen holdout is every id whose bucket is below `holdout_threshold`; for a big snapshot only ids
    below this (smaller or equal) threshold are collected and scored, so they are holdout rows, the same
    ones in every run on the same data, and never training rows.
    """
    full = holdout_threshold(config.holdout_fraction)
    wanted = math.ceil(config.max_holdout_rows / max(rows, 1) * _BUCKETS)
    return max(1, min(full, wanted))


def _tolerance(config: DatasetConfig, name: str) -> float:
    for feature in config.features:
        if feature.name == name and feature.max_null_fraction is not None:
            return feature.max_null_fraction
    return config.max_null_fraction


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
            bad = values.dropna().astype(str)
            bad = bad[~bad.isin([str(c) for c in feature.categories])]
            stats["outside_set"][feature.name] = {str(k): int(v) for k, v in bad.value_counts().items()}
    if config.target in frame.columns:
        target = frame[config.target].dropna()
        if config.task.is_classification:
            stats["target_values"] = {str(k): int(v) for k, v in target.value_counts().items()}
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


def full_data_failures(  # noqa: PLR0912, PLR0915 - one block per kind of check, in the order GX lists them
    stats: Stats, config: DatasetConfig, columns: list[str], duplicated_ids: int
) -> tuple[int, list[ExpectationFailure]]:
    """(number of checks, failures) of the merged summary of every partition; details say "full data"."""
    rows, failures, checks = stats["rows"], [], 1
    if rows < config.min_rows:
        failures.append(
            ExpectationFailure(
                "expect_table_row_count_to_be_between", None, f"{rows} rows, need at least {config.min_rows}"
            )
        )
    for column in (config.id_column, config.target, *config.feature_names):
        checks += 1
        if column not in columns:
            failures.append(ExpectationFailure("expect_column_to_exist", column, "column is missing"))
    present = set(columns)
    for column in (config.id_column, config.target):
        if column in present:
            checks += 1
            nulls = stats["nulls"].get(column, 0)
            if nulls:
                failures.append(
                    ExpectationFailure("expect_column_values_to_not_be_null", column, f"{_share(nulls, rows)} null")
                )
    if config.id_column in present:
        checks += 1
        if duplicated_ids:
            failures.append(
                ExpectationFailure(
                    "expect_column_values_to_be_unique", config.id_column, f"{duplicated_ids} duplicated id value(s)"
                )
            )
    if config.target in present:
        checks += 1
        distinct = len(stats["target_values"]) if config.task.is_classification else _range_distinct(stats)
        if distinct < 2:
            failures.append(
                ExpectationFailure(
                    "expect_column_unique_value_count_to_be_between",
                    config.target,
                    f"{distinct} distinct value(s), need at least 2",
                )
            )
        if config.classes is not None:
            checks += 1
            allowed = {str(c) for c in config.classes}
            bad = {k: v for k, v in stats["target_values"].items() if k not in allowed}
            if bad:
                failures.append(
                    ExpectationFailure(
                        "expect_column_values_to_be_in_set",
                        config.target,
                        f"{_share(sum(bad.values()), rows)} not in the allowed values; e.g. {_sample(bad)}",
                    )
                )
    for feature in config.features:
        if feature.name not in present:
            continue
        checks += 1
        tolerance = _tolerance(config, feature.name)
        nulls = stats["nulls"].get(feature.name, 0)
        if nulls > tolerance * rows:
            failures.append(
                ExpectationFailure(
                    "expect_column_values_to_not_be_null",
                    feature.name,
                    f"{_share(nulls, rows)} null (at most {100 * tolerance:.1f} % allowed)",
                )
            )
        numeric = stats["numeric"].get(feature.name)
        if feature.type is FeatureType.numeric and numeric is not None:
            checks += 1
            if numeric.get("non_numeric"):
                failures.append(
                    ExpectationFailure("expect_column_values_to_be_in_type_list", feature.name, "not numeric")
                )
                continue
            if feature.min is not None or feature.max is not None:
                checks += 1
                bad = numeric["below"] + numeric["above"]
                if bad:
                    failures.append(
                        ExpectationFailure(
                            "expect_column_values_to_be_between",
                            feature.name,
                            f"{_share(bad, rows)} outside [{feature.min}, {feature.max}] ({numeric['below']} below, "
                            f"{numeric['above']} above; observed min {numeric['min']}, max {numeric['max']})",
                        )
                    )
        outside = stats["outside_set"].get(feature.name)
        if outside is not None:
            checks += 1
            if outside:
                failures.append(
                    ExpectationFailure(
                        "expect_column_values_to_be_in_set",
                        feature.name,
                        f"{_share(sum(outside.values()), rows)} not in the allowed values; e.g. {_sample(outside)}",
                    )
                )
    return checks, failures


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
