"""Performance without labels and multivariate drift, against independent references (pure, no servers).

- CBPE's expected ROC AUC, F1, precision and recall against a Monte Carlo of scikit-learn's own metrics on labels
  drawn from the same probabilities (what "expected" means).
- A covariate shift with a known effect: the true ROC AUC on the shifted population comes from labels drawn from
  the data-generating probabilities (not the model's), and the estimate lands within its sampling error of it.
- DLE against the textbook expectation of a heteroscedastic normal error: E|e| = sqrt(2/pi) * sigma(x).
- The domain classifier: a change only in how two features move together (each marginal the same, which the
  per-feature tests cannot see) is found and named; unchanged data is not; the permuted AUCs sit around 0.5 with
  the Mann-Whitney null spread.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from core.monitoring.drift import DriftThresholds, column_drift
from core.monitoring.drift_analysis import NO_REFERENCE_LABELS, WindowFigures, judge_window
from core.monitoring.estimation import (
    BandRule,
    auc_from_groups,
    estimate_performance,
    expected_auc,
    fit_estimator,
    realised_metrics,
)
from core.monitoring.multivariate import domain_classifier_drift

RULE = BandRule(3.0, 0.02)
WEIGHTS = np.array([1.5, -1.0, 0.5, 0.0])


def _population(rng: np.random.Generator, n: int, scale: float = 1.0, shift: float = 0.0) -> tuple:
    """Rows of a logistic data-generating process; `scale`/`shift` move the strongest feature (covariate shift)."""
    X = rng.normal(size=(n, 4))
    X[:, 0] = X[:, 0] * scale + shift
    truth = 1 / (1 + np.exp(-(X @ WEIGHTS - 1.0)))
    return pd.DataFrame(X, columns=list("abcd")), (rng.random(n) < truth).astype(int), truth


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(7)
    X, y, _ = _population(rng, 20_000)
    model = LogisticRegression().fit(X, y)
    Xr, yr, _ = _population(rng, 5000)
    return rng, model, fit_estimator(Xr, model.predict_proba(Xr), yr, [0, 1], seed=0)


def _monte_carlo(proba: np.ndarray, rng: np.random.Generator, draws: int = 200) -> dict[str, float]:
    """scikit-learn's metrics averaged over labels drawn from `proba`: the expectation CBPE estimates."""
    predicted = proba.argmax(axis=1)
    totals = {"roc_auc": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    for _ in range(draws):
        y = (rng.random(len(proba)) < proba[:, 1]).astype(int)
        totals["roc_auc"] += roc_auc_score(y, proba[:, 1])
        totals["f1"] += f1_score(y, predicted)
        totals["precision"] += precision_score(y, predicted)
        totals["recall"] += recall_score(y, predicted)
    return {k: v / draws for k, v in totals.items()}


def test_auc_from_groups_is_the_mann_whitney_auc_when_the_masses_are_counts():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 30, 2000).astype(float)  # many ties
    y = (rng.random(2000) < score / 40).astype(float)
    assert expected_auc(score, y) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert math.isnan(auc_from_groups(np.zeros(3), np.ones(3)))


def test_realised_metrics_equal_scikit_learns():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet([1, 1, 1], 3000)
    y = rng.integers(0, 3, 3000)
    got = realised_metrics(y, proba, [0, 1, 2])
    predicted = proba.argmax(axis=1)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12)
    for name, metric in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert got[name] == pytest.approx(metric(y, predicted, average="macro"), abs=1e-12)
    errors = rng.normal(size=500)
    assert realised_metrics(errors, np.zeros(500), [])["mae"] == pytest.approx(np.abs(errors).mean(), abs=1e-12)


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (0.5, 0.0), (0.5, 1.0)])
def test_cbpe_equals_the_monte_carlo_expectation_of_scikit_learns_metrics(binary, scale, shift):
    rng, model, estimator = binary
    assert estimator.calibrators is None  # a well-specified logistic model needs no calibration
    X, _, _ = _population(rng, 10_000, scale, shift)
    proba = model.predict_proba(X)
    estimated = estimate_performance(estimator, X, proba, RULE)
    reference = _monte_carlo(proba, rng)
    for metric, expected in reference.items():
        assert estimated.get(metric).estimate == pytest.approx(expected, abs=0.004), metric


