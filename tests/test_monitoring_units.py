"""Pure units of monitoring: PSI, KS, chi-square, the verdict rules, the cooldown filter and history records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs
from core.data.synthetic import DriftSpec, generate_month
from core.monitoring.decay import Performance
from core.monitoring.drift import (
    DriftThresholds,
    categorical_psi,
    chi_square_test,
    column_drift,
    feature_drifts,
    ks_test,
    numeric_counts,
    numeric_psi,
    prediction_drift,
    psi_from_shares,
    quantile_edges,
    total_variation,
)
from core.monitoring.drift_analysis import WindowFigures, join_labels, judge_window, overall_verdict, reference_sample
from core.monitoring.drift_report import MonitoredModel, summary_markdown
from core.monitoring.estimation import REFERENCE_TARGET
from core.monitoring.retraining import blocking_runs
from core.promotion.history import ChampionChange, history_table, record_key

RNG = np.random.default_rng(0)
THRESHOLDS = DriftThresholds()


def test_psi_matches_the_textbook_formula_and_is_zero_for_equal_shares():
    ref, cur = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    expected = (0.4 - 0.5) * np.log(0.4 / 0.5) + (0.4 - 0.3) * np.log(0.4 / 0.3)
    assert psi_from_shares(ref, cur) == pytest.approx(expected)
    assert psi_from_shares([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)  # counts are normalised


def test_psi_stays_finite_for_an_empty_bin_and_rejects_mismatched_bins():
    assert np.isfinite(psi_from_shares([1, 0], [0, 1]))
    with pytest.raises(ValueError, match="bins differ"):
        psi_from_shares([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no observations"):
        psi_from_shares([0, 0], [1, 1])


def test_numeric_bins_put_missing_values_in_their_own_bin():
    edges = quantile_edges(np.array([1.0, 2, 3, 4, np.nan]), bins=4)
    counts = numeric_counts(np.array([0.0, 10, np.nan, np.nan]), edges)
    assert counts[-1] == 2 and counts.sum() == 4
    assert numeric_psi(np.array([1.0, 2, 3] * 100), np.array([1.0, 2, 3, np.nan] * 100)) > 0.1


def test_numeric_psi_and_ks_separate_a_shift_from_resampling():
    ref = RNG.normal(0, 1, 5000)
    same, shifted = RNG.normal(0, 1, 2000), RNG.normal(0.5, 1, 2000)
    assert numeric_psi(ref, same) < 0.02
    assert numeric_psi(ref, shifted) > 0.2
    statistic, p_value = ks_test(ref, shifted)
    assert statistic > 0.15 and p_value < 1e-10
    assert ks_test(ref, same)[1] > 0.001
    assert ks_test(ref, np.array([np.nan])) == (0.0, 1.0)


def test_categorical_psi_chi_square_and_total_variation():
    ref = RNG.choice(["a", "b", "c"], 5000, p=[0.6, 0.3, 0.1])
    same = RNG.choice(["a", "b", "c"], 2000, p=[0.6, 0.3, 0.1])
    moved = RNG.choice(["a", "b", "c", "new"], 2000, p=[0.3, 0.3, 0.2, 0.2])
    assert categorical_psi(ref, same) < 0.01 and categorical_psi(ref, moved) > 0.5
    assert chi_square_test(ref, same)[1] > 0.001 > chi_square_test(ref, moved)[1]
    assert total_variation(ref, moved) == pytest.approx(0.3, abs=0.03)
    assert chi_square_test(["a"] * 10, ["a"] * 5) == (0.0, 1.0)
    # missing values are a category of their own
    assert categorical_psi(["a"] * 100, [None] * 50 + ["a"] * 50) > 1


def test_a_significant_but_tiny_shift_is_not_drift():
    # at 200k rows KS rejects a 0.03 sd shift, but the effect (KS statistic ~0.01) is below min_effect
    ref, cur = RNG.normal(0, 1, 200_000), RNG.normal(0.03, 1, 200_000)
    drift = column_drift("x", "numeric", ref, cur, THRESHOLDS)
    assert drift.p_value < THRESHOLDS.p_value and drift.effect < THRESHOLDS.min_effect and not drift.drifted
    assert column_drift("x", "numeric", ref, RNG.normal(0.6, 1, 5000), THRESHOLDS).drifted


@pytest.fixture(scope="module")
def credit():
    config = load_local_dataset_config("credit-risk")
    reference = prepare_inputs(pd.concat([generate_month(i, 1500, 3) for i in range(4)]), config)
    return config, reference


def test_the_generators_drift_knob_is_detected_and_an_undrifted_month_is_not(credit):
    config, reference = credit
    unchanged = prepare_inputs(generate_month(5, 2000, 3), config)
    drifted = prepare_inputs(generate_month(5, 2000, 3, drift=DriftSpec(5, 1.0)), config)
    assert not any(f.drifted for f in feature_drifts(reference, unchanged, config, THRESHOLDS))
    names = {f.name for f in feature_drifts(reference, drifted, config, THRESHOLDS) if f.drifted}
    assert {"annual_income", "credit_utilization", "employment_type"} <= names


def _proba(positive: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - positive, positive])


def test_prediction_drift_binary_and_multiclass():
    ref = _proba(RNG.beta(2, 8, 5000))
    assert not prediction_drift(ref, _proba(RNG.beta(2, 8, 2000)), [0, 1], THRESHOLDS).drifted
    moved = prediction_drift(ref, _proba(RNG.beta(4, 6, 2000)), [0, 1], THRESHOLDS)
    assert moved.drifted and moved.name == "proba_1" and moved.test == "ks"
    three = RNG.dirichlet([5, 3, 1], 3000)
    other = RNG.dirichlet([1, 3, 5], 3000)
    multi = prediction_drift(three, other, ["x", "y", "z"], THRESHOLDS)
    assert multi.name == "predicted" and multi.test == "chi2" and multi.drifted


def _features(n_drifted: int, total: int = 10) -> list:
    return [
        column_drift(f"f{i}", "numeric", np.arange(100.0), np.arange(100.0) + (80 if i < n_drifted else 0), THRESHOLDS)
        for i in range(total)
    ]


def test_window_verdict_rules():
    quiet = column_drift("proba_1", "numeric", np.arange(100.0), np.arange(100.0), THRESHOLDS)
    ok = judge_window(WindowFigures("partition", "s3://b/p", 1000, _features(1), quiet, None, 0), THRESHOLDS)
    assert not ok.triggered and ok.note == "no threshold crossed"
    drifted = judge_window(WindowFigures("partition", "s3://b/p", 1000, _features(2), quiet, None, 0), THRESHOLDS)
    assert drifted.drifted and "2/10 features drifted" in drifted.reasons[0]
    # too few rows: no verdict whatever the numbers
    small = judge_window(WindowFigures("partition", "s3://b/p", 50, _features(10), quiet, None, 0), THRESHOLDS)
    assert not small.triggered and "fewer than the 200" in small.note
    assert ok.judged and not small.judged  # its per-feature figures are shown as "not judged", never "drifted"
    # prediction drift alone triggers
    moved = column_drift("proba_1", "numeric", np.arange(100.0), np.arange(100.0) + 60, THRESHOLDS)
    assert judge_window(WindowFigures("w", "s", 1000, _features(0), moved, None, 0), THRESHOLDS).drifted


def test_decay_is_judged_against_the_holdout():
    holdout = {"roc_auc": 0.85, "f1": 0.5}
    fine = Performance(500, {"roc_auc": 0.83, "f1": 0.45}, holdout)
    worse = Performance(500, {"roc_auc": 0.75, "f1": 0.45}, holdout)
    assert not judge_window(WindowFigures("w", "s", 1000, _features(0), None, fine, 500), THRESHOLDS).triggered
    decayed = judge_window(WindowFigures("w", "s", 1000, _features(0), None, worse, 500), THRESHOLDS)
    assert decayed.decayed and not decayed.drifted and "roc_auc 0.7500" in decayed.reasons[0]
    assert worse.drop("roc_auc") == pytest.approx(0.1) and worse.drop("brier") is None


def test_overall_verdict_and_markdown():
    assert overall_verdict([]).summary == "no recent data to compare"
    ok = judge_window(WindowFigures("partition", "s", 1000, _features(0), None, None, 0), THRESHOLDS)
    bad = judge_window(WindowFigures("prediction-log", "s", 1000, _features(5), None, None, 0), THRESHOLDS)
    verdict = overall_verdict([ok, bad])
    assert verdict.triggered and verdict.summary.startswith("prediction-log 5/10 features")
    assert not overall_verdict([ok]).triggered
    markdown = summary_markdown(
        MonitoredModel("m", "3"), [ok, bad], verdict, "s3://b/r.html", "http://x/r.html", "triggered"
    )
    assert "# Drift monitoring: **RETRAIN**" in markdown and "| f0 | numeric |" in markdown
    assert "[report.html](http://x/r.html)" in markdown


def test_labels_join_by_id_and_missing_labels_stay_unknown():
    current = pd.DataFrame({"id": ["a", "b", "c"]})
    labels = pd.DataFrame({"id": ["c", "a", "a"], "y": [1, 0, 1]})
    joined = join_labels(current, "id", labels, "id", "y")
    assert joined.tolist()[0] == 1 and pd.isna(joined.tolist()[1]) and joined.tolist()[2] == 1  # last label wins
    assert join_labels(current, "request_id", labels, "id", "y").isna().all()


def test_prediction_log_rows_join_labels_on_their_record_id_else_their_request_id():
    from core.monitoring.prediction_log import prediction_log_key

    # Given a batch request whose records carried integer ids (logged as text), one record without an id,
    # and a single-record request whose x-request-id is the id
    logged = pd.DataFrame({"request_id": ["r1", "r1", "r1", "17"], "record_id": ["15", "16", None, None]}, dtype=object)
    labels = pd.DataFrame({"id": [15, 16, 17, 99], "y": [1, 0, 1, 0]})
    # then each row joins on its own id, the id-less batch row on nothing, the single request on its id
    key = prediction_log_key(logged)
    assert key.tolist() == ["15", "16", "r1", "17"]
    joined = join_labels(logged.assign(k=key), "k", labels, "id", "y")
    assert joined.tolist()[:2] == [1, 0] and pd.isna(joined.iloc[2]) and joined.iloc[3] == 1
    # and logs written before record ids existed still join on the request id
    assert prediction_log_key(logged.drop(columns="record_id")).tolist() == ["r1", "r1", "r1", "17"]


def _hand_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI over the reference's deciles, written out with numpy (independent of core.monitoring.drift)."""
    edges = np.concatenate([[-np.inf], np.unique(np.quantile(reference, np.linspace(0.1, 0.9, 9))), [np.inf]])
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def test_an_overfit_model_on_unchanged_data_drifts_against_training_rows_but_not_against_the_holdout(credit):
    from scipy.stats import ks_2samp
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline

    from core.data.features import build_preprocessor, prepare_target
    from core.data.split import split_frame
    from core.monitoring.drift import DriftThresholds, prediction_drift
    from core.monitoring.drift_analysis import reference_scores

    config, _ = credit
    # Given an overfit family (a forest of fully grown trees: min_samples_leaf=1) fitted on the training rows
    split = split_frame(pd.concat([generate_month(i, 1500, 5) for i in range(4)], ignore_index=True), config)
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=1, random_state=0, n_jobs=1)
    model = Pipeline([("prep", build_preprocessor(config)), ("model", forest)])
    model.fit(prepare_inputs(split.train, config), prepare_target(split.train, config))
    # and a new month from the same, unchanged process
    current = model.predict_proba(prepare_inputs(generate_month(4, 2000, 5), config))
    classes = [0, 1]
    verdicts, ks, psi = {}, {}, {}
    for name, rows in (("training rows", split.train), ("holdout rows", split.holdout)):
        reference = reference_sample(rows, model, config, 5000, 0)
        drift = prediction_drift(reference_scores(reference, classes), current, classes, DriftThresholds())
        verdicts[name] = drift.drifted
        ks[name] = ks_2samp(reference["proba_1"], current[:, 1])
        psi[name] = _hand_psi(reference["proba_1"].to_numpy(), current[:, 1])
        assert drift.psi == pytest.approx(psi[name], rel=0.25, abs=0.01)  # our PSI agrees with the hand one
    # then against its in-sample outputs (the old reference) prediction drift fires on unchanged data:
    # scipy's KS and a hand PSI both say so
    assert verdicts["training rows"]
    assert ks["training rows"].pvalue < 1e-3 and ks["training rows"].statistic > 0.1 and psi["training rows"] > 0.2
    # while against its outputs on holdout rows (the reference training now stores) nothing drifts
    assert not verdicts["holdout rows"]
    assert ks["holdout rows"].pvalue > 1e-3 and psi["holdout rows"] < 0.2


