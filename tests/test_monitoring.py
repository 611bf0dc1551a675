"""Drift monitoring on the real stack: reference stored with the model, drift triggers one retrain, labels."""

from __future__ import annotations

import io
import json
import urllib.request
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from core.data.synthetic import DriftSpec, generate_month
from core.evaluation.decision import Gates
from core.modeling.search import SearchSpec
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


def _raw(stack) -> dict:
    import yaml

    from core.data.dataset import bundled_config_text

    source = f"s3://{stack.bucket}/datasets/{MODEL}/"
    return yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL, "source": source}


@pytest.fixture(scope="module")
def dataset(stack) -> str:
    """A dataset of its own (its config the model's catalog entry, read by the worker) with a trained champion."""
    from tests.catalog import put_model

    raw = _raw(stack)
    write_months(stack, raw["source"], MONTHS, ROWS, seed=SEED)
    config = put_model(stack, raw, search=SEARCH).uri
    # The cold start is judged on the lower bound of ROC AUC's interval (0.68 for this one-trial search on
    # 1,200 holdout rows, point 0.73): a lenient gate, as in tests/test_trust.py, since this module needs a
    # champion to monitor, not a test of the promotion rule.
    params = TrainingParams(dataset=config, search=SearchSpec(**SEARCH), gates=Gates(min_roc_auc=0.55))
    assert training(params).promoted  # the in-memory result (see _monitor)
    return config


@pytest.fixture(scope="module")
def deployed(stack, dataset):
    """The model's deployments (`training/monitoring-test`, ...) and its drift automation."""
    from tests.catalog import deploy_model

    return deploy_model(stack, _raw(stack), search=SEARCH)


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
    # The flow's return value, kept in memory by the engine (a failure raises with its message). Not
    # `return_state=True` + `state.result()`: with persist_result=False a state that came back from the API
    # (e.g. the server's answer to a rejected state proposal) carries no data, and a Completed run failed
    # here once with `MissingResult` under load (cause not pinned down; the return value is unaffected).
    return monitoring(MonitoringParams(**({"prediction_log_days": 0} | changes)))


def test_training_stores_the_reference_sample_with_the_model(stack, dataset):
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs
    from core.data.split import holdout_mask

    champion = load_champion_reference.fn(MODEL)
    assert {"age", "region", "proba_0", "proba_1"} <= set(champion.reference.columns)
    assert champion.reference["proba_1"].between(0, 1).all() and champion.holdout["roc_auc"] > 0.6
    # the reference is the holdout rows (about 20 % of the 6000, all kept under the 5000-row cap), not the
    # training rows: the same rows the frozen holdout is, recomputed here from the ids and the config's salt
    config = load_local_dataset_config("credit-risk")
    frame = _read(stack, f"s3://{stack.bucket}/datasets/{MODEL}/")
    holdout = frame[holdout_mask(frame["application_id"], config.holdout_fraction, config.holdout_salt)]
    assert len(champion.reference) == len(holdout) < 0.3 * len(frame)
    for column in ("annual_income", "age", "credit_utilization"):
        np.testing.assert_array_equal(np.sort(champion.reference[column]), np.sort(holdout[column].to_numpy()))
    # with the champion's own outputs on them
    expected = champion.model.predict_proba(prepare_inputs(holdout, config))[:, 1]
    np.testing.assert_allclose(np.sort(champion.reference["proba_1"]), np.sort(expected), rtol=1e-12)


def _read(stack, uri: str) -> pd.DataFrame:
    """Every Parquet object under `uri`, read with boto3 and pandas."""
    location = S3Location.parse(uri)
    client = s3_client(stack)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key)
    keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".parquet"))
    bodies = [client.get_object(Bucket=location.bucket, Key=k)["Body"].read() for k in keys]
    return pd.concat([pd.read_parquet(io.BytesIO(b)) for b in bodies], ignore_index=True)


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
    # and the model's page over time is in S3 (its link opens it), with this run and its champion's promotion
    assert outcome.page is not None and outcome.page.uri == f"s3://{stack.bucket}/reports/monitoring/{MODEL}/index.html"
    assert f"the model's monitoring page</a> (<code>{outcome.page.uri}</code>)" in body
    with urllib.request.urlopen(outcome.page.link, timeout=30) as answer:
        index = answer.read().decode()
    folder = page.key.rsplit("/", 2)[-2]
    assert f"<tr class='run' data-folder='{folder}'>" in index and f"Monitoring of {MODEL} over time" in index
    assert f"data-changes='v{outcome.champion_version}" in index
    # which the champion's model card, written at training time, already named
    card = S3Location.parse(mlflow_client(stack).get_model_version(MODEL, outcome.champion_version).tags["model_card"])
    text = s3_client(stack).get_object(Bucket=card.bucket, Key=card.key)["Body"].read().decode()
    assert f"{outcome.page.uri} (created by the first monitoring run)" in text
    # and the run's result says when it ran: the time its folder is named after
    stored = S3Location.parse(outcome.report.json_uri)
    result = json.loads(s3_client(stack).get_object(Bucket=stored.bucket, Key=stored.key)["Body"].read())
    assert folder.startswith(f"{datetime.fromisoformat(result['at']):%Y%m%dT%H%M%SZ}-")


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
    # but estimated ones: the champion's expected metrics on these rows, inside their bands (an unchanged month)
    for window in before.windows:
        assert window.estimated is not None and window.estimated.rows == 2000 and window.estimated.labelled_rows == 0
        assert {m.metric for m in window.estimated.metrics} == {"roc_auc", "f1", "precision", "recall"}
        assert all(m.realised is None and not m.worse for m in window.estimated.metrics)
        assert window.multivariate is not None and not window.multivariate.drifted
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
        # the estimate made before the labels, now beside the realised value (scikit-learn's, from the decay path)
        estimated = window.estimated.get("roc_auc")
        earlier = next(w for w in before.windows if w.name == window.name).estimated.get("roc_auc")
        assert estimated.estimate == earlier.estimate and window.estimated.labelled_rows == 2000
        assert estimated.realised == pytest.approx(performance.metrics["roc_auc"], abs=1e-12)
        assert abs(estimated.error) < 0.03
    assert _triggered_runs() == []


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _prediction_log(month: pd.DataFrame, champion, at: datetime | None = None) -> pd.DataFrame:
    """What the serving API logs (its own table builder) for batches of 100 records that carry their
    application ids, each batch under a request id of its own, predicted at `at` (now by default)."""
    import uuid

    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs
    from core.monitoring.prediction_log import Entry, to_table

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
            at or datetime.now(UTC),
            ids[start : start + 100],
        )
        for start in range(0, len(features), 100)
    ]
    return to_table(entries)


