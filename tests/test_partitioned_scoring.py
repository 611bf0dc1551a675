"""Batch scoring and drift statistics over partitions on a real two-worker Dask cluster.

The reference for each cluster run is the single-process path on the same input: the same predictions
row for row, the same summary numbers (counts exact, means within 1e-12), the same drift figures. The
model is a plain scikit-learn pipeline registered under this module's own name (the shared stack's
`credit-risk` is left alone).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core.inference.scoring import PredictionTally, ScoringInputError, use_cluster

MODEL = "partitioned-test"
SOURCE = "s3://mlops/datasets/partitioned-test/"
MONTHS = 3
ROWS_PER_MONTH = 1500
CHUNK_ROWS = 400


# ---------------------------------------------------------------------------------------------- pure units


def _predictions(labels: list[str], scores: np.ndarray) -> pa.RecordBatch:
    if not labels:
        return pa.RecordBatch.from_pydict({"predicted": pa.array(scores, pa.float64())})
    columns = {"predicted": pa.array(np.asarray(labels)[scores.argmax(axis=1)])}
    columns |= {f"proba_{label}": pa.array(scores[:, i]) for i, label in enumerate(labels)}
    return pa.RecordBatch.from_pydict(columns)


@pytest.mark.parametrize("labels", [["0", "1"], ["a", "b", "c"], []])
def test_tallies_merged_from_partitions_equal_one_tally_over_every_chunk(labels):
    rng = np.random.default_rng(len(labels))
    shape = (5000, len(labels)) if labels else (5000,)
    scores = rng.dirichlet(np.ones(len(labels)), 5000) if labels else rng.normal(3, 2, shape)
    whole = PredictionTally(list(labels))
    parts = [PredictionTally(list(labels)) for _ in range(3)]
    for index, chunk in enumerate(np.array_split(scores, 9)):
        whole.add(_predictions(labels, chunk))
        parts[index % 3].add(_predictions(labels, chunk))
    merged = PredictionTally(list(labels))
    for part in parts:
        merged.merge(part)
    assert merged.rows == whole.rows == 5000 and merged.counts == whole.counts
    for label in labels:
        assert merged.sums[label] == pytest.approx(whole.sums[label], rel=1e-12)
    if not labels:  # against numpy on all the values (population std)
        stats = merged.values.as_dict()
        assert stats["mean"] == pytest.approx(scores.mean(), rel=1e-12)
        assert stats["std"] == pytest.approx(scores.std(), rel=1e-12)
        assert (stats["min"], stats["max"]) == (scores.min(), scores.max())


def test_the_engine_rule():
    assert use_cluster("auto", 10**6, "tcp://x:1") and not use_cluster("auto", 10**6 - 1, "tcp://x:1")
    assert not use_cluster("auto", 10**9, None) and not use_cluster("local", 10**9, "tcp://x:1")
    assert use_cluster("dask", 1, "tcp://x:1")
    with pytest.raises(ScoringInputError, match="no Dask cluster: set MLOPS_DASK_ADDRESS"):
        use_cluster("dask", 1, None)


def test_a_worker_loads_each_model_once_and_keeps_only_the_newest(monkeypatch):
    from adapters.settings import Settings
    from dask_engine import workers

    loaded: list[str] = []
    monkeypatch.setattr(
        workers.registry, "load_model", lambda name, version, settings, where=None: loaded.append(version)
    )
    monkeypatch.setattr(workers, "_MODELS", {})
    for version in ["1", "1", "2", "1", "2", "3", "1"]:
        workers.worker_model("m", version, Settings())
    # 1 and 2 stay cached; 3 pushes out 1 (the oldest), so 1 is loaded again
    assert loaded == ["1", "2", "3", "1"]
    assert len(workers._MODELS) == workers.MODELS_KEPT


# ---------------------------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def model_setup(stack, tmp_path_factory, dask_cluster):
    """Three months in S3, a logistic regression registered as `partitioned-test` (champion, with a reference)."""
    from sklearn.linear_model import LogisticRegression

    from adapters.clients import mlflow_client
    from adapters.monitoring_store import store_reference
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import generate_month
    from core.monitoring.drift_analysis import reference_sample
    from mlops.datagen import write_months
    from tasks.tracking import log_model, register_model, start_run
    from tests.task_types import fit

    config = load_local_dataset_config("credit-risk")
    write_months(stack, SOURCE, MONTHS, ROWS_PER_MONTH, seed=11)
    train = pd.concat([generate_month(i, 1500, 5) for i in range(3)], ignore_index=True)
    model = fit(config, train, LogisticRegression(max_iter=1000))
    # logged and registered as training does (the version carries its artifact digests)
    run_id = start_run.fn(config.model_copy(update={"name": MODEL}), {"test": "partitioned"}, {"run_name": MODEL})
    uri, digests = log_model.fn(run_id, model, train, config)
    version = register_model.fn(uri, MODEL, run_id, digests.tags())
    store_reference(stack, run_id, reference_sample(train, model, config, 5000, 0))
    mlflow_client(stack).set_registered_model_alias(MODEL, "champion", version)
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL, "source": SOURCE}
    path = tmp_path_factory.mktemp("partitioned") / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), version, model


def _score(path: str, version: str, engine: str, output: str):
    from flows.scoring import ScoringParams, scoring

    params = ScoringParams(
        dataset=path, source=SOURCE, model_version=version, chunk_rows=CHUNK_ROWS, output=output, engine=engine
    )
    return scoring(params, return_state=True)


def _summary(stack, output: str) -> dict:
    import json

    from adapters.clients import S3Location, s3_client
    from adapters.scoring_store import current_output

    location = S3Location.parse(current_output(output, stack).summary)
    return json.loads(s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read())


def test_cluster_scoring_gives_the_single_process_output(stack, model_setup, dask_cluster, monkeypatch):
    from distributed import Client

    from adapters.scoring_store import current_output, read_current_predictions
    from dask_engine import workers

    path, version, model = model_setup
    monkeypatch.setenv("MLOPS_DASK_ADDRESS", dask_cluster)
    here = _score(path, version, "local", "s3://mlops/predictions/partitioned-test/local/")
    there = _score(path, version, "dask", "s3://mlops/predictions/partitioned-test/dask/")
    assert here.is_completed(), here.message
    assert there.is_completed(), there.message
    local, cluster = here.result(), there.result()
    # the same predictions, row for row and file for file (through each output's manifest)
    a = read_current_predictions(local.output, stack).to_pandas()
    b = read_current_predictions(cluster.output, stack).to_pandas()
    assert len(a) == len(b) == MONTHS * ROWS_PER_MONTH
    pd.testing.assert_frame_equal(
        a.drop(columns="scored_at"), b.drop(columns="scored_at"), check_exact=False, rtol=1e-12
    )
    assert [f.rsplit("/", 1)[1] for f in current_output(cluster.output, stack).files] == [
        f"part-{i:05d}.parquet" for i in range(MONTHS)
    ]
    # and the predictions are the model's own (an independent reference: the fitted pipeline itself)
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs

    frames = [_read_source_month(stack, i) for i in range(MONTHS)]
    rows = pd.concat(frames, ignore_index=True)
    proba = model.predict_proba(prepare_inputs(rows, load_local_dataset_config("credit-risk")))
    np.testing.assert_allclose(b["proba_1"].to_numpy(), proba[:, 1], rtol=1e-12)
    # the same summary numbers
    s_local, s_cluster = _summary(stack, local.output), _summary(stack, cluster.output)
    for key in ("rows", "files", "chunks", "task", "predicted_counts"):
        assert s_cluster[key] == s_local[key], key
    for label, mean in s_local["mean_probability"].items():
        assert s_cluster["mean_probability"][label] == pytest.approx(mean, rel=1e-12)
    assert s_local["engine"] == "local" and s_cluster["engine"] == "dask" and s_cluster["workers"] == 2
    # memory per worker: bounded by the cluster's limit, and measured
    assert len(s_cluster["worker_peak_rss_mb"]) == 2
    for worker, peak in s_cluster["worker_peak_rss_mb"].items():
        assert 0 < peak < s_cluster["worker_memory_limit_mb"][worker]
    # the model was loaded once per worker at most, not once per partition
    with Client(dask_cluster, set_as_default=False) as client:
        loads = client.run(workers.model_loads)
    counts = [sum(1 for load in worker if load == (MODEL, version)) for worker in loads.values()]
    assert max(counts) == 1 and sum(counts) >= 1, loads


def _read_source_month(stack, index: int) -> pd.DataFrame:
    from adapters.clients import S3Location, s3_client
    from mlops.datagen import partition_name

    keys = sorted(
        o["Key"]
        for o in s3_client(stack).list_objects_v2(Bucket="mlops", Prefix=S3Location.parse(SOURCE).key)["Contents"]
    )
    body = s3_client(stack).get_object(Bucket="mlops", Key=keys[index])["Body"].read()
    assert keys[index].endswith(partition_name(keys[index].split("month=")[1].split("/")[0]))
    return pd.read_parquet(io.BytesIO(body))


def test_a_bad_file_on_the_cluster_fails_naming_it_and_publishes_nothing(stack, model_setup, dask_cluster, monkeypatch):
    from adapters.clients import S3Location, put_bytes, s3_client

    path, version, _ = model_setup
    frame = _read_source_month(stack, 0).astype({"age": str})  # numbers as text, which the model takes
    frame.loc[frame.index[17], "age"] = "forty"
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    bad = "s3://mlops/datasets/partitioned-bad/month=2025-01/part-0.parquet"
    put_bytes(stack, S3Location.parse(bad), buffer.getvalue(), "application/x-parquet")
    from flows.scoring import ScoringParams, scoring

    output = "s3://mlops/predictions/partitioned-test/bad/"
    params = ScoringParams(
        dataset=path, source=bad.rsplit("/", 1)[0] + "/", model_version=version, output=output, engine="dask"
    )
    monkeypatch.setenv("MLOPS_DASK_ADDRESS", dask_cluster)
    state = scoring(params, return_state=True)
    assert state.is_failed()
    assert bad in state.message or bad in str(state.result(raise_on_failure=False)), state.message
    listed = s3_client(stack).list_objects_v2(Bucket="mlops", Prefix=S3Location.parse(output).key)
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")


def test_cluster_drift_figures_equal_the_whole_partition(stack, model_setup, dask_cluster, monkeypatch):
    from flows.monitoring import MonitoringParams, monitoring

    path, _, _ = model_setup
    monkeypatch.setenv("MLOPS_DASK_ADDRESS", dask_cluster)
    outcomes = {
        engine: monitoring(
            MonitoringParams(
                dataset=path,
                partition=SOURCE,  # every month: three files, three partitions
                labels=SOURCE,  # the months carry their targets: decay is computed too
                prediction_log_days=0,
                trigger_retraining=False,
                engine=engine,
            ),
            return_state=True,
        )
        for engine in ("local", "dask")
    }
    [local], [cluster] = (outcomes[e].result().windows for e in ("local", "dask"))
    assert cluster.rows == local.rows == MONTHS * ROWS_PER_MONTH
    assert cluster.labelled_rows == local.labelled_rows == MONTHS * ROWS_PER_MONTH
    assert (cluster.drifted, cluster.decayed, cluster.reasons) == (local.drifted, local.decayed, local.reasons)
    for mine, theirs in zip([*cluster.features, cluster.prediction], [*local.features, local.prediction], strict=True):
        assert (mine.name, mine.test, mine.drifted) == (theirs.name, theirs.test, theirs.drifted)
        for field in ("psi", "statistic", "p_value", "effect"):
            assert getattr(mine, field) == pytest.approx(getattr(theirs, field), rel=1e-12, abs=1e-12), field
    assert cluster.performance.rows == local.performance.rows
    assert cluster.performance.metrics == pytest.approx(local.performance.metrics, rel=1e-12)
    # null rates, estimated performance (beside the realised metrics) and the domain classifier's verdict
    assert cluster.null_rates == pytest.approx(local.null_rates, rel=1e-12, abs=1e-15)
    _same_estimates(cluster, local)
    assert local.multivariate is not None and cluster.multivariate is not None
    assert cluster.multivariate.drifted == local.multivariate.drifted is False  # unshifted months
    assert cluster.multivariate.rows == local.multivariate.rows == (4500, 4500)  # every reference and window row


AUC_BINNING = 2e-4  # the binned expected ROC AUC against the exact one (tests/test_estimation_partials_units.py)


def _same_estimates(cluster, local) -> None:
    """The cluster's estimates are the local ones: ROC AUC within the binning error, the rest within 1e-9."""
    assert local.estimated is not None and cluster.estimated is not None, (
        local.estimation_note,
        cluster.estimation_note,
    )
    assert (cluster.estimated.rows, cluster.estimated.method) == (local.estimated.rows, local.estimated.method)
    assert cluster.estimated.labelled_rows == local.estimated.labelled_rows
    assert [m.metric for m in cluster.estimated.metrics] == [m.metric for m in local.estimated.metrics]
    for mine, theirs in zip(cluster.estimated.metrics, local.estimated.metrics, strict=True):
        tolerance = AUC_BINNING if mine.metric == "roc_auc" else 1e-9
        assert mine.estimate == pytest.approx(theirs.estimate, abs=tolerance), mine.metric
        assert (mine.lower, mine.upper, mine.reference) == pytest.approx((theirs.lower, theirs.upper, theirs.reference))
        assert (mine.realised is None) == (theirs.realised is None), mine.metric
        if theirs.realised is not None:
            assert mine.realised == pytest.approx(theirs.realised, rel=1e-12), mine.metric
        assert mine.worse == theirs.worse
    assert cluster.estimated_drop == local.estimated_drop