def test_reference_sample_has_features_and_probabilities(credit):
    config, _ = credit
    train = generate_month(0, 300, 1)

    class Model:
        classes_ = np.array([0, 1])

        def predict_proba(self, frame):
            return _proba(np.full(len(frame), 0.25))

    sample = reference_sample(train, Model(), config, max_rows=100, seed=0)
    assert len(sample) == 100
    assert list(sample.columns) == [*config.feature_names, "proba_0", "proba_1", REFERENCE_TARGET]
    assert (sample["proba_1"] == 0.25).all()
    # the labels are the sampled rows' own (what the performance estimator is fitted on)
    assert sample[REFERENCE_TARGET].tolist() == train.sample(n=100, random_state=0)[config.target].tolist()
    assert len(reference_sample(train, Model(), config, max_rows=5000, seed=0)) == 300


def test_reference_sample_takes_the_given_scores_of_the_sampled_rows(credit):
    """The training flow passes the holdout evaluation's scores: the same sample as predicting again, no prediction."""
    config, _ = credit
    rows = generate_month(0, 400, 1)
    rows.index = rows.index[::-1] * 7  # an index that is neither positions nor sorted

    def positive(frame: pd.DataFrame) -> np.ndarray:
        return (frame["age"].to_numpy(float) - 17) / 100

    class Model:
        classes_ = np.array([0, 1])
        calls = 0

        def predict_proba(self, frame):
            Model.calls += 1
            return _proba(positive(frame))

    predicted = reference_sample(rows, Model(), config, max_rows=150, seed=3)
    assert Model.calls == 1
    given = reference_sample(rows, Model(), config, max_rows=150, seed=3, scores=_proba(positive(rows)))
    assert Model.calls == 1  # not predicted again
    pd.testing.assert_frame_equal(given, predicted)
    # the rows pandas' own seeded sample picks, each with its own score
    picked = rows.sample(n=150, random_state=3)
    assert given[REFERENCE_TARGET].tolist() == picked[config.target].tolist()
    np.testing.assert_array_equal(given["proba_1"], positive(picked))


