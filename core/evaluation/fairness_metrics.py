"""How one model treats the groups of one sensitive feature: per-group figures and the gaps between groups.

Measured with fairlearn (`MetricFrame` and its between-groups differences). Classification: selection
rate, true and false positive rates per group, and the demographic parity and equalized odds differences
(`fairness_report`; multiclass one class against the rest, `one_vs_rest_reports`). Regression: MAE, RMSE,
mean prediction and mean target per group, and the largest gaps of MAE, RMSE and mean prediction
(`regression_fairness_report`). Which report a model gets, and the gate on them, are in `core/evaluation/fairness.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    false_positive_rate,
    mean_prediction,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import mean_absolute_error, root_mean_squared_error

from core.evaluation.slices import MISSING

REGRESSION_NOT_APPLICABLE = (
    "a regressor predicts a number, not a class, so there is no selection rate nor true or false positive "
    "rate to compare between groups"
)
# Per-group regression metrics whose largest gap between groups is reported (mean_target is context only).
REGRESSION_DIFFERENCES = ("mae", "rmse", "mean_prediction")
TOO_FEW = "too few rows"  # how the reason of a group left out for its size starts


@dataclass(frozen=True)
class FairnessReport:
    """How differently one model treats the groups of one sensitive feature.

    Attributes:
        feature: The sensitive column.
        demographic_parity_difference: Largest gap in selection rate between groups (NaN if < 2 groups, or
            not applicable).
        equalized_odds_difference: Larger of the largest TPR and FPR gaps between groups (NaN if < 2 groups,
            or not applicable).
        by_group: Group -> `selection_rate`, `tpr`, `fpr` (NaN where undefined) and `n_rows`; for
            regression `mae`, `rmse`, `mean_prediction`, `mean_target` and `n_rows`.
        positive_label: The class counted as positive (selected): for multiclass the class compared with
            the rest; None for regression.
        excluded: Group -> why it was left out of one or both differences.
        task: `binary`, `multiclass` (one class against the rest) or `regression`.
        differences: Regression: largest gap between groups of each of `REGRESSION_DIFFERENCES` (NaN if
            < 2 groups); empty for classification.
        not_applicable: Why the demographic parity and equalized odds differences do not apply (and their
            limits are not applied), or None when they do.
    """

    feature: str
    demographic_parity_difference: float
    equalized_odds_difference: float
    by_group: dict[str, dict[str, float]]
    positive_label: Any = 1
    excluded: dict[str, str] = field(default_factory=dict)
    task: str = "binary"
    differences: dict[str, float] = field(default_factory=dict)
    not_applicable: str | None = None

    @property
    def label(self) -> str:
        """What the report is about, as failures and the card name it: `age`, or `age, class 2 vs rest`."""
        if self.task == "multiclass":
            return f"{self.feature}, class {self.positive_label} vs rest"
        return self.feature


def parity_groups(by_group: dict[str, dict[str, float]], excluded: dict[str, str]) -> list[str]:
    """Groups in the demographic parity difference: all but the too small ones."""
    return [g for g in by_group if not excluded.get(g, "").startswith(TOO_FEW)]


def odds_groups(by_group: dict[str, dict[str, float]], excluded: dict[str, str]) -> list[str]:
    """Groups in the equalized odds difference: large enough and holding both classes."""
    return [g for g in by_group if g not in excluded]


@dataclass(frozen=True)
class _Grouping:
    """The feature's name, each row's group as text (nulls `missing`) and the groups in reading order."""

    feature: str
    values: np.ndarray
    order: list[str]


def _grouping(sensitive: pd.Series) -> _Grouping:
    feature = str(sensitive.name) if sensitive.name is not None else "sensitive"
    if isinstance(sensitive.dtype, pd.CategoricalDtype):
        groups = sensitive.cat.remove_unused_categories().astype(str).where(sensitive.notna(), MISSING)
        order = [str(c) for c in sensitive.cat.categories if (sensitive == c).any()]
    else:
        groups = sensitive.astype("object").where(sensitive.notna(), MISSING).map(str)
        order = sorted(set(groups))
    return _Grouping(feature, groups.to_numpy(), order)


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
    _check_binary(truth, predicted, sensitive, positive_label)
    groups = _grouping(sensitive)
    yt, yp = _binary(truth, positive_label), _binary(predicted, positive_label)
    by_group, excluded = _rates_by_group(yt, yp, groups, min_group_rows)
    kept_for_parity, kept_for_odds = parity_groups(by_group, excluded), odds_groups(by_group, excluded)
    return FairnessReport(
        feature=groups.feature,
        demographic_parity_difference=_gap(by_group, kept_for_parity, ("selection_rate",)),
        equalized_odds_difference=_gap(by_group, kept_for_odds, ("tpr", "fpr")),
        by_group=by_group,
        positive_label=positive_label,
        excluded=excluded,
    )


def _check_binary(truth: np.ndarray, predicted: np.ndarray, sensitive: pd.Series, positive_label: Any) -> None:
    """Refuse inputs `fairness_report` cannot measure (see its Raises)."""
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


def _rates_by_group(
    yt: np.ndarray, yp: np.ndarray, groups: _Grouping, min_group_rows: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each group's selection rate, TPR, FPR (NaN where undefined) and rows, and the groups left out (why)."""
    frame = MetricFrame(
        metrics={
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "n_rows": count,
        },
        y_true=yt,
        y_pred=yp,
        sensitive_features=pd.Series(groups.values, name=groups.feature),
    ).by_group
    by_group: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for group in [*groups.order, *(g for g in frame.index if g not in groups.order)]:
        if group not in frame.index:
            continue
        row = frame.loc[group]
        mask = groups.values == group
        positives, n_rows = int(yt[mask].sum()), int(mask.sum())
        by_group[group] = {
            "selection_rate": float(row["selection_rate"]),
            "tpr": float(row["tpr"]) if positives else math.nan,
            "fpr": float(row["fpr"]) if positives < n_rows else math.nan,
            "n_rows": n_rows,
        }
        if n_rows < min_group_rows:
            excluded[group] = f"{TOO_FEW}: {n_rows} < {min_group_rows}"
        elif positives in (0, n_rows):
            excluded[group] = "a single class: left out of the equalized odds difference"
    return by_group, excluded


