"""SQL dataset sources without a server: the config's rules, data init's YAML, the listing, the error words."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from adapters.snapshot_listing import snapshot_listing
from core.data.config_inference import InferenceRequest, infer_config
from core.data.dataset import DatasetConfigError, bundled_config_text, parse_dataset_config, sql_place

URL = "postgresql+psycopg://mlops@db.example:5433/sales"


def _config_text(**changes: object) -> str:
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"source": URL, "format": "sql"}
    raw |= {"query": "SELECT * FROM applications ORDER BY application_id"} | changes
    return yaml.safe_dump({k: v for k, v in raw.items() if v is not None})


def test_a_sql_config_reads_with_its_query_and_password_variable():
    config = parse_dataset_config(_config_text(password_env="SALES_DB_PASSWORD"), "t")
    assert (config.format, config.source, config.password_env) == ("sql", URL, "SALES_DB_PASSWORD")
    assert config.query.startswith("SELECT")
    assert parse_dataset_config(_config_text(), "t").password_env == "PGPASSWORD"  # libpq's own by default


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"source": "postgresql+psycopg://mlops:hunter2-secret@db.example:5433/sales"}, "carries a password"),
        ({"query": None}, "query: format sql needs a query"),
        ({"source": "s3://mlops/datasets/x/"}, "source: format sql needs a PostgreSQL URL"),
        ({"format": "parquet"}, "source: PostgreSQL at db.example:5433/sales is a database URL"),
        ({"engine": "dask"}, "engine:"),
        ({"password_env": "not a name"}, "password_env"),
    ],
)
def test_sql_config_mistakes_name_the_field(changes, words):
    with pytest.raises(DatasetConfigError, match=words) as caught:
        parse_dataset_config(_config_text(**changes), "sales.yaml")
    assert "hunter2-secret" not in str(caught.value)  # a password in the URL is never repeated back


def test_a_query_belongs_to_sql_sources_only():
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"query": "SELECT 1"}
    with pytest.raises(DatasetConfigError, match="query: only a source of format sql"):
        parse_dataset_config(yaml.safe_dump(raw), "t")


def test_the_place_names_host_port_and_database_only():
    assert sql_place("postgresql+psycopg://u:pw@h.example:5432/db") == "PostgreSQL at h.example:5432/db"
    assert sql_place("postgresql://u@h") == "PostgreSQL at h/(default database)"


def test_data_init_writes_the_query_and_reads_it_back():
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame(
        {"order_id": range(n), "amount": rng.normal(50, 10, n), "region": rng.choice(["n", "s"], n)}
        | {"returned": rng.choice([0, 1], n)}
    )
    query = "SELECT order_id, amount, region, returned\nFROM orders\nWHERE amount > 0 ORDER BY order_id"
    request = InferenceRequest(source=URL, fmt="sql", target="returned", query=query, password_env="SALES_PW")
    inferred = infer_config(frame, request)  # it checks that the YAML reads back to the same config
    text = inferred.to_yaml()
    assert "\nquery: " in text and "\npassword_env: SALES_PW" in text
    config = parse_dataset_config(text, "t")
    assert (config.format, config.query, config.source, config.model_name) == ("sql", query, URL, "sales")


def test_a_query_is_never_listed_as_unchanged():
    # A query cannot be listed without running it: each listing differs, so every run trains
    first, second = snapshot_listing(URL, "sql", None), snapshot_listing(URL, "sql", None)
    assert len(first) == 1 and first != second


def test_the_drivers_words_lose_the_password():
    from adapters.sql_source import _problem

    error = RuntimeError('FATAL: password authentication failed for user "x" (tried "s3cret-pw")')
    words = _problem(error, "s3cret-pw", "SALES_PW")
    assert "s3cret-pw" not in words and "***" in words
    assert "environment variable SALES_PW, which is set" in words
