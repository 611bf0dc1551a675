"""Per-column choices of `mlops data init`: each feature's type, range, categories and null tolerance.

Or why a column is left out. Pure (pandas and the config model); `core/data/config_inference.py` puts them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from core.data.column_kinds import (
    count_text,
    is_bool,
    is_number,
    is_text,
    nulls_text,
    plain_number,
    plain_value,
    round_up,
    show_number,
    whole_numbers,
)
from core.data.dataset import MAX_ONE_HOT_CATEGORIES, CategoricalEncoding, Feature, FeatureType


@dataclass(frozen=True)
class InferenceRules:
    """The knobs of the inference; the YAML header states each one."""

    max_categories: int = 50
    range_margin: float = 0.1
    null_margin: float = 0.05
    max_classes: int = 20
    min_rows_cap: int = 100
    holdout_fraction: float = 0.2


DEFAULT_RULES = InferenceRules()


def datetime_feature(name: str, series: pd.Series, rules: InferenceRules) -> tuple[Feature, str]:
    """A date/time column besides the time column as a `datetime` feature (its calendar parts), with its note."""
    share = float(series.isna().mean())
    feature = Feature(name=name, type=FeatureType.datetime, max_null_fraction=_null_tolerance(share, rules))
    return feature, f"date/time besides the time column: its calendar parts are features; {nulls_text(share)}"


# --- features ---


def _null_tolerance(share: float, rules: InferenceRules) -> float | None:
    """None (use the default) for a column without nulls, else share + margin rounded up, capped at 1."""
    return None if share == 0 else min(1.0, round_up(share + rules.null_margin))


def _bounds(low: float, high: float, whole: bool, rules: InferenceRules) -> tuple[int | float, int | float]:
    margin = rules.range_margin * (high - low)
    # round to a tenth of the margin's order of magnitude: readable, and widening by at most that much more
    step = 10 ** (math.floor(math.log10(margin)) - 1) if margin > 0 else 1
    step = max(step, 1) if whole else step  # whole numbers keep whole bounds
    decimals = max(0, -math.floor(math.log10(step)))
    lower = round(math.floor((low - margin) / step) * step, decimals)
    upper = round(math.ceil((high + margin) / step) * step, decimals)
    if low >= 0:
        lower = max(lower, 0)
    return plain_number(lower), plain_number(upper)


def _numeric_feature(name: str, series: pd.Series, share: float, rules: InferenceRules) -> tuple[Feature, str]:
    values = series.dropna().astype("float64")
    low, high = float(values.min()), float(values.max())
    whole = whole_numbers(values)
    lower, upper = _bounds(low, high, whole, rules)
    feature = Feature(
        name=name, type=FeatureType.numeric, min=lower, max=upper, max_null_fraction=_null_tolerance(share, rules)
    )
    kind = "whole numbers" if whole else "numbers"
    return feature, f"{kind}, observed {show_number(low)} .. {show_number(high)}; {nulls_text(share)}"


def _categorical_feature(name: str, series: pd.Series, share: float, rules: InferenceRules) -> tuple[Feature, str]:
    values = series.dropna()
    tolerance = _null_tolerance(share, rules)
    if is_bool(series):
        feature = Feature(name=name, type=FeatureType.categorical, max_null_fraction=tolerance)
        return feature, f"true/false; categories not listed (text never matches true/false); {nulls_text(share)}"
    distinct = values.drop_duplicates().tolist()
    if not all(isinstance(v, str) for v in distinct):
        feature = Feature(name=name, type=FeatureType.categorical, max_null_fraction=tolerance)
        return feature, f"{len(distinct)} values of mixed types; categories not listed; {nulls_text(share)}"
    if len(distinct) > rules.max_categories:  # kept by `_leave_out_reason`: values repeat across rows
        feature = Feature(
            name=name, type=FeatureType.categorical, encoding=CategoricalEncoding.target, max_null_fraction=tolerance
        )
        encoding = f"target-encoded (above the cap of {rules.max_categories} for one-hot); categories not listed"
        return feature, f"text, {count_text(len(distinct))} distinct values: {encoding}; {nulls_text(share)}"
    feature = Feature(name=name, type=FeatureType.categorical, categories=sorted(distinct), max_null_fraction=tolerance)
    many = (
        f"; target-encoded (more than {MAX_ONE_HOT_CATEGORIES} listed)"
        if len(distinct) > MAX_ONE_HOT_CATEGORIES
        else ""
    )
    return feature, f"text, {len(distinct)} distinct values (cap {rules.max_categories}){many}; {nulls_text(share)}"


def _leave_out_reason(name: str, series: pd.Series, rules: InferenceRules) -> str | None:
    """Why a column cannot be a feature, or None when it can."""
    values = series.dropna()
    distinct = values.nunique()
    reason = None
    if values.empty:
        reason = f"{name} has only empty values"
    elif distinct == 1:
        single = plain_value(values.iloc[0])
        reason = f"{name} has a single value ({single!r}) in every row; add it by hand if it varies later"
    elif is_number(series):
        if not values.astype("float64").map(math.isfinite).all():
            reason = f"{name} has infinite values"
    elif is_bool(series):
        pass
    elif is_text(series):
        # (nearly) a value of its own per row: an id or free text, nothing a category encoding can learn from
        own_value_share = 0.9
        if distinct > rules.max_categories and distinct >= own_value_share * len(values):
            per_row = "a distinct value in every row" if distinct == len(values) else "nearly a distinct value per row"
            reason = (
                f"{name} has {per_row} ({count_text(distinct)} distinct values in {count_text(len(values))} "
                "values): an id or free text, too few repeats to learn a category from"
            )
    else:
        reason = f"{name} has type {series.dtype}, neither numeric nor categorical"
    return reason


def infer_features(
    frame: pd.DataFrame, taken: set[str], rules: InferenceRules
) -> tuple[list[Feature], dict[str, str], dict[str, str]]:
    """Every column not `taken` as a feature (with its note) or left out (with the reason)."""
    features, notes, left_out = [], {}, {}
    for column in frame.columns:
        name = str(column)
        if column in taken:
            continue
        series = frame[column]
        reason = _leave_out_reason(name, series, rules)
        if reason is not None:
            left_out[name] = reason
            continue
        share = float(series.isna().mean())
        if is_number(series):
            feature, note = _numeric_feature(name, series, share, rules)
        else:
            feature, note = _categorical_feature(name, series, share, rules)
        features.append(feature)
        notes[name] = note
    return features, notes, left_out
