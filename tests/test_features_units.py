"""Feature store units: history aggregates, the point-in-time join against an independent pandas reference,
the planted future event, the TTL trap counted, and the dataset config's feature-service fields.

Feast runs for real here (a library, no server): a local Parquet offline source, a local registry file and
a SQLite online store in a temp folder. The stack-backed path (S3, serving) is in tests/test_features.py.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pandas as pd
import pytest

from core.dataset import DatasetConfigError, bundled_config_text, parse_dataset_config
from core.feature_history import (
    ENTITY_TIMESTAMP,
    HISTORY_FEATURES,
    complete_join,
    history_features,
    join_report,
    with_join,
)
from core.feature_repo import ENTITY_KEY, HISTORY_TTL, definitions
from core.synthetic import generate_frame, generate_history
from core.validation import ValidationReport

KEYS = [ENTITY_KEY, ENTITY_TIMESTAMP]
SERVICE = "credit_risk_history"


def _ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def _local_store(tmp_path, table: pd.DataFrame):
    from feast import FeatureStore, RepoConfig

    path = tmp_path / "history.parquet"
    table.to_parquet(path, index=False)
    config = RepoConfig(
        project="unit",
        provider="local",
        registry=str(tmp_path / "registry.db"),
        online_store={"type": "sqlite", "path": str(tmp_path / "online.db")},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    store = FeatureStore(config=config)
    store.apply(definitions(str(path), None))
    return store


def _feast_join(store, rows: pd.DataFrame) -> pd.DataFrame:
    joined = store.get_historical_features(entity_df=rows, features=store.get_feature_service(SERVICE)).to_df()
    joined[ENTITY_TIMESTAMP] = pd.to_datetime(joined[ENTITY_TIMESTAMP], utc=True)
    return joined


def _reference(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Independent point-in-time join: newest feature row at or before each row's time, within the TTL."""
    left = rows.sort_values(ENTITY_TIMESTAMP)
    right = table.sort_values(ENTITY_TIMESTAMP).rename(columns={ENTITY_TIMESTAMP: "feature_time"})
    right[ENTITY_TIMESTAMP] = right["feature_time"]
    merged = pd.merge_asof(left, right, on=ENTITY_TIMESTAMP, by=ENTITY_KEY, direction="backward")
    stale = merged["feature_time"].isna() | (merged[ENTITY_TIMESTAMP] - merged["feature_time"] > HISTORY_TTL)
    merged.loc[stale, HISTORY_FEATURES] = None
    return rows.merge(merged.drop(columns="feature_time"), on=KEYS, how="left")


def test_history_aggregates_by_hand():
    events = pd.DataFrame(
        {
            ENTITY_KEY: ["a", "a", "a", "a", "b"],
            ENTITY_TIMESTAMP: [
                _ts("2025-01-01"),
                _ts("2025-02-01"),
                _ts("2025-03-01"),
                _ts("2025-04-01"),
                _ts("2025-01-15"),
            ],
            "delinquent": [0, 1, 0, 1, 1],
            "utilization": [0.2, 0.4, 0.6, 0.8, 0.5],
        }
    )
    table = history_features(events, ENTITY_KEY)
    a = table[table[ENTITY_KEY] == "a"]
    assert a["prev_applications"].tolist() == [1, 2, 3, 4]
    assert a["past_delinquencies"].tolist() == [0, 1, 1, 2]
    assert a["last_utilization"].tolist() == [0.2, 0.4, 0.6, 0.8]
    assert a["mean_utilization_3"].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.6])
    b = table[table[ENTITY_KEY] == "b"].iloc[0]
    assert (b["prev_applications"], b["past_delinquencies"], b["mean_utilization_3"]) == (1, 1, 0.5)


def test_point_in_time_join_equals_merge_asof_and_never_leaks_the_future(tmp_path):
    # Given generated applications, their history (30 % of applicants with an event AFTER the application,
    # delinquent exactly when the application defaulted) and one more planted future event
    applications = generate_frame(1500, seed=3, n_months=3)
    events = generate_history(applications, seed=3)
    planted_id = applications[ENTITY_KEY].iloc[0]
    planted_at = pd.Timestamp(applications["application_date"].iloc[0], tz="UTC") + pd.Timedelta(hours=1)
    planted = pd.DataFrame(
        {ENTITY_KEY: [planted_id], ENTITY_TIMESTAMP: [planted_at], "delinquent": [1], "utilization": [1.4999]}
    )
    events = pd.concat([events, planted], ignore_index=True)
    table = history_features(events, ENTITY_KEY)
    store = _local_store(tmp_path, table)
    rows = pd.DataFrame(
        {
            ENTITY_KEY: applications[ENTITY_KEY],
            ENTITY_TIMESTAMP: pd.to_datetime(applications["application_date"], utc=True),
        }
    )
    # when Feast joins each application as of its own date
    joined = _feast_join(store, rows)
    completed, rows_out, dropped = complete_join(rows, joined, KEYS, HISTORY_FEATURES)
    # then every row's features equal the independent merge_asof reference (nulls where it has none)
    expected = _reference(rows, table)
    pd.testing.assert_frame_equal(
        completed[HISTORY_FEATURES].astype("float64"), expected[HISTORY_FEATURES].astype("float64"), check_names=True
    )
    # and no feature row later than the application reached it: the planted value never appears
    assert not (completed["last_utilization"] == 1.4999).any()
    assert not (completed["last_utilization"] == 1.5).any()  # the generator's future events carry 1.5
    later = table.merge(rows, on=ENTITY_KEY, suffixes=("", "_row"))
    assert (later[ENTITY_TIMESTAMP] > later[f"{ENTITY_TIMESTAMP}_row"]).sum() > 300  # the future is really there
    # and the counts add up: rows in = rows returned + rows Feast dropped; nothing silently lost
    assert len(completed) == len(rows) == rows_out + dropped
    report = join_report(SERVICE, len(rows), rows_out, dropped, completed, HISTORY_FEATURES, 0.5)
    assert report.missing == int(expected[HISTORY_FEATURES].isna().all(axis=1).sum())


