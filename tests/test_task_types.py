"""Regression and multiclass champions downstream of the registry, on the real stack.

A Ridge pipeline on scikit-learn's diabetes data and a logistic regression on three classes are fitted with
the project's own pipeline, logged and registered as training does (`tasks.tracking`), and made champion.
Then each consumer is checked against the fitted pipeline in this process: the serving API (the real app
under uvicorn) and `mlflow models serve`, batch scoring and drift monitoring.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client, use_tracking_server
from core.data.features import prepare_inputs, prepare_target
from core.modeling.metrics import compute_metrics
from mlops.stack import running
from tests.ports import free_port
from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGRESSION = "diabetes-test"
MULTICLASS = "levels-test"
OCTET = "application/octet-stream"
TRAIN_ROWS = 300  # diabetes: the first 300 patients train, the other 142 are the holdout


def _register(stack, config, model, train: pd.DataFrame, holdout: pd.DataFrame) -> str:
    """Log and register `model` as the training flow does (metrics, model, baseline, reference); make it champion."""
    from core.modeling.metrics import model_classes, model_scores
    from tasks.monitoring import log_reference
    from tasks.tracking import log_model, register_model, start_run

    client = mlflow_client(stack)
    run_id = start_run.fn(config, {"test": "task-types"}, {"run_name": f"{config.model_name}-direct"})
    y, scores = prepare_target(holdout, config), model_scores(model, prepare_inputs(holdout, config))
    for name, value in compute_metrics(y, scores, model_classes(model)).items():
        client.log_metric(run_id, f"holdout_{name}", value)
    uri, digests = log_model.fn(run_id, model, train, config)
    log_reference.fn(run_id, model, train, config)
    version = register_model.fn(uri, config.model_name, run_id, {"id_column": config.id_column} | digests.tags())
    client.set_registered_model_alias(config.model_name, "champion", version)
    return version


def _put_parquet(stack, key: str, frame: pd.DataFrame) -> str:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return put_bytes(stack, S3Location(stack.bucket, key), buffer.getvalue(), OCTET)


@pytest.fixture(scope="module")
def regression(stack, tmp_path_factory) -> dict:
    """The diabetes data in S3, its dataset config (a local YAML file) and a registered Ridge champion."""
    frame = diabetes_frame()
    source = f"s3://{stack.bucket}/datasets/{REGRESSION}/"
    _put_parquet(stack, f"datasets/{REGRESSION}/part-0.parquet", frame)
    config = diabetes_config(REGRESSION, source)
    path = tmp_path_factory.mktemp(REGRESSION) / f"{REGRESSION}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    train, holdout = frame.iloc[:TRAIN_ROWS], frame.iloc[TRAIN_ROWS:]
    model = fit(config, train, Ridge(alpha=0.1))
    version = _register(stack, config, model, train, holdout)
    return {"config": config, "yaml": str(path), "frame": frame, "model": model, "version": version}


@pytest.fixture(scope="module")
def multiclass(stack) -> dict:
    """A registered three-class champion (class labels `high`, `low`, `mid`)."""
    config, frame = multiclass_config(MULTICLASS), multiclass_frame(3000)
    train, holdout = frame.iloc[:2400], frame.iloc[2400:]
    model = fit(config, train, LogisticRegression(max_iter=1000))
    version = _register(stack, config, model, train, holdout)
    return {"config": config, "frame": holdout.reset_index(drop=True), "model": model, "version": version}


def _serve(stack, tmp_path_factory, model: str):
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", model]
    environment = os.environ | {"MLOPS_SERVING_LOG_FLUSH_SECONDS": "1"}
    log_file = tmp_path_factory.mktemp(f"serve-{model}") / "serving.log"
    return f"http://127.0.0.1:{port}", running(command, f"http://127.0.0.1:{port}/health", environment, log_file)


@pytest.fixture(scope="module")
def regression_server(stack, regression, tmp_path_factory):
    url, context = _serve(stack, tmp_path_factory, REGRESSION)
    with context:
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load the regressor")
        yield url


@pytest.fixture(scope="module")
def multiclass_server(stack, multiclass, tmp_path_factory):
    url, context = _serve(stack, tmp_path_factory, MULTICLASS)
    with context:
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load the classifier")
        yield url


def _records(config, frame: pd.DataFrame) -> list[dict]:
    """The frame's feature values exactly (floats as Python floats: JSON keeps every digit of them)."""
    X = prepare_inputs(frame, config).astype(object)
    return X.where(X.notna(), None).to_dict(orient="records")