def _gap(by_group: dict[str, dict[str, float]], kept: list[str], rates: tuple[str, ...]) -> float:
    """The largest gap between the kept groups in any of `rates`; NaN with fewer than two groups.

    fairlearn's `demographic_parity_difference` (rates `selection_rate`) and `equalized_odds_difference`
    (`tpr`, `fpr`; its default "worst case" of the two) on the kept groups' rows, read from the per-group rates
    its `MetricFrame` measured once, instead of measuring every group again in two more frames (a second of
    each review; a test checks the equality with fairlearn's functions).
    """
    if len(kept) < 2:
        return math.nan
    return max(max(by_group[g][rate] for g in kept) - min(by_group[g][rate] for g in kept) for rate in rates)


def _mean_target(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean true value of a group (context for its mean prediction)."""
    return float(np.mean(y_true))


# Per-group figures of a regressor (fairlearn metrics of true and predicted values).
_REGRESSION_METRICS = {
    "mae": mean_absolute_error,
    "rmse": root_mean_squared_error,
    "mean_prediction": mean_prediction,
    "mean_target": _mean_target,
    "n_rows": count,
}


def regression_fairness_report(
    y_true: Sequence[float],
    predicted: Sequence[float],
    sensitive: pd.Series,
    *,
    min_group_rows: int = 1,
) -> FairnessReport:
    """Errors and mean prediction of a regressor per group, and the largest gaps between groups (fairlearn).

    Demographic parity and equalized odds are not applicable (`REGRESSION_NOT_APPLICABLE`): both are NaN
    and `not_applicable` says why.

    Args:
        y_true: True values.
        predicted: Predicted values, in the same order.
        sensitive: The group of each row; its name is the feature reported.
        min_group_rows: Groups with fewer rows are reported but left out of the differences.

    Returns:
        The report: `by_group` holds `mae`, `rmse`, `mean_prediction`, `mean_target` and `n_rows`;
        `differences` the largest gap between the kept groups of MAE, RMSE and mean prediction (NaN when
        fewer than two groups qualify).
    """
    truth = np.asarray(y_true, dtype="float64")
    values = np.asarray(predicted, dtype="float64")
    if not len(truth) == len(values) == len(sensitive):
        raise ValueError(
            f"values, predictions and groups differ in length: {len(truth)}, {len(values)}, {len(sensitive)}"
        )
    groups = _grouping(sensitive)
    by_group, excluded = _errors_by_group(truth, values, groups, min_group_rows)
    kept = [g for g in by_group if g not in excluded]
    return FairnessReport(
        feature=groups.feature,
        demographic_parity_difference=math.nan,
        equalized_odds_difference=math.nan,
        by_group=by_group,
        positive_label=None,
        excluded=excluded,
        task="regression",
        differences=_regression_differences(truth, values, groups, kept),
        not_applicable=REGRESSION_NOT_APPLICABLE,
    )


def _errors_by_group(
    truth: np.ndarray, values: np.ndarray, groups: _Grouping, min_group_rows: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each group's `_REGRESSION_METRICS`, and the groups left out for their size (why)."""
    table = MetricFrame(
        metrics=_REGRESSION_METRICS,
        y_true=truth,
        y_pred=values,
        sensitive_features=pd.Series(groups.values, name=groups.feature),
    ).by_group
    by_group: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for group in [*groups.order, *(g for g in table.index if g not in groups.order)]:
        if group not in table.index:
            continue
        row = table.loc[group]
        by_group[group] = {name: float(row[name]) for name in _REGRESSION_METRICS if name != "n_rows"}
        by_group[group]["n_rows"] = int(row["n_rows"])
        if by_group[group]["n_rows"] < min_group_rows:
            excluded[group] = f"{TOO_FEW}: {by_group[group]['n_rows']} < {min_group_rows}"
    return by_group, excluded


def _regression_differences(
    truth: np.ndarray, values: np.ndarray, groups: _Grouping, kept: list[str]
) -> dict[str, float]:
    """The largest gap between the kept groups of each of `REGRESSION_DIFFERENCES` (NaN with fewer than two)."""
    if len(kept) < 2:
        return dict.fromkeys(REGRESSION_DIFFERENCES, math.nan)
    mask = np.isin(groups.values, kept)
    gaps = MetricFrame(
        metrics={name: _REGRESSION_METRICS[name] for name in REGRESSION_DIFFERENCES},
        y_true=truth[mask],
        y_pred=values[mask],
        sensitive_features=pd.Series(groups.values[mask], name=groups.feature),
    ).difference(method="between_groups")
    return {name: float(gaps[name]) for name in REGRESSION_DIFFERENCES}


def one_vs_rest_reports(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    sensitive: pd.Series,
    classes: Sequence[Any],
    *,
    min_group_rows: int = 1,
) -> list[FairnessReport]:
    """Multiclass fairness: for each class, `fairness_report` of "this class" against the rest.

    A class neither in the truth nor in the predictions has no rate to compare: its report has NaN
    differences, no groups, and `not_applicable` saying so (never a crash).
    """
    truth, predicted = np.asarray(y_true), np.asarray(y_pred)
    feature = str(sensitive.name) if sensitive.name is not None else "sensitive"
    reports = []
    for cls in classes:
        yt, yp = truth == cls, predicted == cls
        if not yt.any() and not yp.any():
            reason = f"class {cls} is neither among the true labels nor predicted: no rate to compare"
            reports.append(
                FairnessReport(feature, math.nan, math.nan, {}, cls, task="multiclass", not_applicable=reason)
            )
            continue
        report = fairness_report(yt, yp, sensitive, True, min_group_rows=min_group_rows)
        reports.append(replace(report, positive_label=cls, task="multiclass"))
    return reports