def test_rows_before_all_feature_data_or_beyond_the_ttl_are_counted_not_lost(tmp_path):
    # Given one entity with one feature row, and three training rows: before it, just after, beyond the TTL
    table = history_features(
        pd.DataFrame(
            {ENTITY_KEY: ["a"], ENTITY_TIMESTAMP: [_ts("2025-06-01")], "delinquent": [1], "utilization": [0.3]}
        ),
        ENTITY_KEY,
    )
    store = _local_store(tmp_path, table)
    rows = pd.DataFrame(
        {
            ENTITY_KEY: ["a", "a", "a"],
            ENTITY_TIMESTAMP: [
                _ts("2025-05-01"),
                _ts("2025-06-02"),
                _ts("2025-06-01") + HISTORY_TTL + pd.Timedelta(days=2),
            ],
        }
    )
    joined = _feast_join(store, rows)
    completed, rows_out, dropped = complete_join(rows, joined, KEYS, HISTORY_FEATURES)
    report = join_report(SERVICE, len(rows), rows_out, dropped, completed, HISTORY_FEATURES, 0.5)
    # then only the middle row has features; the other two are counted, whatever Feast did with them
    assert completed["last_utilization"].tolist()[1] == 0.3
    assert completed[HISTORY_FEATURES].iloc[[0, 2]].isna().all().all()
    assert (report.rows_in, report.missing) == (3, 2)
    assert report.rows_out + report.rows_dropped == 3
    # and a share of 2/3 fails validation under a 50 % limit, the counts in the failure
    validated = with_join(ValidationReport(True, 10, []), report)
    assert not validated.success and validated.n_expectations == 11
    [failure] = validated.failures
    assert failure.expectation == "feature_store_join"
    assert re.search(r"3 rows in, .* 66\.7% without store features \(limit 50\.0%\)", failure.detail)
    assert validated.statistics["feature_join"]["rows_in"] == 3
    # and under a 70 % limit it passes, the counts still reported
    relaxed = with_join(ValidationReport(True, 10, []), replace(report, max_missing_share=0.7))
    assert relaxed.success and relaxed.statistics["feature_join"]["missing_share"] == pytest.approx(2 / 3)


def test_materialized_online_values_equal_offline_point_in_time_at_the_same_time(tmp_path):
    applications = generate_frame(400, seed=5, n_months=2)
    table = history_features(generate_history(applications, seed=5), ENTITY_KEY)
    store = _local_store(tmp_path, table)
    end = table[ENTITY_TIMESTAMP].max() + pd.Timedelta(days=1)
    store.materialize(start_date=(end - HISTORY_TTL).to_pydatetime(), end_date=end.to_pydatetime())
    ids = applications[ENTITY_KEY].sample(50, random_state=1).tolist()
    online = pd.DataFrame(
        store.get_online_features(
            features=store.get_feature_service(SERVICE), entity_rows=[{ENTITY_KEY: i} for i in ids]
        ).to_dict()
    )
    rows = pd.DataFrame({ENTITY_KEY: ids, ENTITY_TIMESTAMP: [end] * len(ids)})
    offline = rows.merge(_feast_join(store, rows), on=KEYS, how="left")
    pd.testing.assert_frame_equal(
        online[HISTORY_FEATURES].astype("float64"), offline[HISTORY_FEATURES].astype("float64"), check_dtype=False
    )


def test_dataset_config_feature_service_fields():
    import yaml

    raw = yaml.safe_load(bundled_config_text("credit-risk-history"))
    config = parse_dataset_config(yaml.safe_dump(raw), "history")
    assert config.feature_service == SERVICE and set(config.store_features) == set(HISTORY_FEATURES)
    with pytest.raises(DatasetConfigError, match=r"store_features .* must also be listed in features"):
        parse_dataset_config(yaml.safe_dump(raw | {"store_features": ["nope"]}), "x")
    with pytest.raises(DatasetConfigError, match="feature_service and store_features go together"):
        parse_dataset_config(yaml.safe_dump(raw | {"feature_service": None}), "x")
    plain = yaml.safe_load(bundled_config_text("credit-risk"))
    assert parse_dataset_config(yaml.safe_dump(plain), "plain").feature_service is None


def test_an_sql_registry_from_settings_holds_the_repository(tmp_path, monkeypatch):
    from feast import FeatureStore, RepoConfig

    from adapters import feature_store
    from adapters.settings import Settings

    # Given MLOPS_FEAST_REGISTRY naming an SQL database (SQLite here; PostgreSQL the same way)
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MLOPS_FEAST_REGISTRY", f"sqlite:///{tmp_path / 'registry.sqlite'}")
    settings = Settings()
    config = RepoConfig(
        project="unit_sql",
        provider="local",
        registry=feature_store._registry(settings),
        online_store=feature_store._online(settings),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    # when the repository is applied to it
    FeatureStore(config=config).apply(definitions(str(tmp_path / "history.parquet"), None))
    # then a second store reading the same database sees every object
    again = FeatureStore(config=config)
    assert [s.name for s in again.list_feature_services()] == [SERVICE]
    assert [v.name for v in again.list_feature_views()] == ["applicant_history"]
    assert (tmp_path / "registry.sqlite").stat().st_size > 0