# --------------------------------------------------------------------------------------------- serving


def test_regression_champion_is_served_with_its_predicted_values(regression, regression_server):
    config, frame, model = regression["config"], regression["frame"].head(40).copy(), regression["model"]
    frame.loc[frame.index[3], "bmi"] = None  # a missing value: the pipeline imputes it
    expected = model.predict(prepare_inputs(frame, config))
    records = _records(config, frame)
    # GET /model says what is served: a regressor, no classes, the id field
    described = httpx.get(f"{regression_server}/model").json()
    assert described["task"] == "regression" and described["classes"] == []
    assert described["version"] == regression["version"] and described["id_field"] == "patient_id"
    assert described["metrics"]["rmse"] > 0 and "roc_auc" not in described["metrics"]
    for path, key in (("/predict", "records"), ("/predict", "dataframe_records"), ("/invocations", "records")):
        answer = httpx.post(f"{regression_server}{path}", json={key: records}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == {"name": REGRESSION, "version": regression["version"]}
        # one predicted value per record, equal to the pipeline's own predict in this process
        assert [set(p) for p in body["predictions"]] == [{"prediction"}] * len(records)
        got = np.array([p["prediction"] for p in body["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_regression_explanations_are_contributions_to_the_predicted_value(stack, regression, regression_server):
    import mlflow.artifacts

    config, frame = regression["config"], regression["frame"]
    [record] = _records(config, frame.head(1))
    answer = httpx.post(f"{regression_server}/predict?explain=true", json={"records": [record]}, timeout=30)
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["predictions"]
    assert prediction["explained"] == {"output": "prediction"} and set(prediction["contributions"]) == set(record)
    # the stored baseline with BMI set to this patient's: the only contribution is BMI's, equal to the
    # difference of the two predicted values
    run_id = httpx.get(f"{regression_server}/model").json()["run_id"]
    use_tracking_server(stack)  # the fluent API below (load_model) reads the global tracking URI
    [baseline] = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/explain/baseline.json"))
    moved = baseline | {"bmi": record["bmi"]}
    body = httpx.post(f"{regression_server}/predict?explain=true", json={"records": [moved]}, timeout=30).json()
    contributions = body["predictions"][0]["contributions"]
    model = regression["model"]
    frame_of = pd.DataFrame([moved, baseline])[config.feature_names]
    expected = np.diff(model.predict(prepare_inputs(frame_of, config))[::-1])[0]
    assert contributions["bmi"] == pytest.approx(expected, abs=1e-9) and abs(expected) > 1
    assert all(v == pytest.approx(0, abs=1e-9) for k, v in contributions.items() if k != "bmi")


def test_regression_prediction_log_stores_the_predicted_value(stack, regression, regression_server):
    config, frame, model = regression["config"], regression["frame"].iloc[100:105], regression["model"]
    records = [r | {"patient_id": i} for r, i in zip(_records(config, frame), frame["patient_id"], strict=True)]
    answer = httpx.post(
        f"{regression_server}/predict", json={"records": records}, headers={"x-request-id": "regression-log"}
    )
    assert answer.status_code == 200, answer.text
    client = s3_client(stack)

    def logged() -> pd.DataFrame:
        listing = client.list_objects_v2(Bucket=stack.bucket, Prefix=f"predictions/serving/{REGRESSION}/")
        frames = [
            pd.read_parquet(io.BytesIO(client.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()))
            for o in listing.get("Contents", [])
        ]
        return pd.concat(frames) if frames else pd.DataFrame(columns=["request_id"])

    wait_for(lambda: "regression-log" in set(logged()["request_id"]), 30, "the prediction log")
    rows = logged().set_index("request_id").loc[["regression-log"]]
    assert rows["record_id"].tolist() == frame["patient_id"].tolist()
    assert rows["predicted"].dtype == "float64" and not [c for c in rows.columns if c.startswith("proba_")]
    np.testing.assert_allclose(rows["predicted"], model.predict(prepare_inputs(frame, config)), rtol=0, atol=1e-9)


def test_multiclass_champion_answers_every_class_probability(multiclass, multiclass_server):
    config, frame, model = multiclass["config"], multiclass["frame"].head(50), multiclass["model"]
    described = httpx.get(f"{multiclass_server}/model").json()
    assert described["task"] == "multiclass" and described["classes"] == ["high", "low", "mid"]
    answer = httpx.post(f"{multiclass_server}/predict", json={"records": _records(config, frame)}, timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    proba = model.predict_proba(prepare_inputs(frame, config))
    # every class's probability, keyed by the class label, equal to predict_proba in this process
    assert all(list(p["probabilities"]) == ["high", "low", "mid"] for p in predictions)
    got = np.array([[p["probabilities"][label] for label in model.classes_] for p in predictions])
    np.testing.assert_allclose(got, proba, rtol=0, atol=1e-12)
    assert [p["class"] for p in predictions] == list(model.classes_[proba.argmax(axis=1)])
    assert len({p["class"] for p in predictions}) == 3  # the 50 records are predicted in every class
    # explanations: contributions to each record's predicted class's probability
    explained = httpx.post(
        f"{multiclass_server}/predict?explain=true", json={"records": _records(config, frame.head(5))}, timeout=30
    ).json()["predictions"]
    for item, row in zip(explained, proba[:5], strict=True):
        assert item["explained"] == {"output": "probability", "class": model.classes_[row.argmax()]}
        assert set(item["contributions"]) == set(config.feature_names)


def test_mlflow_models_serve_answers_raw_rows_of_a_regressor(stack, regression):
    # Given the regression champion served by MLflow's own server, from the registry alias
    port = free_port()
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{REGRESSION}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        # its scoring server is started as `uvicorn`, looked up on PATH
        # MLflow's own loader trusts the types the artifact lists: allowed here, for this version training built
        env=os.environ | {"MLFLOW_TRACKING_URI": stack.mlflow_tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        | {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 120, "mlflow models serve", interval=1)
        config, frame, model = regression["config"], regression["frame"].head(5), regression["model"]
        records = _records(config, frame)
        records[0]["bmi"] = None  # a missing value, as clients send them
        # when raw rows are posted, then each gets the pipeline's predicted value
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": records}, timeout=30)
        assert answer.status_code == 200, answer.text
        expected = model.predict(pd.DataFrame(records).astype({c: "float64" for c in config.numeric_features}))
        np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=0, atol=1e-9)
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------------------------------ batch scoring


def test_batch_scoring_writes_the_predicted_value_and_its_statistics(stack, regression):
    from flows.scoring import ScoringParams, scoring

    config, frame, model = regression["config"], regression["frame"], regression["model"]
    state = scoring(ScoringParams(dataset=regression["yaml"], source=config.source, chunk_rows=100), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert (outcome.task, outcome.rows, outcome.chunks, outcome.model_version) == (
        "regression",
        len(frame),
        5,
        regression["version"],
    )
    from adapters.scoring_store import current_output

    manifest = current_output(outcome.output, stack)  # readers resolve the output through its manifest
    client = s3_client(stack)

    def get(uri: str) -> bytes:
        location = S3Location.parse(uri)
        return client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()

    [part] = manifest.files
    scored = pd.read_parquet(io.BytesIO(get(part)))
    assert list(scored.columns) == ["patient_id", "predicted", "model_version", "scored_at"]
    # every patient's predicted value is the pipeline's own (joined on the id)
    joined = frame.merge(scored, on="patient_id", validate="one_to_one")
    assert len(joined) == len(frame)
    expected = model.predict(prepare_inputs(joined, config))
    np.testing.assert_allclose(joined["predicted"].to_numpy(), expected, rtol=0, atol=1e-9)
    # and the summary has the predictions' statistics, no class counts
    summary = json.loads(get(manifest.summary))
    assert summary["task"] == "regression" and "predicted_counts" not in summary and "mean_probability" not in summary
    stats = summary["prediction_stats"]
    assert stats["mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(expected.std(), rel=1e-9)
    assert (stats["min"], stats["max"]) == pytest.approx((expected.min(), expected.max()), rel=1e-12)


# --------------------------------------------------------------------------------------------- monitoring


def test_monitoring_a_regressor_measures_rmse_and_mae_on_late_labels(stack, regression):
    from flows.monitoring import MonitoringParams, monitoring
    from tasks.monitoring import load_champion_reference

    config, frame, model = regression["config"], regression["frame"], regression["model"]
    from core.monitoring.estimation import REFERENCE_TARGET

    # the reference stored with the model holds the regressor's predicted value on the training rows, and their target
    champion = load_champion_reference.fn(REGRESSION)
    assert list(champion.reference.columns) == [*config.feature_names, "prediction", REFERENCE_TARGET]
    train = prepare_inputs(frame.iloc[:TRAIN_ROWS], config)
    np.testing.assert_allclose(champion.reference["prediction"], model.predict(train), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(champion.reference[REFERENCE_TARGET], frame["progression"].iloc[:TRAIN_ROWS])
    # Given every patient as a recent partition without the target, and the target as late labels
    partition = _put_parquet(stack, f"incoming/{REGRESSION}/part-0.parquet", frame.drop(columns="progression"))
    labels = _put_parquet(
        stack,
        f"labels/{REGRESSION}/part-0.parquet",
        frame[["patient_id", "progression"]].sample(frac=1, random_state=2),
    )
    state = monitoring(
        MonitoringParams(
            dataset=regression["yaml"],
            partition=partition,
            labels=labels,
            prediction_log_days=0,
            trigger_retraining=False,
        ),
        return_state=True,
    )
    assert state.is_completed(), state.message
    [window] = state.result().windows
    # then RMSE and MAE on the 442 labelled rows are scikit-learn's on the same rows
    y, predicted = frame["progression"].to_numpy(), model.predict(prepare_inputs(frame, config))
    performance = window.performance
    assert performance is not None and performance.rows == len(frame)
    assert performance.metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, predicted)), rel=1e-12)
    assert performance.metrics["mae"] == pytest.approx(mean_absolute_error(y, predicted), rel=1e-12)
    assert performance.holdout["rmse"] == pytest.approx(champion.holdout["rmse"])
    assert window.prediction.name == "prediction" and window.prediction.kind == "numeric"
    # the estimates without labels (DLE) are the regressor's error metrics, beside the realised ones
    assert window.estimated is not None and {m.metric for m in window.estimated.metrics} == {"rmse", "mae"}
    for metric in ("rmse", "mae"):
        assert window.estimated.get(metric).realised == pytest.approx(performance.metrics[metric], rel=1e-12)
    # and the report reads as a regression's: error metrics, no classification rows
    report = S3Location.parse(state.result().report.html_uri)
    page = s3_client(stack).get_object(Bucket=report.bucket, Key=report.key)["Body"].read().decode()
    ours = page.split("<h2>Feature distributions", 1)[0]
    assert "Task: regression" in ours and "<td>RMSE</td>" in ours and "<td>MAE</td>" in ours
    assert "ROC AUC" not in ours and "proba_" not in ours
    assert "Feature distributions: partition" in page


def test_logging_a_model_works_whatever_experiment_the_caller_made_active(stack, regression):
    # Given a caller (a notebook, a test, an earlier flow) that made another experiment the active one
    import mlflow

    from tasks.tracking import log_model, start_run

    config, frame = regression["config"], regression["frame"]
    use_tracking_server(stack)
    mlflow.set_experiment("a-notebook-scratch-experiment")
    # when a training run of this dataset logs its model in the same process
    run_id = start_run.fn(config, {"test": "active-experiment"}, {"run_name": "active-experiment"})
    uri, _ = log_model.fn(run_id, regression["model"], frame.iloc[:TRAIN_ROWS], config)
    # then the model lands in the dataset's run and experiment, and loads back to the same predictions
    run = mlflow_client(stack).get_run(run_id)
    assert run.info.experiment_id == mlflow_client(stack).get_experiment_by_name(config.name).experiment_id
    inputs = prepare_inputs(frame.iloc[TRAIN_ROWS:], config)
    import mlflow.sklearn

    loaded = mlflow.sklearn.load_model(uri)
    assert (loaded.predict(inputs) == regression["model"].predict(inputs)).all()
