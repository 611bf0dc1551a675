"""A database query as a dataset's source, against the stack's PostgreSQL with a table this test writes.

`mlops data init` infers the config from the query; the training flow trains on it; the data version is the one
an independent computation gives (psycopg rows -> pyarrow -> Parquet with the documented writer options -> the
loader's hash); changed rows give another version; the reader's password is nowhere in the run; a wrong password
and an unknown table fail with the place named.
"""

from __future__ import annotations

import hashlib
import io
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlops.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD_ENV = "SALES_DB_PASSWORD"
QUERY = "SELECT order_id, amount, items, region, returned FROM orders ORDER BY order_id"
TINY_SEARCH = {"families": ["logistic_regression"], "trials_per_family": 1, "cv_folds": 2}
INIT = ("data", "init")
OPTIONS = ("--password-env", PASSWORD_ENV, "--target", "returned")
runner = CliRunner()


@dataclass(frozen=True)
class Database:
    """A database of the stack's PostgreSQL with an `orders` table, and a reader role with its own password."""

    url: str  # the reader's SQLAlchemy URL, without the password
    admin: dict  # psycopg connection arguments of the stack's owner, on this database
    password: str  # the reader's


@pytest.fixture(scope="module")
def database(stack):
    import psycopg
    from psycopg import sql

    from mlops import stack_postgres

    if stack_postgres.backend(stack) != "postgresql":
        pytest.skip("the stack runs on SQLite (MLOPS_DATABASE=sqlite)")
    admin = {
        "host": stack_postgres.HOST,
        "port": stack.postgres_port,
        "user": stack.postgres_user,
        "password": stack_postgres.password(stack),
    }
    name, reader, password = f"sales_{secrets.token_hex(4)}", f"reader_{secrets.token_hex(4)}", secrets.token_hex(16)
    with psycopg.connect(**admin, dbname="postgres", autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        connection.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(reader), sql.Literal(password))
        )
    rng = np.random.default_rng(11)
    amount = rng.gamma(4, 15, 400).round(2)
    items = rng.integers(1, 9, 400)
    region = rng.choice(["north", "south", "east", "west"], 400)
    returned = ((amount / 60 + (region == "west") + rng.normal(0, 0.4, 400)) > 1.2).astype(int)
    with psycopg.connect(**admin, dbname=name, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE orders (order_id integer PRIMARY KEY, amount double precision, items integer, "
            "region text, returned integer)"
        )
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO orders VALUES (%s, %s, %s, %s, %s)",
                [(i, float(amount[i]), int(items[i]), str(region[i]), int(returned[i])) for i in range(400)],
            )
        connection.execute(sql.SQL("GRANT SELECT ON orders TO {}").format(sql.Identifier(reader)))
    yield Database(
        f"postgresql+psycopg://{reader}@{admin['host']}:{admin['port']}/{name}", admin | {"dbname": name}, password
    )
    with psycopg.connect(**admin, dbname="postgres", autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(reader)))