def test_multiclass_cbpe_equals_the_monte_carlo_of_scikit_learns_macro_metrics():
    rng = np.random.default_rng(9)
    centres = np.array([[0, 0], [1.5, 0], [0, 1.5]])

    def rows(n: int, spread: float = 1.0) -> tuple[pd.DataFrame, np.ndarray]:
        y = rng.integers(0, 3, n)
        return pd.DataFrame(centres[y] + rng.normal(size=(n, 2)) * spread, columns=["a", "b"]), y

    model = LogisticRegression().fit(*rows(20_000))
    Xr, yr = rows(5000)
    estimator = fit_estimator(Xr, model.predict_proba(Xr), yr, [0, 1, 2], seed=0)
    Xw, _ = rows(8000, spread=1.4)  # rows drawn unlike the reference's
    proba = model.predict_proba(Xw)
    chances = proba if estimator.calibrators is None else None
    assert chances is not None  # well specified: used as they are
    predicted = proba.argmax(axis=1)
    totals = dict.fromkeys(("roc_auc", "f1", "precision", "recall"), 0.0)
    draws = 100
    for _ in range(draws):  # labels drawn from the probabilities, one multinomial draw per row
        y = (rng.random((len(proba), 1)) > np.cumsum(proba, axis=1)).sum(axis=1)
        totals["roc_auc"] += roc_auc_score(y, proba, multi_class="ovr", average="macro")
        for name, metric in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
            totals[name] += metric(y, predicted, average="macro")
    estimated = estimate_performance(estimator, Xw, proba, RULE)
    for metric, total in totals.items():
        assert estimated.get(metric).estimate == pytest.approx(total / draws, abs=0.004), metric


def test_a_covariate_shift_that_lowers_the_true_auc_is_estimated_within_its_sampling_error(binary):
    rng, model, estimator = binary
    # the true ROC AUC of the model on a population: labels drawn from the data-generating probabilities
    big, _, truth = _population(rng, 400_000, scale=0.4)
    true_auc = roc_auc_score(rng.random(len(truth)) < truth, model.predict_proba(big)[:, 1])
    drop = estimator.reference["roc_auc"] - true_auc
    assert drop > 0.06  # the shift's known effect: the strongest feature varies less

    window, y, _ = _population(rng, 8000, scale=0.4)
    estimated = estimate_performance(estimator, window, model.predict_proba(window), RULE)
    auc = estimated.get("roc_auc")
    spread = estimator.spread["roc_auc"] * math.sqrt(estimator.reference_rows / len(window))
    assert abs(auc.estimate - true_auc) < 3 * spread
    assert auc.worse and auc.estimate < auc.lower  # beyond the band: the drop is seen without labels

    unchanged, _, _ = _population(rng, 8000)
    assert not estimate_performance(estimator, unchanged, model.predict_proba(unchanged), RULE).get("roc_auc").worse
    # with the labels, the realised value sits beside the estimate and its error is kept
    labelled = estimate_performance(
        estimator, window, model.predict_proba(window), RULE, (np.ones(len(window), bool), y)
    )
    assert labelled.get("roc_auc").realised == pytest.approx(roc_auc_score(y, model.predict_proba(window)[:, 1]))
    assert labelled.get("roc_auc").error == pytest.approx(auc.estimate - labelled.get("roc_auc").realised)


def test_cbpe_calibrates_on_the_reference_when_the_probabilities_are_off():
    rng = np.random.default_rng(3)
    X, y, _ = _population(rng, 20_000)
    model = LogisticRegression().fit(X, y)
    Xr, yr, _ = _population(rng, 5000)
    squeezed = model.predict_proba(Xr) ** 3  # far too low: a miscalibrated model
    squeezed = np.column_stack([1 - squeezed[:, 1], squeezed[:, 1]])
    estimator = fit_estimator(Xr, squeezed, yr, [0, 1], seed=0)
    assert estimator.calibrators is not None and "calibrated on the reference" in estimator.method
    Xw, _, truth = _population(rng, 10_000, scale=0.6)
    raw = model.predict_proba(Xw) ** 3
    raw = np.column_stack([1 - raw[:, 1], raw[:, 1]])
    estimated = estimate_performance(estimator, Xw, raw, RULE)
    # the expected recall under the true probabilities (the calibration's target), by the textbook ratio
    chosen = raw.argmax(axis=1) == 1
    recall = truth[chosen].sum() / truth.sum()
    assert estimated.get("recall").estimate == pytest.approx(recall, abs=0.03)


