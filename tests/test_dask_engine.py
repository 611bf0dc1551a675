"""The Dask engine on the real stack and a real two-worker Dask cluster.

Each result is compared with an independent computation: the full-data checks with pandas on the same
rows, the holdout with `core.data.split.split_frame` (the pandas engine), the Dask-trained LightGBM with
`lightgbm.LGBMClassifier` trained locally on the same rows (holdout ROC AUC within 0.01). Then the flow
with `engine: dask` freezes its partitions (the data version the pandas engine computes from the same files,
read back byte for byte), registers and promotes its own model, which answers raw rows; a bad snapshot is
frozen, then fails validation naming the columns and registers nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MONTHS, ROWS = 4, 3000


def _config(name: str, source: str, **changes: object):
    from core.data.dataset import DatasetConfig, bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {
        "name": name,
        "model_name": name,
        "source": source,
        "engine": "dask",
        "lightgbm": {"n_estimators": 60},
    }
    return DatasetConfig.model_validate(raw | changes)


@pytest.fixture(scope="module")
def big(stack, dask_cluster) -> dict:
    """Good data (4 monthly partitions) and bad data (3 partitions with planted faults) in the stack's S3."""
    import os

    from mlops.datagen import write_months
    from tests.test_dask_engine_units import _bad_frame

    os.environ["MLOPS_DASK_ADDRESS"] = dask_cluster
    good = f"s3://{stack.bucket}/datasets/big-engine-test/"
    write_months(stack, good, MONTHS, ROWS, seed=11)
    frames = []
    for index in range(MONTHS):
        from core.data.synthetic import generate_month

        frames.append(generate_month(index, ROWS, 11))
    bad = f"s3://{stack.bucket}/datasets/big-engine-bad/"
    bad_frame = _bad_frame()
    from adapters.clients import S3Location, put_bytes

    pieces = [bad_frame.iloc[:1000], bad_frame.iloc[1000:2200], bad_frame.iloc[2200:]]
    for number, piece in enumerate(pieces):
        put_bytes(
            stack,
            S3Location.parse(bad).child(f"part-{number}.parquet"),
            piece.to_parquet(index=False),
            "application/x-parquet",
        )
    try:
        yield {"good": good, "frame": pd.concat(frames, ignore_index=True), "bad": bad, "bad_frame": bad_frame}
    finally:
        os.environ.pop("MLOPS_DASK_ADDRESS", None)


def test_full_data_checks_on_the_cluster_match_pandas(stack, big) -> None:
    from core.dask_engine.checks import full_data_failures
    from dask_engine.snapshots import open_snapshot
    from dask_engine.validation import full_data_stats

    config = _config("big-engine-bad", big["bad"])
    frame = big["bad_frame"]
    snapshot = open_snapshot(config, stack)
    assert snapshot.rows == len(frame) and len(snapshot.files) == 3  # from the Parquet footers
    stats, columns, duplicated, sample = full_data_stats(snapshot, config, stack, 500, seed=1)
    # Independent: pandas on the same rows in one frame
    assert duplicated == int(frame["application_id"].duplicated().sum()) == 3
    assert stats["rows"] == len(frame)
    assert stats["nulls"] == {c: int(frame[c].isna().sum()) for c in stats["nulls"]}
    for feature in config.features:
        if feature.min is not None:
            values = frame[feature.name].dropna()
            assert stats["numeric"][feature.name]["below"] == int((values < feature.min).sum())
            assert stats["numeric"][feature.name]["above"] == int((values > feature.max).sum())
        if feature.categories:
            outside = frame[feature.name].dropna()
            outside = outside[~outside.isin(feature.categories)].value_counts()
            assert stats["outside_set"][feature.name] == {k: int(v) for k, v in outside.items()}
    assert 400 <= len(sample) <= 600  # a ~500-row sample for Great Expectations
    _, failures = full_data_failures(stats, config, columns, duplicated)
    assert {f.column for f in failures} == {"age", "loan_amount", "credit_utilization", "region", "application_id"}


@pytest.fixture(scope="module")
def good_split(stack, big):
    """The good snapshot split on the cluster with room for the whole holdout (shared by two tests)."""
    from dask_engine.snapshots import open_snapshot
    from dask_engine.split import split_snapshot

    config = _config("big-engine-test", big["good"], max_holdout_rows=10**6)
    snapshot = open_snapshot(config, stack)
    return config, snapshot, split_snapshot(snapshot, config, stack)


def test_holdout_is_the_pandas_engines(stack, big, good_split) -> None:
    from core.data.split import split_frame
    from dask_engine.snapshots import open_snapshot
    from dask_engine.split import split_snapshot

    frame = big["frame"]
    reference = split_frame(frame, _config("x", big["good"]))  # the pandas engine
    # With room for the whole holdout, the evaluated rows are exactly the pandas engine's holdout
    _, _, split = good_split
    assert set(split.holdout["application_id"]) == set(reference.holdout["application_id"])
    assert split.rows_holdout == len(reference.holdout) and split.rows_train == len(reference.train)
    assert split.window == tuple(
        str(v) for v in (reference.train.application_date.min(), reference.train.application_date.max())
    )
    # With a cap, a fixed subset of that holdout (never a training row) comes back
    capped = _config("big-engine-test", big["good"], max_holdout_rows=1000)
    small = split_snapshot(open_snapshot(capped, stack), capped, stack)
    assert set(small.holdout["application_id"]) < set(reference.holdout["application_id"])
    assert 700 <= len(small.holdout) <= 1300 and small.rows_holdout == len(reference.holdout)


