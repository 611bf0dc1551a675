"""Unit tests of pure functions: decision rules, holdout hashing, metrics, configs, settings."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss

from adapters.clients import S3Location
from adapters.settings import Settings
from core.data.dataset import DatasetConfigError, TaskType, load_local_dataset_config, parse_dataset_config
from core.data.split import holdout_mask
from core.evaluation.decision import (
    NO_CHAMPION,
    ChampionEvidence,
    GateResult,
    Gates,
    HoldoutEvidence,
    decide,
    resolve_gates,
)
from core.evaluation.significance import DeltaInterval, MetricInterval
from core.modeling.metrics import compute_metrics, improvement
from core.transformers import QuantileClipper

GOOD = {"roc_auc": 0.82, "pr_auc": 0.5, "f1": 0.4, "log_loss": 0.35, "brier": 0.1}


# --- promotion decision ---


def _evidence(
    metrics: dict[str, float], n_rows: int = 500, width: float = 0.0, per_class: int = 100
) -> HoldoutEvidence:
    """Holdout evidence whose intervals are `metric +- width` (a point estimate when width is 0)."""
    intervals = [MetricInterval(m, v, v - width, v + width, 0.95, 1000, 0) for m, v in metrics.items()]
    counts = {"0": per_class, "1": per_class} if "roc_auc" in metrics else {}
    return HoldoutEvidence(n_rows, counts, intervals)


def test_cold_start_promotes_when_gates_pass():
    decision = decide(GOOD, NO_CHAMPION, Gates(), holdout=_evidence(GOOD))
    assert decision.promote
    assert any("cold start" in r and "promoted" in r for r in decision.reasons)
    assert [c.gate for c in decision.checks] == ["holdout_size", "min_roc_auc"]


def test_cold_start_rejects_when_a_gate_fails_and_never_states_the_promotion_rule():
    bad = GOOD | {"roc_auc": 0.6}
    decision = decide(bad, NO_CHAMPION, Gates(min_roc_auc=0.7), holdout=_evidence(bad))
    assert not decision.promote
    assert any(r.startswith("gate failed: roc_auc 95% CI lower bound 0.6000") for r in decision.reasons)
    # the rejected run says why it was rejected, not the rule that would have promoted it
    assert not any("is promoted" in r or "so a candidate" in r for r in decision.reasons)
    assert "cold start: no champion yet; not promoted because 1 gate(s) failed" in decision.reasons


def test_cold_start_is_judged_on_the_interval_bound_not_the_point_estimate():
    # point estimate 0.82 clears 0.7, but the 95 % interval reaches down to 0.62: a tiny holdout's luck
    decision = decide(GOOD, NO_CHAMPION, Gates(min_roc_auc=0.7), holdout=_evidence(GOOD, width=0.2))
    assert not decision.promote
    assert decision.checks[1].gate == "min_roc_auc" and not decision.checks[1].passed
    assert "lower bound 0.6200 (point 0.8200" in decision.checks[1].detail
    # loss metrics are judged on the upper bound
    gates = Gates(max_log_loss=0.4)
    assert not decide(GOOD, NO_CHAMPION, gates, holdout=_evidence(GOOD, width=0.1)).promote  # 0.35 + 0.1 > 0.4
    assert decide(GOOD, NO_CHAMPION, gates, holdout=_evidence(GOOD, width=0.04)).promote


def test_cold_start_needs_enough_holdout_rows_and_rows_per_class():
    few_rows = decide(GOOD, NO_CHAMPION, Gates(min_holdout_rows=200), holdout=_evidence(GOOD, n_rows=150))
    assert not few_rows.promote
    assert "gate failed: holdout_size: 150 holdout rows < min_holdout_rows 200" in few_rows.reasons
    few_per_class = decide(GOOD, NO_CHAMPION, Gates(min_holdout_per_class=20), holdout=_evidence(GOOD, per_class=7))
    assert not few_per_class.promote
    assert any("fewer than min_holdout_per_class 20 rows (0: 7, 1: 7)" in r for r in few_per_class.reasons)
    with pytest.raises(ValueError, match="needs the holdout evidence"):
        decide(GOOD, NO_CHAMPION, Gates())


def test_regression_gates_default_to_rmse_and_min_r2():
    metrics = {"rmse": 1.2, "mae": 0.9, "r2": 0.4}
    gates = resolve_gates(Gates(), TaskType.regression)
    assert gates.primary_metric == "rmse"
    decision = decide(metrics, NO_CHAMPION, Gates(), holdout=_evidence(metrics))
    assert decision.promote and decision.primary_metric == "rmse"
    # min_roc_auc (a classification gate) does not apply; min_r2 = 0 does
    assert [c.gate for c in decision.checks] == ["holdout_size", "min_r2"]
    worse_than_the_mean = metrics | {"r2": -0.1}
    assert not decide(worse_than_the_mean, NO_CHAMPION, Gates(), holdout=_evidence(worse_than_the_mean)).promote
    with pytest.raises(ValueError, match="does not apply to a regression task"):
        resolve_gates(Gates(primary_metric="roc_auc"), TaskType.regression)
    with pytest.raises(ValueError, match="does not apply to a binary task"):
        resolve_gates(Gates(primary_metric="rmse"), TaskType.binary)


def test_rejected_with_a_champion_says_why_when_it_beats_it():
    slice_failure = GateResult("slices", False, "slice region=north: roc_auc drop 0.07")
    decision = decide(
        GOOD,
        ChampionEvidence(dict(GOOD), "3"),
        Gates(),
        interval=_interval("roc_auc", 0.02, 0.01, 0.03),
        checks=[slice_failure],
    )
    assert not decision.promote
    assert "not promoted: it beats the champion, but 1 gate(s) failed" in decision.reasons


def _interval(metric: str, delta: float, low: float, high: float) -> DeltaInterval:
    return DeltaInterval(metric, 0.8 + delta, 0.8, delta, low, high, 0.95, 1000, 0)


def test_candidate_must_beat_champion_beyond_noise_by_min_delta():
    champion = GOOD | {"roc_auc": 0.80}
    # the lower bound of the improvement's interval clears min_delta: promoted
    assert decide(
        GOOD, ChampionEvidence(champion, "3"), Gates(min_delta=0.01), interval=_interval("roc_auc", 0.02, 0.012, 0.03)
    ).promote
    # better on the point estimate, but the interval reaches below min_delta: not promoted
    rejected = decide(
        GOOD, ChampionEvidence(champion, "3"), Gates(min_delta=0.01), interval=_interval("roc_auc", 0.02, 0.005, 0.03)
    )
    assert not rejected.promote
    assert any("does not beat the champion beyond noise" in r for r in rejected.reasons)
    assert rejected.interval["low"] == 0.005


def test_equal_candidate_does_not_replace_champion():
    # equal up to noise: the interval straddles zero
    assert not decide(
        GOOD, ChampionEvidence(dict(GOOD), "1"), Gates(), interval=_interval("roc_auc", 0.0, -0.004, 0.004)
    ).promote


def test_a_champion_comparison_needs_the_interval_of_the_primary_metric():
    with pytest.raises(ValueError, match="paired interval of roc_auc"):
        decide(GOOD, ChampionEvidence(dict(GOOD), "1"), Gates())
    with pytest.raises(ValueError, match="paired interval of roc_auc"):
        decide(GOOD, ChampionEvidence(dict(GOOD), "1"), Gates(), interval=_interval("f1", 0.1, 0.05, 0.2))


def test_lower_is_better_metrics_are_compared_in_the_right_direction():
    assert improvement("log_loss", 0.30, 0.35) == pytest.approx(0.05)
    assert improvement("roc_auc", 0.80, 0.85) == pytest.approx(-0.05)
    gates = Gates(primary_metric="log_loss", min_delta=0.01)
    assert decide(
        GOOD | {"log_loss": 0.30}, ChampionEvidence(GOOD, "2"), gates, interval=_interval("log_loss", 0.05, 0.02, 0.08)
    ).promote
    worse = _interval("log_loss", -0.05, -0.08, -0.02)
    assert not decide(GOOD | {"log_loss": 0.40}, ChampionEvidence(GOOD, "2"), gates, interval=worse).promote


def test_a_failed_review_gate_blocks_promotion_and_is_named():
    slice_failure = GateResult("slices", False, "slice region=north: roc_auc 0.7100 vs champion 0.7600")
    decision = decide(
        GOOD, NO_CHAMPION, Gates(), checks=[slice_failure, GateResult("latency", True, "5 ms")], holdout=_evidence(GOOD)
    )
    assert not decision.promote
    assert "gate failed: slices: slice region=north: roc_auc 0.7100 vs champion 0.7600" in decision.reasons
    assert [c.gate for c in decision.checks] == ["holdout_size", "min_roc_auc", "slices", "latency"]


def test_unscorable_champion_blocks_promotion():
    decision = decide(GOOD, ChampionEvidence(None, "4", "KeyError: 'age'"), Gates())
    assert not decision.promote
    assert any("could not be scored" in r for r in decision.reasons)


def test_max_gates():
    decision = decide(GOOD, NO_CHAMPION, Gates(max_brier=0.05, max_log_loss=0.3), holdout=_evidence(GOOD))
    assert not decision.promote
    assert len([r for r in decision.reasons if r.startswith("gate failed")]) == 2


# --- frozen holdout ---


def test_holdout_depends_only_on_id_and_salt():
    ids = pd.Series([f"A{i:07d}" for i in range(20000)])
    mask = holdout_mask(ids, 0.2, "salt")
    assert 0.18 < mask.mean() < 0.22
    # the same id is held out whatever the order or the other rows
    shuffled = ids.sample(frac=1, random_state=1)
    assert (holdout_mask(shuffled, 0.2, "salt") == mask[shuffled.index]).all()
    assert (holdout_mask(ids[:500], 0.2, "salt") == mask[:500]).all()
    # a new salt draws a different holdout
    assert (holdout_mask(ids, 0.2, "other") != mask).any()


# --- metrics ---


def test_binary_metrics_match_sklearn_and_perfect_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    proba1 = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    metrics = compute_metrics(y, np.column_stack([1 - proba1, proba1]), [0, 1])
    assert metrics["roc_auc"] == 1.0
    assert metrics["f1"] == 1.0
    assert metrics["brier"] == pytest.approx(brier_score_loss(y, proba1))


def test_multiclass_metrics_are_macro():
    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], size=300)
    proba = rng.dirichlet([1, 1, 1], size=300)
    metrics = compute_metrics(y, proba, ["a", "b", "c"])
    assert 0.4 < metrics["roc_auc"] < 0.6
    assert set(metrics) == {"roc_auc", "pr_auc", "f1", "log_loss", "brier"}


def test_regression_metrics_match_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    y = rng.normal(10, 3, size=400)
    predicted = y + rng.normal(0, 1.5, size=400)
    metrics = compute_metrics(y, predicted, [])
    assert metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, predicted)), abs=1e-12)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y, predicted), abs=1e-12)
    assert metrics["r2"] == pytest.approx(r2_score(y, predicted), abs=1e-12)


def test_metrics_reject_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        compute_metrics([0, 1], np.array([[0.5], [0.5]]), [0, 1])


# --- clipping ---


def test_quantile_clipper_clips_to_training_quantiles_and_keeps_nan():
    X = np.column_stack([np.arange(1000.0), np.arange(1000.0) * 2])
    clipper = QuantileClipper(lower=0.01, upper=0.99).fit(X)
    out = clipper.transform(np.array([[-1e9, 1e9], [np.nan, 500.0]]))
    assert out[0, 0] == pytest.approx(np.quantile(X[:, 0], 0.01))
    assert out[0, 1] == pytest.approx(np.quantile(X[:, 1], 0.99))
    assert np.isnan(out[1, 0]) and out[1, 1] == 500.0


# --- configs and settings ---


def test_bundled_config_is_valid():
    config = load_local_dataset_config("credit-risk")
    assert config.target == "default" and config.id_column == "application_id"
    assert len(config.numeric_features) >= 5 and len(config.categorical_features) >= 3


def test_bad_config_names_the_field():
    with pytest.raises(DatasetConfigError, match=r"features\.0\.type"):
        parse_dataset_config(
            "name: x\nmodel_name: x\nsource: s3://b/p\ntarget: y\nid_column: id\nfeatures: [{name: a, type: text}]\n",
            "test.yaml",
        )
    with pytest.raises(DatasetConfigError, match="target 'a' must not also be a feature"):
        parse_dataset_config(
            "name: x\nmodel_name: x\nsource: s3://b/p\ntarget: a\nid_column: id\n"
            "features: [{name: a, type: numeric}]\n",
            "test.yaml",
        )


def test_missing_config_file_is_named():
    with pytest.raises(DatasetConfigError, match=r"nope\.yaml"):
        load_local_dataset_config("nope.yaml")


def test_settings_follow_standard_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.example:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    settings = Settings()
    assert settings.s3_endpoint_url == "http://s3.example:9000"
    assert settings.mlflow_tracking_uri == "http://mlflow.example:5000"
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings.model_dump())


def test_s3_location_parsing():
    loc = S3Location.parse("s3://bucket/a/b/")
    assert (loc.bucket, loc.key) == ("bucket", "a/b/")
    assert loc.child("c.parquet").uri == "s3://bucket/a/b/c.parquet"
    with pytest.raises(ValueError, match="not an s3"):
        S3Location.parse("/local/path")


# --- review gates ---


def test_schema_gate_blocks_inputs_that_would_break_callers():
    from core.evaluation.review import schema_gate

    champion = {"age": "numeric", "region": "text", "income": "numeric"}
    assert schema_gate({"age": "numeric", "region": "text"}, champion, False).passed  # a dropped input is fine
    broken = schema_gate({"age": "text", "region": "text", "tenure": "numeric"}, champion, False)
    assert not broken.passed
    assert "new required input 'tenure'" in broken.detail and "'age' changes from numeric to text" in broken.detail
    assert schema_gate({"tenure": "numeric"}, champion, True).passed  # deliberately allowed
    assert schema_gate({"tenure": "numeric"}, None, False).passed  # cold start


def test_operational_gates_measure_size_and_latency():
    from sklearn.linear_model import LogisticRegression

    from core.evaluation.review import operational_gates

    X = pd.DataFrame({"a": np.arange(100, dtype=float), "b": np.arange(100, dtype=float) % 7})
    model = LogisticRegression().fit(X, (X["a"] > 50).astype(int))
    results = {r.gate: r for r in operational_gates(model, X.head(1), Gates(max_model_mb=1, max_latency_ms=1000))}
    assert results["model_size"].passed and results["latency"].passed
    tight = {r.gate: r for r in operational_gates(model, X.head(1), Gates(max_model_mb=1e-6, max_latency_ms=1e-6))}
    assert not tight["model_size"].passed and not tight["latency"].passed
    assert "limit" in tight["latency"].detail


def test_prediction_log_table_keeps_every_row_and_each_models_classes():
    from datetime import UTC, datetime

    from serving.prediction_log import Entry, to_table

    frame = pd.DataFrame({"age": [30.0, 40.0], "region": ["north", None]})
    at = datetime(2026, 1, 2, tzinfo=UTC)
    ids = np.array(["A1", None], dtype=object)
    binary = Entry(frame, np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 1], np.array(["a", "a"]), "3", at, ids)
    three = Entry(frame.head(1), np.array([[0.2, 0.3, 0.5]]), [0, 1, 2], np.array(["c"]), "4", at)
    table = to_table([binary, three])
    assert list(table["request_id"]) == ["a", "a", "c"]
    # each record's own id where it sent one (labels join on it), null elsewhere; Parquet keeps it as text
    assert list(table["record_id"]) == ["A1", None, None]
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    assert pd.read_parquet(buffer)["record_id"].tolist() == ["A1", None, None]
    assert list(table["model_version"]) == ["3", "3", "4"]
    assert list(table["predicted"]) == [0, 1, 2]
    assert table["proba_1"].tolist() == [0.1, 0.8, 0.3]
    assert np.isnan(table["proba_2"].iloc[0]) and table["proba_2"].iloc[2] == 0.5
    assert (table["predicted_at"] == pd.Timestamp(at)).all()


def _spooled(entries):
    """Entries through the spool's line format (orjson, as the serving API writes them) and back."""
    import orjson

    from core.monitoring.prediction_log import spooled_batch

    option = orjson.OPT_SERIALIZE_NUMPY
    return [orjson.loads(orjson.dumps(spooled_batch(e), option=option)) for e in entries]