def test_prediction_log_of_the_last_n_days_reads_exactly_those_date_folders(stack, dataset):
    from datetime import timedelta

    from core.data.dataset import load_local_dataset_config
    from core.monitoring.prediction_log import object_key
    from tasks.monitoring import load_prediction_log

    model = f"{MODEL}-days"
    config = load_local_dataset_config("credit-risk")
    champion = load_champion_reference.fn(MODEL)
    month = generate_month(MONTHS + 1, 700, SEED)
    # Given a prediction log with objects in the date folders of today, 1, 2, 3 and 6 days ago (100 rows each,
    # two objects today), each row predicted at noon of its folder's date (or now, for today)
    now = datetime.now(UTC)
    written: dict[int, int] = {}
    for index, back in enumerate([0, 0, 1, 2, 3, 6]):
        at = now if back == 0 else (now - timedelta(days=back)).replace(hour=12, minute=0)
        rows = _prediction_log(month.iloc[index * 100 : (index + 1) * 100], champion, at)
        key = object_key(model, at, f"days-test-{index}")
        put_bytes(stack, S3Location(stack.bucket, key), _parquet(rows), OCTET)
        written[back] = written.get(back, 0) + len(rows)
    # when monitoring reads the last N days, then it gets exactly the rows of the N newest date folders
    for days, folders in ((1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (7, [0, 1, 2, 3, 6])):
        window = load_prediction_log.fn(model, days, config)
        assert len(window.frame) == sum(written[b] for b in folders), (days, len(window.frame))
        expected = {(now - timedelta(days=b)).date() for b in folders}
        assert set(pd.to_datetime(window.frame["predicted_at"], utc=True).dt.date) == expected
        assert f"last {days} day(s)" in window.source


def test_drift_outside_the_training_source_is_not_retrained_on_and_says_so(stack, dataset, deployed):
    # Given a drifted month under a prefix that is not the dataset's source (a retrain would not read it)
    partition = _incoming(stack, MONTHS + 3, DriftSpec(start_month=MONTHS + 3, strength=1.0))
    source = f"s3://{stack.bucket}/datasets/{MODEL}/"
    # when monitoring checks it twice, with no cooldown
    outcomes = [_monitor(dataset=dataset, partition=partition, cooldown_minutes=0) for _ in range(2)]
    # then both see the drift, and neither retrains: each says why, in the run, the report and its JSON
    expected = f"not retraining: the drifted data ({partition}) is outside the training source ({source})"
    for outcome in outcomes:
        assert outcome.verdict.triggered and outcome.windows[0].drifted
        assert (outcome.trigger.status, outcome.trigger.detail) == ("outside-source", expected)
        for uri in (outcome.report.html_uri, outcome.report.json_uri):
            location = S3Location.parse(uri)
            body = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()
            assert expected in body.replace("&#x27;", "'"), uri
    # and no training run was started, by either check
    assert _triggered_runs() == []


def test_drift_triggers_exactly_one_retraining_within_the_cooldown(stack, dataset, deployed):
    # Given a month shifted by the generator's drift knob, arrived in the dataset's source (training reads it)
    [partition] = write_months(
        stack,
        f"s3://{stack.bucket}/datasets/{MODEL}/",
        1,
        2000,
        SEED,
        drift=DriftSpec(start_month=MONTHS + 2, strength=1.0),
        first_month=MONTHS + 2,
    )
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
    # by the model's own training deployment (monitoring's default `training/<model>`)
    assert str(runs[0].deployment_id) == deployed["training"]
    # and the worker runs it with the reason recorded on the Prefect run and the MLflow run
    [finished] = wait_for_runs([runs[0].id], timeout=300)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters["params"]["reason"].startswith("drift: partition ")
    assert finished.parameters["params"]["search"] == SEARCH  # the deployment's defaults are kept
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name(MODEL)
    [run] = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{finished.id}'")
    assert run.data.tags["trigger_reason"].startswith("drift: partition ")
    # and that run read the drifted month: its snapshot (content hash of the source's files) is not the champion's
    champion_run = client.get_run(client.get_model_version(MODEL, first.champion_version).run_id)
    assert run.data.params["data_version"] != champion_run.data.params["data_version"]
    # and once the cooldown is over, the same drifted data does not start another retrain: the run did
    later = _monitor(dataset=dataset, partition=partition, cooldown_minutes=0)
    assert later.verdict.triggered and later.trigger.status == "already-retrained", later.trigger.detail
    assert later.trigger.flow_run_id == first.trigger.flow_run_id
    assert later.trigger.detail.startswith("not retraining: drift-triggered run ")
    assert [str(r.id) for r in _triggered_runs()] == [first.trigger.flow_run_id]
