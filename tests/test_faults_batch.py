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
from datetime import UTC, datetime, timedelta
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
    version_started,
)
from tests.faults import kill_server, s3_restarting
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------- pure units


def test_versions_sort_by_start_time_and_expire_only_below_the_kept_ones():
    early = new_version(datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC), "zzz")
    late = new_version(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "aaa")
    assert early < late  # the time comes first, so the token never reorders runs
    v = [new_version(datetime(2026, 1, 1, h, tzinfo=UTC), f"run/{h}") for h in range(6)]
    assert all("/" not in name for name in v)
    later = datetime(2026, 1, 2, tzinfo=UTC)  # a day after: every run of these is over (longest run: 1 hour)
    # current v[4], previous v[2]: v[0], v[1] expire; v[3] (a killed or concurrent run) and v[5] (newer) stay
    assert expired_versions(v, v[4], v[2], later, 3600) == [v[0], v[1]]
    assert expired_versions(v, v[0], None, later, 3600) == []
    assert expired_versions(v, v[3], None, later, 3600) == [v[0], v[1], v[2]]
    # a version whose run started less than the longest run ago may still be being written: never deleted
    two_hours_in = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)  # v[0], v[1] started 2.5 and 1.5 h before
    assert expired_versions(v, v[4], v[2], two_hours_in, 2 * 3600) == [v[0]]
    assert expired_versions(v, v[4], v[2], two_hours_in, 3 * 3600) == []
    assert version_started(v[1]) == datetime(2026, 1, 1, 1, tzinfo=UTC) and version_started("not-ours") is None


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


def _served(stack, uri: str) -> bool:
    """Whether S3 answers a GET of `uri` (not the server error of a volume that is not serving yet)."""
    from botocore.exceptions import ClientError

    try:
        _raw(stack, uri)
    except ClientError as exc:
        if not s3_restarting(exc):
            raise
        return False
    return True


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
    stack, default_data, scoring_setup, monkeypatch
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
    # When a run scoring the big source into the same output is SIGKILLed once it has written a part (its lock
    # of the output leased for 60 s, the shortest: the lease of a killed run lapses, nobody releases it)
    process = _score_in_subprocess(stack, dataset, big, output, MLOPS_LOCK_LEASE_SECONDS="60")
    killed_version = _first_part_of_a_new_version(process, stack, output, good)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    time.sleep(1)  # an upload in flight at the kill would show by now
    # then it died mid-write, and readers still get the previous complete run, unchanged
    _assert_half_written(stack, output, killed_version)
    _assert_previous_output_is_whole(stack, output, good, good_manifest, good_rows)

    # When the run is started again (in-process, to completion; it waits for the killed run's lease to lapse),
    # while a consumer keeps reading the output
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
    # (the longest run set to 1 s: the killed run's version is older than that, so its run is over)
    monkeypatch.setenv("MLOPS_SCORING_MAX_RUN_SECONDS", "1")
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
    # (a restarted SeaweedFS is healthy a moment before its volume serves the stored objects again)
    wait_for(lambda: _served(stack, f"{output}manifest.json"), 60, "S3 to serve the stored objects again")
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


@pytest.mark.integration
def test_an_older_run_never_replaces_a_later_publication_nor_clean_up_a_version_still_written(stack):
    from adapters.clients import S3Location, put_bytes
    from adapters.scoring_store import publish_output, read_manifest

    output = f"s3://{stack.bucket}/test-faults/batch/out-races/"
    now = datetime.now(UTC)

    def written(started: datetime, token: str) -> tuple[OutputPlan, ScoringSummary]:
        """A run's version with its one part in S3, not published yet."""
        plan = OutputPlan(output, new_version(started, token))
        summary = ScoringSummary(MODEL, "1", "s3://b/in/", output, "binary", rows=1)
        summary.parts = {"s3://b/in/a.parquet": plan.prefix + "part-00000.parquet"}
        put_bytes(stack, S3Location.parse(summary.parts["s3://b/in/a.parquet"]), b"part", "x/parquet")
        return plan, summary

    # Given runs of one output: one that started two days ago and never finished, one still writing (started a
    # minute ago), then A (30 s ago) and B (10 s ago), both written
    stale, running = written(now - timedelta(days=2), "stale"), written(now - timedelta(minutes=1), "running")
    a, b = written(now - timedelta(seconds=30), "a"), written(now - timedelta(seconds=10), "b")
    # when B publishes first, then A
    publish_output(*b, stack)
    # then A is refused, naming the later run: the output stays B's
    with pytest.raises(ScoringOutputError, match=r"started later .* has published already"):
        publish_output(*a, stack)
    assert read_manifest(output, stack).version == b[0].version
    # and when a newer run publishes on top, clean-up deletes the two-day-old version (older than the longest
    # run, a day) but not the one started a minute ago, which may still be written
    newest = written(now, "newest")
    publish_output(*newest, stack)
    manifest = read_manifest(output, stack)
    assert (manifest.version, manifest.previous) == (newest[0].version, b[0].version)
    assert set(_versions(stack, output)) == {running[0].version, a[0].version, b[0].version, newest[0].version}
    assert stale[0].version < running[0].version < b[0].version  # (older than the kept ones, both)


@pytest.mark.integration
@pytest.mark.slow
def test_scoring_runs_of_one_output_take_turns(stack, default_data, scoring_setup, caplog):
    import contextvars
    import logging

    from adapters.locks import ensure_lock, hold
    from adapters.scoring_store import current_output
    from flows.scoring import ScoringParams, scoring
    from tasks.scoring import scoring_lock_name

    dataset, _ = scoring_setup
    output = f"s3://{stack.bucket}/test-faults/batch/out-turns/"
    caplog.set_level(logging.INFO, logger="tasks.scoring")
    finished: list = []
    # Given another run of the output holding its lock
    with hold(ensure_lock(scoring_lock_name(output)), timeout_seconds=60):
        # when a run of the same output starts and reaches the lock
        params = ScoringParams(dataset=dataset, source=f"{default_data}month=2025-06/", output=output)
        # in this test's context: Prefect's API address is a context setting of the session (tests/conftest.py)
        context = contextvars.copy_context()
        run = threading.Thread(target=context.run, args=(lambda: finished.append(scoring(params)),), daemon=True)
        run.start()
        wait_for(lambda: any("taking the lock of output" in r.getMessage() for r in caplog.records), 300, "the lock")
        # then it has named no version of its own and written nothing while the other holds the lock
        assert _versions(stack, output) == {}
        released = datetime.now(UTC)
    run.join(300)
    # and once the lock is released it goes on: its version is named after the release, and published
    [outcome] = finished
    manifest = current_output(output, stack)
    assert version_started(manifest.version) >= released and outcome.rows > 0
