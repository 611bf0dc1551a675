"""Drift monitoring on the real stack: reference stored with the model, drift triggers one retrain, labels."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from core.decision import Gates
from core.search import SearchSpec
from core.synthetic import DriftSpec, generate_month
from flows.monitoring import MonitoringParams, monitoring
from flows.training import TrainingParams, training
from mlops.datagen import write_months
from services.retraining import DRIFT_TAG, model_tag
from tasks.monitoring import load_champion_reference
from tests.waiting import wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "monitoring-test"
SEED = 11
MONTHS = 4
ROWS = 1500
SEARCH = {"trials_per_family": 1, "cv_folds": 2}
OCTET = "application/octet-stream"


@pytest.fixture(scope="module")
def dataset(stack) -> str:
    """A dataset of its own (config in S3, read by the worker) with a trained champion."""
    import yaml

    from core.dataset import bundled_config_text

    source = f"s3://{stack.bucket}/datasets/{MODEL}/"
    write_months(stack, source, MONTHS, ROWS, seed=SEED)
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL, "source": source}
    config = put_bytes(stack, S3Location(stack.bucket, f"configs/{MODEL}.yaml"), yaml.safe_dump(raw).encode(), OCTET)
    # The cold start is judged on the lower bound of ROC AUC's interval (0.68 for this one-trial search on
    # 1,200 holdout rows, point 0.73): a lenient gate, as in tests/test_trust.py, since this module needs a
    # champion to monitor, not a test of the promotion rule.
    params = TrainingParams(dataset=config, search=SearchSpec(**SEARCH), gates=Gates(min_roc_auc=0.55))
    state = training(params, return_state=True)
    assert state.is_completed() and state.result().promoted, state.message
    return config


@pytest.fixture(scope="module")
def deployed(stack, dataset):
    from deployments.deploy import deploy_all

    return deploy_all(work_pool=stack.work_pool, training_parameters={"params": {"dataset": dataset, "search": SEARCH}})


def _incoming(stack, month: int, drift: DriftSpec | None = None) -> str:
    """A recent month (not part of the training data) under its own prefix; returns its URI."""
    [uri] = write_months(stack, f"s3://{stack.bucket}/incoming/{MODEL}/", 1, 2000, SEED, drift=drift, first_month=month)
    return uri


def _triggered_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[DRIFT_TAG, model_tag(MODEL)]))
        )


def _monitor(**changes):
    state = monitoring(MonitoringParams(**({"prediction_log_days": 0} | changes)), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def test_training_stores_the_reference_sample_with_the_model(stack, dataset):
    champion = load_champion_reference.fn(MODEL)
    # about 80 % of the 6000 rows are training rows, under the 5000-row cap: all of them are kept
    assert 4000 < len(champion.reference) <= 5000
    assert {"age", "region", "proba_0", "proba_1"} <= set(champion.reference.columns)
    assert champion.reference["proba_1"].between(0, 1).all() and champion.holdout["roc_auc"] > 0.6


def test_unchanged_data_triggers_nothing(stack, dataset, deployed):
    # Given a new month from the same process
    partition = _incoming(stack, MONTHS)
    # when monitoring compares it with the champion's reference
    outcome = _monitor(dataset=dataset, partition=partition, cooldown_minutes=60)
    # then nothing drifted, nothing is triggered, and the report is in S3
    [window] = outcome.windows
    assert window.rows == 2000 and not window.drifted_features and not window.drifted, window.reasons
    assert not outcome.verdict.triggered and outcome.trigger.status == "not-needed"
    assert _triggered_runs() == []
    page = S3Location.parse(outcome.report.html_uri)
    body = s3_client(stack).get_object(Bucket=page.bucket, Key=page.key)["Body"].read().decode()
    assert f"Drift monitoring of {MODEL}" in body and "Feature distributions: partition" in body
    assert "Task: binary; prediction drift is measured on the probability of class 1" in body


def test_delayed_labels_give_performance_on_partition_and_prediction_log(stack, dataset):
    # Given a recent month without labels, and a prediction log of batch requests whose records carry their
    # application ids
    month = generate_month(MONTHS + 1, 2000, SEED)
    features = month.drop(columns=["default"])
    partition = put_bytes(
        stack, S3Location(stack.bucket, f"incoming/{MODEL}/unlabelled/part.parquet"), _parquet(features), OCTET
    )
    champion = load_champion_reference.fn(MODEL)
    logged = _prediction_log(month, champion)
    today = datetime.now(UTC)
    key = f"predictions/serving/{MODEL}/date={today:%Y-%m-%d}/{today:%H%M%S}-test.parquet"
    put_bytes(stack, S3Location(stack.bucket, key), _parquet(logged), OCTET)
    # when monitoring runs before the labels arrive, there are no performance figures
    before = _monitor(dataset=dataset, partition=partition, prediction_log_days=1, trigger_retraining=False)
    assert [w.performance for w in before.windows] == [None, None]
    # and once they arrive (id and target only), both windows are judged on them, like the holdout
    labels_frame = month[["application_id", "default"]].sample(frac=1, random_state=0)
    labels = put_bytes(stack, S3Location(stack.bucket, f"labels/{MODEL}/part.parquet"), _parquet(labels_frame), OCTET)
    after = _monitor(
        dataset=dataset, partition=partition, prediction_log_days=1, labels=labels, trigger_retraining=False
    )
    by_name = {w.name: w for w in after.windows}
    assert set(by_name) == {"partition", "prediction-log"}
    for window in by_name.values():
        performance = window.performance
        assert performance is not None and performance.rows == 2000
        assert abs(performance.metrics["roc_auc"] - champion.holdout["roc_auc"]) < 0.08
        assert set(performance.metrics) >= {"roc_auc", "f1"} and performance.holdout["f1"] > 0
    assert _triggered_runs() == []


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _prediction_log(month: pd.DataFrame, champion) -> pd.DataFrame:
    """What the serving API logs (its own table builder) for batches of 100 records that carry their
    application ids, each batch under a request id of its own."""
    import uuid

    from core.dataset import load_local_dataset_config
    from core.features import prepare_inputs
    from core.prediction_log import Entry, to_table

    features = prepare_inputs(month, load_local_dataset_config("credit-risk"))
    proba = champion.model.predict_proba(features)
    ids = month["application_id"].to_numpy(dtype=object)
    classes = list(champion.model.classes_)
    entries = [
        Entry(
            features.iloc[start : start + 100].reset_index(drop=True),
            proba[start : start + 100],
            classes,
            np.full(len(ids[start : start + 100]), uuid.uuid4().hex),
            champion.version,
            datetime.now(UTC),
            ids[start : start + 100],
        )
        for start in range(0, len(features), 100)
    ]
    return to_table(entries)


def test_drift_triggers_exactly_one_retraining_within_the_cooldown(stack, dataset, deployed):
    # Given a month shifted by the generator's drift knob
    partition = _incoming(stack, MONTHS + 2, DriftSpec(start_month=MONTHS + 2, strength=1.0))
    # when monitoring checks it twice in a row
    first = _monitor(dataset=dataset, partition=partition, cooldown_minutes=60)
    second = _monitor(dataset=dataset, partition=partition, cooldown_minutes=60)
    # then both detect the drift, the first starts a training run and the second is held by the cooldown
    [window] = first.windows
    assert first.verdict.triggered and {"annual_income", "credit_utilization"} <= set(window.drifted_features)
    assert first.trigger.status == "triggered" and second.trigger.status == "cooldown", second.trigger.detail
    assert second.trigger.flow_run_id == first.trigger.flow_run_id
    runs = _triggered_runs()
    assert [str(r.id) for r in runs] == [first.trigger.flow_run_id]
    # and the worker runs it with the reason recorded on the Prefect run and the MLflow run
    [finished] = wait_for_runs([runs[0].id], timeout=300)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters["params"]["reason"].startswith("drift: partition ")
    assert finished.parameters["params"]["search"] == SEARCH  # the deployment's defaults are kept
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name(MODEL)
    [run] = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{finished.id}'")
    assert run.data.tags["trigger_reason"].startswith("drift: partition ")