def test_cooldown_blocks_recent_or_unfinished_runs_only():
    now = datetime.now(UTC)
    final = SimpleNamespace(is_final=lambda: True)
    running = SimpleNamespace(is_final=lambda: False)
    old_done = SimpleNamespace(expected_start_time=now - timedelta(hours=5), state=final)
    old_running = SimpleNamespace(expected_start_time=now - timedelta(hours=5), state=running)
    recent_done = SimpleNamespace(expected_start_time=now - timedelta(minutes=5), state=final)
    since = now - timedelta(hours=1)
    assert blocking_runs([old_done], since) == []
    assert blocking_runs([old_done, old_running, recent_done], since) == [old_running, recent_done]


def test_history_keys_sort_by_time_and_records_round_trip():
    early = ChampionChange("2026-01-02T03:04:05.000001+00:00", "m", None, "1", "promotion", "cold start", "me")
    late = ChampionChange("2026-01-02T03:04:05.000002+00:00", "m", "1", "2", "rollback", "bad", "you")
    assert record_key(early) < record_key(late) and record_key(early).startswith("history/m/20260102T030405000001Z-")
    assert ChampionChange.from_json(late.to_json()) == late
    rows = history_table([early, late])
    assert rows[1]["from"] == "v1" and rows[1]["to"] == "v2" and rows[0]["from"] == "-"


