"""The feature store on the real stack: history on S3, `mlops features`, training with a point-in-time join
(counts in validation and the card, a failing share), materialization, and serving with online features
(parity with the offline store and with the in-process pipeline, unknown entity, lookup latency in /metrics).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from core.data.feature_history import ENTITY_TIMESTAMP, HISTORY_FEATURES
from core.data.feature_repo import ENTITY_KEY
from core.modeling.search import SearchSpec
from flows.training import TrainingParams, training
from mlops.stack import running
from tests.conftest import TEST_MONTHS, TEST_ROWS_PER_MONTH
from tests.ports import free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "credit-risk-history"
SERVICE = "credit_risk_history"
FAST_SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)
PARITY_SAMPLE = 60


def _mlops(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "mlops"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=False)


@pytest.fixture(scope="module")
def applied(stack, default_data) -> str:
    """The applicants' history next to the bundled data, and the repository applied through the CLI."""
    from mlops.datagen import write_applicant_history

    uri, rows = write_applicant_history(stack, TEST_MONTHS, TEST_ROWS_PER_MONTH, seed=7)
    assert rows > TEST_MONTHS * TEST_ROWS_PER_MONTH  # several events per applicant
    done = _mlops("features", "apply")
    assert done.returncode == 0, done.stderr
    listed = _mlops("features", "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout and "applicant_history: prev_applications" in listed.stdout
    assert stack.aws_secret_access_key.get_secret_value() not in listed.stdout + listed.stderr + done.stdout
    return uri


@pytest.fixture(scope="module")
def trained(stack, applied):
    state = training(TrainingParams(dataset=MODEL, search=FAST_SEARCH), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _read(stack, key: str) -> bytes:
    from adapters.clients import s3_client

    return s3_client(stack).get_object(Bucket=stack.bucket, Key=key)["Body"].read()


def test_training_joins_point_in_time_and_reports_the_counts(stack, trained):
    from adapters.clients import mlflow_client, s3_client

    # then the validation report carries the join's counts, which add up, under the limit
    listing = s3_client(stack).list_objects_v2(Bucket=stack.bucket, Prefix=f"reports/{MODEL}/")["Contents"]
    report = json.loads(_read(stack, next(o["Key"] for o in listing if o["Key"].endswith("validation.json"))))
    join = report["statistics"]["feature_join"]
    assert join["rows_in"] == TEST_MONTHS * TEST_ROWS_PER_MONTH
    assert join["rows_out"] + join["rows_dropped"] == join["rows_in"]
    assert 0 < join["rows_dropped"] + join["rows_without_features"] <= 0.1 * join["rows_in"]
    assert join["ok"] and report["success"]
    # and so does the model card; the version says which feature service serving must look up
    client = mlflow_client(stack)
    version = client.get_model_version(MODEL, trained.candidate_version)
    assert version.tags["feature_service"] == SERVICE
    card = client.download_artifacts(version.run_id, "model_card/model_card.md")
    text = Path(card).read_text()
    assert f"{join['rows_in']} rows in, {join['rows_out']} out of the point-in-time join" in text
    # and the model was trained on the store's features
    import mlflow.models

    inputs = mlflow.models.get_model_info(f"models:/{MODEL}/{trained.candidate_version}").signature.inputs
    assert set(HISTORY_FEATURES) <= set(inputs.input_names())


def test_a_join_losing_too_many_rows_fails_the_run_naming_the_counts(stack, applied, tmp_path):
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text(MODEL)) | {"name": "history-strict", "max_missing_feature_share": 0.0}
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(raw))
    state = training(TrainingParams(dataset=str(path), search=FAST_SEARCH, dry_run=True), return_state=True)
    assert state.is_failed()
    assert "feature_store_join" in state.message and "without store features (limit 0.0%)" in state.message


