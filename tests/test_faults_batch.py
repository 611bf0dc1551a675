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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.inference.scoring import (
    Manifest,
    OutputPlan,
    ScoringOutputError,
    ScoringSummary,
    expired_versions,
    manifest_for,
    new_version,
)
from tests.faults import kill_server

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
    from core.data.dataset import bundled_config_text
    from core.modeling.search import ModelFamily, SearchSpec
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


def _first_part_of_a_new_version(process: subprocess.Popen, stack, output: str, good: Manifest) -> str:
    """Poll S3 until the scoring process has written a part of a new version; returns that version."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        fresh = {v: names for v, names in _versions(stack, output).items() if v != good.version}
        if any(name.startswith("part-") for names in fresh.values() for name in names):
            [version] = fresh
            return version
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"run ended (rc {process.wait()}) before any fault: {process.stderr.read()}")


def _stop_s3(stack) -> None:
    """Stop the stack's S3 server (its process group), as tests/test_resilience.py does."""
    kill_server(stack, "s3", signal.SIGTERM)


def _given_a_published_output(stack, default_data, dataset: str, output: str) -> tuple[Manifest, bytes, pd.DataFrame]:
    """Score one month into `output`; returns its manifest, the manifest's bytes and the predictions."""
    from adapters.scoring_store import current_output, read_current_predictions
    from flows.scoring import ScoringParams, scoring

    first = scoring(ScoringParams(dataset=dataset, source=f"{default_data}month=2025-06/", output=output))
    good = current_output(output, stack)
    rows = read_current_predictions(output, stack).to_pandas()
    assert first.rows == len(rows) > 0 and good.version in _versions(stack, output)
    return good, _raw(stack, f"{output}manifest.json"), rows


def _assert_previous_output_is_whole(stack, output: str, good: Manifest, manifest: bytes, rows: pd.DataFrame) -> None:
    """The manifest is byte for byte the previous one, and every file it names reads back unchanged."""
    from adapters.scoring_store import current_output, read_current_predictions

    assert _raw(stack, f"{output}manifest.json") == manifest
    assert current_output(output, stack) == good
    pd.testing.assert_frame_equal(read_current_predictions(output, stack).to_pandas(), rows)
    assert sum(len(pd.read_parquet(io.BytesIO(_raw(stack, uri)))) for uri in good.files) == len(rows)


def _assert_half_written(stack, output: str, version: str) -> None:
    """The interrupted run's version has some parts, not all, and no summary: it was stopped mid-write."""
    names = _versions(stack, output).get(version, [])
    parts = [n for n in names if n.startswith("part-")]
    assert 1 <= len(parts) < FILES and "summary.json" not in names, names


class _Reader(threading.Thread):
    """Reads the output through its manifest in a loop, as a consumer would: (version, rows read, rows listed)."""

    def __init__(self, stack, output: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.output = stack, output
        self.reads: list[tuple[str, int, int]] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        from adapters.scoring_store import current_output, read_predictions

        while not self.done.is_set():
            try:
                manifest = current_output(self.output, self.stack)
                self.reads.append((manifest.version, read_predictions(manifest, self.stack).num_rows, manifest.rows))
            except Exception as exc:  # any failure to read is what the test is about
                self.errors.append(repr(exc))
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)


