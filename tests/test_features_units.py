"""Feature store units: history aggregates, the point-in-time join against an independent pandas reference,
the planted future event, the TTL trap counted, the dataset config's feature-service fields, and parsing
Feast repositories (the bundled example, and folders that cannot be applied).

Feast runs for real here (a library, no server): the example repository (`examples/feature_repo`) parsed
by Feast's own repo parsing, its source pointed at a local Parquet file, a local registry file and a SQLite
online store in a temp folder. The stack-backed path (S3, serving) is in tests/test_features.py.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from core.data.dataset import DatasetConfigError, bundled_config_text, parse_dataset_config
from core.data.feature_history import (
    ENTITY_TIMESTAMP,
    HISTORY_FEATURES,
    JoinCounts,
    complete_join,
    history_features,
    join_report,
    with_join,
)
from core.data.feature_repo import (
    ENTITY_KEY,
    EXAMPLE_REPO,
    HISTORY_SERVICE,
    HISTORY_TABLE,
    HISTORY_TTL,
    HISTORY_VIEW,
)
from core.data.synthetic import generate_frame, generate_history
from core.data.validation import ValidationReport

KEYS = [ENTITY_KEY, ENTITY_TIMESTAMP]
SERVICE = "credit_risk_history"
CHECKOUT = Path(__file__).resolve().parent.parent


def _ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def _example_objects(source_path: str) -> list:
    """The example repository's objects as Feast parses them, its history source read from `source_path`."""
    from adapters.feature_store import _objects, parse_repository

    contents = parse_repository(CHECKOUT / EXAMPLE_REPO)
    [source] = contents.data_sources
    source.file_options.uri = source_path  # the view holds the same source object
    source.file_options.s3_endpoint_override = ""
    return _objects(contents)


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
    store.apply(_example_objects(str(path)))
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
    report = join_report(SERVICE, JoinCounts(len(rows), rows_out, dropped), completed, HISTORY_FEATURES, 0.5)
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
    report = join_report(SERVICE, JoinCounts(len(rows), rows_out, dropped), completed, HISTORY_FEATURES, 0.5)
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
    FeatureStore(config=config).apply(_example_objects(str(tmp_path / "history.parquet")))
    # then a second store reading the same database sees every object
    again = FeatureStore(config=config)
    assert [s.name for s in again.list_feature_services()] == [SERVICE]
    assert [v.name for v in again.list_feature_views()] == ["applicant_history"]
    assert (tmp_path / "registry.sqlite").stat().st_size > 0


