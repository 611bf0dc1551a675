"""Pure units: performance estimates from per-partition sums merged equal the estimate on the whole window.

The whole-window estimate is `core.monitoring.estimation.estimate_performance` on the concatenated rows. From the
merged sums (`core.monitoring.estimation_partials`): F1, precision and recall (confusion sums), MAE and RMSE (sums
of predicted losses) and every band within 1e-9; ROC AUC within `auc_binning_error` of the merged sums (half the
share of positive-negative pairs inside one of the 10,000 score bins), which is itself below 2e-4 here (5e-4 for
probabilities squared, bunched towards 0).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from core.data.features import prepare_inputs, prepare_target
from core.modeling.metrics import model_scores
from core.monitoring.drift import drift_features
from core.monitoring.estimation import BandRule, EstimatedMetric, estimate_performance, fit_estimator
from core.monitoring.estimation_partials import (
    EstimationPartial,
    auc_binning_error,
    estimated_from_partial,
    estimation_partial,
    expected_from_partial,
    merge_estimations,
    merge_samples,
    partition_sample,
    sample_rate,
)

RULE = BandRule(3.0, 0.02)


def _cuts(rows: int, seed: int) -> list[slice]:
    """Uneven partitions of `rows` rows, one of them empty."""
    inner = np.sort(np.random.default_rng(seed).choice(np.arange(1, rows), size=4, replace=False))
    bounds = [0, *inner.tolist(), inner[-1], rows]
    return [slice(a, b) for a, b in pairwise(bounds)]


def _same(merged: EstimatedMetric, whole: EstimatedMetric, auc_error: float) -> None:
    assert merged.metric == whole.metric
    tolerance = auc_error if merged.metric == "roc_auc" else 1e-9
    assert abs(merged.estimate - whole.estimate) <= tolerance + 1e-12, (merged.metric, merged.estimate, whole.estimate)
    for name in ("reference", "lower", "upper"):  # the same band: the same rows, the same estimator
        assert getattr(merged, name) == pytest.approx(getattr(whole, name), rel=1e-12, abs=1e-12), name
    assert merged.realised == whole.realised


def _check(estimator, features: pd.DataFrame, scores: np.ndarray, seed: int) -> float:
    """Merged partition sums == the whole-window estimate; returns the AUC binning bound."""
    parts = [estimation_partial(estimator, features.iloc[cut], scores[cut]) for cut in _cuts(len(features), seed)]
    merged = merge_estimations(parts[::-1])  # any order: sums
    assert merged.rows == len(features)
    whole = estimate_performance(estimator, features, scores, RULE)
    mine = estimated_from_partial(estimator, merged, RULE)
    assert (mine.rows, mine.method, mine.labelled_rows) == (whole.rows, whole.method, whole.labelled_rows)
    bound = auc_binning_error(merged) if estimator.classes else 0.0
    for a, b in zip(mine.metrics, whole.metrics, strict=True):
        _same(a, b, bound)
    return bound


@pytest.fixture(scope="module")
def credit():
    """A logistic regression on credit-risk months, its reference rows (features, scores, labels) and a window."""
    from sklearn.linear_model import LogisticRegression

    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import DriftSpec, generate_month
    from tests.task_types import fit

    config = load_local_dataset_config("credit-risk")
    train = pd.concat([generate_month(i, 1500, 3) for i in range(4)], ignore_index=True)
    model = fit(config, train, LogisticRegression(max_iter=1000))
    holdout = generate_month(4, 5000, 3)
    window = generate_month(7, 20_000, 3, drift=DriftSpec(5, 1.0))
    columns = drift_features(config)
    sides = []
    for frame in (holdout, window):
        inputs = prepare_inputs(frame, config)
        sides.append((inputs[columns], model_scores(model, inputs), prepare_target(frame, config).to_numpy()))
    return sides, model.classes_.tolist()


def test_binary_estimates_from_partitions_equal_the_whole_window(credit):
    (ref_x, ref_scores, ref_y), (x, scores, _) = credit[0]
    classes = credit[1]
    estimator = fit_estimator(ref_x, ref_scores, ref_y, classes)
    assert estimator.calibrators is None  # logistic regression: calibrated as it is
    assert _check(estimator, x, scores, seed=1) < 2e-4


def test_binary_estimates_through_calibrators(credit):
    """Probabilities bent out of calibration (squared): isotonic calibrators are fitted and applied per partition."""
    (ref_x, ref_scores, ref_y), (x, scores, _) = credit[0]

    def bent(s: np.ndarray) -> np.ndarray:
        positive = s[:, 1] ** 2
        return np.column_stack([1 - positive, positive])

    estimator = fit_estimator(ref_x, bent(ref_scores), ref_y, credit[1])
    assert estimator.calibrators is not None
    assert _check(estimator, x, bent(scores), seed=2) < 5e-4  # squared: more rows share the low bins


def test_multiclass_and_regression_estimates_from_partitions():
    from sklearn.linear_model import LogisticRegression, Ridge

    from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame

    config, frame = multiclass_config("levels-units"), multiclass_frame(9000, 0)
    model = fit(config, frame.iloc[:3000], LogisticRegression(max_iter=1000))
    inputs = prepare_inputs(frame, config)
    columns, scores, y = drift_features(config), model_scores(model, inputs), frame["level"].to_numpy()
    estimator = fit_estimator(inputs[columns].iloc[3000:6000], scores[3000:6000], y[3000:6000], model.classes_)
    assert len(estimator.classes) == 3
    assert _check(estimator, inputs[columns].iloc[6000:], scores[6000:], seed=3) < 2e-4  # macro over 3 classes

    config, frame = diabetes_config("diabetes-units"), diabetes_frame()
    model = fit(config, frame.iloc[:200], Ridge(alpha=0.1))
    inputs = prepare_inputs(frame, config)
    columns, scores, y = drift_features(config), model_scores(model, inputs), frame["progression"].to_numpy()
    estimator = fit_estimator(inputs[columns].iloc[200:320], scores[200:320], y[200:320], [])
    assert estimator.loss_models is not None
    _check(estimator, inputs[columns].iloc[320:], scores[320:], seed=4)  # MAE, RMSE within 1e-9


def test_the_auc_bound_holds_with_coarse_bins(credit):
    """With 20 bins the binned AUC is visibly off, and still within the stated bound."""
    from core.monitoring.estimation import expected_metrics

    (ref_x, ref_scores, ref_y), (x, scores, _) = credit[0]
    estimator = fit_estimator(ref_x, ref_scores, ref_y, credit[1])
    merged = merge_estimations([estimation_partial(estimator, x.iloc[c], scores[c], bins=20) for c in _cuts(len(x), 5)])
    exact = expected_metrics(scores, scores, estimator.classes)["roc_auc"]
    binned = expected_from_partial(estimator, merged)["roc_auc"]
    assert 1e-4 < abs(binned - exact) <= auc_binning_error(merged)


def test_sums_of_different_shapes_do_not_merge():
    with pytest.raises(ValueError, match="cannot merge estimation sums"):
        EstimationPartial(1, np.zeros((1, 10)), np.zeros((1, 10))).merge(EstimationPartial())


def _sample(frame: pd.DataFrame, bounds: list[int], rows: int, seed: int = 0) -> pd.DataFrame:
    rate = sample_rate(len(frame), rows)
    parts = [frame.iloc[a:b] for a, b in pairwise(bounds)]
    return merge_samples([partition_sample(p, rate, rows, seed, i) for i, p in enumerate(parts)], rows)


def test_a_small_window_is_sampled_whole():
    frame = pd.DataFrame({"a": np.arange(3000)})
    assert sample_rate(3000, 5000) == 1.0
    pd.testing.assert_frame_equal(_sample(frame, [0, 1000, 1000, 3000], 5000), frame)


def test_the_sample_is_uniform_over_the_window_and_follows_partition_sizes():
    """5,000 rows of 1,000,000 in partitions of very different sizes: each gives rows in proportion to its size."""
    rows, bounds = 1_000_000, [0, 10_000, 10_000, 110_000, 400_000, 1_000_000]
    frame = pd.DataFrame({"a": np.arange(rows)})
    sample = _sample(frame, bounds, 5000)
    assert len(sample) == 5000 and sample["a"].is_unique and sample["a"].is_monotonic_increasing
    pd.testing.assert_frame_equal(sample, _sample(frame, bounds, 5000))  # seeded
    assert not sample.equals(_sample(frame, bounds, 5000, seed=1))
    counts = np.histogram(sample["a"], bins=bounds)[0]  # rows per partition, the empty one included
    expected = np.diff(bounds) * 5000 / rows
    # hypergeometric counts: within 5 standard deviations of their share (sd < sqrt(expected))
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1e-9), (counts, expected)
    # and uniform inside the window: deciles of the sampled row numbers
    deciles = np.histogram(sample["a"], bins=10, range=(0, rows))[0]
    assert np.all(np.abs(deciles - 500) < 5 * np.sqrt(500))


def test_a_partition_sends_few_candidates():
    """The candidates are `rate` of each partition's rows (about 5,000 + 6 sd in all), never more than 5,000."""
    rate = sample_rate(1_000_000, 5000)
    assert 5000 / 1e6 < rate < 5500 / 1e6
    frame = pd.DataFrame({"a": np.arange(500_000)})
    candidates, keys = partition_sample(frame, rate, 5000, 0, 3)
    assert len(candidates) == len(keys) and abs(len(candidates) - 500_000 * rate) < 5 * np.sqrt(500_000 * rate)
    assert np.all(keys < rate) and candidates["a"].is_monotonic_increasing
    capped, keys = partition_sample(frame, 1.0, 5000, 0, 3)  # everything a candidate: the 5,000 smallest keys
    assert len(capped) == 5000 and keys.max() < np.sort(np.random.default_rng([0, 3]).random(500_000))[5000]
