"""Performance without labels: what the champion's metrics are expected to be on a window of recent rows (pure).

Labels in credit, fraud and churn arrive weeks or months late. Until then:

- **Classifiers: confidence-based performance estimation (CBPE).** The champion's probabilities, calibrated on
  the reference rows (its holdout, with their labels) where that helps, are read as the chance that each row is of
  each class. The expected confusion matrix follows: a row predicted positive adds its probability to the true
  positives and the rest to the false positives, a row predicted negative its probability to the false negatives.
  Precision, recall and F1 come from those sums; ROC AUC from the expected true and false positive mass above every
  score (`auc_from_groups`). Multiclass: one class against the rest, macro averages.
- **Regressors: direct loss estimation (DLE).** Two models fitted on the reference rows learn each row's absolute
  and squared error from its features and prediction; the window's MAE is the mean of the predicted absolute errors,
  its RMSE the root of the mean predicted squared error.

Both hold when the data shift but the relation between inputs and target does not (covariate shift); a change of
that relation (concept drift) shows only in realised performance once labels arrive, which is why both are shown.

**The band.** The metric realised on the reference rows, plus or minus `sigmas` bootstrap standard deviations at
the window's size (the spread of the metric on the reference, `spread * sqrt(reference rows / window rows)`), and
never narrower than `min_change` (absolute for ROC AUC, F1, precision and recall; relative for RMSE and MAE). An
estimate beyond the band on the worse side is a drop worth retraining for. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

REFERENCE_TARGET = "__target__"  # the label column of a reference sample (its rows' true target)
CLASSIFIER_ESTIMATES = ("roc_auc", "f1", "precision", "recall")
REGRESSOR_ESTIMATES = ("rmse", "mae")
LOWER_IS_BETTER = ("rmse", "mae")
BOOTSTRAP_DRAWS = 200
CALIBRATION_GAIN = 0.01  # isotonic calibration is used when it lowers the cross-fitted Brier score by more than 1 %


@dataclass(frozen=True)
class EstimatedMetric:
    """One metric of one window: the estimate, the band it is judged against, and the realised value if known.

    Attributes:
        metric: `roc_auc`, `f1`, `precision`, `recall`, `rmse` or `mae`.
        estimate: Expected on the window's rows (no labels needed).
        reference: Realised on the reference rows (the champion's holdout).
        lower: The band's lower end at the window's size.
        upper: The band's upper end.
        realised: Realised on the window's labelled rows, once labels arrived (else None).
    """

    metric: str
    estimate: float
    reference: float
    lower: float
    upper: float
    realised: float | None = None

    @property
    def error(self) -> float | None:
        """Estimate minus realised, once labels arrived."""
        return None if self.realised is None else self.estimate - self.realised

    @property
    def worse(self) -> bool:
        """The estimate is beyond the band on the worse side (lower, or higher for an error metric)."""
        return self.estimate > self.upper if self.metric in LOWER_IS_BETTER else self.estimate < self.lower


@dataclass(frozen=True)
class Estimated:
    """A window's estimated performance: every estimated metric, how it was estimated, on how many rows."""

    rows: int
    method: str
    metrics: list[EstimatedMetric] = field(default_factory=list)
    labelled_rows: int = 0

    def get(self, metric: str) -> EstimatedMetric | None:
        """The estimate of `metric`, if estimated."""
        return next((m for m in self.metrics if m.metric == metric), None)


@dataclass(frozen=True)
class BandRule:
    """How wide a band is: `sigmas` bootstrap standard deviations at the window's size, at least `min_change`."""

    sigmas: float = 3.0
    min_change: float = 0.02


@dataclass(frozen=True)
class PerformanceEstimator:
    """What the estimates need, fitted once on the reference rows (`fit_estimator`).

    Attributes:
        classes: The champion's classes; empty for a regressor.
        calibrators: Isotonic calibrators per class (one for binary, on the positive class), or None when the
            champion's probabilities are used as they are.
        method: How it estimates, in words (shown in the reports).
        loss_models: A regressor's (absolute error, squared error) models, else None.
        categories: The reference's categories per non-numeric column (the loss models' inputs).
        reference: Each metric realised on the reference rows.
        spread: Each metric's bootstrap standard deviation at the reference's size.
        reference_rows: How many reference rows.
    """

    classes: list[Any]
    calibrators: list[Any] | None
    method: str
    loss_models: tuple[Any, Any] | None
    categories: dict[str, list[Any]]
    reference: dict[str, float]
    spread: dict[str, float]
    reference_rows: int


# ------------------------------------------------------------------------------------------ the formulas


def auc_from_groups(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC from the (expected) positive and negative mass of rows grouped by score, in ascending score order.

    The share of positive-negative pairs where the positive scores higher, ties counting half: the textbook
    Mann-Whitney form, here with expected masses instead of counts. Groups may be single scores or bins of them
    (the cluster sums bins); NaN when either mass is zero.
    """
    total_pos, total_neg = float(positive.sum()), float(negative.sum())
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    above = total_pos - np.cumsum(positive)  # positive mass scoring higher than each group
    return float(np.sum(negative * (above + 0.5 * positive)) / (total_pos * total_neg))


def expected_auc(score: np.ndarray, probability: np.ndarray) -> float:
    """Expected ROC AUC of `score` when each row is positive with `probability` (rows of equal score tie)."""
    order = np.argsort(score, kind="stable")
    ordered, chances = score[order], probability[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return auc_from_groups(np.add.reduceat(chances, starts), np.add.reduceat(1.0 - chances, starts))


def rates(true_pos: float, false_pos: float, false_neg: float) -> dict[str, float]:
    """Precision, recall and F1 from (expected or counted) confusion sums; 0 where undefined, as scikit-learn's."""
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos > 0 else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg > 0 else 0.0
    f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg) if true_pos > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def one_vs_rest(classes: Sequence[Any]) -> list[int]:
    """The class columns judged one against the rest: the positive class for binary, every class otherwise."""
    return [1] if len(classes) == 2 else list(range(len(classes)))


def macro_average(per_class: list[dict[str, float]]) -> dict[str, float]:
    """Each estimated classifier metric averaged over the judged classes (the positive class alone for binary)."""
    return {metric: float(np.mean([c[metric] for c in per_class])) for metric in CLASSIFIER_ESTIMATES}


def expected_metrics(raw: np.ndarray, calibrated: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
    """CBPE: ROC AUC, F1, precision and recall expected from calibrated probabilities (macro for multiclass).

    `raw` ranks the rows and decides the predicted class (its argmax, as the realised metrics do); `calibrated`
    is each row's chance of being of each class.
    """
    predicted = raw.argmax(axis=1)
    per_class = []
    for column in one_vs_rest(classes):
        chance, chosen = calibrated[:, column], predicted == column
        figures = rates(float(chance[chosen].sum()), float((1.0 - chance[chosen]).sum()), float(chance[~chosen].sum()))
        per_class.append(figures | {"roc_auc": expected_auc(raw[:, column], chance)})
    return macro_average(per_class)


def realised_metrics(y: np.ndarray, scores: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
    """The estimated metrics computed from labels: what an estimate is compared with (NaN where undefined)."""
    if not len(classes):
        errors = np.asarray(y, dtype=float) - scores
        return {"rmse": float(np.sqrt(np.mean(errors**2))), "mae": float(np.mean(np.abs(errors)))}
    y = np.asarray(y)
    predicted = scores.argmax(axis=1)
    per_class = []
    for column in one_vs_rest(classes):
        truth, chosen = y == classes[column], predicted == column
        figures = rates(float((truth & chosen).sum()), float((~truth & chosen).sum()), float((truth & ~chosen).sum()))
        auc = roc_auc_score(truth, scores[:, column]) if 0 < truth.sum() < len(truth) else float("nan")
        per_class.append(figures | {"roc_auc": float(auc)})
    return macro_average(per_class)


# ------------------------------------------------------------------------------------------ fitting


def fit_estimator(
    features: pd.DataFrame, scores: np.ndarray, y: np.ndarray, classes: Sequence[Any], seed: int = 0
) -> PerformanceEstimator:
    """Fit the estimator on the reference rows: their features, the champion's outputs on them, their labels.

    Classifiers: isotonic calibrators per class when they lower the cross-fitted Brier score by more than 1 %
    (else the probabilities as they are). Regressors: the loss models. Both: the realised metrics and their
    bootstrap spread.
    """
    classes = list(classes)
    y = np.asarray(y)
    reference = realised_metrics(y, scores, classes)
    spread = bootstrap_spread(y, scores, classes, seed)
    if classes:
        calibrators, method = choose_calibrators(scores, y, classes, seed)
        return PerformanceEstimator(classes, calibrators, method, None, {}, reference, spread, len(y))
    from threadpoolctl import threadpool_limits

    categories = {c: sorted(features[c].dropna().astype(str).unique()) for c in _non_numeric(features)}
    inputs = loss_inputs(features, scores, categories)
    errors = np.asarray(y, dtype=float) - scores
    with threadpool_limits(1, user_api="openmp"):  # small fits: one thread, as the domain classifier's
        models = (_loss_model(seed).fit(inputs, np.abs(errors)), _loss_model(seed).fit(inputs, errors**2))
    method = "DLE: absolute and squared errors learnt from the reference rows' features and predictions"
    return PerformanceEstimator([], None, method, models, categories, reference, spread, len(y))


def bootstrap_spread(y: np.ndarray, scores: np.ndarray, classes: Sequence[Any], seed: int) -> dict[str, float]:
    """Each estimated metric's standard deviation over bootstrap resamples of the reference rows."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = rng.integers(0, len(y), len(y))
        draws.append(realised_metrics(y[rows], scores[rows], classes))
    return {metric: float(np.nanstd([d[metric] for d in draws], ddof=1)) for metric in draws[0]}


def choose_calibrators(
    scores: np.ndarray, y: np.ndarray, classes: list[Any], seed: int
) -> tuple[list[Any] | None, str]:
    """Isotonic calibrators per class when two-fold cross-fitting says they help, else None; and the method."""
    from sklearn.isotonic import IsotonicRegression

    columns = one_vs_rest(classes)
    truth = np.column_stack([(y == classes[c]).astype(float) for c in columns])
    raw = scores[:, columns]
    folds = np.random.default_rng(seed).permutation(len(y)) % 2
    crossed = np.empty_like(raw)
    for fold in (0, 1):
        fit, out = folds != fold, folds == fold
        for k in range(len(columns)):
            calibrator = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(raw[fit, k], truth[fit, k])
            crossed[out, k] = calibrator.predict(raw[out, k])
    before, after = float(np.mean((raw - truth) ** 2)), float(np.mean((crossed - truth) ** 2))
    if after >= before * (1 - CALIBRATION_GAIN):
        return None, f"CBPE on the champion's probabilities (reference Brier {before:.4f}; isotonic {after:.4f})"
    calibrators = [
        IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(raw[:, k], truth[:, k])
        for k in range(len(columns))
    ]
    return calibrators, f"CBPE on probabilities calibrated on the reference (Brier {before:.4f} -> {after:.4f})"


def calibrated(estimator: PerformanceEstimator, scores: np.ndarray) -> np.ndarray:
    """Each row's chance of being of each class: the champion's probabilities through the calibrators, if any."""
    if estimator.calibrators is None:
        return scores
    chances = scores.copy()
    for calibrator, column in zip(estimator.calibrators, one_vs_rest(estimator.classes), strict=True):
        chances[:, column] = calibrator.predict(scores[:, column])
    return chances


def loss_inputs(features: pd.DataFrame, predictions: np.ndarray, categories: dict[str, list[Any]]) -> pd.DataFrame:
    """The loss models' inputs: numeric features, the reference's categories (others missing), the prediction."""
    frame = features.copy()
    for column, known in categories.items():
        values = frame[column].where(frame[column].isna(), frame[column].astype(str))
        frame[column] = pd.Categorical(values, categories=known)
    for column in _non_numeric(frame):
        if column not in categories:  # a column of no category in the reference: nothing to learn from
            frame = frame.drop(columns=column)
    return frame.assign(__prediction__=np.asarray(predictions, dtype=float))


def _non_numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c]) or frame[c].dtype == bool]


def _loss_model(seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        max_iter=150, learning_rate=0.05, min_samples_leaf=40, categorical_features="from_dtype", random_state=seed
    )


# ------------------------------------------------------------------------------------------ estimating


def band(estimator: PerformanceEstimator, metric: str, rows: int, rule: BandRule) -> tuple[float, float]:
    """The band around the reference's realised `metric` at a window of `rows` rows (see the module's rules)."""
    centre = estimator.reference[metric]
    spread = estimator.spread.get(metric, 0.0)
    width = rule.sigmas * spread * math.sqrt(estimator.reference_rows / max(rows, 1))
    floor = rule.min_change * abs(centre) if metric in LOWER_IS_BETTER else rule.min_change
    width = max(width if np.isfinite(width) else 0.0, floor)
    return centre - width, centre + width


def estimate_sums(estimator: PerformanceEstimator, features: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    """The expected metrics on these rows (CBPE for a classifier, DLE for a regressor)."""
    if estimator.classes:
        return expected_metrics(scores, calibrated(estimator, scores), estimator.classes)
    assert estimator.loss_models is not None
    inputs = loss_inputs(features, scores, estimator.categories)
    absolute, squared = (np.clip(model.predict(inputs), 0, None) for model in estimator.loss_models)
    return {"rmse": float(np.sqrt(np.mean(squared))), "mae": float(np.mean(absolute))}


def judge_estimates(
    estimator: PerformanceEstimator,
    expected: dict[str, float],
    rows: int,
    rule: BandRule,
    realised: dict[str, float] | None = None,
    labelled_rows: int = 0,
) -> Estimated:
    """Expected metrics of a window of `rows` rows with their bands, beside the realised ones when labels arrived."""
    metrics = []
    for metric, value in expected.items():
        lower, upper = band(estimator, metric, rows, rule)
        known = None if realised is None or not np.isfinite(realised.get(metric, np.nan)) else realised[metric]
        metrics.append(EstimatedMetric(metric, value, estimator.reference[metric], lower, upper, known))
    return Estimated(rows, estimator.method, metrics, labelled_rows)


def estimate_performance(
    estimator: PerformanceEstimator,
    features: pd.DataFrame,
    scores: np.ndarray,
    rule: BandRule,
    labelled: tuple[np.ndarray, np.ndarray] | None = None,
) -> Estimated:
    """A window's estimated performance, judged against its band; `labelled`: (row mask, labels) once known."""
    realised = None
    if labelled is not None:
        known, y = labelled
        realised = realised_metrics(y, scores[known], estimator.classes)
    rows_known = 0 if labelled is None else int(labelled[0].sum())
    expected = estimate_sums(estimator, features, scores)
    return judge_estimates(estimator, expected, len(features), rule, realised, rows_known)


def estimate_reasons(estimated: Estimated, watched: Sequence[str]) -> list[str]:
    """Why the estimates say the champion got worse: each watched metric beyond its band on the worse side."""
    reasons = []
    for m in estimated.metrics:
        if m.metric in watched and m.worse:
            edge, side = (m.upper, "above") if m.metric in LOWER_IS_BETTER else (m.lower, "below")
            reasons.append(
                f"estimated {m.metric} {m.estimate:.4g} on {estimated.rows} unlabelled rows is {side} its band "
                f"({edge:.4g}; the reference's {m.reference:.4g})"
            )
    return reasons
