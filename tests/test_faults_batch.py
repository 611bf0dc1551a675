"""Faults in batch scoring: a run killed mid-write never takes the previous good output away.

Pure units of the manifest first (no servers), then the fault on the real stack: a scoring run in a
subprocess is SIGKILLed while it writes its parts; the output's manifest still names the previous
complete run, whose files read back unchanged; a rerun then publishes the new one.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.scoring import (
    Manifest,
    OutputPlan,
    ScoringOutputError,
    ScoringSummary,
    expired_versions,
    manifest_for,
    new_version,
)

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------- pure units


def test_versions_sort_by_start_time_and_expire_only_below_the_kept_ones():
    early = new_version(datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC), "zzz")
    late = new_version(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "aaa")
    assert early < late  # the time comes first, so the token never reorders runs
    v = [new_version(datetime(2026, 1, 1, h, tzinfo=UTC), f"run/{h}") for h in range(6)]
    assert all("/" not in name for name in v)
    # current v[4], previous v[2]: v[0], v[1] expire; v[3] (a killed or concurrent run) and v[5] (newer) stay
    assert expired_versions(v, v[4], v[2]) == [v[0], v[1]]
    assert expired_versions(v, v[0], None) == []
    assert expired_versions(v, v[3], None) == [v[0], v[1], v[2]]


def test_manifest_round_trips_and_bad_ones_are_named():
    plan = OutputPlan("s3://b/out/", "20260101T000000000000Z-x")
    summary = ScoringSummary("m", "3", "s3://b/in/", plan.output, "t", rows=10)
    summary.parts = {"s3://b/in/a.parquet": plan.prefix + "part-00000.parquet"}
    manifest = manifest_for(plan, summary, datetime(2026, 1, 1, tzinfo=UTC), "older")
    assert manifest.prefix == "s3://b/out/versions/20260101T000000000000Z-x/"
    assert Manifest.from_json(manifest.to_json(), "here") == manifest
    with pytest.raises(ScoringOutputError, match=r"here: not a scoring manifest"):
        Manifest.from_json("{", "here")
    with pytest.raises(ScoringOutputError, match=r"here: manifest format 7, expected 1"):
        Manifest.from_json('{"format": 7}', "here")
    with pytest.raises(ScoringOutputError, match=r"here: incomplete manifest"):
        Manifest.from_json('{"format": 1, "output": "s3://b/out/"}', "here")
    outside = manifest.to_json().replace(plan.prefix + "part", "s3://b/elsewhere/part")
    with pytest.raises(ScoringOutputError, match=r"outside its version"):
        Manifest.from_json(outside, "here")


# ------------------------------------------------------------------------------ fault on the stack

MODEL = "faults-batch"
FILES = 16  # the killed run's source: enough files that the kill lands while parts are still written


@pytest.fixture(scope="module")
def scoring_setup(stack, default_data, tmp_path_factory):
    """A champion of its own (one small tree) and its dataset config; returns (config path, version)."""
    import yaml

    from adapters.clients import mlflow_client
    from core.dataset import bundled_config_text
    from core.search import ModelFamily, SearchSpec
    from flows.training import TrainingParams, training

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    path = tmp_path_factory.mktemp("faults-batch") / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw))
    search = SearchSpec(families=[ModelFamily.decision_tree], trials_per_family=1, cv_folds=2)
    state = training(TrainingParams(dataset=str(path), search=search), return_state=True)
    assert state.is_completed(), state.message
    version = state.result().candidate_version
    mlflow_client(stack).set_registered_model_alias(MODEL, "champion", version)
    return str(path), version


def _keys(stack, uri: str) -> list[str]:
    from adapters.clients import S3Location, s3_client

    location = S3Location.parse(uri)
    pages = s3_client(stack).get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _raw(stack, uri: str) -> bytes:
    from adapters.clients import S3Location, s3_client

    location = S3Location.parse(uri)
    return s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()


def _versions(stack, output: str) -> dict[str, list[str]]:
    """Version -> the names of its objects, from a plain boto3 listing (not the code under test)."""
    from adapters.clients import S3Location

    base = S3Location.parse(output).key + "versions/"
    found: dict[str, list[str]] = {}
    for key in _keys(stack, output + "versions/"):
        version, name = key.removeprefix(base).split("/", 1)
        found.setdefault(version, []).append(name)
    return found


def _big_source(stack, month: pd.DataFrame) -> str:
    """FILES Parquet files, each the month with its ids made unique; returns the folder's URI."""
    from adapters.clients import S3Location, put_bytes

    big = f"s3://{stack.bucket}/test-faults/batch/big/"
    for index in range(FILES):
        frame = month.assign(application_id=month["application_id"].astype(str) + f"-{index}")
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        put_bytes(stack, S3Location.parse(big).child(f"part-{index:02d}.parquet"), buffer.getvalue(), "x/parquet")
    return big


