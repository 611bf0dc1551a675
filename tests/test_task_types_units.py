"""Pure units of serving, batch scoring and explanations for regressors and multiclass classifiers."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.svm import SVC

from core.data.features import prepare_inputs
from core.inference.scoring import PredictionStats, PredictionTally, ScoringSummary, predict_chunk
from core.modeling.explain import baseline_row, contributions
from core.modeling.signature import Column, ModelLoadError
from core.monitoring.prediction_log import Entry, to_table
from serving.forms import answer, explain_records
from serving.model import LoadedModel, check_servable
from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame


@pytest.fixture(scope="module")
def regression():
    config, frame = diabetes_config("diabetes-units"), diabetes_frame()
    return config, frame, fit(config, frame, Ridge(alpha=0.1))


@pytest.fixture(scope="module")
def multiclass():
    config, frame = multiclass_config("levels-units"), multiclass_frame(1500)
    return config, frame, fit(config, frame, LogisticRegression(max_iter=1000))


def _loaded(config, model, train: pd.DataFrame) -> LoadedModel:
    """What serving.model.load_version builds for a registered pipeline (without the registry)."""
    columns = [Column(c, "numeric" if c in config.numeric_features else "text") for c in config.feature_names]
    baseline = baseline_row(prepare_inputs(train, config))
    return LoadedModel("m", "7", model, columns, check_servable(model, "models:/m/7"), baseline=baseline)


def _records(config, frame: pd.DataFrame) -> list[dict]:
    """Records with the exact values of the frame (JSON text would round numbers to 10 digits)."""
    X = prepare_inputs(frame, config).astype(object)
    return X.where(X.notna(), None).to_dict(orient="records")


def test_a_regressor_is_servable_and_answers_a_value_per_record(regression):
    config, frame, model = regression
    loaded = _loaded(config, model, frame)
    assert loaded.classes == [] and loaded.task == "regression" and loaded.describe()["task"] == "regression"
    records = _records(config, frame.head(5))
    scores = loaded.scores(loaded.frame(records))
    body = answer(loaded, scores, "r1")
    expected = model.predict(prepare_inputs(frame.head(5), config))
    assert [set(p) for p in body["predictions"]] == [{"prediction"}] * 5
    np.testing.assert_allclose([p["prediction"] for p in body["predictions"]], expected, rtol=0, atol=1e-9)
    assert body["model"] == {"name": "m", "version": "7"} and body["request_id"] == "r1"


def test_multiclass_answers_every_class_probability_keyed_by_label(multiclass):
    config, frame, model = multiclass
    loaded = _loaded(config, model, frame)
    assert loaded.task == "multiclass" and loaded.describe()["classes"] == ["high", "low", "mid"]
    scores = loaded.scores(loaded.frame(_records(config, frame.head(20))))
    body = answer(loaded, scores, "r2")
    proba = model.predict_proba(prepare_inputs(frame.head(20), config))
    for prediction, row in zip(body["predictions"], proba, strict=True):
        assert list(prediction["probabilities"]) == ["high", "low", "mid"]
        np.testing.assert_allclose(list(prediction["probabilities"].values()), row, rtol=0, atol=1e-12)
        assert prediction["class"] == model.classes_[row.argmax()]


def test_only_classifiers_with_probabilities_or_regressors_are_servable(regression):
    config, frame, _ = regression
    no_proba = fit(config, frame.assign(progression=(frame["progression"] > 140).astype(float)), SVC())
    with pytest.raises(ModelLoadError, match="classifier without predict_proba"):
        check_servable(no_proba, "models:/m/1")
    with pytest.raises(ModelLoadError, match="neither"):
        check_servable(object(), "models:/m/2")


def test_regression_explanations_are_contributions_to_the_predicted_value(regression):
    config, frame, model = regression
    loaded = _loaded(config, model, frame)
    records = _records(config, frame.head(3))
    explained = explain_records(loaded, records, loaded.scores(loaded.frame(records)))
    X = prepare_inputs(frame.head(3), config)
    for i, item in enumerate(explained):
        assert item["explained"] == {"output": "prediction"}
        # each contribution is the prediction minus the prediction with that feature at the baseline
        occluded = X.iloc[[i]].assign(bmi=loaded.baseline["bmi"].iloc[0])
        expected = model.predict(X.iloc[[i]])[0] - model.predict(occluded)[0]
        assert item["contributions"]["bmi"] == pytest.approx(expected, abs=1e-9)
    # and BMI, which the model relies on, moves the first patient's prediction
    assert abs(explained[0]["contributions"]["bmi"]) > 1


def test_multiclass_explanations_are_contributions_to_the_predicted_class_probability(multiclass):
    config, frame, model = multiclass
    loaded = _loaded(config, model, frame)
    records = _records(config, frame.head(12))
    scores = loaded.scores(loaded.frame(records))
    explained = explain_records(loaded, records, scores)
    X = prepare_inputs(frame.head(12), config)
    assert {item["explained"]["class"] for item in explained} == set(model.classes_)  # not always one class
    for i, item in enumerate(explained):
        k = scores[i].argmax()
        assert item["explained"] == {"output": "probability", "class": model.classes_[k]}
        occluded = X.iloc[[i]].assign(x0=loaded.baseline["x0"].iloc[0])
        expected = model.predict_proba(X.iloc[[i]])[0, k] - model.predict_proba(occluded)[0, k]
        assert item["contributions"]["x0"] == pytest.approx(expected, abs=1e-12)


def test_contributions_take_one_class_per_record_and_check_the_count(multiclass):
    config, frame, model = multiclass
    X = prepare_inputs(frame.head(4), config)
    baseline = baseline_row(prepare_inputs(frame, config))
    per_record = contributions(model, X, baseline, positive_index=[0, 1, 2, 0])
    for i, k in enumerate([0, 1, 2, 0]):
        pd.testing.assert_series_equal(
            per_record.iloc[i], contributions(model, X.iloc[[i]], baseline, positive_index=k).iloc[0]
        )
    with pytest.raises(ValueError, match="3 entries for 4 records"):
        contributions(model, X, baseline, positive_index=[0, 1, 2])


def test_prediction_log_stores_a_regressors_value():
    frame = pd.DataFrame({"age": [30.0, 40.0], "sex": ["m", None]})
    at = datetime(2026, 1, 2, tzinfo=UTC)
    value = Entry(frame, np.array([151.5, 99.25]), [], np.array(["a", "a"]), "3", at, np.array(["p1", None], object))
    table = to_table([value])
    assert table["predicted"].tolist() == [151.5, 99.25] and table["predicted"].dtype == "float64"
    assert not [c for c in table.columns if c.startswith("proba_")]
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    assert pd.read_parquet(buffer)["predicted"].tolist() == [151.5, 99.25]
    # a flush that mixes a regressor's and a classifier's batches (a swap) keeps both, as text
    binary = Entry(frame.head(1), np.array([[0.3, 0.7]]), [0, 1], np.array(["b"]), "4", at)
    mixed = to_table([value, binary])
    assert mixed["predicted"].tolist() == ["151.5", "99.25", "1"]
    assert np.isnan(mixed["proba_1"].iloc[0]) and mixed["proba_1"].iloc[2] == 0.7
    mixed.to_parquet(io.BytesIO(), index=False)


def test_batch_chunk_of_a_regressor_has_the_predicted_value_and_no_probabilities(regression):
    config, frame, model = regression
    batch = pa.RecordBatch.from_pandas(frame, preserve_index=False)
    chunk = predict_chunk(model, batch, config, "5", datetime(2026, 1, 2, tzinfo=UTC))
    assert chunk.schema.names == ["patient_id", "predicted", "model_version", "scored_at"]
    assert chunk.schema.field("predicted").type == pa.float64()
    expected = model.predict(prepare_inputs(frame, config))
    np.testing.assert_allclose(chunk.column("predicted").to_numpy(), expected, rtol=0, atol=1e-9)


def test_batch_chunk_of_a_multiclass_model_has_every_class_probability(multiclass):
    config, frame, model = multiclass
    chunk = predict_chunk(model, pa.RecordBatch.from_pandas(frame), config, "5", datetime(2026, 1, 2, tzinfo=UTC))
    proba = model.predict_proba(prepare_inputs(frame, config))
    for index, label in enumerate(model.classes_):
        np.testing.assert_allclose(chunk.column(f"proba_{label}").to_numpy(), proba[:, index], rtol=1e-12)
    assert chunk.column("predicted").to_pylist() == list(model.classes_[proba.argmax(axis=1)])


def test_prediction_statistics_merged_over_chunks_equal_numpys():
    values = np.random.default_rng(0).normal(1e6, 3.0, 10_001)  # a large mean: a sum of squares would cancel
    stats = PredictionStats()
    for chunk in np.array_split(values, 7):
        stats.add(chunk)
    stats.add(np.array([]))
    got = stats.as_dict()
    assert got["mean"] == pytest.approx(values.mean(), rel=1e-14)
    assert got["std"] == pytest.approx(values.std(), rel=1e-9)
    assert (got["min"], got["max"]) == (values.min(), values.max())
    assert PredictionStats().as_dict() == {}


def test_regression_summary_has_prediction_statistics_instead_of_class_counts(regression):
    config, frame, model = regression
    summary = ScoringSummary("m", "5", "s3://b/src/", "s3://b/out/", "2026-01-02", task="regression", rows=442)
    tally = PredictionTally([])
    chunk = predict_chunk(model, pa.RecordBatch.from_pandas(frame), config, "5", datetime(2026, 1, 2, tzinfo=UTC))
    tally.add(chunk.slice(0, 200))
    tally.add(chunk.slice(200))
    tally.fill(summary)
    expected = model.predict(prepare_inputs(frame, config))
    data = json.loads(summary.to_json())
    assert "predicted_counts" not in data and "mean_probability" not in data and data["task"] == "regression"
    assert data["prediction_stats"]["mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert (data["prediction_stats"]["min"], data["prediction_stats"]["max"]) == (expected.min(), expected.max())
    markdown = summary.to_markdown()
    assert "| task | regression |" in markdown and "| mean |" in markdown and "class" not in markdown
