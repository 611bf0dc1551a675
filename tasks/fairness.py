"""Fairness: does the model treat the groups of a sensitive feature alike? Measured with fairlearn.

Two differences between groups, both 0 when the groups are treated alike:
- demographic parity difference: the largest gap in selection rate (share predicted positive);
- equalized odds difference: the larger of the largest gaps in true positive rate and false positive rate.

Binary classification only. Groups are the values of the sensitive column (numbers banded by their
slice bins, see `sensitive_groups`). A group with fewer than `min_group_rows` rows is left out of both
differences, and a group without both classes is left out of the equalized odds difference (its true or
false positive rate is undefined: fairlearn would count it as 0); `excluded` says which and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)

from mlops.dataset import DatasetConfig
from tasks.slices import MISSING, slice_labels, slice_order


@dataclass(frozen=True)
class FairnessReport:
    """How differently one model treats the groups of one sensitive feature.

    Attributes:
        feature: The sensitive column.
        demographic_parity_difference: Largest gap in selection rate between groups (NaN if < 2 groups).
        equalized_odds_difference: Larger of the largest TPR and FPR gaps between groups (NaN if < 2 groups).
        by_group: Group -> `selection_rate`, `tpr`, `fpr` (NaN where undefined) and `n_rows`.
        positive_label: The class counted as positive (selected).
        excluded: Group -> why it was left out of one or both differences.
    """

    feature: str
    demographic_parity_difference: float
    equalized_odds_difference: float
    by_group: dict[str, dict[str, float]]
    positive_label: Any = 1
    excluded: dict[str, str] = field(default_factory=dict)


def sensitive_groups(frame: pd.DataFrame, config: DatasetConfig) -> dict[str, pd.Series]:
    """The group of each row for every sensitive feature of the config.

    A column with a slice spec is labelled like its slices (numbers banded by the bins), any other
    column by its value; nulls are `missing`. Groups are ordered categoricals (bands in value order).
    """
    specs = {spec.column: spec for spec in config.slices}
    groups = {}
    for column in config.sensitive_features:
        if column in specs:
            labels = slice_labels(frame, specs[column])
            order = slice_order(specs[column], labels)
        else:
            values = frame[column]
            labels = values.astype("object").where(values.notna(), MISSING).map(str).rename(column)
            present = set(labels.unique())
            order = sorted(present - {MISSING}) + ([MISSING] if MISSING in present else [])
        groups[column] = labels.astype(pd.CategoricalDtype(order, ordered=True))
    return groups


_TOO_FEW = "too few rows"


def _parity_groups(by_group: dict[str, dict[str, float]], excluded: dict[str, str]) -> list[str]:
    """Groups in the demographic parity difference: all but the too small ones."""
    return [g for g in by_group if not excluded.get(g, "").startswith(_TOO_FEW)]


def _odds_groups(by_group: dict[str, dict[str, float]], excluded: dict[str, str]) -> list[str]:
    """Groups in the equalized odds difference: large enough and holding both classes."""
    return [g for g in by_group if g not in excluded]


def _binary(values: Sequence[Any], positive_label: Any) -> np.ndarray:
    return (np.asarray(values) == positive_label).astype("int64")


def fairness_report(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    sensitive: pd.Series,
    positive_label: Any,
    *,
    min_group_rows: int = 1,
) -> FairnessReport:
    """Selection rate, true and false positive rates per group, and the gaps between groups (fairlearn).

    Args:
        y_true: True labels.
        y_pred: Predicted labels (e.g. `model.predict`, or probabilities thresholded by the caller).
        sensitive: The group of each row, in the same order; its name is the feature reported.
        positive_label: The class that counts as selected (e.g. the predicted default).
        min_group_rows: Groups with fewer rows are reported but left out of the differences.

    Returns:
        The report; the differences are NaN when fewer than two groups qualify.

    Raises:
        ValueError: More than two labels (multiclass: not supported), a positive label found in neither
            the truth nor the predictions, or inputs of different lengths.
    """
    truth, predicted = np.asarray(y_true), np.asarray(y_pred)
    if not len(truth) == len(predicted) == len(sensitive):
        raise ValueError(
            f"labels, predictions and groups differ in length: {len(truth)}, {len(predicted)}, {len(sensitive)}"
        )
    labels = set(truth.tolist()) | set(predicted.tolist())
    if len(labels) > 2:
        raise ValueError(
            f"fairness_report is for binary classification, got labels {sorted(map(str, labels))}; "
            "compare one class against the rest by passing labels mapped to that class or not"
        )
    if positive_label not in labels:
        raise ValueError(f"positive label {positive_label!r} is in neither the labels nor the predictions {labels}")
    feature = str(sensitive.name) if sensitive.name is not None else "sensitive"
    if isinstance(sensitive.dtype, pd.CategoricalDtype):
        groups = sensitive.cat.remove_unused_categories().astype(str).where(sensitive.notna(), MISSING)
        order = [str(c) for c in sensitive.cat.categories if (sensitive == c).any()]
    else:
        groups = sensitive.astype("object").where(sensitive.notna(), MISSING).map(str)
        order = sorted(set(groups))
    group_values = groups.to_numpy()
    yt, yp = _binary(truth, positive_label), _binary(predicted, positive_label)

    frame = MetricFrame(
        metrics={
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "n_rows": count,
        },
        y_true=yt,
        y_pred=yp,
        sensitive_features=pd.Series(group_values, name=feature),
    ).by_group
    by_group: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for group in [*order, *(g for g in frame.index if g not in order)]:
        if group not in frame.index:
            continue
        row = frame.loc[group]
        mask = group_values == group
        positives, n_rows = int(yt[mask].sum()), int(mask.sum())
        by_group[group] = {
            "selection_rate": float(row["selection_rate"]),
            "tpr": float(row["tpr"]) if positives else math.nan,
            "fpr": float(row["fpr"]) if positives < n_rows else math.nan,
            "n_rows": n_rows,
        }
        if n_rows < min_group_rows:
            excluded[group] = f"{_TOO_FEW}: {n_rows} < {min_group_rows}"
        elif positives in (0, n_rows):
            excluded[group] = "a single class: left out of the equalized odds difference"

    parity_groups, odds_groups = _parity_groups(by_group, excluded), _odds_groups(by_group, excluded)
    return FairnessReport(
        feature=feature,
        demographic_parity_difference=_difference(demographic_parity_difference, yt, yp, group_values, parity_groups),
        equalized_odds_difference=_difference(equalized_odds_difference, yt, yp, group_values, odds_groups),
        by_group=by_group,
        positive_label=positive_label,
        excluded=excluded,
    )


def _difference(metric: Any, y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, kept: list[str]) -> float:
    """A fairlearn between-groups difference on the rows of the kept groups; NaN with fewer than two."""
    if len(kept) < 2:
        return math.nan
    mask = np.isin(groups, kept)
    return float(metric(y_true[mask], y_pred[mask], sensitive_features=groups[mask]))


def _extremes(report: FairnessReport, rate: str, kept: list[str]) -> str:
    """The groups with the lowest and highest `rate`, e.g. "0.1000 for a vs 0.3000 for b"."""
    values = {g: report.by_group[g][rate] for g in kept if not math.isnan(report.by_group[g][rate])}
    low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    return f"{values[low]:.4f} for {low} vs {values[high]:.4f} for {high}"


def fairness_gate(
    reports: Sequence[FairnessReport], max_dp_difference: float | None, max_eo_difference: float | None
) -> list[str]:
    """Failures: sensitive features whose group differences exceed the limits (None: no limit).

    A difference that could not be measured (NaN: fewer than two groups qualified) is not a failure.

    Returns:
        One line per exceeded limit, naming the feature, the difference, the limit and the two groups
        furthest apart, e.g. "fairness age: demographic parity difference 0.2500 > 0.1000 (selection
        rate 0.5000 for [18, 30) vs 0.7500 for [60, 100])".
    """
    failures = []
    for report in reports:
        parity = _parity_groups(report.by_group, report.excluded)
        odds = _odds_groups(report.by_group, report.excluded)
        dp = report.demographic_parity_difference
        if max_dp_difference is not None and not math.isnan(dp) and dp > max_dp_difference:
            failures.append(
                f"fairness {report.feature}: demographic parity difference {dp:.4f} > {max_dp_difference:.4f} "
                f"(selection rate {_extremes(report, 'selection_rate', parity)})"
            )
        eo = report.equalized_odds_difference
        if max_eo_difference is not None and not math.isnan(eo) and eo > max_eo_difference:
            gaps = {
                rate: max(values) - min(values)
                for rate in ("tpr", "fpr")
                if (values := [report.by_group[g][rate] for g in odds])
            }
            rate = max(gaps, key=gaps.__getitem__)
            name = "true positive rate" if rate == "tpr" else "false positive rate"
            failures.append(
                f"fairness {report.feature}: equalized odds difference {eo:.4f} > {max_eo_difference:.4f} "
                f"({name} {_extremes(report, rate, odds)})"
            )
    return failures