def _kill_once_a_part_is_written(process: subprocess.Popen, stack, output: str, good: Manifest) -> str:
    """SIGKILL the scoring process as soon as a part of a new version is in S3; returns that version."""
    deadline, killed_version = time.monotonic() + 300, None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            fresh = {v: names for v, names in _versions(stack, output).items() if v != good.version}
            if any(name.startswith("part-") for names in fresh.values() for name in names):
                process.send_signal(signal.SIGKILL)
                [killed_version] = fresh
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert killed_version is not None, f"run ended (rc {process.returncode}) before the kill: {process.stderr.read()}"
    assert process.returncode == -signal.SIGKILL
    time.sleep(1)  # an upload in flight at the kill would show by now
    return killed_version


def _score_in_subprocess(stack, dataset: str, source: str, output: str) -> subprocess.Popen:
    code = (
        "from flows.scoring import ScoringParams, scoring\n"
        f"scoring(ScoringParams(dataset={dataset!r}, source={source!r}, output={output!r}, chunk_rows=100))\n"
    )
    env = os.environ | {"PREFECT_API_URL": stack.prefect_api_url}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.integration
@pytest.mark.slow
def test_scoring_killed_mid_write_leaves_the_previous_output_whole_and_a_rerun_publishes(
    stack, default_data, scoring_setup
):
    import mlflow.sklearn

    from adapters.clients import use_tracking_server
    from adapters.scoring_store import current_output, read_current_predictions
    from core.dataset import load_local_dataset_config
    from core.features import prepare_inputs
    from flows.scoring import ScoringParams, scoring

    dataset, version = scoring_setup
    output = f"s3://{stack.bucket}/test-faults/batch/out/"
    month = pd.read_parquet(io.BytesIO(_raw(stack, f"{default_data}month=2025-06/part-0.parquet")))
    # Given an output whose published run scored one month
    first = scoring(ScoringParams(dataset=dataset, source=f"{default_data}month=2025-06/", output=output))
    good = current_output(output, stack)
    good_manifest = _raw(stack, f"{output}manifest.json")
    good_rows = read_current_predictions(output, stack).to_pandas()
    assert first.rows == len(good_rows) == len(month) and good.version in _versions(stack, output)
    # and a big source: FILES files (each the month, ids made unique), scored 100 rows per chunk
    big = _big_source(stack, month)
    # When a run scoring the big source into the same output is SIGKILLed once it has written a part
    killed_version = _kill_once_a_part_is_written(
        _score_in_subprocess(stack, dataset, big, output), stack, output, good
    )

    # Then it died mid-write: some parts of its version exist, not all, and no summary
    parts = [n for n in _versions(stack, output)[killed_version] if n.startswith("part-")]
    assert 1 <= len(parts) < FILES, parts
    assert "summary.json" not in _versions(stack, output)[killed_version]
    # and the manifest is byte for byte the previous one: readers still get the previous complete run
    assert _raw(stack, f"{output}manifest.json") == good_manifest
    assert current_output(output, stack) == good
    pd.testing.assert_frame_equal(read_current_predictions(output, stack).to_pandas(), good_rows)
    for uri in good.files:  # every file it names reads in full
        assert len(pd.read_parquet(io.BytesIO(_raw(stack, uri)))) == len(month)

    # When the run is started again (in-process, to completion)
    rerun = scoring(ScoringParams(dataset=dataset, source=big, output=output, chunk_rows=100))
    # then it publishes the new output: all FILES files, the previous one kept as `previous`
    latest = current_output(output, stack)
    assert latest.version not in {good.version, killed_version}
    assert latest.previous == good.version and len(latest.files) == FILES == rerun.files
    scored = read_current_predictions(output, stack).to_pandas()
    assert len(scored) == FILES * len(month) and scored["application_id"].is_unique
    # and its probabilities are the registered model's own (scikit-learn on the same rows)
    use_tracking_server(stack)
    model = mlflow.sklearn.load_model(f"models:/{MODEL}/{version}")
    config = load_local_dataset_config("credit-risk")
    expected = model.predict_proba(prepare_inputs(month, config))[:, 1]
    np.testing.assert_allclose(scored["proba_1"].to_numpy(), np.tile(expected, FILES), rtol=1e-12)
    # and the killed run's leftovers are never read, and go once they are older than the kept versions
    assert not any(killed_version in uri for uri in latest.files)
    scoring(ScoringParams(dataset=dataset, source=f"{default_data}month=2025-06/", output=output))
    assert set(_versions(stack, output)) == {latest.version, current_output(output, stack).version}