def test_the_example_repository_parses_into_what_the_rest_of_the_code_names(monkeypatch):
    from feast import Entity, FeatureService, FeatureView, FileSource

    from adapters.feature_store import parse_repository

    # Given the bundled example repository, parsed by Feast's own repo parsing with a bucket from the environment
    monkeypatch.setenv("MLOPS_BUCKET", "unit-bucket")
    monkeypatch.setenv("FEAST_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    contents = parse_repository(CHECKOUT / EXAMPLE_REPO, "mlops")
    entities = [e for e in contents.entities if e.name != "__dummy"]
    # then it holds one entity, source, view and service, named as the constants other code reads
    assert [type(o) for o in (*entities, *contents.data_sources)] == [Entity, FileSource]
    [entity], [source], [view], [service] = (
        entities,
        contents.data_sources,
        contents.feature_views,
        contents.feature_services,
    )
    assert isinstance(view, FeatureView) and isinstance(service, FeatureService)
    assert entity.join_key == ENTITY_KEY and view.name == HISTORY_VIEW and service.name == HISTORY_SERVICE
    assert view.ttl == HISTORY_TTL and [f.name for f in view.features] == HISTORY_FEATURES
    # and the source reads the table where the generator writes it, on the endpoint Feast was given
    assert source.path == f"s3://unit-bucket/{HISTORY_TABLE}"
    assert source.s3_endpoint_override == "http://127.0.0.1:1" and source.timestamp_field == ENTITY_TIMESTAMP
    # and parsing left nothing behind: the working directory and the imported modules are as before
    assert Path.cwd() != CHECKOUT / EXAMPLE_REPO
    import sys

    assert "applicant_history" not in sys.modules


@pytest.fixture
def unit_settings(tmp_path, monkeypatch):
    """Settings of a stack that is never started; the variables `apply_repository` exports are restored after."""
    from adapters.settings import Settings

    for name in (
        "FEAST_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "MLOPS_BUCKET",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / "state"))
    return Settings()


def test_a_repository_with_a_python_error_is_refused_naming_the_file_and_line(tmp_path, unit_settings):
    from adapters.feature_store import FeatureRepoError, apply_repository

    # Given a repository whose second file fails on import (a name error on line 4), next to a good file
    repo = tmp_path / "my_repo"
    (repo / "views").mkdir(parents=True)
    (repo / "entities.py").write_text(
        "from feast import Entity\n\ncustomer = Entity(name='customer', join_keys=['cid'])\n"
    )
    (repo / "views" / "broken.py").write_text("from feast import Field\n\n\nview = FeatureVeiw(name='x')\n")
    # when it is applied, then the error names the folder, the file, the line and Python's message
    with pytest.raises(FeatureRepoError) as raised:
        apply_repository(unit_settings, repo)
    message = str(raised.value)
    assert message.startswith(f"feature repository {repo}: ")
    assert "views/broken.py, line 4: NameError" in message and "FeatureVeiw" in message
    # and a syntax error is named the same way
    (repo / "views" / "broken.py").write_text("from feast import Field\nview = (\n")
    with pytest.raises(FeatureRepoError, match=r"views/broken\.py, line \d+: SyntaxError"):
        apply_repository(unit_settings, repo)


def test_a_repository_without_definitions_or_without_a_folder_is_refused_naming_it(tmp_path, unit_settings):
    from adapters.feature_store import FeatureRepoError, apply_repository

    # Given a folder whose Python files define no Feast object
    repo = tmp_path / "empty_repo"
    repo.mkdir()
    (repo / "helpers.py").write_text("THRESHOLD = 3\n")
    (repo / "feature_store.yaml").write_text("project: mine\n")
    with pytest.raises(FeatureRepoError) as raised:
        apply_repository(unit_settings, repo)
    assert str(raised.value) == (
        f"feature repository {repo}: no Feast definitions (entities, data sources, feature views, feature services "
        "at module level) in helpers.py"
    )
    # and a folder without any Python file, and no folder at all
    (repo / "helpers.py").unlink()
    with pytest.raises(FeatureRepoError, match=rf"^feature repository {re.escape(str(repo))}: no Python files"):
        apply_repository(unit_settings, repo)
    with pytest.raises(FeatureRepoError, match=rf"^feature repository {re.escape(str(tmp_path / 'nope'))}: no such"):
        apply_repository(unit_settings, tmp_path / "nope")


def test_a_relative_feature_repo_resolves_against_the_config_folder_then_the_checkout(tmp_path, monkeypatch):
    from adapters.feature_store import FeatureRepoError, resolve_repository

    # Given a local config file next to its repository, and a current directory elsewhere
    (tmp_path / "configs" / "repo").mkdir(parents=True)
    config = tmp_path / "configs" / "model.yaml"
    config.write_text("name: x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # then a local config's relative repository is found next to it; an absolute one is taken as it is
    assert resolve_repository("repo", str(config)) == (tmp_path / "configs" / "repo").resolve()
    assert resolve_repository(str(tmp_path / "configs" / "repo")) == (tmp_path / "configs" / "repo").resolve()
    # and a bundled config's (no file) is found from any directory: the current one, else the checkout
    assert resolve_repository(EXAMPLE_REPO, "credit-risk-history") == (CHECKOUT / EXAMPLE_REPO).resolve()
    # and a missing one is an error naming every place looked at
    with pytest.raises(FeatureRepoError) as raised:
        resolve_repository("missing", str(config))
    assert str(tmp_path / "configs" / "missing") in str(raised.value)
    assert str(CHECKOUT / "missing") in str(raised.value)
