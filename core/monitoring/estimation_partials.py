"""Estimated performance and the domain classifier's sample over partitions: sums per partition, merged (pure).

A window too big for one process is read partition by partition (on a Dask cluster, `dask_engine/drift.py`). The
estimates of `core/monitoring/estimation.py` are functions of sums over the window's rows, so each partition
returns its sums (`estimation_partial`), the sums are added (`merge_estimations`), and the metrics are computed
once from them (`expected_from_partial`) and judged by the same code as a window read whole (`judge_estimates`):
- **Classifiers (CBPE)**, per judged class column (`one_vs_rest`): the expected confusion sums (true positive,
  false positive and false negative mass of the calibrated probabilities, the predicted class being the raw
  scores' argmax) give precision, recall and F1 exactly (`rates`, up to the order of the additions). ROC AUC:
  the calibrated positive and negative mass per bin of the raw score (`SCORE_BINS` equal bins on [0, 1]) go to
  `auc_from_groups`, which counts the pairs inside one bin as ties (half). The whole-window AUC orders the rows
  inside a bin by their exact scores, so the two differ by at most half the share of positive-negative pairs in
  the same bin, `auc_binning_error` (about 1e-5 with 10,000 bins on the credit-risk data; tests assert it).
- **Regressors (DLE)**: the sums of the loss models' predicted absolute and squared errors and the row count
  give MAE and RMSE (exact up to the order of the additions).
- **The domain classifier's sample**: the window's rows are too many to send, and `domain_classifier_drift` uses
  at most `MAX_ROWS` of them anyway. Each row of a partition gets a seeded uniform random key; a partition sends
  its rows whose key is below a rate set from the window's row count (`sample_rate`: a few more than `MAX_ROWS`
  expected in all, so each partition sends in proportion to its size, without knowing the others' sizes), and the
  client keeps the `MAX_ROWS` of smallest key (`merge_samples`): a uniform random sample of the window's rows,
  whatever its partitions. (A partition is not always one file: dask may read several small files as one.)
  No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.monitoring.drift import merge_partials
from core.monitoring.estimation import (
    BandRule,
    Estimated,
    PerformanceEstimator,
    auc_from_groups,
    calibrated,
    judge_estimates,
    loss_inputs,
    macro_average,
    one_vs_rest,
    rates,
)

SCORE_BINS = 10_000  # equal bins of a raw probability on [0, 1] for the expected ROC AUC


def _zeros(shape: tuple[int, ...] | int) -> np.ndarray:
    return np.zeros(shape)


@dataclass
class EstimationPartial:
    """The sums some rows of a window add to its estimates; `merge` adds two.

    Attributes:
        rows: Rows summed.
        positive: Classifier: (judged class columns, bins) calibrated positive mass per bin of the raw score.
        negative: Classifier: the same for the negative mass (1 - the calibrated probability).
        true_pos: Classifier: per judged class column, the calibrated mass of the rows predicted that class.
        false_pos: Classifier: per judged class column, 1 - that mass over the same rows.
        false_neg: Classifier: per judged class column, the calibrated mass of the rows predicted another class.
        absolute: Regressor: the sum of the predicted absolute errors.
        squared: Regressor: the sum of the predicted squared errors.
    """

    rows: int = 0
    positive: np.ndarray = field(default_factory=lambda: _zeros((0, 0)))
    negative: np.ndarray = field(default_factory=lambda: _zeros((0, 0)))
    true_pos: np.ndarray = field(default_factory=lambda: _zeros(0))
    false_pos: np.ndarray = field(default_factory=lambda: _zeros(0))
    false_neg: np.ndarray = field(default_factory=lambda: _zeros(0))
    absolute: float = 0.0
    squared: float = 0.0

    def merge(self, other: EstimationPartial) -> EstimationPartial:
        """The sums of both (partials of the same estimator with the same bins)."""
        if self.positive.shape != other.positive.shape:
            raise ValueError(f"cannot merge estimation sums of shapes {other.positive.shape} and {self.positive.shape}")
        return EstimationPartial(
            self.rows + other.rows,
            self.positive + other.positive,
            self.negative + other.negative,
            self.true_pos + other.true_pos,
            self.false_pos + other.false_pos,
            self.false_neg + other.false_neg,
            self.absolute + other.absolute,
            self.squared + other.squared,
        )


def empty_estimation(estimator: PerformanceEstimator, bins: int = SCORE_BINS) -> EstimationPartial:
    """The sums of no rows."""
    if not estimator.classes:
        return EstimationPartial()
    k = len(one_vs_rest(estimator.classes))
    return EstimationPartial(0, _zeros((k, bins)), _zeros((k, bins)), _zeros(k), _zeros(k), _zeros(k))


def score_bins(raw: np.ndarray, bins: int = SCORE_BINS) -> np.ndarray:
    """Each raw probability's bin: `bins` equal bins on [0, 1], the upper end in the last one."""
    return np.minimum((np.clip(raw, 0.0, 1.0) * bins).astype(np.int64), bins - 1)


