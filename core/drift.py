"""Drift statistics and the rules that judge them: recent data against the champion's training reference.

Pure (numpy, scipy, pandas; unit-tested, no I/O): PSI, KS, chi-square and total-variation distance per
feature, and the drift of the champion's predictions. These numbers are the only drift figures in the
project: the verdict, the Markdown summary and the HTML report (`core/drift_report.py`, which plots the
very bins PSI is computed over) all show them.

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
  (`core/decay.py` applies these.)
- A window with fewer than `min_rows` rows gives no verdict. Any drifted or decayed window triggers
  (`core/drift_analysis.py` judges windows and gives the overall verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from core.dataset import DatasetConfig
from core.errors import PermanentError

PROBA_PREFIX = "proba_"
PREDICTION_COLUMN = "prediction"  # a regressor's predicted value in the reference sample
PREDICTED_CLASS = "predicted"  # a multiclass model's predicted class, as prediction drift sees it
MISSING = "__missing__"
EPSILON = 1e-4  # floor of a bin's share in PSI, so an empty bin does not make it infinite

Kind = Literal["numeric", "categorical"]


class MonitoringError(PermanentError):
    """Monitoring cannot run as asked (no champion, no reference, unreadable labels); names the problem."""


class DriftThresholds(BaseModel):
    """When drift or decay is bad enough to retrain (the rules are in `core/drift.py`)."""

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


# ---------------------------------------------------------------------------------------------- statistics


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares, or counts).

    PSI = sum((c - r) * ln(c / r)); shares are floored at `EPSILON` so an empty bin stays finite.
    """
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    if ref.shape != cur.shape:
        raise ValueError(f"bins differ: reference has {ref.shape}, current has {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError("a distribution with no observations has no PSI")
    ref = np.clip(ref / ref.sum(), EPSILON, None)
    cur = np.clip(cur / cur.sum(), EPSILON, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (distinct values only, so ties do not make empty bins)."""
    values = np.asarray(reference, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin (`(-inf, e0], (e0, e1], ..., (ek, inf)`) plus a last bin for missing values."""
    values = np.asarray(values, dtype=float)
    missing = np.isnan(values)
    index = np.searchsorted(edges, values[~missing], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(float)
    return np.append(counts, missing.sum())


def _short(value: float) -> str:
    """A bin edge for people: 4 significant digits, thousands as `k` and millions as `M` (`25.88k`)."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def edge_labels(edges: np.ndarray) -> list[str]:
    """Names of the bins of `numeric_counts`: `<= e0`, `(e0, e1]`, ..., `> ek`, `missing`."""
    if len(edges) == 0:
        return ["any value", "missing"]
    text = [_short(e) for e in edges]
    inner = [f"({low}, {high}]" for low, high in pairwise(text)]
    return [f"<= {text[0]}", *inner, f"> {text[-1]}", "missing"]


def _labels(values: Any) -> pd.Series:
    series = pd.Series(values, dtype="object")
    return series.where(series.notna(), MISSING).astype(str)


def category_counts(reference: Any, current: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Categories seen in either sample (missing values as `__missing__`) and both samples' counts."""
    ref, cur = _labels(reference), _labels(current)
    categories = sorted(set(ref) | set(cur))
    ref_counts = ref.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    cur_counts = cur.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    return categories, ref_counts, cur_counts


@dataclass(frozen=True)
class Bins:
    """The bins a column's PSI is computed over: a name per bin and both samples' counts."""

    labels: list[str]
    reference: np.ndarray
    current: np.ndarray

    @property
    def psi(self) -> float:
        """PSI over these bins."""
        return psi_from_shares(self.reference, self.current)


def numeric_bins(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> Bins:
    """The reference's quantile bins (plus one for missing values) with both samples' counts."""
    edges = quantile_edges(reference, bins)
    return Bins(edge_labels(edges), numeric_counts(reference, edges), numeric_counts(current, edges))


def categorical_bins(reference: Any, current: Any) -> Bins:
    """The categories of both samples with their counts."""
    categories, ref, cur = category_counts(reference, current)
    return Bins(categories, ref, cur)


def column_bins(kind: Kind, reference: Any, current: Any) -> Bins:
    """The bins PSI uses for a column of this kind."""
    return numeric_bins(reference, current) if kind == "numeric" else categorical_bins(reference, current)


def numeric_psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of a numeric feature over the reference's quantile bins (missing values are a bin of their own)."""
    return numeric_bins(reference, current, bins).psi


def categorical_psi(reference: Any, current: Any) -> float:
    """PSI of a categorical feature over the categories of both samples."""
    return categorical_bins(reference, current).psi


def total_variation(reference: Any, current: Any) -> float:
    """Total-variation distance of two categorical samples: half the sum of absolute share differences (0..1)."""
    _, ref, cur = category_counts(reference, current)
    return float(0.5 * np.abs(ref / ref.sum() - cur / cur.sum()).sum())


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value on the non-missing values ((0, 1) if either is empty)."""
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if ref.size == 0 or cur.size == 0:
        return 0.0, 1.0
    result = stats.ks_2samp(ref, cur)
    return float(result.statistic), float(result.pvalue)


def chi_square_test(reference: Any, current: Any) -> tuple[float, float]:
    """Chi-square test of homogeneity of two categorical samples: statistic and p-value ((0, 1) for one category)."""
    _, ref, cur = category_counts(reference, current)
    if len(ref) < 2:
        return 0.0, 1.0
    statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
    return float(statistic), float(p_value)


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
    drifted = psi >= thresholds.psi or (p_value < thresholds.p_value and effect >= thresholds.min_effect)
    return FeatureDrift(name, kind, psi, test, statistic, p_value, effect, bool(drifted))


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
        for feature in config.feature_names
    ]


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