# ------------------------------------------------------------------- regression and multiclass champions


@pytest.fixture(scope="module")
def regression():
    """A Ridge pipeline on the diabetes data: fitted on the first 300 patients, the reference from them."""
    from sklearn.linear_model import Ridge

    from tests.task_types import diabetes_config, diabetes_frame, fit

    config, frame = diabetes_config("diabetes-units"), diabetes_frame()
    train = frame.iloc[:300]
    model = fit(config, train, Ridge(alpha=0.1))
    return config, frame, model, reference_sample(train, model, config, 5000, 0)


def test_regression_reference_stores_the_predicted_value(regression):
    config, frame, model, reference = regression
    assert list(reference.columns) == [*config.feature_names, "prediction", REFERENCE_TARGET]
    expected = model.predict(prepare_inputs(frame.iloc[:300], config))
    np.testing.assert_allclose(reference["prediction"].to_numpy(), expected, rtol=0, atol=1e-9)
    # a classifier's reference cannot be read as a regressor's, and the error says so
    from core.monitoring.drift import MonitoringError
    from core.monitoring.drift_analysis import reference_scores

    with pytest.raises(MonitoringError, match="regression expected"):
        reference_scores(reference.drop(columns="prediction").assign(proba_0=0.5, proba_1=0.5), [])