def test_cluster_estimates_and_multivariate_drift_on_a_shifted_partition(stack, model_setup, dask_cluster):
    """Two strongly shifted months: the cluster's estimates and domain classifier say what the local path says."""
    from adapters.monitoring_store import load_champion
    from adapters.scoring_store import list_partition_files
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import DriftSpec
    from core.monitoring.drift import DriftThresholds
    from core.monitoring.drift_analysis import analyse_window, with_estimator
    from dask_engine.drift import ClusterPartition, analyse_on_cluster
    from mlops.datagen import write_months
    from tasks.monitoring import load_partition

    path, _, _ = model_setup
    shifted = "s3://mlops/datasets/partitioned-shifted/"
    write_months(stack, shifted, 2, 3000, seed=13, drift=DriftSpec(0, 1.0))
    config = load_local_dataset_config(path)
    champion = with_estimator(load_champion(stack, MODEL), config)
    thresholds = DriftThresholds()
    local = analyse_window(load_partition.fn(shifted, config), champion, config, None, thresholds)
    partition = ClusterPartition(dask_cluster, shifted, tuple(list_partition_files(shifted, stack)))
    _, cluster = analyse_on_cluster(partition, champion, config, None, thresholds, stack)
    assert cluster.rows == local.rows == 6000
    assert cluster.null_rates == pytest.approx(local.null_rates, rel=1e-12, abs=1e-15)
    _same_estimates(cluster, local)
    assert cluster.estimated.labelled_rows == 0 and all(m.realised is None for m in cluster.estimated.metrics)
    assert local.multivariate.drifted and cluster.multivariate.drifted  # the same verdict: drifted
    assert cluster.multivariate.rows == local.multivariate.rows == (4500, 5000)  # 5,000 of 6,000: sampled on workers
    assert cluster.multivariate.auc > 0.6 and local.multivariate.auc > 0.6
    assert {name for name, _ in cluster.multivariate.features} & {name for name, _ in local.multivariate.features}
    assert (cluster.drifted, cluster.estimated_drop) == (local.drifted, local.estimated_drop)
