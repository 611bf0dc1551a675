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

from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------- over partitions
#
# A window too big for one process is read partition by partition (on a Dask cluster). Every figure above
# is a function of counts over bins that the *reference* fixes, so each partition only counts, the counts
# are summed, and the figures are computed once from the sums: the same numbers as on the whole frame.
# - PSI (numeric): counts over the reference's quantile edges plus the missing bin (`numeric_counts`).
# - KS (numeric): the reference is small (`REFERENCE_ROWS`), so its distinct values cut the line into
#   cells: "equal to the j-th value" and "strictly between the (j-1)-th and the j-th". Both ECDFs are
#   constant or monotone inside a cell, so the largest ECDF gap is found at a cell's ends: the counts per
#   cell give the exact statistic. The p-value is scipy's for that statistic and those sizes (exact method
#   up to scipy's 10,000 rows, Smirnov's asymptotic formula above it, as `ks_2samp(method="auto")`).
# - chi-square, total variation, PSI (categorical): counts per category (missing as `__missing__`).
# - null rates: missing values per column.

KS_EXACT_MAX_ROWS = 10_000  # scipy's `ks_2samp` uses the exact method up to this many rows per sample


@dataclass(frozen=True)
class ColumnReference:
    """What the partitions of a window need from the reference for one column: bins fixed by the reference."""

    name: str
    kind: Kind
    values: Any = None  # the reference values themselves (the final figures are computed against them)
    edges: np.ndarray = field(default_factory=lambda: np.array([]))  # numeric: PSI's inner edges
    support: np.ndarray = field(default_factory=lambda: np.array([]))  # numeric: distinct non-missing values


def column_reference(name: str, kind: Kind, values: Any) -> ColumnReference:
    """The reference side of a column, for partial counts (`column_partial`)."""
    if kind == "categorical":
        return ColumnReference(name, kind, _labels(values))
    array = np.asarray(values, dtype=float)
    return ColumnReference(name, kind, array, quantile_edges(array), np.unique(array[~np.isnan(array)]))


@dataclass
class ColumnPartial:
    """Counts of one column over some rows of a window, against its `ColumnReference`; `merge` sums them."""

    name: str
    kind: Kind
    rows: int = 0
    missing: int = 0
    psi_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # numeric: `numeric_counts`
    equal: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # numeric: == support[j]
    between: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # numeric: (s[j-1], s[j])
    categories: dict[str, int] = field(default_factory=dict)  # categorical: count per label

    def merge(self, other: ColumnPartial) -> ColumnPartial:
        """The counts of both (the same column against the same reference)."""
        if (other.name, other.kind) != (self.name, self.kind):
            raise ValueError(f"cannot merge the counts of {other.name} ({other.kind}) into {self.name} ({self.kind})")
        categories = dict(self.categories)
        for label, count in other.categories.items():
            categories[label] = categories.get(label, 0) + count
        return ColumnPartial(
            self.name,
            self.kind,
            self.rows + other.rows,
            self.missing + other.missing,
            self.psi_counts + other.psi_counts,
            self.equal + other.equal,
            self.between + other.between,
            categories,
        )

    @property
    def null_rate(self) -> float:
        """Share of missing values (0 for no rows)."""
        return self.missing / self.rows if self.rows else 0.0


def column_partial(reference: ColumnReference, values: Any) -> ColumnPartial:
    """Counts of one partition's values of a column (see the section's comment)."""
    if reference.kind == "categorical":
        labels = _labels(values)
        counts = labels.value_counts()
        categories = {str(label): int(count) for label, count in counts.items()}
        return ColumnPartial(
            reference.name, "categorical", len(labels), categories.get(MISSING, 0), categories=categories
        )
    array = np.asarray(values, dtype=float)
    present = array[~np.isnan(array)]
    support = reference.support
    left = np.searchsorted(support, present, side="left")
    right = np.searchsorted(support, present, side="right")
    hit = right > left
    return ColumnPartial(
        reference.name,
        "numeric",
        array.size,
        int(array.size - present.size),
        numeric_counts(array, reference.edges),
        np.bincount(left[hit], minlength=support.size).astype(np.int64),
        np.bincount(left[~hit], minlength=support.size + 1).astype(np.int64),
    )


def _ks_surrogate(support: np.ndarray, equal: np.ndarray, between: np.ndarray) -> np.ndarray:
    """A sample with exactly these cell counts (a value inside each open cell stands for the cell's values)."""
    inside = np.empty(support.size + 1)
    inside[0] = np.nextafter(support[0], -np.inf)
    inside[1:-1] = np.nextafter(support[:-1], np.inf)  # strictly inside (s[j-1], s[j]) whenever that cell is not empty
    inside[-1] = np.nextafter(support[-1], np.inf)
    return np.concatenate([np.repeat(support, equal), np.repeat(inside, between)])


def ks_from_partial(reference: ColumnReference, partial: ColumnPartial) -> tuple[float, float]:
    """`ks_test(reference values, all the window's values)` from the window's merged cell counts."""
    support = reference.support
    ref = np.asarray(reference.values, dtype=float)
    ref = ref[~np.isnan(ref)]
    n_ref, n_cur = ref.size, int(partial.equal.sum() + partial.between.sum())
    if n_ref == 0 or n_cur == 0:
        return 0.0, 1.0
    if max(n_ref, n_cur) <= KS_EXACT_MAX_ROWS:  # small: scipy's exact method on a sample with the same cells
        return ks_test(ref, _ks_surrogate(support, partial.equal, partial.between))
    ref_cum = np.searchsorted(np.sort(ref), support, side="right")  # reference rows <= s[j]
    cur_at = np.cumsum(partial.equal + partial.between[:-1])  # window rows <= s[j]
    before = np.concatenate([[0], cur_at]) + partial.between  # window rows < s[j] (and all rows, last)
    ref_before = np.concatenate([[0], ref_cum])
    gaps = np.concatenate(
        [ref_cum / n_ref - cur_at / n_cur, ref_before / n_ref - before / n_cur]  # at s[j]; just before s[j]
    )
    statistic = float(max(gaps.max(), -gaps.min(), 0.0))
    # scipy's ks_2samp, method "asymp", two-sided: Smirnov's distribution at the effective size
    m, n = sorted([float(n_ref), float(n_cur)], reverse=True)
    p_value = float(np.clip(stats.kstwo.sf(statistic, np.round(m * n / (m + n))), 0, 1))
    return statistic, p_value


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
        column_reference(f, feature_kind(f, config), feature_values(reference, f, config)) for f in config.feature_names
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


def merge_partials(partials: list[WindowPartial]) -> WindowPartial:
    """The counts of every partition of a window (in any order: sums of integers)."""
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