@pytest.fixture(scope="module")
def materialized(stack, trained) -> datetime:
    from flows.features import MaterializeParams, materialize

    end = datetime.now(UTC).replace(microsecond=0)
    done = materialize(MaterializeParams(end=end))
    assert done.views == ["applicant_history"]
    return end


@pytest.fixture(scope="module")
def server(stack, materialized, tmp_path_factory):
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", MODEL]
    log_file = tmp_path_factory.mktemp("history-serving") / "serving.log"
    with running(command, f"http://127.0.0.1:{port}/health", os.environ.copy(), log_file):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 90, "the server to load its model")
        yield url


def _applications(stack) -> pd.DataFrame:
    import io

    key = f"datasets/credit-risk/month=2025-{TEST_MONTHS:02d}/part-0.parquet"
    return pd.read_parquet(io.BytesIO(_read(stack, key)))


def test_online_features_match_offline_and_serving_matches_the_pipeline(stack, trained, materialized, server):
    import mlflow.pyfunc

    from adapters.feature_store import feature_store, historical_features, online_features
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs

    config = load_local_dataset_config(MODEL)
    applications = _applications(stack)
    rows = pd.DataFrame({ENTITY_KEY: applications[ENTITY_KEY], ENTITY_TIMESTAMP: pd.Timestamp(materialized)})
    offline = rows.merge(historical_features(stack, rows, SERVICE), on=[ENTITY_KEY, ENTITY_TIMESTAMP], how="left")
    known = offline[offline[HISTORY_FEATURES].notna().any(axis=1)]
    unknown_ids = offline.loc[offline[HISTORY_FEATURES].isna().all(axis=1), ENTITY_KEY].tolist()
    # Given sampled entities: offline point-in-time features at the materialization time
    sample = known.sample(PARITY_SAMPLE, random_state=0)
    ids = sample[ENTITY_KEY].tolist()
    # then they equal the online store's after materialization
    online = pd.DataFrame(online_features(feature_store(stack), SERVICE, ids))
    pd.testing.assert_frame_equal(
        online[HISTORY_FEATURES].astype("float64").reset_index(drop=True),
        sample[HISTORY_FEATURES].astype("float64").reset_index(drop=True),
    )
    # when records carry only the id and the request-time fields
    request_fields = [f for f in config.feature_names if f not in config.store_features]
    chosen = applications.set_index(ENTITY_KEY).loc[ids].reset_index()
    records = json.loads(chosen[[ENTITY_KEY, *request_fields]].to_json(orient="records"))
    answer = httpx.post(f"{server}/predict", json={"records": records}, timeout=60)
    assert answer.status_code == 200, answer.text
    got = np.array([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in answer.json()["predictions"]])
    # then the served prediction equals the in-process pipeline's on the offline features
    full = chosen.merge(sample[[ENTITY_KEY, *HISTORY_FEATURES]], on=ENTITY_KEY)
    pipeline = mlflow.pyfunc.load_model(f"models:/{MODEL}/{trained.candidate_version}").get_raw_model()
    np.testing.assert_allclose(got, pipeline.predict_proba(prepare_inputs(full, config)), rtol=1e-9, atol=1e-12)
    # and a store feature the record carries itself is kept, not overwritten by the lookup
    own = chosen.head(1).merge(sample[[ENTITY_KEY, *HISTORY_FEATURES]], on=ENTITY_KEY)
    own["past_delinquencies"] = 9
    mine = httpx.post(f"{server}/predict", json={"records": [records[0] | {"past_delinquencies": 9}]}, timeout=60)
    assert mine.status_code == 200, mine.text
    expected_own = pipeline.predict_proba(prepare_inputs(own, config))[0]
    assert mine.json()["predictions"][0]["probabilities"]["1"] == pytest.approx(expected_own[1], rel=1e-9)

    # and a record carrying every store feature is scored without a lookup
    def lookups() -> float:
        text = httpx.get(f"{server}/metrics").text
        return float(
            next(x for x in text.splitlines() if x.startswith("mlops_serving_feature_lookup_seconds_count")).split()[-1]
        )

    before = lookups()
    complete = json.loads(own[[ENTITY_KEY, *config.feature_names]].to_json(orient="records"))
    assert httpx.post(f"{server}/predict", json={"records": complete}, timeout=60).status_code == 200
    assert lookups() == before
    # and an entity the store does not know is a 422 naming the record and the id, never a silent zero
    stranger = records[0] | {ENTITY_KEY: "nobody-0001"}
    refused = httpx.post(f"{server}/predict", json={"records": [records[1], stranger]}, timeout=60)
    assert refused.status_code == 422
    assert "records[1].application_id: unknown entity 'nobody-0001'" in refused.text
    # and so is an application without any history event (a few percent of the generated ones)
    assert unknown_ids
    lone = httpx.post(f"{server}/predict", json={"records": [records[0] | {ENTITY_KEY: unknown_ids[0]}]}, timeout=60)
    assert lone.status_code == 422 and "unknown entity" in lone.text
    # and the lookup latency is in /metrics
    metrics = httpx.get(f"{server}/metrics").text
    count = next(line for line in metrics.splitlines() if line.startswith("mlops_serving_feature_lookup_seconds_count"))
    assert float(count.split()[-1]) >= 2