def estimation_partial(
    estimator: PerformanceEstimator, features: pd.DataFrame, scores: np.ndarray, bins: int = SCORE_BINS
) -> EstimationPartial:
    """The sums of one partition: `features` its prepared drift features, `scores` the champion's outputs on them.

    Classifier: the calibrated masses per score bin and the expected confusion sums (the module's docstring);
    regressor: the loss models' predicted absolute and squared errors, summed (clipped at 0 as the whole-window
    estimate clips them).
    """
    if len(features) == 0:
        return empty_estimation(estimator, bins)
    if not estimator.classes:
        assert estimator.loss_models is not None
        inputs = loss_inputs(features, scores, estimator.categories)
        absolute, squared = (np.clip(model.predict(inputs), 0, None) for model in estimator.loss_models)
        return EstimationPartial(len(features), absolute=float(np.sum(absolute)), squared=float(np.sum(squared)))
    chances = calibrated(estimator, scores)
    predicted = scores.argmax(axis=1)
    partial = empty_estimation(estimator, bins)
    partial.rows = len(features)
    for k, column in enumerate(one_vs_rest(estimator.classes)):
        chance, chosen, where = chances[:, column], predicted == column, score_bins(scores[:, column], bins)
        partial.positive[k] = np.bincount(where, weights=chance, minlength=bins)
        partial.negative[k] = np.bincount(where, weights=1.0 - chance, minlength=bins)
        partial.true_pos[k] = chance[chosen].sum()
        partial.false_pos[k] = (1.0 - chance[chosen]).sum()
        partial.false_neg[k] = chance[~chosen].sum()
    return partial


def merge_estimations(partials: Sequence[EstimationPartial]) -> EstimationPartial:
    """The sums of every partition of a window (in any order)."""
    merged: EstimationPartial = merge_partials(partials)
    return merged


def expected_from_partial(estimator: PerformanceEstimator, partial: EstimationPartial) -> dict[str, float]:
    """The expected metrics of the window from its merged sums: what `estimate_sums` gives on the whole window.

    Classifier: ROC AUC, F1, precision and recall (macro over the judged classes, as `expected_metrics`);
    regressor: RMSE and MAE. NaN for a window of no rows.
    """
    if not estimator.classes:
        if partial.rows == 0:
            return {"rmse": float("nan"), "mae": float("nan")}
        return {"rmse": float(np.sqrt(partial.squared / partial.rows)), "mae": float(partial.absolute / partial.rows)}
    per_class = []
    for k in range(len(partial.true_pos)):
        figures = rates(float(partial.true_pos[k]), float(partial.false_pos[k]), float(partial.false_neg[k]))
        per_class.append(figures | {"roc_auc": auc_from_groups(partial.positive[k], partial.negative[k])})
    return macro_average(per_class)


def auc_binning_error(partial: EstimationPartial) -> float:
    """How far the binned expected ROC AUC can be from the one over exact scores (macro over the judged classes).

    Inside a bin `auc_from_groups` counts every positive-negative pair half; ordered by exact score, a pair counts 0
    or 1. So the two differ by at most half the share of pairs in the same bin: 0.5 * sum(pos * neg) / (P * N).
    """
    bounds = []
    for positive, negative in zip(partial.positive, partial.negative, strict=True):
        total = float(positive.sum()) * float(negative.sum())
        bounds.append(0.5 * float(np.sum(positive * negative)) / total if total > 0 else 0.0)
    return float(np.mean(bounds)) if bounds else 0.0


def estimated_from_partial(
    estimator: PerformanceEstimator,
    partial: EstimationPartial,
    rule: BandRule,
    realised: dict[str, float] | None = None,
    labelled_rows: int = 0,
) -> Estimated:
    """The window's estimated performance from its merged sums, judged as a window read whole (`judge_estimates`)."""
    return judge_estimates(
        estimator, expected_from_partial(estimator, partial), partial.rows, rule, realised, labelled_rows
    )


# ------------------------------------------------------------------------------------------ the domain sample

SAMPLE_SLACK_SIGMAS = 6.0  # candidates beyond the rows wanted, in standard deviations of their count


def sample_rate(window_rows: int, rows: int) -> float:
    """The share of each partition's rows drawn as candidates, so that the window gives at least `rows` of them.

    Every row when the window has at most `rows`; else `rows` plus 6 standard deviations (and 10) over the window's
    rows: the candidates fall short of `rows` with a probability below 1e-9.
    """
    if window_rows <= rows:
        return 1.0
    return min(1.0, (rows + SAMPLE_SLACK_SIGMAS * math.sqrt(rows) + 10) / window_rows)


def partition_sample(
    frame: pd.DataFrame, rate: float, rows: int, seed: int, index: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """One partition's candidates for the window's sample, and their random keys (in the partition's row order).

    Each row gets a uniform key from a generator seeded by (`seed`, the partition's `index`); the rows whose key is
    below `rate` are candidates, at most `rows` of them (the smallest keys). `merge_samples` keeps the `rows`
    smallest keys of the window: a uniform sample of its rows, each partition giving rows in proportion to its size.
    """
    keys = np.random.default_rng([seed, index]).random(len(frame))
    chosen = np.flatnonzero(keys < rate)
    if len(chosen) > rows:
        chosen = np.sort(chosen[np.argpartition(keys[chosen], rows - 1)[:rows]])
    return frame.iloc[chosen], keys[chosen]


def merge_samples(samples: Sequence[tuple[pd.DataFrame, np.ndarray]], rows: int) -> pd.DataFrame:
    """The window's sample: the `rows` candidates of smallest key over every partition, in partition and row order."""
    if not samples:
        raise ValueError("no partitions' samples to merge")
    frame = pd.concat([candidates for candidates, _ in samples], ignore_index=True)
    keys = np.concatenate([k for _, k in samples])
    if len(keys) > rows:
        frame = frame.iloc[np.sort(np.argpartition(keys, rows - 1)[:rows])].reset_index(drop=True)
    return frame
