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

The measurements are in `core/evaluation/fairness_metrics.py`; this module picks the report for the task, groups
the rows, and gates the reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig
from core.evaluation.decision import GateResult
from core.evaluation.fairness_metrics import (
    REGRESSION_NOT_APPLICABLE,
    TOO_FEW,
    FairnessReport,
    fairness_report,
    odds_groups,
    one_vs_rest_reports,
    parity_groups,
    regression_fairness_report,
)
from core.evaluation.slices import MISSING, slice_labels, slice_order


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


def _extremes(report: FairnessReport, rate: str, kept: list[str]) -> str:
    """The groups with the lowest and highest `rate`, e.g. "0.1000 for a vs 0.3000 for b"."""
    values = {g: report.by_group[g][rate] for g in kept if not math.isnan(report.by_group[g][rate])}
    low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    return f"{values[low]:.4f} for {low} vs {values[high]:.4f} for {high}"


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
        parity = parity_groups(report.by_group, report.excluded)
        odds = odds_groups(report.by_group, report.excluded)
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
        if why.startswith(TOO_FEW) and group in report.by_group
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