def test_regression_prediction_drift_is_on_the_predicted_value():
    ref = RNG.normal(150, 50, 5000)
    same = prediction_drift(ref, RNG.normal(150, 50, 2000), [], THRESHOLDS)
    assert same.name == "prediction" and same.kind == "numeric" and same.test == "ks"
    assert same.psi < 0.05 and not same.drifted
    # predictions half a standard deviation higher: PSI over the reference's deciles crosses 0.2
    shifted = prediction_drift(ref, RNG.normal(175, 50, 2000), [], THRESHOLDS)
    assert shifted.psi >= THRESHOLDS.prediction_psi and shifted.drifted
    assert judge_window(WindowFigures("w", "s", 2000, _features(0), shifted, None, 0), THRESHOLDS).drifted
    assert not judge_window(WindowFigures("w", "s", 2000, _features(0), same, None, 0), THRESHOLDS).triggered


def test_regression_decay_is_a_relative_rise_of_rmse_or_mae():
    assert (THRESHOLDS.max_rmse_rise, THRESHOLDS.max_mae_rise) == (0.1, 0.1)
    holdout = {"rmse": 50.0, "mae": 40.0, "r2": 0.5}

    def judged(rmse: float, mae: float):
        performance = Performance(500, {"rmse": rmse, "mae": mae, "r2": 0.4}, holdout)
        return judge_window(WindowFigures("w", "s", 1000, _features(0), None, performance, 500), THRESHOLDS)

    # 9 % worse on both: within the 10 % allowed
    assert not judged(54.5, 43.6).triggered
    # RMSE 12 % worse: decayed, the reason names RMSE, its rise and the limit
    rmse = judged(56.0, 41.0)
    assert rmse.decayed and not rmse.drifted and len(rmse.reasons) == 1
    assert rmse.reasons[0] == "rmse 56 on 500 labelled rows is 12.0% above the holdout's 50 (allowed 10%)"
    # MAE alone 15 % worse also decays; better than the holdout never does
    assert judged(50.0, 46.0).decayed and "mae 46" in judged(50.0, 46.0).reasons[0]
    assert not judged(30.0, 20.0).triggered
    # no classification rule applies to a regressor, and a custom limit is honoured
    assert all("roc_auc" not in r and "f1" not in r for r in judged(80.0, 80.0).reasons)
    strict = DriftThresholds(max_rmse_rise=0.05)
    performance = Performance(500, {"rmse": 53.0, "mae": 40.0}, holdout)
    assert judge_window(WindowFigures("w", "s", 1000, _features(0), None, performance, 500), strict).decayed
    # a perfect holdout: any error is an infinite rise, none is no rise
    assert Performance(10, {"rmse": 0.1}, {"rmse": 0.0}).rise("rmse") == float("inf")
    assert Performance(10, {"rmse": 0.0}, {"rmse": 0.0}).rise("rmse") == 0.0


