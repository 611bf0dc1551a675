"""A database query as a snapshot: its result as one Parquet object, so it is versioned like a file snapshot.

The dataset config's `source` is an SQLAlchemy URL without a password (`postgresql+psycopg://user@host:5432/db`,
PostgreSQL through psycopg 3); the password comes from the environment variable `password_env` names (PGPASSWORD,
libpq's own, by default) and is never logged nor put in a message. The query runs in a read-only transaction.

The result becomes `("query.parquet", bytes)`: a pyarrow table, one column per result column in the query's order,
written with fixed options (`PARQUET_OPTIONS`), so the same rows in the same order give the same bytes and so the
same data version (`adapters.snapshots.read_snapshot` hashes it like any file). Rows come in the query's order:
a query without ORDER BY may return the same rows in another order another day, and so another version.
Values map as pyarrow infers them from psycopg's Python values, except NUMERIC (Decimal) as float64, DATE as a
timestamp and other kinds (UUID, JSON, ranges, ...) as text.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.data.dataset import is_sql_url, sql_place
from core.errors import PermanentError

log = logging.getLogger(__name__)

OBJECT_NAME = "query.parquet"
# Fixed writer options: the bytes depend on the rows, their order, the column types and pyarrow's version only.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "version": "2.6"}
CONNECT_TIMEOUT_SECONDS = 10
# Values Arrow holds as they are; any other (UUID, JSON, ranges, ...) becomes its text (JSON with sorted keys).
PLAIN = (bool, int, float, str, bytes, dt.datetime, dt.time, dt.timedelta)


class SqlSourceError(PermanentError):
    """The query's result could not be read: names the database, never the password.

    `adapters.snapshots.read_snapshot` raises it again as its `DataLoadError`.
    """


def fetch_sql(source: str, query: str, password_env: str = "PGPASSWORD") -> list[tuple[str, bytes]]:
    """Run `query` on the database `source` names; its result as one Parquet object `("query.parquet", bytes)`.

    Raises:
        SqlSourceError: Not a PostgreSQL URL, a password in the URL, the server unreachable, authentication
            refused, the query failing, or a column named twice; the message names the place, never the password.
    """
    place = sql_place(source)
    if not is_sql_url(source):
        raise SqlSourceError(f"{source!r} is not a PostgreSQL URL (postgresql+psycopg://user@host:port/database)")
    password = os.environ.get(password_env) or None
    try:
        names, rows = _run(source, query, password)
    except SqlSourceError:
        raise
    except Exception as exc:  # the driver's and SQLAlchemy's errors, with the password scrubbed from the words
        raise SqlSourceError(f"{place}: {_problem(exc, password, password_env)}") from None
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SqlSourceError(f"{place}: the query returns columns {duplicated} more than once; give them aliases")
    table = pa.table({name: _column([row[i] for row in rows]) for i, name in enumerate(names)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **PARQUET_OPTIONS)
    log.info("%s: the query returned %d rows, %d columns", place, table.num_rows, table.num_columns)
    return [(OBJECT_NAME, buffer.getvalue())]


def check_query(source: str, query: str, password_env: str = "PGPASSWORD") -> list[str]:
    """Connect and plan the query without reading a row (`SELECT * FROM (query) LIMIT 0`); its column names.

    What `mlops models add` checks: the server answers, the password is accepted, the query is valid.

    Raises:
        SqlSourceError: As `fetch_sql`, naming the place, never the password.
    """
    place = sql_place(source)
    if not is_sql_url(source):
        raise SqlSourceError(f"{source!r} is not a PostgreSQL URL (postgresql+psycopg://user@host:port/database)")
    password = os.environ.get(password_env) or None
    probe = f"SELECT * FROM ({query.strip().rstrip(';')}) AS mlops_probe LIMIT 0"
    try:
        names, _ = _run(source, probe, password)
    except SqlSourceError:
        raise
    except Exception as exc:
        raise SqlSourceError(f"{place}: {_problem(exc, password, password_env)}") from None
    return names


def _run(source: str, query: str, password: str | None) -> tuple[list[str], list[tuple[Any, ...]]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = make_url(source)
    if url.password is not None:  # the config refuses it too; a URL given some other way is refused here
        raise SqlSourceError(f"{sql_place(source)}: the URL carries a password; put it in the environment instead")
    url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    if password is not None:
        connect_args["password"] = password
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect().execution_options(postgresql_readonly=True) as connection:
            result = connection.execute(text(query))
            if not result.returns_rows:
                raise SqlSourceError(f"{sql_place(source)}: the query returns no rows at all (is it a SELECT?)")
            return list(result.keys()), [tuple(row) for row in result.fetchall()]
    finally:
        engine.dispose()


def _problem(exc: Exception, password: str | None, password_env: str) -> str:
    """The driver's own words (first lines), without the password; a hint where the password comes from."""
    original = getattr(exc, "orig", None) or exc
    words = " ".join(str(original).split()) or type(original).__name__
    if password:
        words = words.replace(password, "***")
    if "password" in words.lower() or "authentication" in words.lower():
        state = "set" if password else "not set"
        words += f" (the password comes from the environment variable {password_env}, which is {state})"
    return words


def _column(values: list[Any]) -> pa.Array:
    """One result column as an Arrow array: NUMERIC as float64, DATE as timestamp, the unrepresentable as text."""
    if any(isinstance(v, decimal.Decimal) for v in values):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if any(isinstance(v, dt.date) and not isinstance(v, dt.datetime) for v in values):
        return pa.array(
            [None if v is None else dt.datetime(v.year, v.month, v.day) for v in values], type=pa.timestamp("us")
        )
    if all(v is None or isinstance(v, PLAIN) for v in values):
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # mixed kinds in one column: as text
    return pa.array([None if v is None else _text(v) for v in values], type=pa.string())


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict | list) else str(value)