def _score_in_subprocess(stack, dataset: str, source: str, output: str, **extra_env: str) -> subprocess.Popen:
    code = (
        "from flows.scoring import ScoringParams, scoring\n"
        f"scoring(ScoringParams(dataset={dataset!r}, source={source!r}, output={output!r}, chunk_rows=100))\n"
    )
    env = os.environ | {"PREFECT_API_URL": stack.prefect_api_url} | extra_env
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
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs
    from flows.scoring import ScoringParams, scoring

    dataset, version = scoring_setup
    output = f"s3://{stack.bucket}/test-faults/batch/out/"
    month = pd.read_parquet(io.BytesIO(_raw(stack, f"{default_data}month=2025-06/part-0.parquet")))
    # Given an output whose published run scored one month
    good, good_manifest, good_rows = _given_a_published_output(stack, default_data, dataset, output)
    # and a big source: FILES files (each the month, ids made unique), scored 100 rows per chunk
    big = _big_source(stack, month)
    # When a run scoring the big source into the same output is SIGKILLed once it has written a part
    process = _score_in_subprocess(stack, dataset, big, output)
    killed_version = _first_part_of_a_new_version(process, stack, output, good)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    time.sleep(1)  # an upload in flight at the kill would show by now
    # then it died mid-write, and readers still get the previous complete run, unchanged
    _assert_half_written(stack, output, killed_version)
    _assert_previous_output_is_whole(stack, output, good, good_manifest, good_rows)

    # When the run is started again (in-process, to completion), while a consumer keeps reading the output
    reader = _Reader(stack, output)
    reader.start()
    try:
        rerun = scoring(ScoringParams(dataset=dataset, source=big, output=output, chunk_rows=100))
        time.sleep(1)  # a few reads of the new version too
    finally:
        reader.stop()
    # then it publishes the new output: all FILES files, the previous one kept as `previous`
    latest = current_output(output, stack)
    assert latest.version not in {good.version, killed_version}
    assert latest.previous == good.version and len(latest.files) == FILES == rerun.files
    # and the consumer never failed to read, and always read a whole version: the previous, then the new one
    assert reader.errors == []
    assert {version for version, _, _ in reader.reads} == {good.version, latest.version}
    assert all(read == listed for _, read, listed in reader.reads)
    versions = [version for version, _, _ in reader.reads]
    assert versions == sorted(versions)  # once flipped, never back
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


@pytest.mark.integration
@pytest.mark.slow
def test_s3_stopped_mid_write_fails_the_run_and_leaves_the_previous_output_whole(stack, default_data, scoring_setup):
    from adapters.scoring_store import current_output, read_current_predictions
    from flows.scoring import ScoringParams, scoring
    from mlops import stack as local_stack

    dataset, _ = scoring_setup
    output = f"s3://{stack.bucket}/test-faults/batch/out-s3/"
    month = pd.read_parquet(io.BytesIO(_raw(stack, f"{default_data}month=2025-06/part-0.parquet")))
    # Given a published output, and a run scoring a big source into it
    good, good_manifest, good_rows = _given_a_published_output(stack, default_data, dataset, output)
    big = _big_source(stack, month)
    # (its I/O tasks retry 1 s apart instead of 2, 5 and 15 s: the same path, 19 s sooner)
    process = _score_in_subprocess(stack, dataset, big, output, MLOPS_IO_RETRY_DELAYS="[1, 1, 1]")
    # when S3 stops once the run has written a part, and stays down until the run gives up
    interrupted = _first_part_of_a_new_version(process, stack, output, good)
    _stop_s3(stack)
    stopped = time.monotonic()
    try:
        returncode = process.wait(timeout=600)
        failed_after = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
        local_stack.up(stack)
    # then the run failed (after its retries, in about `failed_after` s), saying S3 was unreachable
    stderr = process.stderr.read().decode()
    assert returncode == 1, stderr[-2000:]
    assert "unreachable" in stderr or "Connection refused" in stderr or "connect" in stderr.lower(), stderr[-2000:]
    assert failed_after > 3  # the three retries (1 s apart) ran before it gave up
    # and once S3 is back, the half-written version is there but unreferenced (its clean-up had no S3 either),
    # and readers get the previous complete run, unchanged
    _assert_half_written(stack, output, interrupted)
    _assert_previous_output_is_whole(stack, output, good, good_manifest, good_rows)
    # and a rerun publishes the new one, the previous kept
    rerun = scoring(ScoringParams(dataset=dataset, source=big, output=output, chunk_rows=100))
    latest = current_output(output, stack)
    assert latest.previous == good.version and latest.version != interrupted and len(latest.files) == FILES
    assert len(read_current_predictions(output, stack)) == rerun.rows == FILES * len(month)