def test_regression_window_metrics_equal_sklearns_and_shifted_labels_decay(regression):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from core.modeling.metrics import compute_metrics
    from core.monitoring.drift_analysis import Champion, Window, analyse_window

    config, frame, model, reference = regression
    window = frame.drop(columns="progression")  # what arrives: features and ids, labels later
    labels = frame[["patient_id", "progression"]].sample(frac=1, random_state=1)  # any order: joined by id
    X, y = prepare_inputs(frame, config), frame["progression"].to_numpy()
    predicted = model.predict(X)
    holdout = compute_metrics(y[300:], predicted[300:], [])  # the champion's figures on rows it never saw
    recent = Window("partition", "s3://b/p", window, "patient_id")
    champion = Champion("m", "1", "run", model, holdout, reference)
    result = analyse_window(recent, champion, config, labels, THRESHOLDS)
    # RMSE, MAE and R² on the 442 labelled rows are scikit-learn's on the same rows
    performance = result.performance
    assert performance is not None and performance.rows == len(frame) == result.labelled_rows
    assert set(performance.metrics) == {"rmse", "mae", "r2"}
    assert performance.metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, predicted)), rel=1e-12)
    assert performance.metrics["mae"] == pytest.approx(mean_absolute_error(y, predicted), rel=1e-12)
    assert performance.metrics["r2"] == pytest.approx(r2_score(y, predicted), rel=1e-12)
    assert performance.holdout == holdout
    # the window is the training population: the predicted value did not drift
    assert result.prediction.name == "prediction" and not result.prediction.drifted
    # labels that moved by half a standard deviation of the target make the champion clearly worse
    moved = labels.assign(progression=labels["progression"] + 0.5 * y.std())
    decayed = analyse_window(recent, champion, config, moved, THRESHOLDS)
    assert decayed.decayed and any(r.startswith("rmse ") for r in decayed.reasons), decayed.reasons
    assert overall_verdict([decayed]).summary.startswith("partition RMSE ")


def test_regression_window_with_shifted_inputs_triggers_prediction_drift(regression):
    from core.monitoring.drift_analysis import Champion, Window, analyse_window

    config, frame, model, reference = regression
    # Given patients whose BMI is a standard deviation higher (the model's strongest input)
    heavier = frame.assign(bmi=frame["bmi"] + frame["bmi"].std())
    result = analyse_window(
        Window("partition", "s", heavier, "patient_id"),
        Champion("m", "1", "run", model, {}, reference),
        config,
        None,
        THRESHOLDS,
    )
    # then the predicted value drifted beyond the limit, and that alone triggers
    assert result.prediction.psi >= THRESHOLDS.prediction_psi and result.drifted
    assert any(r.startswith("prediction drift: PSI") for r in result.reasons)


def test_regression_reports_show_error_metrics_and_no_classification_rows(regression):
    from core.monitoring.drift_analysis import Champion, Window, analyse_window
    from core.monitoring.drift_report import summary_html as _summary_html

    config, frame, model, reference = regression
    labels = frame[["patient_id", "progression"]]
    holdout = {"rmse": 40.0, "mae": 30.0, "r2": 0.6}
    result = analyse_window(
        Window("partition", "s", frame, "patient_id"),
        Champion("m", "1", "run", model, holdout, reference),
        config,
        labels,
        THRESHOLDS,
    )
    markdown = summary_markdown(
        MonitoredModel("d", "1", []), [result], overall_verdict([result]), "s3://r", "http://r", "t"
    )
    assert "task: regression; prediction drift is measured on the predicted value" in markdown
    assert "| RMSE |" in markdown and "| MAE |" in markdown and "| R² |" in markdown
    assert "| prediction (prediction) | numeric |" in markdown
    page = _summary_html(Champion("d", "1", "run", model, holdout, reference), [result])
    for text in (markdown, page):
        assert "ROC AUC" not in text and "roc_auc" not in text and "F1" not in text and "proba_" not in text
    assert "<td>RMSE</td>" in page and "Task: regression" in page


