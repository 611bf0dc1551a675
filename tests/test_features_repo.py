"""A feature repository the user owns, on the real stack: written into a temp folder (another entity, join
key and feature view over a table on the stack's S3), applied with Feast's repo parsing, and joined
point-in-time by the training flow; the joined values equal an independent pandas `merge_asof`, and the
online store serves the same definitions from the registry after materialization.
"""

from __future__ import annotations

import io
import json
import textwrap
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from core.data.feature_history import ENTITY_TIMESTAMP
from core.modeling.search import SearchSpec
from flows.training import TrainingParams, training
from tests.conftest import TEST_MONTHS, TEST_ROWS_PER_MONTH

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = "bureau_risk"
VIEW = "bureau_scores"
JOIN_KEY = "applicant_ref"  # not the dataset's id column: the id column stands for it
TABLE_KEY = "features/test_bureau/bureau.parquet"
TTL = timedelta(days=90)
STORE_FEATURES = ["bureau_score", "open_lines"]
FAST_SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)

ENTITIES_PY = '''
"""The user's entity: an applicant, keyed by their bureau reference."""

from feast import Entity
from feast.value_type import ValueType

applicant = Entity(name="bureau_applicant", join_keys=["applicant_ref"], value_type=ValueType.STRING)
'''

BUREAU_PY = f'''
"""Bureau scores observed over time, read from the stack's S3."""

import os
from datetime import timedelta

from feast import FeatureService, FeatureView, Field, FileSource
from feast.types import Float64, Int64

from entities import applicant

source = FileSource(
    name="bureau_source",
    path=f"s3://{{os.environ.get('MLOPS_BUCKET', 'mlops')}}/{TABLE_KEY}",
    timestamp_field="observed_at",
    s3_endpoint_override=os.environ.get("FEAST_S3_ENDPOINT_URL"),
)
scores = FeatureView(
    name="{VIEW}",
    entities=[applicant],
    ttl=timedelta(days={TTL.days}),
    schema=[Field(name="bureau_score", dtype=Float64), Field(name="open_lines", dtype=Int64)],
    source=source,
    online=True,
)
bureau_risk = FeatureService(name="{SERVICE}", features=[scores])
'''


def _bureau_table(ids: pd.Series, times: pd.Series, seed: int) -> pd.DataFrame:
    """Observations per applicant around each application's time: some before (within or beyond the TTL),
    some after it (scores >= 900 only there: a joined value that high leaked the future), 10 % with none."""
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(ids)) < 0.9
    base = pd.to_datetime(times, utc=True)[chosen].reset_index(drop=True)
    refs = ids[chosen].reset_index(drop=True)
    n = len(refs)
    beyond = rng.random(n) < 0.05  # only one observation, older than the TTL
    recent = base - pd.to_timedelta(rng.uniform(1, 80, n), unit="D")
    old = base - pd.to_timedelta(rng.uniform(100, 200, n), unit="D")
    offset = rng.uniform(-100, 40, n)  # a second observation: before, or after the application
    first = pd.DataFrame({JOIN_KEY: refs, "observed_at": recent.where(~beyond, old), "future": False})
    second = pd.DataFrame(
        {JOIN_KEY: refs, "observed_at": base + pd.to_timedelta(offset, unit="D"), "future": offset > 0}
    )[~beyond]
    table = pd.concat([first, second], ignore_index=True)
    size = len(table)
    table["bureau_score"] = np.where(table["future"], rng.uniform(900, 999, size), rng.uniform(300, 850, size))
    table["open_lines"] = rng.integers(0, 20, size).astype("int64")
    table["observed_at"] = table["observed_at"].dt.floor("s")
    return table.drop_duplicates(subset=[JOIN_KEY, "observed_at"]).reset_index(drop=True)


