"""Drift statistics and the rules that judge them: recent data against the champion's training reference.

Pure (numpy, scipy, pandas; unit-tested, no I/O): PSI, KS, chi-square and total-variation distance per
feature (computed in `core/monitoring/drift_statistics.py`), and the drift of the champion's predictions. These
numbers are the only drift figures in the project: the verdict, the Markdown summary and the HTML report
(`core/monitoring/drift_report.py`, which plots the very bins PSI is computed over) all show them. A window read
partition by partition gives the same figures from summed counts (`core/monitoring/drift_partials.py`, then
`window_partial`, `merge_partials` and `partial_drifts` here).

Rules (stated once, here):
- A feature has drifted when its PSI reaches `psi`, or when its test rejects "same distribution"
  (KS for numeric, chi-square for categorical, p < `p_value`) *and* the effect is material (KS
  statistic or total-variation distance >= `min_effect`): at large row counts a test alone flags
  differences nobody cares about.
- A window (the partition, or the prediction log) has drifted when the share of drifted features reaches
  `drifted_share`, or the champion's predictions drifted: their PSI reaches `prediction_psi`. What is
  compared depends on the task:
  - binary: the positive-class probability (PSI over the reference's deciles, KS test);
  - multiclass: the shares of the predicted classes (PSI over the classes, chi-square test), so a
    change in the class mix the champion predicts is seen whichever class gains or loses;
  - regression: the predicted value (PSI over the reference's deciles, KS test).
- It has decayed when, on at least `min_labelled_rows` labelled rows (late labels joined by id):
  - classification: ROC AUC fell by more than `max_auc_drop` or F1 by more than `max_f1_drop` below the
    champion's holdout figures (absolute drops; macro averages for multiclass, as on the holdout);
  - regression: RMSE rose by more than `max_rmse_rise` or MAE by more than `max_mae_rise` above the
    champion's holdout figures, relative to them (0.10: more than 10 % worse). With the minimum of 200
    labelled rows the window's own RMSE or MAE has a standard error of about 5 % (Gaussian errors), so
    10 % is about two standard errors: a real loss, not noise; heavier-tailed errors are noisier.
  (`core/monitoring/decay.py` applies these.)
- A window with fewer than `min_rows` rows gives no verdict. Any drifted or decayed window triggers
  (`core/monitoring/drift_analysis.py` judges windows and gives the overall verdict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from core.data.dataset import DatasetConfig
from core.errors import PermanentError
from core.monitoring.drift_partials import (
    KS_EXACT_MAX_ROWS,
    ColumnPartial,
    ColumnReference,
    column_partial,
    column_reference,
    ks_from_partial,
)
from core.monitoring.drift_statistics import (
    Bins,
    Kind,
    capped_counts,
    categorical_psi,
    chi_square_test,
    column_bins,
    edge_labels,
    ks_test,
    numeric_bins,
    numeric_counts,
    numeric_psi,
    psi_from_shares,
    quantile_edges,
    total_variation,
)

__all__ = [
    "KS_EXACT_MAX_ROWS",
    "PREDICTED_CLASS",
    "PREDICTION_COLUMN",
    "PROBA_PREFIX",
    "Bins",
    "ColumnPartial",
    "ColumnReference",
    "DriftThresholds",
    "FeatureDrift",
    "Kind",
    "MonitoringError",
    "WindowPartial",
    "WindowReference",
    "categorical_psi",
    "chi_square_test",
    "column_bins",
    "column_drift",
    "column_partial",
    "column_reference",
    "drift_from_partial",
    "edge_labels",
    "feature_drifts",
    "feature_kind",
    "feature_values",
    "is_drifted",
    "ks_from_partial",
    "ks_test",
    "merge_partials",
    "numeric_bins",
    "numeric_counts",
    "numeric_psi",
    "output_columns",
    "partial_drifts",
    "prediction_basis",
    "prediction_drift",
    "prediction_kind",
    "prediction_name",
    "prediction_values",
    "proba_columns",
    "psi_from_shares",
    "quantile_edges",
    "task_of",
    "total_variation",
    "window_partial",
    "window_reference",
]

PROBA_PREFIX = "proba_"
PREDICTION_COLUMN = "prediction"  # a regressor's predicted value in the reference sample
PREDICTED_CLASS = "predicted"  # a multiclass model's predicted class, as prediction drift sees it


class MonitoringError(PermanentError):
    """Monitoring cannot run as asked (no champion, no reference, unreadable labels); names the problem."""


class DriftThresholds(BaseModel):
    """When drift or decay is bad enough to retrain (the rules are in `core/monitoring/drift.py`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    psi: float = Field(0.2, gt=0, title="Feature PSI", description="A feature whose PSI reaches this has drifted.")
    p_value: float = Field(
        0.001,
        gt=0,
        lt=1,
        title="Test p-value",
        description="KS (numeric) or chi-square (categorical) p-value below which a feature's shift is significant.",
    )
    min_effect: float = Field(
        0.1,
        gt=0,
        le=1,
        title="Minimum effect",
        description="A significant shift counts only when the KS statistic or total-variation distance reaches this.",
    )
    drifted_share: float = Field(
        0.2,
        gt=0,
        le=1,
        title="Drifted feature share",
        description="Retrain when this share of the features has drifted.",
    )
    prediction_psi: float = Field(
        0.2, gt=0, title="Prediction PSI", description="Retrain when the champion's predictions drift this much."
    )
    max_auc_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        title="Maximum ROC AUC drop",
        description="Retrain when ROC AUC on labelled recent rows "
        "is lower than the champion's holdout ROC AUC by more than this.",
    )
    max_f1_drop: float = Field(0.1, ge=0, le=1, title="Maximum F1 drop", description="The same for F1.")
    max_rmse_rise: float = Field(
        0.1,
        ge=0,
        title="Maximum RMSE rise (relative)",
        description="Regression: retrain when RMSE on labelled recent rows is higher than the champion's holdout "
        "RMSE by more than this fraction of it (0.1: more than 10 % worse).",
    )
    max_mae_rise: float = Field(
        0.1, ge=0, title="Maximum MAE rise (relative)", description="Regression: the same for MAE."
    )
    min_rows: int = Field(200, ge=10, title="Minimum rows", description="A window with fewer rows gives no verdict.")
    min_labelled_rows: int = Field(
        200, ge=10, title="Minimum labelled rows", description="Performance is judged on at least this many rows."
    )
    estimate_triggers: bool = Field(
        True,
        title="Retrain on estimated drops",
        description="Retrain when the estimated ROC AUC or F1 (a regressor's RMSE or MAE), computed without labels, "
        "is beyond its band on the worse side (`core/monitoring/estimation.py`).",
    )
    estimate_sigmas: float = Field(
        3.0,
        gt=0,
        le=10,
        title="Estimate band (standard deviations)",
        description="Half-width of the band around the reference's realised metric, in bootstrap standard "
        "deviations at the window's size.",
    )
    estimate_min_change: float = Field(
        0.02,
        ge=0,
        le=1,
        title="Estimate band at least",
        description="The band's half-width is never below this (absolute for ROC AUC, F1, precision, recall; "
        "relative for RMSE and MAE), so a huge window does not trigger on a change too small to matter.",
    )
    multivariate: bool = Field(
        True,
        title="Multivariate drift",
        description="Check with a domain classifier whether recent rows can be told from the reference's "
        "(`core/monitoring/multivariate.py`); a drift found this way triggers retraining like per-feature drift.",
    )
    domain_min_auc: float = Field(
        0.55,
        gt=0.5,
        le=1,
        title="Domain classifier AUC at least",
        description="Multivariate drift needs the classifier's cross-validated ROC AUC above this and above every "
        "AUC with the labels shuffled.",
    )
    domain_permutations: int = Field(
        9, ge=1, le=99, title="Permutations", description="Label shuffles that give the domain classifier's null AUCs."
    )