def test_spooled_lines_give_the_same_table_as_the_in_memory_log():
    from datetime import UTC, datetime, timedelta

    from core.monitoring.prediction_log import Entry, spooled_table, to_table

    # Given batches of two models (binary, then three classes), with NaN inputs, ids and record indices
    frame = pd.DataFrame({"age": [30.0, np.nan, 41.5], "region": ["north", None, "south"]})
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    binary = Entry(
        frame,
        np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]),
        [0, 1],
        np.array(["a", "a", "b"], dtype=object),
        "3",
        at,
        np.array(["A1", None, None], dtype=object),
        np.array([0, 1, 0]),
    )
    later = Entry(frame.head(1), np.array([[0.3, 0.7]]), [0, 1], np.array(["c"], dtype=object), "3", at + timedelta(1))
    three = Entry(frame.head(1), np.array([[0.2, 0.3, 0.5]]), [0, 1, 2], np.array(["d"]), "4", at, None, np.array([0]))
    expected = to_table([binary, later, three])
    # when they go through the spool's JSON lines
    got = spooled_table(_spooled([binary, later, three]))
    # then the table is the one the in-memory log writes: values, dtypes, per-batch times, indices
    pd.testing.assert_frame_equal(got, expected, check_dtype=True)
    assert got["predicted_at"].tolist() == [pd.Timestamp(at)] * 3 + [pd.Timestamp(at + timedelta(1)), pd.Timestamp(at)]
    assert got["record_index"].tolist() == [0, 1, 0, -1, 0]  # -1: the batch sent none
    assert np.isnan(got["age"].iloc[1]) and got["region"].iloc[1] is None
    # and a regressor's values (no classes, one score per record) come back the same way
    value = Entry(frame, np.array([1.5, np.nan, -2.0]), [], np.array(["e", "e", "e"], dtype=object), "5", at)
    pd.testing.assert_frame_equal(spooled_table(_spooled([value])), to_table([value]), check_dtype=True)
    # a batch's call time (a rollout compares the versions' p50 and p99) comes back per row, NaN where none was kept
    timed = Entry(frame.head(2), np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 1], np.array(["f", "f"]), "3", at, call_ms=2.5)
    table = spooled_table(_spooled([timed, later]))
    pd.testing.assert_frame_equal(table, to_table([timed, later]), check_dtype=True)
    assert table["call_ms"].tolist()[:2] == [2.5, 2.5] and np.isnan(table["call_ms"].iloc[2])