def _expected_version(database: Database, query: str) -> str:
    """The data version computed apart from the project's code: rows by psycopg, Parquet by pyarrow, the hash."""
    import psycopg
    import pyarrow as pa
    import pyarrow.parquet as pq

    with psycopg.connect(**database.admin) as connection, connection.cursor() as cursor:
        cursor.execute(query)
        names = [column.name for column in cursor.description]
        rows = cursor.fetchall()
    table = pa.table({name: pa.array([row[i] for row in rows]) for i, name in enumerate(names)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=3, version="2.6")  # docs/your-data.md
    digest = hashlib.sha256(b"query.parquet\0" + hashlib.sha256(buffer.getvalue()).digest())
    return digest.hexdigest()[:16]


def _flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_a_query_is_initialised_trained_versioned_and_its_password_kept_out(
    stack, database, tmp_path: Path, monkeypatch, caplog
):
    import psycopg

    from adapters.clients import mlflow_client
    from core.data.dataset import load_local_dataset_config
    from flows.training import TrainingParams, training

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(PASSWORD_ENV, database.password)
    out, model = tmp_path / "orders.yaml", f"sql-orders-{secrets.token_hex(3)}"

    # Given the orders table, when `mlops data init` reads it through the query
    result = runner.invoke(
        app,
        [*INIT, database.url, "--query", QUERY, *OPTIONS, "--name", model, "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    config = load_local_dataset_config(str(out))
    assert (config.source, config.format, config.query, config.password_env) == (
        database.url,
        "sql",
        QUERY,
        PASSWORD_ENV,
    )
    assert (config.id_column, config.task.value) == ("order_id", "binary")
    assert database.password not in out.read_text()

    # then a training run trains on it, on the data version an independent computation gives
    state = training(TrainingParams(dataset=str(out), search=TINY_SEARCH, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first.data_version == _expected_version(database, QUERY)

    # and the password is in none of the run's params and tags, nor in the flow's logs
    run = mlflow_client(stack).get_run(first.run_id)
    assert run.data.params["source"] == database.url
    recorded = [*run.data.params.values(), *run.data.tags.values(), _flow_logs(state.state_details.flow_run_id)]
    assert not [text for text in recorded if database.password in text]
    assert database.password not in caplog.text

    # When a row changes, the next run (never skipped: a query has no listing) trains on another data version
    with psycopg.connect(**database.admin, autocommit=True) as connection:
        connection.execute("UPDATE orders SET amount = amount + 1 WHERE order_id = 7")
    state = training(TrainingParams(dataset=str(out), search=TINY_SEARCH, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    second = state.result()
    assert second.data_version == _expected_version(database, QUERY) != first.data_version


def test_a_wrong_password_and_an_unknown_table_name_the_place(stack, database, tmp_path: Path, monkeypatch):
    from adapters.settings import Settings
    from adapters.snapshots import DataLoadError, read_snapshot
    from core.data.dataset import sql_place

    place = sql_place(database.url)
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password-xyz")
    with pytest.raises(DataLoadError) as caught:
        read_snapshot(database.url, "sql", Settings(), query=QUERY, password_env=PASSWORD_ENV)
    message = str(caught.value)
    assert message.startswith(f"{place}: ") and "password authentication failed" in message
    assert "not-the-password-xyz" not in message and f"environment variable {PASSWORD_ENV}, which is set" in message

    monkeypatch.setenv(PASSWORD_ENV, database.password)
    result = runner.invoke(
        app,
        [*INIT, database.url, "--query", "SELECT * FROM nope", *OPTIONS, "--out", str(tmp_path / "x.yaml")],
    )
    assert result.exit_code != 0
    assert f'{place}: relation "nope" does not exist' in result.output
    assert database.password not in result.output


def test_models_add_checks_that_the_query_answers(stack, database, tmp_path: Path, monkeypatch):
    from services.catalog import CatalogError, check_config

    monkeypatch.setenv(PASSWORD_ENV, database.password)
    out = tmp_path / "orders.yaml"
    result = runner.invoke(app, [*INIT, database.url, "--query", QUERY, *OPTIONS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    # Given the config data init wrote, `models add`'s check plans the query on the server (no row read)
    assert check_config(out.read_text(), str(out), stack).query == QUERY
    # then a refused password or a query the server rejects stop it, naming the model and the place
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password-xyz")
    with pytest.raises(CatalogError, match=r"source cannot be queried: .*password authentication failed") as caught:
        check_config(out.read_text(), str(out), stack)
    assert "not-the-password-xyz" not in str(caught.value)
    monkeypatch.setenv(PASSWORD_ENV, database.password)
    broken = out.read_text().replace("FROM orders", "FROM orderz")
    with pytest.raises(CatalogError, match='relation "orderz" does not exist'):
        check_config(broken, str(out), stack)
