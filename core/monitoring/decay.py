"""Decay: the champion's performance on late-labelled recent rows against its holdout figures (pure).

The rules are stated in `core/monitoring/drift.py`: absolute drops of ROC AUC and F1 for a classifier, relative rises
of RMSE and MAE for a regressor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.modeling.metrics import REGRESSION_METRICS, compute_metrics
from core.monitoring.drift import DriftThresholds

RELATIVE_METRICS = ("rmse", "mae")  # judged by their rise relative to the holdout's
METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC",
    "f1": "F1",
    "log_loss": "log loss",
    "brier": "Brier",
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R²",
}


@dataclass(frozen=True)
class Performance:
    """Metrics on the labelled recent rows next to the champion's holdout metrics."""

    rows: int
    metrics: dict[str, float]
    holdout: dict[str, float]

    def drop(self, metric: str) -> float | None:
        """Holdout minus recent (positive = worse now for a higher-is-better metric), or None when unknown."""
        if metric not in self.metrics or metric not in self.holdout:
            return None
        return self.holdout[metric] - self.metrics[metric]

    def rise(self, metric: str) -> float | None:
        """Relative rise of an error metric: (recent - holdout) / holdout (positive = worse now).

        None when either is unknown. A holdout error of 0 makes any recent error an infinite rise (and
        none a rise of 0).
        """
        if metric not in self.metrics or metric not in self.holdout:
            return None
        recent, holdout = self.metrics[metric], self.holdout[metric]
        if holdout <= 0:
            return 0.0 if recent <= holdout else float("inf")
        return (recent - holdout) / holdout

    def change(self, metric: str) -> str:
        """The change from the holdout in words for the reports (`-0.0312`, `+12.5 %`), empty when unknown."""
        if metric in RELATIVE_METRICS:
            rise = self.rise(metric)
            return "" if rise is None else f"{rise:+.1%}"
        drop = self.drop(metric)
        return "" if drop is None else f"{-drop:+.4f}"


def labelled_performance(
    y: np.ndarray, scores: np.ndarray, classes: list[Any], holdout: dict[str, float]
) -> Performance | None:
    """Metrics of the champion on labelled recent rows, beside its holdout figures (None if not measurable).

    Classification: ROC AUC, F1, PR AUC, log loss (macro averages for multiclass), when at least two
    classes are among the labels; a metric that is undefined on these rows (e.g. ROC AUC of a class that no
    label has) is left out. Regression: RMSE, MAE and R².
    """
    if classes:
        if len(set(y)) < 2:
            return None
        y = y.astype(np.asarray(classes).dtype)
        names: tuple[str, ...] = ("roc_auc", "f1", "pr_auc", "log_loss")
    else:
        y = y.astype("float64")
        names = REGRESSION_METRICS
    metrics = compute_metrics(y, scores, classes)
    chosen = {k: metrics[k] for k in names if k in metrics and np.isfinite(metrics[k])}
    return Performance(len(y), chosen, {k: v for k, v in holdout.items() if k in chosen})


def decay_reasons(performance: Performance, thresholds: DriftThresholds) -> list[str]:
    """Why the labelled rows say the champion decayed (empty: it did not); see the rules in `core/monitoring/drift.py`.

    Classification: absolute drops of ROC AUC and F1; regression: relative rises of RMSE and MAE. A metric
    the window or the holdout lacks is not judged.
    """
    reasons = []
    for metric, limit in (("roc_auc", thresholds.max_auc_drop), ("f1", thresholds.max_f1_drop)):
        drop = performance.drop(metric)
        if drop is not None and drop > limit:
            reasons.append(
                f"{metric} {performance.metrics[metric]:.4f} on {performance.rows} labelled rows is "
                f"{drop:.4f} below the holdout's {performance.holdout[metric]:.4f} (allowed {limit})"
            )
    for metric, limit in (("rmse", thresholds.max_rmse_rise), ("mae", thresholds.max_mae_rise)):
        rise = performance.rise(metric)
        if rise is not None and rise > limit:
            reasons.append(
                f"{metric} {performance.metrics[metric]:.4g} on {performance.rows} labelled rows is "
                f"{rise:.1%} above the holdout's {performance.holdout[metric]:.4g} (allowed {limit:.0%})"
            )
    return reasons


def decay_summary(performance: Performance) -> str:
    """The headline figure of a decayed window: RMSE and its rise for a regressor, else ROC AUC."""
    metrics = performance.metrics
    if "rmse" in metrics:
        return f"RMSE {metrics['rmse']:.4g} ({performance.change('rmse')} vs holdout)"
    if "roc_auc" in metrics:
        return f"ROC AUC {metrics['roc_auc']:.3f}"
    return ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.3f}" for k, v in metrics.items())


def metric_label(metric: str, classes: list[Any] | None) -> str:
    """A metric's name for people: `RMSE`, `ROC AUC`, `F1 (macro)` for a multiclass model's averages."""
    name = METRIC_NAMES.get(metric, metric)
    averaged = classes is not None and len(classes) > 2 and metric in ("roc_auc", "pr_auc", "f1")
    return f"{name} (macro)" if averaged else name