def test_dask_lightgbm_matches_a_local_reference(stack, big, good_split) -> None:
    import lightgbm
    from sklearn.metrics import roc_auc_score

    from core.dask_engine.model import lightgbm_kwargs
    from core.data.split import split_frame
    from dask_engine.training import train_lightgbm

    config, snapshot, split = good_split
    model, params = train_lightgbm(snapshot, split, config, stack, seed=42)
    reference_split = split_frame(big["frame"], config)
    # Reference: the same parameters on the same training rows, trained locally with pandas categoricals
    train, holdout = reference_split.train, reference_split.holdout
    features = config.feature_names

    def native(frame: pd.DataFrame) -> pd.DataFrame:
        out = frame[features].copy()
        for f in config.features:
            if f.categories:
                out[f.name] = pd.Categorical(out[f.name], categories=sorted(f.categories))
        return out

    local = lightgbm.LGBMClassifier(**lightgbm_kwargs(config, 42), n_jobs=1).fit(native(train), train["default"])
    ours = roc_auc_score(holdout["default"], model.predict_proba(holdout[features])[:, 1])
    theirs = roc_auc_score(holdout["default"], local.predict_proba(native(holdout))[:, 1])
    print(f"holdout ROC AUC: dask {ours:.4f}, local reference {theirs:.4f}")
    assert abs(ours - theirs) <= 0.01
    assert ours > 0.7
    assert params["n_estimators"] == 60 and model.named_steps["model"].n_estimators == 60
    assert model.named_steps["model"].n_jobs == 1  # one OpenMP thread when it predicts (serving, review)


def test_flow_on_dask_registers_and_promotes_a_model_that_takes_raw_rows(stack, big, tmp_path, monkeypatch) -> None:
    import mlflow.pyfunc

    from adapters.clients import mlflow_client
    from flows.training import TrainingParams, training

    # No serving API follows this model: the promotion stands without the serving check
    monkeypatch.delenv("MLOPS_SERVING_URL", raising=False)
    config = _config("big-engine-flow", big["good"], max_holdout_rows=1500)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    state = training(TrainingParams(dataset=str(path)), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.promoted, outcome.decision.reasons
    client = mlflow_client(stack)
    run = client.get_run(outcome.run_id)
    assert run.data.params["best_family"] == "lightgbm_dask"
    assert run.data.metrics["holdout_roc_auc"] > 0.7
    assert client.get_model_version_by_alias("big-engine-flow", "champion").version == outcome.candidate_version
    # The partitions were frozen before validation, by content: the run's data version is the one the pandas
    # engine computes from the same files, and the frozen version reads back byte for byte
    from adapters.data_versions import list_manifests, read_frozen
    from adapters.snapshots import fetch_objects, snapshot_from_objects
    from mlops.datagen import write_months

    objects, fmt = fetch_objects(big["good"], "parquet", stack)
    expected = snapshot_from_objects(objects, big["good"], fmt).data_version
    assert outcome.data_version == expected == run.data.tags["data_version"]
    manifest, frozen = read_frozen(stack, "big-engine-flow", expected)
    assert frozen == objects and manifest.rows == MONTHS * ROWS and len(manifest.files) == MONTHS
    assert manifest.first_run_id == run.data.tags["prefect_flow_run_id"]
    # and a run on that frozen version (the source overwritten meanwhile) reads its blobs in place on the cluster
    write_months(stack, big["good"], MONTHS, ROWS, seed=12)
    again = TrainingParams(dataset=str(path), data_version=expected, dry_run=True, force=True)
    state = training(again, return_state=True)
    assert state.is_completed(), state.message
    rerun = client.get_run(state.result().run_id)
    assert rerun.data.tags["data_version"] == expected and rerun.data.params["best_family"] == "lightgbm_dask"
    print(f"\nholdout ROC AUC {run.data.metrics['holdout_roc_auc']!r} -> {rerun.data.metrics['holdout_roc_auc']!r}")
    assert rerun.data.metrics["holdout_roc_auc"] == pytest.approx(run.data.metrics["holdout_roc_auc"], abs=0.02)
    write_months(stack, big["good"], MONTHS, ROWS, seed=11)  # the module's other tests read the original rows
    # The registered champion answers raw rows (as serving and scoring send them)
    served = mlflow.pyfunc.load_model("models:/big-engine-flow@champion")
    rows = big["frame"][config.feature_names].head(50)
    assert np.asarray(served.predict(rows)).shape[0] == 50
    # A bad snapshot: validation names the columns, nothing is registered
    bad = _config("big-engine-bad", big["bad"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad.model_dump(mode="json")))
    state = training(TrainingParams(dataset=str(path)), return_state=True)
    assert state.is_failed()
    message = str(state.message)
    for column in ("age", "loan_amount", "region", "application_id"):
        assert column in message
    assert "full data" in message
    assert client.search_registered_models("name = 'big-engine-bad'") == []
    [bad_version] = list_manifests(stack, "big-engine-bad")  # frozen before its validation failed
    assert bad_version.rows == len(big["bad_frame"]) and len(bad_version.files) == 3
