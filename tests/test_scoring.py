"""The batch scoring flow end to end on the real stack: same predictions as the model, chunked, versions, failures."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adapters.clients import S3Location, mlflow_client, s3_client, use_tracking_server
from adapters.scoring_store import current_output, read_current_predictions
from core.inference.scoring import default_output
from core.modeling.search import ModelFamily, SearchSpec
from flows.scoring import ScoringParams, scoring
from flows.training import TrainingParams, training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "scoring-test"
MONTH = "month=2025-06"
SEARCH_SAMPLE_ROWS = 4_000
SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)
# A different model: one shallow tree, so its predictions differ clearly from the first version's.
TREE = SearchSpec(families=[ModelFamily.decision_tree], trials_per_family=1, cv_folds=2)


def _dataset_yaml(folder: Path, **changes: object) -> str:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | changes
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, default_data) -> str:
    """A dataset config like the bundled one (same data) whose model is `scoring-test`.

    Its search sees a sample of the training rows (what a table above `search_sample_rows` gets), so the
    training runs of this module also show that the registered model was fitted on every training row.
    """
    return _dataset_yaml(
        tmp_path_factory.mktemp("scoring"), name=MODEL, model_name=MODEL, search_sample_rows=SEARCH_SAMPLE_ROWS
    )


@pytest.fixture(scope="module")
def versions(stack, dataset) -> tuple[str, str]:
    """(older version, champion): a shallow tree first, then a real search that is the champion."""
    first = training(TrainingParams(dataset=dataset, search=TREE), return_state=True)
    assert first.is_completed(), first.message
    second = training(TrainingParams(dataset=dataset, search=SEARCH), return_state=True)
    assert second.is_completed(), second.message
    older, newer = first.result().candidate_version, second.result().candidate_version
    # The search beats the tree; setting the alias keeps the test independent of that decision.
    mlflow_client(stack).set_registered_model_alias(MODEL, "champion", newer)
    return older, newer


def _run(dataset: str, **params):
    return scoring(ScoringParams(dataset=dataset, **params), return_state=True)


def _keys(stack, uri: str) -> list[str]:
    location = S3Location.parse(uri)
    pages = s3_client(stack).get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _get(stack, bucket: str, key: str) -> bytes:
    return s3_client(stack).get_object(Bucket=bucket, Key=key)["Body"].read()


def _read_parquet(stack, uri: str) -> pd.DataFrame:
    """Every Parquet file under `uri` (or the one file), concatenated in key order."""
    bucket = S3Location.parse(uri).bucket
    keys = [k for k in _keys(stack, uri) if k.endswith(".parquet")]
    return pd.concat([pd.read_parquet(io.BytesIO(_get(stack, bucket, k))) for k in keys], ignore_index=True)


def _published(stack, output: str) -> pd.DataFrame:
    """The output's current predictions, read through its manifest (as every reader does)."""
    return read_current_predictions(output, stack).to_pandas()


def _summary(stack, output: str) -> dict:
    location = S3Location.parse(current_output(output, stack).summary)
    return json.loads(_get(stack, location.bucket, location.key))


def _features(frame: pd.DataFrame) -> pd.DataFrame:
    from core.data.dataset import load_local_dataset_config

    return frame[load_local_dataset_config("credit-risk").feature_names]


def _assert_matches_model(stack, predictions: pd.DataFrame, rows: pd.DataFrame, version: str) -> None:
    """Predictions are the registered version's own, row by row (joined on the id)."""
    import mlflow.pyfunc
    import mlflow.sklearn

    use_tracking_server(stack)  # the fluent API below (load_model) reads the global tracking URI
    assert len(predictions) == len(rows)
    assert predictions["application_id"].is_unique
    joined = rows.merge(predictions, on="application_id", suffixes=("", "_scored"), validate="one_to_one")
    assert len(joined) == len(rows)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    np.testing.assert_array_equal(joined["predicted"].to_numpy(), np.asarray(pyfunc.predict(_features(joined))))
    sklearn_model = mlflow.sklearn.load_model(f"models:/{MODEL}/{version}")
    proba = sklearn_model.predict_proba(_features(joined))
    for index, label in enumerate(sklearn_model.classes_):
        np.testing.assert_allclose(joined[f"proba_{label}"].to_numpy(), proba[:, index], rtol=1e-12)
    assert (joined["model_version"] == version).all()
    assert (joined["application_date_scored"] == joined["application_date"]).all()
    assert joined["scored_at"].notna().all()


