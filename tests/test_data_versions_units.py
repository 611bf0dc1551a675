"""Frozen data versions, pure parts: the version hash, manifests, blob checks, the retention rule, metric comparison."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta

import pytest

from core.data.data_versions import (
    Manifest,
    TamperedDataError,
    UnknownDataVersionError,
    blob_key,
    build_manifest,
    compare_metrics,
    manifest_key,
    plan_retention,
    verify_blob,
)

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
SOURCE = "s3://mlops/datasets/m/"


def _legacy_version(objects: list[tuple[str, bytes]], source: str) -> str:
    """The loader's data version as it was computed before versions were frozen (the tags of past runs)."""
    digest = hashlib.sha256()
    for name, body in objects:
        digest.update(name.removeprefix(source).encode() + b"\0" + hashlib.sha256(body).digest())
    return digest.hexdigest()[:16]


def _manifest(objects: list[tuple[str, bytes]], age_days: float = 30, model: str = "m") -> Manifest:
    return build_manifest(model, SOURCE, "parquet", objects, 10, ["a", "b"], NOW - timedelta(days=age_days), "run-1")


def _objects(*bodies: bytes) -> list[tuple[str, bytes]]:
    return [(f"{SOURCE}month={i:02d}/part-0.parquet", body) for i, body in enumerate(bodies)]


def test_the_data_version_is_the_one_past_runs_were_tagged_with():
    for objects, source in [
        (_objects(b"jan", b"feb"), SOURCE),
        ([("s3://mlops/one.csv", b"a,b\n1,2\n")], "s3://mlops/one.csv"),  # a single file: its relative name is ""
        ([("query.parquet", b"PAR1...")], "postgresql://db/x"),  # a query's result: one object
    ]:
        manifest = build_manifest("m", source, "parquet", objects, 1, ["a"], NOW, None)
        assert manifest.data_version == _legacy_version(objects, source)


def test_a_manifest_round_trips_and_names_its_files_by_content():
    objects = _objects(b"jan", b"feb")
    manifest = _manifest(objects)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert [f.name for f in manifest.files] == ["month=00/part-0.parquet", "month=01/part-0.parquet"]
    assert manifest.files[0].sha256 == hashlib.sha256(b"jan").hexdigest()
    assert manifest.bytes == 6 and manifest.rows == 10 and manifest.created_at.startswith("2026-11-01")
    assert blob_key(manifest.files[0].sha256) == f"data-versions/blobs/sha256/{manifest.files[0].sha256}"
    assert manifest_key("m", manifest.data_version) == f"data-versions/m/{manifest.data_version}.json"
    manifest.check_version()


def test_an_altered_blob_or_manifest_is_named():
    manifest = _manifest(_objects(b"jan"))
    verify_blob(manifest.data_version, manifest.files[0], b"jan")
    with pytest.raises(TamperedDataError, match=rf"blob {blob_key(manifest.files[0].sha256)}.*altered"):
        verify_blob(manifest.data_version, manifest.files[0], b"jaN")
    edited = Manifest.from_json(manifest.to_json().replace(manifest.files[0].sha256, "00" * 32))
    with pytest.raises(TamperedDataError, match="hash to"):
        edited.check_version()


def test_an_unknown_version_names_it_the_model_and_the_known_ones():
    message = str(UnknownDataVersionError("churn", "deadbeef", ["aaaa", "bbbb"]))
    assert "'deadbeef'" in message and "'churn'" in message and "aaaa, bbbb" in message
    assert "none yet" in str(UnknownDataVersionError("churn", "x", []))


def test_retention_keeps_registered_and_the_last_runs_and_removes_the_rest():
    # Given four versions: v_reg (an old registered version), v_recent (the last run), v_old and v_shared (unused)
    v_reg, v_recent, v_old, v_shared = (
        _manifest(_objects(b"reg")),
        _manifest(_objects(b"recent")),
        _manifest(_objects(b"old", b"common")),
        _manifest(_objects(b"shared", b"common2")),
    )
    runs = [v_recent.data_version, v_recent.data_version, v_old.data_version, v_reg.data_version]  # newest first
    plan = plan_retention(
        [v_reg, v_recent, v_old, v_shared],
        {v_reg.data_version: ["3", "1"]},
        runs,
        keep_runs=2,
        now=NOW,
        min_age=timedelta(hours=24),
        other_models_blobs={v_shared.files[0].sha256},  # another model's version uses this blob
    )
    # Then the registered and the last two runs' versions stay, the others go
    assert plan.keep == {
        v_reg.data_version: "registered: v1, v3",
        v_recent.data_version: "used by one of the last 2 runs",
    }
    assert set(plan.remove) == {v_old.data_version, v_shared.data_version}
    # and only blobs no remaining manifest (of any model) names are removed
    assert set(plan.blobs_removed) == {v_old.files[0].sha256, v_old.files[1].sha256, v_shared.files[1].sha256}
    assert plan.bytes_freed == len(b"old") + len(b"common") + len(b"common2")


def test_retention_keeps_a_version_shared_by_a_kept_one_and_recent_versions():
    kept = _manifest(_objects(b"same"))
    recent = _manifest(_objects(b"new"), age_days=0.01)  # a run in flight: its MLflow run does not exist yet
    plan = plan_retention([kept, recent], {kept.data_version: ["1"]}, [], 0, NOW, timedelta(hours=24))
    assert plan.remove == () and recent.data_version in plan.keep
    plan = plan_retention([kept, recent], {}, [], 0, NOW, timedelta(0))
    assert set(plan.remove) == {kept.data_version, recent.data_version}


def test_metrics_compare_exactly_and_skip_what_depends_on_the_champion_of_the_day():
    original = {"holdout_roc_auc": 0.8123456789012345, "cv_roc_auc": 0.8, "delta_roc_auc": 0.01, "x": float("nan")}
    rows, differing = compare_metrics(original, dict(original, delta_roc_auc=0.0), ("delta_",))
    assert differing == []
    assert {name: verdict for name, *_, verdict in rows}["delta_roc_auc"].startswith("not compared")
    rows, differing = compare_metrics(
        original, dict(original, holdout_roc_auc=math.nextafter(original["holdout_roc_auc"], 1)), ("delta_",)
    )
    assert differing == ["holdout_roc_auc"]  # one ulp counts
    _, differing = compare_metrics(original, {k: v for k, v in original.items() if k != "cv_roc_auc"}, ("delta_",))
    assert differing == ["cv_roc_auc"]