def test_dle_equals_the_textbook_expected_error_of_a_heteroscedastic_normal():
    rng = np.random.default_rng(5)

    def rows(n: int, wide: bool = False) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        X = rng.normal(size=(n, 3))
        if wide:  # more rows where the noise is large, inside the reference's range (trees do not extrapolate)
            X[:, 0] = rng.uniform(-2.5, 2.5, n)
        sigma = 0.5 + np.abs(X[:, 0])
        return pd.DataFrame(X, columns=["a", "b", "c"]), 2 * X[:, 0] + X[:, 1] + rng.normal(size=n) * sigma, sigma

    X, y, _ = rows(20_000)
    model = LinearRegression().fit(X, y)
    Xr, yr, _ = rows(5000)
    estimator = fit_estimator(Xr, model.predict(Xr), yr, [], seed=0)
    for wide in (False, True):
        Xw, _, sigma = rows(20_000, wide)
        estimated = estimate_performance(estimator, Xw, model.predict(Xw), RULE)
        mae, rmse = math.sqrt(2 / math.pi) * sigma.mean(), math.sqrt((sigma**2).mean())  # E|N(0, s)| = s sqrt(2/pi)
        assert estimated.get("mae").estimate == pytest.approx(mae, rel=0.02), wide
        assert estimated.get("rmse").estimate == pytest.approx(rmse, rel=0.02), wide
        assert estimated.get("mae").worse == wide and estimated.get("rmse").worse == wide  # errors rise past the band


def test_the_domain_classifier_finds_a_change_in_how_features_move_together_and_names_them():
    rng = np.random.default_rng(11)
    reference = pd.DataFrame(rng.normal(size=(5000, 4)), columns=list("abcd"))
    reference["kind"] = rng.choice(["x", "y", "z"], 5000)
    unchanged = pd.DataFrame(rng.normal(size=(4000, 4)), columns=list("abcd")).assign(
        kind=rng.choice(["x", "y", "z"], 4000)
    )
    tied = unchanged.copy()  # the same marginals, a and b now correlated 0.9
    tied["b"] = 0.9 * tied["a"] + math.sqrt(1 - 0.81) * tied["b"]
    columns = ["a", "b", "c", "d", "kind"]
    thresholds = DriftThresholds()
    for name in ("a", "b"):  # per feature, nothing moved
        assert not column_drift(name, "numeric", reference[name].to_numpy(), tied[name].to_numpy(), thresholds).drifted

    same = domain_classifier_drift(reference, unchanged, columns, 9, 0.55)
    moved = domain_classifier_drift(reference, tied, columns, 9, 0.55)
    assert not same.drifted and same.features == [] and abs(same.auc - 0.5) < 0.03
    assert moved.drifted and moved.auc > 0.6 and moved.p_value == pytest.approx(0.1)
    assert {name for name, _ in moved.features[:2]} == {"a", "b"}
    # the permuted AUCs are the null distribution: around 0.5 with the Mann-Whitney spread
    n1, n2 = moved.rows
    null_sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    assert all(abs(a - 0.5) < 4 * null_sd for a in moved.permuted)


def test_estimated_drops_and_multivariate_drift_are_judged_and_give_reasons(binary):
    rng, model, estimator = binary
    window, _, _ = _population(rng, 4000, scale=0.4)
    estimated = estimate_performance(estimator, window, model.predict_proba(window), RULE)
    figures = WindowFigures("partition", "s3://b/p/", 4000, estimated=estimated)
    result = judge_window(figures, DriftThresholds())
    assert result.estimated_drop and result.triggered and not result.drifted and not result.decayed
    assert any(r.startswith("estimated roc_auc") and "below its band" in r for r in result.reasons)
    quiet = judge_window(figures, DriftThresholds(estimate_triggers=False))
    assert not quiet.triggered and quiet.estimated is estimated  # shown, not acted on

    moved = domain_classifier_drift(
        pd.DataFrame({"a": rng.normal(size=3000)}), pd.DataFrame({"a": rng.normal(1, 1, 3000)}), ["a"], 5, 0.55
    )
    drifted = judge_window(WindowFigures("partition", "s3://b/p/", 3000, multivariate=moved), DriftThresholds())
    assert drifted.drifted and any("multivariate drift" in r for r in drifted.reasons)
    off = judge_window(WindowFigures("p", "s3://b/p/", 3000, multivariate=moved), DriftThresholds(multivariate=False))
    assert not off.triggered


def test_a_reference_without_labels_says_why_nothing_was_estimated():
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import generate_month
    from core.monitoring.drift_analysis import Champion, Window, analyse_window, reference_sample
    from core.monitoring.estimation import REFERENCE_TARGET

    config = load_local_dataset_config("credit-risk")
    rows = generate_month(0, 1500, 1)

    class Model:
        classes_ = np.array([0, 1])

        def predict_proba(self, frame):
            return np.column_stack([np.full(len(frame), 0.7), np.full(len(frame), 0.3)])

    old = reference_sample(rows, Model(), config, 1000, 0).drop(columns=REFERENCE_TARGET)
    champion = Champion(config.model_name, "1", "run", Model(), {"roc_auc": 0.8}, old)
    window = Window("partition", "s3://b/p/", generate_month(1, 500, 1), config.id_column)
    result = analyse_window(window, champion, config, None, DriftThresholds(multivariate=False))
    assert result.estimated is None and result.estimation_note == NO_REFERENCE_LABELS