def test_champion_predictions_match_the_model_and_summary_is_written(stack, versions, dataset, default_data):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    _, champion = versions
    source = f"{default_data}{MONTH}/"
    # Given a month's partition, when it is scored without naming a version
    state = _run(dataset, source=source)
    # then the champion is used, and the predictions land at the default place
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.model_version == champion
    assert outcome.output == default_output(stack.bucket, MODEL, source, champion)
    assert outcome.output.endswith(f"/predictions/batch/{MODEL}/{MONTH}/v{champion}/")
    # and every row of the partition has the model's own prediction and probabilities
    predictions = _published(stack, outcome.output)
    rows = _read_parquet(stack, source)
    _assert_matches_model(stack, predictions, rows, champion)
    # and summary.json beside them has the right counts
    summary = _summary(stack, outcome.output)
    assert (summary["rows"], summary["files"], summary["chunks"]) == (len(rows), 1, 1)
    assert (summary["model_name"], summary["model_version"], summary["source"]) == (MODEL, champion, source)
    assert summary["output"] == outcome.output
    assert summary["task"] == outcome.task == "binary" and "prediction_stats" not in summary
    counts = predictions["predicted"].value_counts()
    assert summary["predicted_counts"] == {label: int(counts.get(int(label), 0)) for label in ("0", "1")}
    assert sum(summary["predicted_counts"].values()) == len(rows)
    for label, mean in summary["mean_probability"].items():
        assert mean == pytest.approx(predictions[f"proba_{label}"].mean())
    # and the output holds the manifest and this run's version (its part and summary), nothing else
    manifest = current_output(outcome.output, stack)
    assert manifest.files == outcome.prediction_files == (f"{manifest.prefix}part-00000.parquet",)
    assert manifest.summary == outcome.summary_uri == f"{manifest.prefix}summary.json"
    assert outcome.manifest_uri == f"{outcome.output}manifest.json"
    assert manifest.prefix.startswith(f"{outcome.output}versions/")
    assert (manifest.rows, manifest.model_version, manifest.source) == (len(rows), champion, source)
    assert _keys(stack, outcome.output) == sorted(
        S3Location.parse(uri).key for uri in (outcome.manifest_uri, *manifest.files, manifest.summary)
    )
    # and the run shows the summary as a markdown artifact
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["batch-scoring"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(artifacts) == 1 and f"| rows | {len(rows):,} |" in artifacts[0].data


def test_the_search_saw_a_sample_and_the_registered_model_every_training_row(stack, versions, default_data):
    import mlflow.artifacts

    from core.data.dataset import load_local_dataset_config
    from core.data.split import split_frame

    use_tracking_server(stack)  # mlflow.artifacts reads the global tracking URI
    # Given the champion's training run, whose dataset has more training rows than its search sample
    client = mlflow_client(stack)
    run = client.get_run(client.get_model_version(MODEL, versions[1]).run_id)
    tags = run.data.tags
    snapshot = _read_parquet(stack, default_data)
    train = split_frame(snapshot, load_local_dataset_config("credit-risk")).train
    # then its record says the trials saw about SEARCH_SAMPLE_ROWS of them, and the final fit every one
    assert tags["training.engine"] == "pandas"
    assert int(tags["training.train_rows"]) == int(tags["training.fit_rows"]) == len(train)
    assert SEARCH_SAMPLE_ROWS <= int(tags["training.search_rows"]) <= SEARCH_SAMPLE_ROWS + 10
    # and so does the model card
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card/model_card.md")
    assert f"a sample by id hash of the {len(train):,} training rows" in card
    assert f"the chosen configuration on all {len(train):,} training rows" in card


def test_small_chunks_over_several_files_give_the_same_predictions(stack, versions, dataset, default_data):
    _, champion = versions
    whole = f"s3://{stack.bucket}/test-scoring/whole/"
    chunked = f"s3://{stack.bucket}/test-scoring/chunked/"
    # Given every month of the dataset (several files), scored once in big chunks and once in small ones
    big = _run(dataset, source=default_data, output=whole)
    small = _run(dataset, source=default_data, output=chunked, chunk_rows=300)
    assert big.is_completed(), big.message
    assert small.is_completed(), small.message
    # then the small run read many chunks, and both wrote one file per input file
    files = [k for k in _keys(stack, default_data) if k.endswith(".parquet")]
    rows = _read_parquet(stack, default_data)
    per_file = len(rows) // len(files)
    assert small.result().chunks == len(files) * math.ceil(per_file / 300)
    assert big.result().chunks == len(files)
    assert _summary(stack, chunked)["files"] == len(files) > 1
    # and the predictions are the same rows, classes and probabilities, and the model's own
    by_big, by_small = _published(stack, whole), _published(stack, chunked)
    pd.testing.assert_frame_equal(by_big.drop(columns="scored_at"), by_small.drop(columns="scored_at"))
    _assert_matches_model(stack, by_small, rows, champion)
    summaries = _summary(stack, whole), _summary(stack, chunked)
    for key in ("rows", "files", "model_version", "source", "predicted_counts"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["mean_probability"] == pytest.approx(summaries[1]["mean_probability"])
    assert summaries[1]["rows"] == len(rows)


def test_a_given_older_version_is_used(stack, versions, dataset, default_data):
    older, champion = versions
    source = f"{default_data}{MONTH}/"
    # Given a champion, when an older version is asked for
    state = _run(dataset, source=source, model_version=older)
    # then that version scores, and its output is apart from the champion's
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.model_version == older != champion
    assert outcome.output.endswith(f"/v{older}/")
    predictions = _published(stack, outcome.output)
    _assert_matches_model(stack, predictions, _read_parquet(stack, source), older)
    assert _summary(stack, outcome.output)["model_version"] == older


def test_a_missing_version_fails_clearly(stack, versions, dataset, default_data):
    state = _run(dataset, source=f"{default_data}{MONTH}/", model_version="999")
    assert state.is_failed()
    assert f"{MODEL!r} has no version '999'" in state.message, state.message


def test_bad_source_fails_naming_it_and_writes_nothing(stack, versions, dataset, default_data):
    _, champion = versions
    source = f"{default_data}month=2031-01/"
    # Given a partition that does not exist, when it is scored
    state = _run(dataset, source=source)
    # then the run fails naming the source, and nothing is written where the predictions would go
    assert state.is_failed()
    assert source in state.message and "no Parquet files" in state.message, state.message
    assert _keys(stack, default_output(stack.bucket, MODEL, source, champion)) == []


def test_no_champion_and_no_version_fails_clearly(stack, tmp_path, default_data):
    name = "scoring-no-champion"
    state = _run(_dataset_yaml(tmp_path, name=name, model_name=name), source=f"{default_data}{MONTH}/")
    assert state.is_failed()
    assert f"model {name!r} has no 'champion' alias" in state.message, state.message
    assert _keys(stack, f"s3://{stack.bucket}/predictions/batch/{name}/") == []


def _month(stack, default_data, month: str = MONTH) -> pd.DataFrame:
    return _read_parquet(stack, f"{default_data}{month}/")


def _put_parquet(stack, key: str, frame: pd.DataFrame) -> str:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    s3_client(stack).put_object(Bucket=stack.bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{stack.bucket}/{key}"


def test_missing_feature_column_names_the_column_and_the_file(stack, versions, dataset, default_data):
    # Given a partition whose file lacks a feature column
    bad = _put_parquet(
        stack, "test-scoring/missing-age/part-0.parquet", _month(stack, default_data).drop(columns="age")
    )
    output = f"s3://{stack.bucket}/test-scoring/out-missing-age/"
    # when it is scored, then the run fails naming the column and the file, and writes nothing
    state = _run(dataset, source=f"s3://{stack.bucket}/test-scoring/missing-age/", output=output)
    assert state.is_failed()
    assert "'age'" in state.message and bad in state.message, state.message
    assert _keys(stack, output) == []


def test_failure_after_some_files_are_scored_leaves_nothing(stack, versions, dataset, default_data):
    # Given a partition whose first file is good and whose second has text in a numeric column
    _put_parquet(stack, "test-scoring/half-bad/part-0.parquet", _month(stack, default_data))
    bad = _put_parquet(stack, "test-scoring/half-bad/part-1.parquet", _month(stack, default_data).assign(age="forty"))
    output = f"s3://{stack.bucket}/test-scoring/out-half-bad/"
    # when it is scored, then the run fails naming the bad file
    state = _run(dataset, source=f"s3://{stack.bucket}/test-scoring/half-bad/", output=output, chunk_rows=500)
    assert state.is_failed()
    assert bad in state.message and "cannot be scored" in state.message, state.message
    # and the first file's predictions were discarded with the run's version: nothing in the output
    assert _keys(stack, output) == []


def test_rerun_into_the_same_output_replaces_the_earlier_run(stack, versions, dataset, default_data, monkeypatch):
    output = f"s3://{stack.bucket}/test-scoring/rerun/"
    # Given an output holding a run over every month (several files)
    first = _run(dataset, source=default_data, output=output)
    assert first.is_completed(), first.message
    first_manifest = current_output(output, stack)
    first_rows = _published(stack, output)
    # when one month is scored into the same output, and then another run of it
    second = _run(dataset, source=f"{default_data}{MONTH}/", output=output)
    assert second.is_completed(), second.message
    # then readers see only that run: one file, and the summary's rows
    manifest = current_output(output, stack)
    assert manifest.files == second.result().prediction_files and len(manifest.files) == 1
    assert manifest.previous == first_manifest.version != manifest.version
    assert _summary(stack, output)["rows"] == len(_published(stack, output)) == len(_month(stack, default_data))
    # and the previous version is kept, complete, until the next flip
    bucket = S3Location.parse(output).bucket
    kept = [pd.read_parquet(io.BytesIO(_get(stack, bucket, S3Location.parse(u).key))) for u in first_manifest.files]
    pd.testing.assert_frame_equal(pd.concat(kept, ignore_index=True), first_rows)
    # and a third run deletes the version before the previous one, keeping the second as previous (the longest
    # run set to 1 s: the first run started longer ago than that, so it cannot be writing any more)
    monkeypatch.setenv("MLOPS_SCORING_MAX_RUN_SECONDS", "1")
    third = _run(dataset, source=f"{default_data}{MONTH}/", output=output)
    assert third.is_completed(), third.message
    latest = current_output(output, stack)
    assert latest.previous == manifest.version
    versions = {k.removeprefix(S3Location.parse(output).key).split("/")[1] for k in _keys(stack, output + "versions/")}
    assert versions == {manifest.version, latest.version}


def test_one_file_can_be_scored_and_output_inside_the_source_is_refused(stack, versions, dataset, default_data):
    _, champion = versions
    file = f"{default_data}{MONTH}/part-0.parquet"
    # Given one Parquet file as the source, then it is scored to a place named after its folder and name
    state = _run(dataset, source=file)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.output.endswith(f"/{MONTH}/part-0/v{champion}/")
    assert (outcome.rows, outcome.files) == (len(_month(stack, default_data)), 1)
    # and an output inside the source partition is refused before anything is written
    inside = f"{default_data}{MONTH}/predictions/"
    refused = _run(dataset, source=f"{default_data}{MONTH}/", output=inside)
    assert refused.is_failed()
    assert "overlaps the source" in refused.message, refused.message
    assert _keys(stack, inside) == []