def test_duplicate_log_rows_are_dropped_by_request_and_record_index_only():
    from datetime import UTC, datetime

    from core.monitoring.prediction_log import Entry, drop_duplicates, to_table

    at = datetime(2026, 1, 2, tzinfo=UTC)
    frame = pd.DataFrame({"age": [1.0, 2.0]})
    batch = Entry(frame, np.array([[0.4, 0.6], [0.1, 0.9]]), [0, 1], np.array(["r", "r"]), "1", at, None, np.arange(2))
    later = datetime(2026, 1, 3, tzinfo=UTC)
    reused = Entry(frame.head(1), np.array([[0.5, 0.5]]), [0, 1], np.array(["r"]), "1", later, None, np.arange(1))
    old = Entry(frame.head(1), np.array([[0.5, 0.5]]), [0, 1], np.array(["o"]), "1", at)  # before record_index
    # Given a segment uploaded twice, a client reusing its request id a day later, and old rows without an index
    table = pd.concat([to_table([batch, old]), to_table([batch, reused, old])], ignore_index=True)
    kept = drop_duplicates(table)
    # then each record of each answer is kept once; nothing identifies old rows, so all of them stay
    assert sorted(zip(kept["request_id"], kept["record_index"], strict=True)) == [
        ("o", -1),
        ("o", -1),
        ("r", 0),
        ("r", 0),
        ("r", 1),
    ]
    assert kept["predicted_at"].nunique() == 2
    assert len(drop_duplicates(kept)) == len(kept)