def _reference(rows: pd.DataFrame, table: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Independent point-in-time join: each row's newest observation at or before its time, within the TTL."""
    left = rows.rename(columns={id_column: JOIN_KEY}).sort_values(ENTITY_TIMESTAMP)
    right = table.sort_values("observed_at").assign(**{ENTITY_TIMESTAMP: lambda t: t["observed_at"]})
    merged = pd.merge_asof(
        left, right[[JOIN_KEY, ENTITY_TIMESTAMP, "observed_at", *STORE_FEATURES]], on=ENTITY_TIMESTAMP, by=JOIN_KEY
    )
    stale = merged["observed_at"].isna() | (merged[ENTITY_TIMESTAMP] - merged["observed_at"] > TTL)
    merged.loc[stale, STORE_FEATURES] = np.nan
    merged = merged.rename(columns={JOIN_KEY: id_column})
    return rows.merge(merged[[id_column, ENTITY_TIMESTAMP, *STORE_FEATURES]], on=[id_column, ENTITY_TIMESTAMP])


@pytest.fixture(scope="module")
def user_repo(stack, default_data, tmp_path_factory):
    """The user's repository and dataset config in a temp folder, its table on S3, the repository applied."""
    import yaml

    from adapters.clients import s3_client
    from adapters.feature_store import apply_repository, feature_store, has_service, resolve_repository
    from adapters.snapshots import read_snapshot
    from core.data.dataset import bundled_config_text, load_local_dataset_config

    folder = tmp_path_factory.mktemp("user-model")
    repo = folder / "bureau_repo"
    repo.mkdir()
    (repo / "entities.py").write_text(textwrap.dedent(ENTITIES_PY))
    (repo / "bureau.py").write_text(textwrap.dedent(BUREAU_PY))
    raw = yaml.safe_load(bundled_config_text("credit-risk"))
    raw |= {
        "name": "bureau-history",
        "model_name": "bureau-history",
        "features": [
            *raw["features"],
            {"name": "bureau_score", "type": "numeric", "min": 300, "max": 999},
            {"name": "open_lines", "type": "numeric", "min": 0, "max": 20},
        ],
        "feature_service": SERVICE,
        "store_features": STORE_FEATURES,
        "feature_repo": "bureau_repo",  # relative: next to the config file
        "max_missing_feature_share": 0.3,
    }
    config_path = folder / "bureau-history.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = load_local_dataset_config(str(config_path))

    frame = read_snapshot(config.source, config.format, stack).frame
    table = _bureau_table(frame[config.id_column], frame[config.time_column], seed=11)
    buffer = io.BytesIO()
    table.drop(columns="future").to_parquet(buffer, index=False)
    s3_client(stack).put_object(Bucket=stack.bucket, Key=TABLE_KEY, Body=buffer.getvalue())

    assert not has_service(stack, SERVICE)
    names = apply_repository(stack, resolve_repository(config.feature_repo, str(config_path)))
    assert set(names) == {"bureau_source", "bureau_applicant", VIEW, SERVICE}
    assert has_service(stack, SERVICE) and not has_service(stack, "no_such_service")
    yield config_path, config, frame, table
    store = feature_store(stack)
    store.delete_feature_service(SERVICE)
    store.delete_feature_view(VIEW)
    store.registry.delete_entity("bureau_applicant", store.project)
    store.registry.delete_data_source("bureau_source", store.project)
    assert not has_service(stack, SERVICE)


def test_a_user_repository_is_joined_point_in_time_in_training(stack, user_repo):
    from adapters.clients import s3_client
    from tasks.features import entity_rows, join_features

    config_path, config, frame, table = user_repo
    # when the training flow runs on the config (reading the definitions from the registry only)
    state = training(TrainingParams(dataset=str(config_path), search=FAST_SEARCH, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    # and its join task joins the snapshot as the flow does
    enriched, report = join_features.fn(frame, config)
    # then every row keeps its place and carries the values of an independent merge_asof (nulls where none)
    rows = entity_rows(frame, config)
    expected = _reference(rows, table, config.id_column)
    assert len(enriched) == len(frame) == TEST_MONTHS * TEST_ROWS_PER_MONTH
    assert enriched[config.id_column].tolist() == frame[config.id_column].tolist()
    pd.testing.assert_frame_equal(
        enriched[STORE_FEATURES].astype("float64"), expected[STORE_FEATURES].astype("float64"), check_names=True
    )
    # and the reference is not trivial: values found, rows left without (no data, only after, beyond the TTL)
    found = expected["bureau_score"].notna()
    assert 0.7 * len(frame) < found.sum() < len(frame)
    # and no observation later than a row's own time reached it, though many exist
    assert table["future"].sum() > 1000 and not (enriched["bureau_score"] >= 900).any()
    # and the training run's validation report counts the same rows without store features
    listing = s3_client(stack).list_objects_v2(Bucket=stack.bucket, Prefix="reports/bureau-history/")["Contents"]
    key = next(o["Key"] for o in listing if o["Key"].endswith("validation.json"))
    validation = json.loads(s3_client(stack).get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    join = validation["statistics"]["feature_join"]
    assert join["feature_service"] == SERVICE and join["rows_in"] == len(frame)
    assert join["rows_dropped"] + join["rows_without_features"] == int((~found).sum()) == report.missing


def test_the_online_store_serves_the_user_repository_by_its_own_join_key(stack, user_repo):
    from adapters.feature_store import feature_store, materialize, online_features

    _, config, frame, table = user_repo
    # Given the registered views materialized up to a day after the newest observation
    end = (table["observed_at"].max() + pd.Timedelta(days=1)).to_pydatetime()
    done = materialize(stack, end)
    assert VIEW in done.views
    # when ids are looked up (the dataset's id values, sent under the entity's join key)
    ids = frame[config.id_column].sample(80, random_state=2).tolist()
    online = pd.DataFrame(online_features(feature_store(stack), SERVICE, ids))
    # then each id gets its newest observation within the TTL before `end` (pandas, independently), else nulls
    window = table[table["observed_at"] >= pd.Timestamp(end) - TTL]
    newest = window.sort_values("observed_at").groupby(JOIN_KEY).tail(1).set_index(JOIN_KEY)
    expected = newest.reindex(ids)[STORE_FEATURES].reset_index(drop=True)
    assert online[JOIN_KEY].tolist() == ids
    pd.testing.assert_frame_equal(online[STORE_FEATURES].astype("float64"), expected.astype("float64"))
    assert expected["bureau_score"].notna().sum() > 0