@pytest.fixture(scope="module")
def multiclass():
    """A logistic regression on three classes; reference from its 3000 training rows, 3000 unseen rows."""
    from sklearn.linear_model import LogisticRegression

    from tests.task_types import fit, multiclass_config, multiclass_frame

    config, frame = multiclass_config("levels-units"), multiclass_frame(6000, seed=0)
    train, unseen = frame.iloc[:3000], frame.iloc[3000:].reset_index(drop=True)
    model = fit(config, train, LogisticRegression(max_iter=1000))
    return config, unseen, model, reference_sample(train, model, config, 5000, 0)


def test_multiclass_prediction_drift_is_quiet_on_unchanged_data_and_fires_on_a_shifted_class_mix(multiclass):
    from core.monitoring.drift_analysis import Champion, Window, analyse_window

    config, unseen, model, reference = multiclass
    assert {"proba_high", "proba_low", "proba_mid"} <= set(reference.columns)
    # Given unseen rows of the same process, then the predicted classes' shares did not move
    same = analyse_window(
        Window("partition", "s", unseen, "row_id"),
        Champion("m", "1", "run", model, {}, reference),
        config,
        None,
        THRESHOLDS,
    )
    assert same.prediction.name == "predicted" and same.prediction.test == "chi2"
    assert same.prediction.psi < 0.02 and not same.prediction.drifted and not same.triggered, same.reasons
    # Given a class mix of 70 % "high" (each class a third before), drawn from the same unseen rows
    rng = np.random.default_rng(1)
    high, other = unseen.index[unseen["level"] == "high"], unseen.index[unseen["level"] != "high"]
    mix = np.concatenate([rng.choice(high, 1400), rng.choice(other, 600)])
    shifted = unseen.loc[mix].reset_index(drop=True)
    moved = analyse_window(
        Window("partition", "s", shifted, "row_id"),
        Champion("m", "1", "run", model, {}, reference),
        config,
        None,
        THRESHOLDS,
    )
    # then the prediction drift fires (the shift is in the shares of every class, not one probability column)
    assert moved.prediction.psi >= THRESHOLDS.prediction_psi and moved.drifted
    assert any(r.startswith("prediction drift: PSI") for r in moved.reasons)


def test_multiclass_prediction_drift_sees_a_shift_the_last_probability_column_misses():
    # Given predictions moving from class x to class y while class z (the last column) keeps its share
    classes = ["x", "y", "z"]
    ref = np.tile([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]], (1000, 1))
    cur = np.tile([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], (1000, 1))
    last_column = column_drift("proba_z", "numeric", ref[:, -1], cur[:, -1], THRESHOLDS)
    assert last_column.psi == pytest.approx(0) and not last_column.drifted
    # then the drift over the predicted classes' shares fires
    drift = prediction_drift(ref, cur, classes, THRESHOLDS)
    assert drift.psi >= THRESHOLDS.prediction_psi and drift.drifted