# ---------------------------------------------------------------------------------------------- per column


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one column: PSI, the test (`ks` or `chi2`), its statistic and p-value, the effect size."""

    name: str
    kind: Kind
    psi: float
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    effect: float
    drifted: bool


def column_drift(name: str, kind: Kind, reference: Any, current: Any, thresholds: DriftThresholds) -> FeatureDrift:
    """Drift of one column of the reference against the current sample (see the module's rules)."""
    psi = column_bins(kind, reference, current).psi
    if kind == "numeric":
        statistic, p_value = ks_test(reference, current)
        test, effect = "ks", statistic
    else:
        statistic, p_value = chi_square_test(reference, current)
        test, effect = "chi2", total_variation(reference, current)
    return FeatureDrift(name, kind, psi, test, statistic, p_value, effect, is_drifted(psi, p_value, effect, thresholds))


def is_drifted(psi: float, p_value: float, effect: float, thresholds: DriftThresholds) -> bool:
    """The feature rule of the module: PSI reaches `psi`, or a significant test with a material effect."""
    return bool(psi >= thresholds.psi or (p_value < thresholds.p_value and effect >= thresholds.min_effect))


def feature_kind(feature: str, config: DatasetConfig) -> Kind:
    """`numeric` or `categorical`, as the dataset declares the feature."""
    return "numeric" if feature in config.numeric_features else "categorical"


def feature_values(frame: pd.DataFrame, feature: str, config: DatasetConfig) -> Any:
    """A feature's values as the statistics take them: an array for a numeric one, a Series for a category."""
    return frame[feature].to_numpy() if feature in config.numeric_features else frame[feature]


def feature_drifts(
    reference: pd.DataFrame, current: pd.DataFrame, config: DatasetConfig, thresholds: DriftThresholds
) -> list[FeatureDrift]:
    """Drift of every feature of the dataset, in the config's order."""
    return [
        column_drift(
            feature,
            feature_kind(feature, config),
            feature_values(reference, feature, config),
            feature_values(current, feature, config),
            thresholds,
        )
        for feature in drift_features(config)
    ]


def drift_features(config: DatasetConfig) -> list[str]:
    """The features whose distributions are compared: all but date/time ones (every new day would be a shift)."""
    return [f for f in config.feature_names if f not in config.datetime_features]


# ---------------------------------------------------------------------------------------------- predictions


def proba_columns(classes: list[Any]) -> list[str]:
    """Names of the probability columns, in class order: `proba_<class>`."""
    return [f"{PROBA_PREFIX}{cls}" for cls in classes]


def output_columns(classes: list[Any]) -> list[str]:
    """Columns of the model's outputs in a reference sample: `proba_<class>` per class, or `prediction`."""
    return proba_columns(classes) if classes else [PREDICTION_COLUMN]


def task_of(classes: list[Any]) -> str:
    """`regression` (no classes), `binary` (two) or `multiclass`."""
    if len(classes) == 0:
        return "regression"
    return "binary" if len(classes) == 2 else "multiclass"


def prediction_name(classes: list[Any]) -> str:
    """The name prediction drift goes by: `prediction`, `proba_<positive class>` or `predicted`."""
    if not classes:
        return PREDICTION_COLUMN
    return f"{PROBA_PREFIX}{classes[1]}" if len(classes) == 2 else PREDICTED_CLASS


def prediction_kind(classes: list[Any]) -> Kind:
    """Prediction drift is categorical (the predicted classes) for a multiclass model, else numeric."""
    return "categorical" if len(classes) > 2 else "numeric"


def prediction_values(scores: np.ndarray, classes: list[Any]) -> np.ndarray:
    """One value per row, what prediction drift compares (see `prediction_drift`).

    Args:
        scores: The model's outputs: probabilities (n, classes), or values (n,).
        classes: The model's classes; empty for a regressor.
    """
    if not classes:
        return np.asarray(scores, dtype=float)
    if len(classes) == 2:
        return np.asarray(scores)[:, 1]
    return np.asarray(classes, dtype=object)[np.asarray(scores).argmax(axis=1)]


def prediction_drift(
    reference_scores: np.ndarray, current_scores: np.ndarray, classes: list[Any], thresholds: DriftThresholds
) -> FeatureDrift:
    """Drift of the champion's predictions (see the module's rules).

    Binary: the positive-class probability (numeric, named `proba_<class>`). Multiclass: the shares of the
    predicted classes (categorical, named `predicted`): every class counts, not only one probability
    column. Regression: the predicted value (numeric, named `prediction`).

    Args:
        reference_scores: The model's outputs on the reference rows: probabilities (n, classes), or values (n,).
        current_scores: The same on the recent rows.
        classes: The model's classes; empty for a regressor.
        thresholds: The rules' limits.
    """
    return column_drift(
        prediction_name(classes),
        prediction_kind(classes),
        prediction_values(reference_scores, classes),
        prediction_values(current_scores, classes),
        thresholds,
    )


def prediction_basis(classes: list[Any]) -> str:
    """What prediction drift is measured on, in words (for the reports)."""
    if len(classes) == 0:
        return "the predicted value"
    if len(classes) == 2:
        return f"the probability of class {classes[1]}"
    return f"the shares of the predicted classes ({', '.join(map(str, classes))})"


# ---------------------------------------------------------------------------------------------- over partitions
# Per column, the partitions' counts (`core/monitoring/drift_partials.py`); here, a window's columns and the drift from
# the merged counts.


def drift_from_partial(reference: ColumnReference, partial: ColumnPartial, thresholds: DriftThresholds) -> FeatureDrift:
    """`column_drift(name, kind, reference values, the window's values)` from the window's merged counts."""
    if reference.kind == "numeric":
        bins = Bins([], numeric_counts(reference.values, reference.edges), partial.psi_counts)
        statistic, p_value = ks_from_partial(reference, partial)
        test, effect = "ks", statistic
    else:
        ref_counts = reference.values.value_counts()
        categories = sorted(set(ref_counts.index) | set(partial.categories))
        ref = ref_counts.reindex(categories, fill_value=0).to_numpy(dtype=float)
        cur = np.array([partial.categories.get(c, 0) for c in categories], dtype=float)
        categories, ref, cur = capped_counts(categories, ref, cur)
        bins = Bins(categories, ref, cur)
        if len(categories) < 2:
            statistic, p_value = 0.0, 1.0
        else:
            statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
            statistic, p_value = float(statistic), float(p_value)
        test, effect = "chi2", float(0.5 * np.abs(ref / ref.sum() - cur / cur.sum()).sum())
    psi = bins.psi
    drifted = is_drifted(psi, p_value, effect, thresholds)
    return FeatureDrift(reference.name, reference.kind, psi, test, statistic, p_value, effect, drifted)


@dataclass(frozen=True)
class WindowReference:
    """The reference side of every feature (prepared inputs) and of the champion's predictions."""

    features: tuple[ColumnReference, ...]
    prediction: ColumnReference | None  # None: predictions are not compared
    classes: tuple[Any, ...] = ()  # the model's classes (empty for a regressor)


def window_reference(reference: pd.DataFrame, config: DatasetConfig, classes: list[Any] | None) -> WindowReference:
    """From a stored reference sample (features + outputs); `classes` None leaves predictions out.

    `classes` is the model's (empty for a regressor); the reference's outputs are `prediction_values` of them.
    """
    features = tuple(
        column_reference(f, feature_kind(f, config), feature_values(reference, f, config))
        for f in drift_features(config)
    )
    if classes is None:
        return WindowReference(features, None)
    scores = reference[output_columns(classes)].to_numpy(dtype=float)
    values = prediction_values(scores if classes else scores[:, 0], classes)
    prediction = column_reference(prediction_name(classes), prediction_kind(classes), values)
    return WindowReference(features, prediction, tuple(classes))


@dataclass
class WindowPartial:
    """Counts of some rows of a window: per feature, and of the champion's predictions on them."""

    rows: int
    features: list[ColumnPartial]
    prediction: ColumnPartial | None = None

    def merge(self, other: WindowPartial) -> WindowPartial:
        """The counts of both."""
        prediction = None
        if self.prediction is not None and other.prediction is not None:
            prediction = self.prediction.merge(other.prediction)
        features = [a.merge(b) for a, b in zip(self.features, other.features, strict=True)]
        return WindowPartial(self.rows + other.rows, features, prediction)

    @property
    def null_rates(self) -> dict[str, float]:
        """Share of missing values per feature."""
        return {f.name: f.null_rate for f in self.features}


def window_partial(
    features: pd.DataFrame, reference: WindowReference, config: DatasetConfig, scores: np.ndarray | None = None
) -> WindowPartial:
    """Counts of one partition: `features` are its prepared inputs, `scores` the model's outputs on them.

    An empty partition needs no scores (a model cannot score no rows); its counts are zeros.
    """
    partials = [column_partial(r, feature_values(features, r.name, config)) for r in reference.features]
    prediction = None
    if reference.prediction is not None:
        if len(features) == 0:
            values: Any = np.array([], dtype=float if reference.prediction.kind == "numeric" else object)
        elif scores is None:
            raise ValueError("the model's outputs are needed to count the predictions of a non-empty partition")
        else:
            values = prediction_values(scores, list(reference.classes))
        prediction = column_partial(reference.prediction, values)
    return WindowPartial(len(features), partials, prediction)


def merge_partials(partials: Sequence[Any]) -> Any:
    """The sums of every partition of a window, in any order.

    Its counts (`WindowPartial`), or any partial that adds another to itself with `.merge` (the estimates' sums,
    `core.monitoring.estimation_partials.EstimationPartial`).
    """
    if not partials:
        raise ValueError("no partitions to merge")
    merged = partials[0]
    for partial in partials[1:]:
        merged = merged.merge(partial)
    return merged


def partial_drifts(
    reference: WindowReference, partial: WindowPartial, thresholds: DriftThresholds
) -> tuple[list[FeatureDrift], FeatureDrift | None]:
    """Every feature's drift and the predictions' (None when not counted) from a window's merged counts."""
    features = [drift_from_partial(r, p, thresholds) for r, p in zip(reference.features, partial.features, strict=True)]
    prediction = None
    if reference.prediction is not None and partial.prediction is not None:
        prediction = drift_from_partial(reference.prediction, partial.prediction, thresholds)
    return features, prediction