def test_spool_segments_are_durable_lines_uploaded_once_and_orphans_are_adopted(tmp_path, monkeypatch, caplog):
    """The spool's file logic, with S3 replaced by a dict (the real S3 is in tests/test_faults_serving.py)."""
    from adapters import prediction_spool
    from adapters.prediction_spool import read_segment
    from adapters.settings import Settings
    from serving.prediction_log import ScoredBatch, SpooledPredictionLog

    uploaded: dict[str, bytes] = {}
    failing = {"on": False}

    class FakeS3:
        def put_object(self, Bucket, Key, Body):
            if failing["on"]:
                raise ConnectionError("S3 down")
            uploaded[Key] = Body

    monkeypatch.setattr(prediction_spool, "s3_client", lambda settings: FakeS3())
    settings = Settings(state_dir=tmp_path, serving_spool_max_bytes=4096)
    events: list[tuple[str, int]] = []

    def spooled(name: str = "m") -> SpooledPredictionLog:
        log = SpooledPredictionLog(settings, name, flush_seconds=3600, on_event=lambda k, n: events.append((k, n)))
        log.spool.open()  # start() without its thread: rounds are run by hand below
        return log

    def record(log, request_id: str) -> None:
        frame = pd.DataFrame({"x": [1.0]})
        log.record(ScoredBatch(frame, np.array([[0.3, 0.7]]), [0, 1], np.array([request_id]), "1", None, np.array([0])))

    # Given a process that spooled 3 predictions and died (its lock released, segment left on disk)
    dead = spooled()
    for i in range(3):
        record(dead, f"dead-{i}")
    dead_folder = dead.spool.folder
    (segment,) = dead_folder.glob("*.jsonl")
    segment.open("ab").write(b'{"torn": ')  # a write that never completed (never synced, never answered)
    dead.spool.close()
    # and a live one
    live = spooled()
    record(live, "live-0")
    assert len(read_segment(next(live.spool.folder.glob("*.jsonl")))[0]) == 1  # on disk before any upload
    # when S3 is down, nothing is deleted
    failing["on"] = True
    assert live.adopt() == 0 and dead_folder.exists()
    live.spool.roll()
    assert live.upload_own() == 1 and ("failed", 1) in events
    # and once S3 is back, the orphan is adopted (3 rows, torn line skipped) and the live rows go too
    failing["on"] = False
    assert live.adopt() == 1 and not dead_folder.exists()
    assert live.upload_own() == 0 and not list(live.spool.folder.glob("*.jsonl"))
    tables = {k: pd.read_parquet(io.BytesIO(v)) for k, v in uploaded.items()}
    rows = pd.concat(tables.values())
    assert sorted(rows["request_id"]) == ["dead-0", "dead-1", "dead-2", "live-0"]
    # each key names its segment: the owner folder and the segment number, under the segment's date folder
    assert all(k.startswith("predictions/serving/m/date=") for k in tables)
    assert any(dead_folder.name in k for k in tables) and any(live.spool.folder.name in k for k in tables)
    # a live process's folder is never adopted
    other = spooled()
    assert other.adopt() == 0 and live.spool.folder.exists()
    # at the bound, predictions are dropped, counted and reported as errors, not written
    events.clear()
    caplog.set_level("ERROR", logger="serving.prediction_log")
    for i in range(100):
        record(live, f"many-{i}")
    assert ("dropped", 1) in events and live.spool.bytes <= 4096
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("spool full" in m and "NOT logged" in m for m in errors), errors
    written = sum(len(read_segment(p)[0]) for p in live.spool.folder.glob("*.jsonl"))
    assert written + sum(n for k, n in events if k == "dropped") == 100
    for log in (live, other):
        log.spool.close()


