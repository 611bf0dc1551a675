"""Fairness: does the model treat the groups of a sensitive feature alike? Measured with fairlearn.

Per task (`fairness_reports` picks the right one from the model's classes):
- binary: two differences between groups, both 0 when the groups are treated alike: the demographic
  parity difference (the largest gap in selection rate, the share predicted positive) and the equalized
  odds difference (the larger of the largest gaps in true positive rate and false positive rate). The
  `max_dp_difference` / `max_eo_difference` limits gate them.
- multiclass: one class against the rest, for every class: the same two differences with "predicted
  this class" as the selection (fairlearn's metrics are binary; one-vs-rest is its usual reading of
  multiclass). One report per (feature, class); the limits apply to each, so the worst class decides.
- regression: there is no predicted class, so no selection rate and no true or false positive rate:
  demographic parity and equalised odds do not apply (`not_applicable` says why, and a configured limit
  is reported as not applied, never failed). Reported instead per group with fairlearn's `MetricFrame`:
  MAE, RMSE, mean prediction and mean target, and the largest difference between groups of MAE, RMSE and
  mean prediction (`differences`). No limit gates these.

Groups are the values of the sensitive column (numbers banded by their slice bins, see
`sensitive_groups`). A group with fewer than `min_group_rows` rows (the dataset config's, 30 by default)
is left out of the differences and the gate, and named in the gate's detail and the card; and
a group without both classes is left out of the equalized odds difference (its true or false positive
rate is undefined: fairlearn would count it as 0); `excluded` says which and why.
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
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    mean_prediction,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import mean_absolute_error, root_mean_squared_error

from core.dataset import DatasetConfig
from core.decision import GateResult
from core.slices import MISSING, slice_labels, slice_order

REGRESSION_NOT_APPLICABLE = (
    "a regressor predicts a number, not a class, so there is no selection rate nor true or false positive "
    "rate to compare between groups"
)
# Per-group regression metrics whose largest gap between groups is reported (mean_target is context only).
REGRESSION_DIFFERENCES = ("mae", "rmse", "mean_prediction")


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


def _groups(sensitive: pd.Series) -> tuple[str, np.ndarray, list[str]]:
    """The feature's name, each row's group as text (nulls `missing`) and the groups in reading order."""
    feature = str(sensitive.name) if sensitive.name is not None else "sensitive"
    if isinstance(sensitive.dtype, pd.CategoricalDtype):
        groups = sensitive.cat.remove_unused_categories().astype(str).where(sensitive.notna(), MISSING)
        order = [str(c) for c in sensitive.cat.categories if (sensitive == c).any()]
    else:
        groups = sensitive.astype("object").where(sensitive.notna(), MISSING).map(str)
        order = sorted(set(groups))
    return feature, groups.to_numpy(), order


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
    feature, group_values, order = _groups(sensitive)
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
    feature, group_values, order = _groups(sensitive)
    metrics = {
        "mae": mean_absolute_error,
        "rmse": root_mean_squared_error,
        "mean_prediction": mean_prediction,
        "mean_target": _mean_target,
        "n_rows": count,
    }
    table = MetricFrame(
        metrics=metrics, y_true=truth, y_pred=values, sensitive_features=pd.Series(group_values, name=feature)
    ).by_group
    by_group: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for group in [*order, *(g for g in table.index if g not in order)]:
        if group not in table.index:
            continue
        row = table.loc[group]
        by_group[group] = {name: float(row[name]) for name in metrics if name != "n_rows"}
        by_group[group]["n_rows"] = int(row["n_rows"])
        if by_group[group]["n_rows"] < min_group_rows:
            excluded[group] = f"{_TOO_FEW}: {by_group[group]['n_rows']} < {min_group_rows}"
    kept = [g for g in by_group if g not in excluded]
    differences = dict.fromkeys(REGRESSION_DIFFERENCES, math.nan)
    if len(kept) >= 2:
        mask = np.isin(group_values, kept)
        gaps = MetricFrame(
            metrics={name: metrics[name] for name in REGRESSION_DIFFERENCES},
            y_true=truth[mask],
            y_pred=values[mask],
            sensitive_features=pd.Series(group_values[mask], name=feature),
        ).difference(method="between_groups")
        differences = {name: float(gaps[name]) for name in REGRESSION_DIFFERENCES}
    return FairnessReport(
        feature=feature,
        demographic_parity_difference=math.nan,
        equalized_odds_difference=math.nan,
        by_group=by_group,
        positive_label=None,
        excluded=excluded,
        task="regression",
        differences=differences,
        not_applicable=REGRESSION_NOT_APPLICABLE,
    )


def _mean_target(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean true value of a group (context for its mean prediction)."""
    return float(np.mean(y_true))


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


def fairness_reports(
    y_true: Sequence[Any],
    scores: np.ndarray,
    classes: Sequence[Any],
    groups: dict[str, pd.Series],
    *,
    min_group_rows: int = 1,
) -> list[FairnessReport]:
    """Fairness of one model's holdout scores for every sensitive feature, as its task allows.

    Args:
        y_true: True labels (values for a regressor).
        scores: Probabilities (n, classes), or predicted values (n,) for a regressor.
        classes: The model's classes (`tasks.evaluation.model_classes`); empty for a regressor.
        groups: Sensitive feature -> each row's group (`sensitive_groups`).
        min_group_rows: Groups with fewer rows are reported but left out of the differences.

    Returns:
        Binary: one report per feature (positive class: the second class). Multiclass: one report per
        feature and class (one-vs-rest). Regression: one report per feature, with per-group errors and
        `not_applicable` set for demographic parity and equalized odds.
    """
    classes = list(classes)
    scores = np.asarray(scores)
    if not classes:
        return [
            regression_fairness_report(y_true, scores, sensitive, min_group_rows=min_group_rows)
            for sensitive in groups.values()
        ]
    predicted = np.asarray(classes)[scores.argmax(axis=1)]
    if len(classes) == 2:
        return [
            fairness_report(y_true, predicted, sensitive, classes[1], min_group_rows=min_group_rows)
            for sensitive in groups.values()
        ]
    return [
        report
        for sensitive in groups.values()
        for report in one_vs_rest_reports(y_true, predicted, sensitive, classes, min_group_rows=min_group_rows)
    ]


