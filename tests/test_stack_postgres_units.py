"""Which database the stack's Prefect and MLflow use, and how they are pointed at it (no server started)."""

from __future__ import annotations

import stat

from adapters.settings import Settings
from mlops import stack_postgres
from mlops.stack_servers import services


def _settings(tmp_path, **values) -> Settings:
    return Settings(state_dir=tmp_path, postgres_port=6543, **values)


def _by_name(settings: Settings) -> dict:
    return {service.name: service for service in services(settings)}


def test_a_new_state_folder_runs_prefect_and_mlflow_on_postgresql_without_a_password_in_any_url(tmp_path):
    settings = _settings(tmp_path)
    assert stack_postgres.backend(settings) == "postgresql"
    found = _by_name(settings)
    assert next(iter(found)) == "postgres"  # started first: MLflow and Prefect need it
    password = stack_postgres.password(settings)
    store = found["mlflow"].command[found["mlflow"].command.index("--backend-store-uri") + 1]
    assert store == "postgresql+psycopg://mlops@127.0.0.1:6543/mlflow"
    prefect_url = found["prefect"].env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_url == "postgresql+asyncpg://mlops@127.0.0.1:6543/prefect"
    # the password reaches them as libpq's variable only
    assert found["mlflow"].env["PGPASSWORD"] == password == found["prefect"].env["PGPASSWORD"]
    assert all(password not in " ".join(service.command) for service in found.values())
    assert "PGPASSWORD" not in found["s3"].env and "PGPASSWORD" not in found["serving"].env
    # and the server listens on loopback only, stopped with its fast shutdown
    assert "listen_addresses=127.0.0.1" in found["postgres"].command
    assert found["postgres"].stop_signal.name == "SIGINT"


def test_the_generated_password_is_private_and_stable_and_the_setting_wins(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    first = stack_postgres.password(settings)
    path = tmp_path / "postgres" / "password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 24 and stack_postgres.password(settings) == first
    assert stack_postgres.password(_settings(tmp_path / "other")) != first
    monkeypatch.setenv("MLOPS_POSTGRES_PASSWORD", "from-the-env")
    assert stack_postgres.password(Settings(state_dir=tmp_path)) == "from-the-env"


def test_an_earlier_sqlite_state_folder_keeps_sqlite_and_says_how_to_move(tmp_path):
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "prefect.db").write_bytes(b"")
    settings = _settings(tmp_path)
    assert stack_postgres.backend(settings) == "sqlite"
    found = _by_name(settings)
    assert "postgres" not in found
    assert found["prefect"].env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("sqlite+aiosqlite:///")
    assert "PGPASSWORD" not in found["prefect"].env
    note = stack_postgres.database_summary(settings)
    assert "SQLite" in note and "MLOPS_DATABASE=postgresql mlops stack up" in note
    # asked for explicitly: PostgreSQL (a fresh registry), and once made, `auto` stays on it
    assert stack_postgres.backend(_settings(tmp_path, database="postgresql")) == "postgresql"
    (tmp_path / "postgres").mkdir()
    (tmp_path / "postgres" / stack_postgres._READY_MARK).write_text("prefect,mlflow\n")
    assert stack_postgres.backend(settings) == "postgresql"


def test_sqlite_on_request_needs_no_postgresql(tmp_path):
    settings = _settings(tmp_path, database="sqlite")
    found = _by_name(settings)
    assert "postgres" not in found
    store = found["mlflow"].command[found["mlflow"].command.index("--backend-store-uri") + 1]
    assert store == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert "MLOPS_DATABASE=sqlite" in stack_postgres.database_summary(settings)