def test_multiclass_performance_is_macro_and_gated_like_binary(multiclass):
    from sklearn.metrics import f1_score, roc_auc_score

    from core.monitoring.drift_analysis import Champion, Window, analyse_window

    config, unseen, model, reference = multiclass
    labels = unseen[["row_id", "level"]]
    proba = model.predict_proba(prepare_inputs(unseen, config))
    y = unseen["level"].to_numpy()
    macro_auc = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(model.classes_))
    macro_f1 = f1_score(y, model.classes_[proba.argmax(axis=1)], average="macro")
    holdout = {"roc_auc": macro_auc, "f1": macro_f1}
    result = analyse_window(
        Window("partition", "s", unseen, "row_id"),
        Champion("m", "1", "run", model, holdout, reference),
        config,
        labels,
        THRESHOLDS,
    )
    assert result.performance.metrics["roc_auc"] == pytest.approx(macro_auc, rel=1e-12)
    assert result.performance.metrics["f1"] == pytest.approx(macro_f1, rel=1e-12)
    assert not result.decayed
    # labels the champion gets wrong: a third of the rows relabelled as the next class
    wrong = labels.copy()
    flip = wrong.index[::3]
    wrong.loc[flip, "level"] = wrong.loc[flip, "level"].map({"low": "mid", "mid": "high", "high": "low"})
    decayed = analyse_window(
        Window("partition", "s", unseen, "row_id"),
        Champion("m", "1", "run", model, holdout, reference),
        config,
        wrong,
        THRESHOLDS,
    )
    assert decayed.decayed and {r.split()[0] for r in decayed.reasons} >= {"roc_auc", "f1"}
    markdown = summary_markdown(
        MonitoredModel("m", "1", list(model.classes_)), [decayed], overall_verdict([decayed]), "s3://r", "u", "t"
    )
    assert "| ROC AUC (macro) |" in markdown and "| F1 (macro) |" in markdown and "RMSE" not in markdown
    assert "shares of the predicted classes (high, low, mid)" in markdown


def test_multiclass_metrics_undefined_on_the_window_are_left_out():
    from core.monitoring.decay import labelled_performance

    # Given labels of two of three classes only: ROC AUC of the third is undefined
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([1, 1, 1], 300)
    y = np.array(["a", "b"] * 150, dtype=object)
    with np.errstate(all="ignore"), pytest.warns(Warning):
        performance = labelled_performance(y, proba, ["a", "b", "c"], {"roc_auc": 0.9, "f1": 0.8})
    # then it is left out rather than judged as NaN, and F1 is still there
    assert "roc_auc" not in performance.metrics and "f1" in performance.metrics
    assert performance.holdout == {"f1": 0.8}


def test_a_retrain_is_decided_only_for_drifted_data_inside_the_training_source():
    from core.monitoring.drift_analysis import WindowResult, inside_source, retrain_scope, window_location

    source = "s3://mlops/datasets/credit-risk/"
    assert inside_source("s3://mlops/datasets/credit-risk/month=2026-01/", source)
    assert inside_source("s3://mlops/datasets/credit-risk/month=2026-01/part-0.parquet", source.rstrip("/"))
    assert not inside_source("s3://mlops/datasets/credit-risk-v2/month=2026-01/", source)  # a sibling, not below
    assert not inside_source("s3://mlops/incoming/credit-risk/month=2026-01/", source)
    assert inside_source("s3://b/d/one.parquet", "s3://b/d/one.parquet")
    assert not inside_source("s3://b/d/two.parquet", "s3://b/d/one.parquet")  # a file source covers itself only
    assert not inside_source("s3://b/d/x/", "/local/d/")
    log = "s3://mlops/predictions/serving/credit-risk/ (last 2 day(s), 5 file(s))"
    assert window_location(log) == "s3://mlops/predictions/serving/credit-risk/"

    def window(name: str, where: str, drifted: bool) -> WindowResult:
        return WindowResult(name, where, 500, drifted=drifted)

    outside = window("prediction-log", log, True)
    inside = window("partition", f"{source}month=2026-01/", True)
    calm = window("partition", "s3://mlops/incoming/x/", False)
    # only drift outside: no retrain, and the note names where the drift is and what training reads
    scope = retrain_scope([outside, calm], source)
    assert not scope.retrain
    assert scope.note == (
        "not retraining: the drifted data (s3://mlops/predictions/serving/credit-risk/) is outside the training "
        f"source ({source})"
    )
    # drift inside: retrain, keyed by the drifted data (the same data gives the same key, other data another)
    both = retrain_scope([outside, inside], source)
    assert both.retrain and both.note.startswith("retraining on the rest: ")
    assert (
        both.window_key
        == retrain_scope([inside], source).window_key
        != retrain_scope([window("partition", f"{source}month=2026-02/", True)], source).window_key
    )
    assert retrain_scope([calm], source).note == "" and not retrain_scope([calm], source).retrain
