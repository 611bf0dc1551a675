"""Pure units: drift statistics counted per partition and merged equal the whole-window computation.

The reference fixes the bins; each partition only counts; the merged counts give every figure (PSI, KS,
chi-square, total variation, null rates, prediction drift). The whole-window figures are `core.monitoring.drift`'s
own functions on the concatenated frame (scipy's `ks_2samp` and `chi2_contingency` underneath): counts
exact, floats within 1e-12.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from core.data.features import prepare_inputs
from core.modeling.metrics import model_classes, model_scores
from core.monitoring.drift import (
    KS_EXACT_MAX_ROWS,
    ColumnPartial,
    DriftThresholds,
    column_partial,
    column_reference,
    drift_from_partial,
    feature_drifts,
    ks_test,
    merge_partials,
    partial_drifts,
    prediction_drift,
    window_partial,
    window_reference,
)
from core.monitoring.drift_analysis import reference_sample, reference_scores

THRESHOLDS = DriftThresholds()
FIELDS = ("psi", "statistic", "p_value", "effect")


def _cuts(rows: int, seed: int) -> list[slice]:
    """Uneven partitions of `rows` rows, one of them empty."""
    rng = np.random.default_rng(seed)
    inner = np.sort(rng.choice(np.arange(1, rows), size=4, replace=False))
    bounds = [0, *inner.tolist(), inner[-1], rows]  # a repeated bound: an empty partition
    return [slice(a, b) for a, b in pairwise(bounds)]


def _same(merged, whole) -> None:
    assert (merged.name, merged.kind, merged.test, merged.drifted) == (
        whole.name,
        whole.kind,
        whole.test,
        whole.drifted,
    )
    for name in FIELDS:
        assert getattr(merged, name) == pytest.approx(getattr(whole, name), rel=1e-12, abs=1e-12), (merged.name, name)


def _check_window(config, model, reference: pd.DataFrame, current: pd.DataFrame, seed: int) -> list:
    """Partitioned figures == whole-window figures; returns the whole window's feature drifts."""
    classes = model_classes(model)
    window_ref = window_reference(reference, config, classes)
    parts = []
    for cut in _cuts(len(current), seed):
        features = prepare_inputs(current.iloc[cut], config)
        scores = model_scores(model, features) if len(features) else None
        parts.append(window_partial(features, window_ref, config, scores))
    merged = merge_partials(parts[::-1])  # any order: sums
    drifts, prediction = partial_drifts(window_ref, merged, THRESHOLDS)

    whole_features = prepare_inputs(current, config)
    whole = feature_drifts(reference, whole_features, config, THRESHOLDS)
    whole_prediction = prediction_drift(
        reference_scores(reference, classes), model_scores(model, whole_features), classes, THRESHOLDS
    )
    assert merged.rows == len(current)
    for a, b in zip(drifts, whole, strict=True):
        _same(a, b)
    _same(prediction, whole_prediction)
    # null rates: exact counts of missing values per feature
    expected_nulls = whole_features.isna().sum()
    for partial in merged.features:
        assert partial.missing == int(expected_nulls[partial.name])
        assert partial.null_rate == expected_nulls[partial.name] / len(current)
    return whole


@pytest.fixture(scope="module")
def credit():
    """A logistic regression on credit-risk months (numeric and categorical features), its reference."""
    from sklearn.linear_model import LogisticRegression

    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import generate_month
    from tests.task_types import fit

    config = load_local_dataset_config("credit-risk")
    train = pd.concat([generate_month(i, 1500, 3) for i in range(4)], ignore_index=True)
    model = fit(config, train, LogisticRegression(max_iter=1000))
    return config, model, reference_sample(train, model, config, 5000, 0)


@pytest.mark.parametrize("rows", [3000, 24_000])  # scipy's exact KS p-value below 10,000 rows, asymptotic above
def test_binary_window_merged_from_partitions_equals_the_whole_window(credit, rows):
    from core.data.synthetic import DriftSpec, generate_month

    config, model, reference = credit
    # an unchanged month, and a drifted one with nulls put into a numeric and a categorical feature
    drifted = generate_month(6, rows, 3, drift=DriftSpec(5, 1.0))
    drifted.loc[drifted.index[::7], "annual_income"] = np.nan
    drifted.loc[drifted.index[::11], "region"] = None
    plain = _check_window(config, model, reference, generate_month(5, rows, 3), seed=1)
    moved = _check_window(config, model, reference, drifted, seed=2)
    assert not any(f.drifted for f in plain) and any(f.drifted for f in moved)  # both verdicts are exercised


def test_multiclass_and_regression_windows_merged_from_partitions(credit):
    from sklearn.linear_model import LogisticRegression, Ridge

    from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame

    config, frame = multiclass_config("levels-units"), multiclass_frame(6000, 0)
    model = fit(config, frame.iloc[:3000], LogisticRegression(max_iter=1000))
    reference = reference_sample(frame.iloc[:3000], model, config, 5000, 0)
    _check_window(config, model, reference, frame.iloc[3000:], seed=3)  # predicted classes: categorical

    config, frame = diabetes_config("diabetes-units"), diabetes_frame()
    model = fit(config, frame.iloc[:300], Ridge(alpha=0.1))
    _check_window(config, model, reference_sample(frame.iloc[:300], model, config, 5000, 0), frame.iloc[300:], seed=4)


@pytest.mark.parametrize("current_rows", [700, KS_EXACT_MAX_ROWS + 1, 50_000])
def test_ks_from_cell_counts_is_scipys_ks_on_the_whole_sample(current_rows):
    # Ties in both samples (rounded values), NaNs, and window values below, between and above the reference's.
    rng = np.random.default_rng(current_rows)
    reference = np.round(rng.normal(0, 1, 4000), 1)
    reference[::50] = np.nan
    current = np.round(rng.normal(0.05, 1.3, current_rows), 2)
    current[::13] = np.nan
    ref = column_reference("x", "numeric", reference)
    parts = [column_partial(ref, chunk) for chunk in np.array_split(current, 7)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    drift = drift_from_partial(ref, merged, THRESHOLDS)
    statistic, p_value = ks_test(reference, current)
    assert drift.statistic == pytest.approx(statistic, rel=1e-12, abs=1e-15)
    assert drift.p_value == pytest.approx(p_value, rel=1e-12, abs=1e-300)
    assert merged.missing == int(np.isnan(current).sum()) and merged.rows == current_rows


def test_counts_of_different_columns_do_not_merge():
    with pytest.raises(ValueError, match="cannot merge the counts of b"):
        ColumnPartial("a", "numeric").merge(ColumnPartial("b", "numeric"))