def test_drift_monitoring_covers_the_store_features(stack, trained):
    from flows.monitoring import MonitoringParams, monitoring

    # Given the champion trained with store features (promoted: a cold start)
    month = f"s3://{stack.bucket}/datasets/credit-risk/month=2025-{TEST_MONTHS:02d}/"
    # when monitoring compares the latest partition (joined with the store as of each row's time)
    outcome = monitoring(
        MonitoringParams(dataset=MODEL, partition=month, prediction_log_days=0, trigger_retraining=False)
    )
    # then every store feature has a drift statistic next to the request-time features
    [window] = outcome.windows
    measured = {f.name for f in window.features}
    assert set(HISTORY_FEATURES) <= measured and "age" in measured
    assert window.rows == TEST_ROWS_PER_MONTH


def test_features_deployment_is_scheduled_and_runs_on_the_worker(stack, applied):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from deployments.deploy import deploy_all

    # Given every deployment registered (what `mlops deploy` does)
    deploy_all(work_pool=stack.work_pool)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("features/features")
    # then materialization is scheduled daily at 02:00, shows its form, and holds no secret
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert "MaterializeParams" in str(deployment.parameter_openapi_schema)
    assert stack.aws_secret_access_key.get_secret_value() not in deployment.model_dump_json()
    # when it is run on demand (as the UI's Run button does), the worker runs it to completion
    run = run_deployment("features/features", timeout=600, tags=["test-features"])
    assert run.state.is_completed(), run.state.message


def test_a_rewritten_feature_history_is_new_data_for_the_fingerprint(stack, applied):
    from mlops.datagen import write_applicant_history
    from tasks.loading import load_dataset_config
    from tasks.tracking import fingerprint_run

    # Given the model's dataset config (a feature service joined onto the snapshot) and its fingerprint
    config, params = load_dataset_config(MODEL), TrainingParams(dataset=MODEL).model_dump(mode="json")
    before = fingerprint_run.fn(config, params)
    try:
        # when the store's history table is rewritten with other events, the snapshot's files untouched
        write_applicant_history(stack, TEST_MONTHS, TEST_ROWS_PER_MONTH, seed=8)
        changed = fingerprint_run.fn(config, params)
    finally:
        # (the same events again: the table every other test of the session reads)
        write_applicant_history(stack, TEST_MONTHS, TEST_ROWS_PER_MONTH, seed=7)
    # then the data part differs (a rerun would train, not record "nothing new"), and only the data part
    assert changed.data != before.data
    assert (changed.config, changed.params, changed.code) == (before.config, before.params, before.code)
    # and the same bytes written again give the same data part back (the listing's ETags are content hashes)
    assert fingerprint_run.fn(config, params).data == before.data