def test_spool_sync_modes_write_before_the_answer_and_sync_when_told(tmp_path, monkeypatch):
    """batch: the line is in the file (the kernel's) when `record` returns, fdatasync comes from `sync()`;
    always: fdatasync inside `record`. Counted through os.fdatasync itself."""
    import os

    from adapters import prediction_spool
    from adapters.prediction_spool import read_segment
    from adapters.settings import Settings
    from serving.prediction_log import ScoredBatch, SpooledPredictionLog

    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(prediction_spool.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    frame = pd.DataFrame({"x": [1.0]})

    def record(log, request_id: str) -> None:
        log.record(ScoredBatch(frame, np.array([[0.3, 0.7]]), [0, 1], np.array([request_id]), "1", None, np.array([0])))

    batch = SpooledPredictionLog(Settings(state_dir=tmp_path / "b", serving_spool_sync="batch"), "m")
    batch.spool.open()
    for i in range(5):
        record(batch, f"r{i}")
    (segment,) = batch.spool.folder.glob("*.jsonl")
    assert len(read_segment(segment)[0]) == 5 and synced == []  # written, visible to any reader, not synced yet
    batch.spool.sync()
    batch.spool.sync()  # nothing new: no second sync
    assert len(synced) == 1
    batch.spool.close()

    synced.clear()
    always = SpooledPredictionLog(Settings(state_dir=tmp_path / "a", serving_spool_sync="always"), "m")
    always.spool.open()
    for i in range(3):
        record(always, f"r{i}")
    assert len(synced) == 3
    always.spool.close()


def test_the_serving_check_counts_every_worker_process_not_the_one_that_answered():
    from adapters.serving_api import served_versions

    two = {"version": "3", "workers": [{"pid": 1, "version": "3"}, {"pid": 2, "version": "2"}]}
    assert served_versions(two) == {"3", "2"}  # one process still serves v2: not yet
    assert served_versions({"version": "3", "workers": [{"pid": 1, "version": "3"}, {"pid": 2, "version": "3"}]}) == {
        "3"
    }
    assert served_versions({"version": 3}) == {"3"}  # a single-process API without a workers list
    assert served_versions({"detail": "no model loaded yet"}) == {None}


def test_spool_records_strided_arrays_a_batch_cut_from_a_matrix(tmp_path):
    """Columns cut from a 2-d batch and a class slice of the scores are strided views: they are logged all the same."""
    from adapters.prediction_spool import read_segment
    from adapters.settings import Settings
    from core.monitoring.prediction_log import spooled_table
    from serving.prediction_log import ScoredBatch, SpooledPredictionLog

    events: list[tuple[str, int]] = []
    log = SpooledPredictionLog(
        Settings(state_dir=tmp_path), "m", flush_seconds=3600, on_event=lambda k, n: events.append((k, n))
    )
    log.spool.open()
    matrix = np.asfortranarray(np.arange(12, dtype="float64").reshape(4, 3))
    columns = {"a": matrix[:, 0], "b": matrix[::1, 2]}  # Fortran order: a row-wise view is not C-contiguous
    scores = np.arange(16, dtype="float64").reshape(4, 4)[:, 1:3]  # two classes sliced from four: strided
    assert not columns["a"].flags["C_CONTIGUOUS"] or not scores.flags["C_CONTIGUOUS"]
    log.record(ScoredBatch(columns, scores, [0, 1], ["r"] * 4, "1", None, list(range(4))))
    (segment,) = log.spool.folder.glob("*.jsonl")
    lines, _ = read_segment(segment)
    table = spooled_table(lines)
    assert ("dropped", 4) not in events and len(table) == 4
    assert table["a"].tolist() == [0.0, 3.0, 6.0, 9.0] and table["b"].tolist() == [2.0, 5.0, 8.0, 11.0]
    assert table["proba_1"].tolist() == [2.0, 6.0, 10.0, 14.0]  # the sliced scores' second column, row by row
    log.spool.close()


def test_the_io_retry_backoff_is_the_setting_on_every_io_task():
    """`MLOPS_IO_RETRY_DELAYS` sets the retries of every task that touches the network (read at import)."""
    import json
    import subprocess
    import sys

    probe = (
        "import json\n"
        "from tasks.promotion import promote\n"
        "from tasks.reports import publish_model_card\n"
        "print(json.dumps([[t.retries, t.retry_delay_seconds] for t in (promote, publish_model_card)]))\n"
    )
    for setting, expected in ((None, [3, [2, 5, 15]]), ("[1, 4]", [2, [1, 4]]), ("[]", [0, []])):
        env = {k: v for k, v in os.environ.items() if k != "MLOPS_IO_RETRY_DELAYS"}
        if setting is not None:
            env["MLOPS_IO_RETRY_DELAYS"] = setting
        out = subprocess.run(
            [sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [expected, expected], setting


def test_mlflow_requests_skip_feasts_header_provider_and_never_import_feast():
    # A fresh interpreter, as a flow run or the serving API starts: the first MLflow request reads the
    # request-header providers. Feast's (installed with feast) is left out, so feast is never imported.
    import subprocess
    import sys
    from importlib.metadata import entry_points

    assert "feast" in {point.name for point in entry_points(group="mlflow.request_header_provider")}
    script = (
        "import sys\n"
        "from adapters.clients import mlflow_client\n"
        "from adapters.settings import Settings\n"
        "mlflow_client(Settings())\n"
        "from mlflow.tracking.request_header.registry import _request_header_provider_registry as registry\n"
        "print(sorted(type(p).__name__ for p in registry), 'feast' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[0] == "['DatabricksRequestHeaderProvider', 'DefaultRequestHeaderProvider'] False"


def test_a_spool_write_cut_short_leaves_no_partial_line(tmp_path):
    # A real short write: in a child process whose files may not grow past 1,000 bytes (RLIMIT_FSIZE; SIGXFSZ
    # ignored, so write() returns the bytes it could write, then fails with EFBIG)
    import subprocess
    import sys

    script = f"""
import json, os, resource, signal
from datetime import UTC, datetime
from pathlib import Path
from adapters.prediction_spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
spool = Spool(Path({str(tmp_path)!r}) / "spool", max_bytes=10**6)
spool.open()
outcomes = []
for i in range(5):
    line = (json.dumps({{"i": i, "pad": "x" * 280}}) + "\\n").encode()
    try:
        outcomes.append(spool.append(line, datetime.now(UTC)))
    except OSError as exc:
        outcomes.append(type(exc).__name__)
print(json.dumps(outcomes))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    outcomes = json.loads(result.stdout.splitlines()[-1])
    # then three 299-byte lines fit; the fourth is cut short and fails, and so does the fifth
    assert outcomes == [True, True, True, "OSError", "OSError"]
    [segment] = (tmp_path / "spool").glob("*/*.jsonl")
    text = segment.read_bytes()
    # and the segment holds the three whole lines only: nothing of the fourth glues onto a later line
    assert text.endswith(b"\n") and [json.loads(line)["i"] for line in text.splitlines()] == [0, 1, 2]


def test_two_requests_with_one_request_id_in_one_micro_batch_stay_two_rows(tmp_path):
    from types import SimpleNamespace

    from adapters.prediction_spool import read_segment
    from adapters.settings import Settings
    from core.monitoring.prediction_log import drop_duplicates, spooled_table
    from serving.batching import Job
    from serving.prediction_log import SpooledPredictionLog
    from serving.runtime import Runtime

    # Given two requests sent at once with the same x-request-id, scored in one micro-batch
    model = SimpleNamespace(classes=[0, 1], version="7")
    jobs = [Job(model, [{"x": 1.0}], "same-id", None), Job(model, [{"x": 2.0}], "same-id", None)]
    log = SpooledPredictionLog(Settings(state_dir=tmp_path), "m")
    log.spool.open()
    Runtime._log_predictions(log, jobs, {"x": np.array([1.0, 2.0])}, np.array([[0.3, 0.7], [0.6, 0.4]]), 0.002)
    log.spool.close()
    # when monitoring reads the log (a segment read twice, as after a crash between upload and deletion)
    (segment,) = log.spool.folder.glob("*.jsonl")
    lines = read_segment(segment)[0]
    table = drop_duplicates(pd.concat([spooled_table(lines), spooled_table(lines)], ignore_index=True))
    # then both answers are there once each: the re-read copy goes, the colliding request does not
    assert sorted(table["x"]) == [1.0, 2.0] and table["request_id"].tolist() == ["same-id", "same-id"]
    assert sorted(table["request_seq"]) == [0, 1]


def test_the_search_ships_to_the_cluster_only_from_the_configured_training_cells():
    from tasks.training import search_address

    settings = Settings(search_cluster_min_cells=1_000)
    assert search_address("tcp://127.0.0.1:8786", 199, 5, settings) is None  # 995 cells: in this process
    assert search_address("tcp://127.0.0.1:8786", 200, 5, settings) == "tcp://127.0.0.1:8786"
    assert search_address(None, 10**9, 100, settings) is None  # no cluster: in this process, whatever the size
    assert search_address("tcp://h:1", 1, 1, Settings(search_cluster_min_cells=0)) == "tcp://h:1"


def test_a_validation_beside_the_search_stops_it_and_names_the_cause_not_the_symptom():
    from concurrent.futures import Future

    from core.data.validation import DataValidationError, ExpectationFailure, ValidationReport
    from tasks.preparation import PreparedData

    class Running:  # a thread pool task's future, as Prefect wraps it
        def __init__(self) -> None:
            self.wrapped_future: Future = Future()

        def result(self) -> ValidationReport:
            return self.wrapped_future.result(timeout=5)

    failed = ValidationReport(False, 3, [ExpectationFailure("expect_column_values_to_be_of_type", "age", "text")])
    validation = Running()
    data = PreparedData(None, pd.DataFrame({"age": ["forty"]}), None, validation)
    data.stop_if_invalid()  # still running: the search goes on
    validation.wrapped_future.set_result(failed)
    with pytest.raises(DataValidationError, match="'age'"):
        data.stop_if_invalid()  # finished and failed: the search stops at its next trial
    symptom = ValueError("could not convert string to float: 'forty'")
    with pytest.raises(DataValidationError, match="'age'") as raised:
        data.raise_if_invalid(symptom)
    assert raised.value.__cause__ is symptom
    passed = PreparedData(None, pd.DataFrame(), None, ValidationReport(True, 3, []))
    passed.raise_if_invalid(symptom)  # valid data: the symptom is the cause, left as it is
    assert passed.report.success


def test_s3_requests_side_by_side_keep_the_items_order_and_raise_a_failure():
    import time as clock

    from adapters.clients import S3_REQUESTS_AT_ONCE, map_s3_requests

    def slow_first(i: int) -> int:
        clock.sleep(0.05 if i == 0 else 0)  # the first finishes last
        return i * i

    assert map_s3_requests(slow_first, list(range(3 * S3_REQUESTS_AT_ONCE))) == [i * i for i in range(24)]
    assert map_s3_requests(slow_first, []) == []

    def fails_on_two(i: int) -> int:
        if i == 2:
            raise OSError("S3 went away on item 2")
        return i

    with pytest.raises(OSError, match="item 2"):
        map_s3_requests(fails_on_two, [0, 1, 2, 3])


HALF_IMPORTED_PYPLOT = """
import importlib.abc, importlib.machinery, sys, threading, time
import numpy as np

class SlowPyplot(importlib.abc.MetaPathFinder):
    # matplotlib.pyplot sits in sys.modules, not yet executed, for 2 s: another thread importing it
    def find_spec(self, name, path, target=None):
        if name != "matplotlib.pyplot":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module
        def slow(module):
            time.sleep(2)
            execute(module)
        spec.loader.exec_module = slow
        return spec

sys.meta_path.insert(0, SlowPyplot())
import matplotlib
from core.modeling.metrics import evaluation_figures, regression_figures
threading.Thread(target=lambda: __import__("matplotlib.pyplot")).start()
time.sleep(0.5)  # the thread's import is under way
assert "matplotlib.pyplot" in sys.modules and not hasattr(sys.modules["matplotlib.pyplot"], "switch_backend")
y = np.array([0, 1] * 50)
drawn = evaluation_figures(y, np.column_stack([1 - y * 0.8, y * 0.8 + 0.1]), [0, 1])
drawn |= regression_figures(np.arange(10.0), np.arange(10.0) + 0.5)
print(sorted(drawn), matplotlib.get_backend())
"""


def test_the_figures_wait_for_pyplot_half_imported_by_another_thread():
    """The training flow imports pyplot beside the search; after a short search the evaluation drew while that
    import was under way and failed ("partially initialized module 'matplotlib.pyplot' has no attribute
    'switch_backend'", the act test twice). The figures now wait for the import."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", HALF_IMPORTED_PYPLOT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'confusion_matrix.png'" in done.stdout and "'residuals.png'" in done.stdout, done.stdout
    assert done.stdout.strip().lower().endswith("agg"), done.stdout


def test_test_ports_come_from_below_the_kernels_ephemeral_range_and_never_twice(monkeypatch):
    """A port the kernel could give another server (bind to port 0) between its choice and its bind is not chosen."""
    import socket
    from pathlib import Path

    from tests import ports

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setattr(ports, "_cursor", {})
    chosen = [ports.free_port() for _ in range(40)]
    block = ports.free_port_block(16)
    assert len(set(chosen)) == 40 and block not in chosen
    assert all(ports.LOWEST <= port < low for port in [*chosen, block + 15])
    assert all(port in ports._slice() for port in [*chosen, block, block + 15])  # gw1's slice
    with socket.socket() as other:  # the kernel's own choice for a server binding port 0 is never among them
        other.bind(("127.0.0.1", 0))
        assert other.getsockname()[1] >= low
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert set(ports._slice()).isdisjoint(range(block, block + 16))  # another worker's slice