def fairness_gate(
    reports: Sequence[FairnessReport], max_dp_difference: float | None, max_eo_difference: float | None
) -> list[str]:
    """Failures: sensitive features whose group differences exceed the limits (None: no limit).

    A difference that could not be measured (NaN: fewer than two groups qualified) is not a failure, nor
    is a report where the differences do not apply (regression: see `fairness_check`).

    Returns:
        One line per exceeded limit, naming the feature (and the class, one-vs-rest, for multiclass), the
        difference, the limit and the two groups furthest apart, e.g. "fairness age: demographic parity
        difference 0.2500 > 0.1000 (selection rate 0.5000 for [18, 30) vs 0.7500 for [60, 100])".
    """
    failures = []
    for report in reports:
        if report.not_applicable is not None:
            continue
        parity = _parity_groups(report.by_group, report.excluded)
        odds = _odds_groups(report.by_group, report.excluded)
        dp = report.demographic_parity_difference
        if max_dp_difference is not None and not math.isnan(dp) and dp > max_dp_difference:
            failures.append(
                f"fairness {report.label}: demographic parity difference {dp:.4f} > {max_dp_difference:.4f} "
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
                f"fairness {report.label}: equalized odds difference {eo:.4f} > {max_eo_difference:.4f} "
                f"({name} {_extremes(report, rate, odds)})"
            )
    return failures


def small_groups(report: FairnessReport) -> dict[str, int]:
    """Groups left out of the report's differences for having fewer than `min_group_rows` rows -> their rows."""
    return {
        group: int(report.by_group[group]["n_rows"])
        for group, why in report.excluded.items()
        if why.startswith(_TOO_FEW) and group in report.by_group
    }


def excluded_groups_line(reports: Sequence[FairnessReport]) -> str:
    """`left out (fewer than min_group_rows rows): age [18, 30) (1 row); ...`, or "" when none was left out."""
    parts, seen = [], set()
    for report in reports:
        for group, rows in small_groups(report).items():
            if (report.feature, group) not in seen:
                seen.add((report.feature, group))
                parts.append(f"{report.feature} {group} ({rows} row{'s' if rows != 1 else ''})")
    return f"left out (fewer than min_group_rows rows): {'; '.join(parts)}" if parts else ""


def fairness_check(
    reports: Sequence[FairnessReport], max_dp_difference: float | None, max_eo_difference: float | None
) -> GateResult:
    """The `fairness` gate (`_fairness_check`), its detail ending with the groups left out for size."""
    result = _fairness_check(reports, max_dp_difference, max_eo_difference)
    left_out = excluded_groups_line(reports)
    return GateResult(result.gate, result.passed, f"{result.detail}; {left_out}") if left_out else result


def _fairness_check(
    reports: Sequence[FairnessReport], max_dp_difference: float | None, max_eo_difference: float | None
) -> GateResult:
    """The `fairness` gate of the review, with a detail that says what was and was not judged.

    Passed unless a limit is exceeded (`fairness_gate`). A limit that does not apply is reported, never
    failed: with no sensitive feature configured there is nothing to measure; for regression demographic
    parity and equalised odds are undefined (`REGRESSION_NOT_APPLICABLE`), so the gate passes with a
    detail starting "not applicable for regression: ...". Differences that could not be measured
    (fewer than two groups) are named.
    """
    limits = ", ".join(
        f"{name} {limit:g}"
        for name, limit in (("max_dp_difference", max_dp_difference), ("max_eo_difference", max_eo_difference))
        if limit is not None
    )
    failures = fairness_gate(reports, max_dp_difference, max_eo_difference)
    if failures:
        return GateResult("fairness", False, "; ".join(failures))
    if not reports:
        return GateResult(
            "fairness", True, f"not applied ({limits}): no sensitive_features in the dataset config, nothing measured"
        )
    applicable = [r for r in reports if r.not_applicable is None]
    if not applicable:
        if all(r.task == "regression" for r in reports):
            detail = (
                f"not applicable for regression: {REGRESSION_NOT_APPLICABLE}; limits not applied ({limits}); "
                "per-group MAE, RMSE and mean prediction are reported in the model card"
            )
        else:
            why = "; ".join(f"{r.label}: {r.not_applicable}" for r in reports)
            detail = f"not applicable: {why}; limits not applied ({limits})"
        return GateResult("fairness", True, detail)
    unmeasured = [
        r.label
        for r in applicable
        if (max_dp_difference is not None and math.isnan(r.demographic_parity_difference))
        or (max_eo_difference is not None and math.isnan(r.equalized_odds_difference))
    ]
    skipped = [f"{r.label}: {r.not_applicable}" for r in reports if r.not_applicable is not None]
    detail = f"within the configured limits ({limits}) on {'; '.join(r.label for r in applicable)}"
    if unmeasured:
        detail += f"; not measured (fewer than two groups qualified): {', '.join(unmeasured)}"
    if skipped:
        detail += f"; not applicable: {'; '.join(skipped)}"
    return GateResult("fairness", True, detail)
