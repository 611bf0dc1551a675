"""The local stack's servers: how each one is started (command, environment, folder) and probed.

In start order: PostgreSQL (Prefect's and MLflow's databases; none with MLOPS_DATABASE=sqlite), SeaweedFS's S3
gateway (MLflow stores its artifacts there), MLflow, the Prefect server,
the Dask cluster (a scheduler and nanny-managed workers, none when `dask_workers` is 0), a Prefect process
worker and the serving API. `mlops.stack` starts, stops and reports them.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.settings import Settings
from mlops import stack_postgres
from mlops.stack_env import (
    PROJECT_ROOT,
    client_env,
    console_script,
    dask_address,
    dask_dashboard_url,
    dask_host,
    s3_env,
    worker_env,
)
from mlops.stack_health import dask_worker_count, healthy

# SeaweedFS `weed mini` opens several internal ports besides S3 (master, volume, filer, admin and a
# gRPC port for each). They are laid out from one base so a test can move all of them at once.
WEED_INTERNAL = ("master", "volume", "filer", "admin")
WEED_GRPC_OFFSET = 10


@dataclass(frozen=True)
class Service:
    """How to run and probe one server."""

    name: str
    port: int
    url: str
    health_url: str
    command: list[str]
    env: dict[str, str]
    state_dir: Path
    extra_ports: tuple[int, ...] = ()
    cwd: Path | None = None
    ready: Callable[[], bool] | None = None  # health beyond an answer at health_url (e.g. all Dask workers joined)
    # Before each start (PostgreSQL: its cluster made once); returns the (uid, gid) to start it as, None for ours.
    prepare: Callable[[], tuple[int, int] | None] | None = None
    stop_signal: int = signal.SIGTERM  # PostgreSQL: SIGINT, its fast shutdown (SIGTERM waits for every client)

    @property
    def log_file(self) -> Path:
        """Where the server's output goes."""
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        """Where the server's pid is kept."""
        return self.state_dir / "run" / f"{self.name}.pid"

    def is_healthy(self) -> bool:
        """Its own readiness check when it has one, else an answer at its health URL."""
        return self.ready() if self.ready is not None else healthy(self.health_url)


def weed_ports(settings: Settings) -> dict[str, int]:
    """Internal SeaweedFS ports derived from `settings.weed_port_base`."""
    base = settings.weed_port_base
    ports = {name: base + i for i, name in enumerate(WEED_INTERNAL)}
    ports |= {f"{name}.grpc": base + WEED_GRPC_OFFSET + i for i, name in enumerate(WEED_INTERNAL)}
    ports["s3.grpc"] = base + WEED_GRPC_OFFSET + len(WEED_INTERNAL)
    return ports


def services(settings: Settings) -> list[Service]:
    """The stack's servers, in start order (S3 first: MLflow stores its artifacts there)."""
    database = [_postgres(settings)] if stack_postgres.backend(settings) == "postgresql" else []
    return [
        *database,
        _s3(settings),
        _mlflow(settings),
        _prefect(settings),
        *dask_services(settings),
        _worker(settings),
        _serving(settings),
    ]


def _postgres(settings: Settings) -> Service:
    host, port = stack_postgres.HOST, settings.postgres_port
    return Service(
        name="postgres",
        port=port,
        url=f"postgresql://{host}:{port} (databases {', '.join(stack_postgres.DATABASES)})",
        health_url=f"postgresql://{host}:{port}",
        command=stack_postgres.command(settings),
        env={"LC_ALL": "C"},
        state_dir=settings.state_dir.resolve(),
        ready=lambda: stack_postgres.accepts_connections(settings),
        prepare=lambda: stack_postgres.prepare(settings),
        stop_signal=signal.SIGINT,
    )


def _s3(settings: Settings) -> Service:
    state, host = settings.state_dir.resolve(), settings.host
    internal = weed_ports(settings)
    command = [
        console_script("weed"),
        f"-logdir={state / 'logs'}",  # glog files; /tmp otherwise
        "mini",
        f"-dir={state / 's3'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={settings.s3_port}",
        f"-s3.port.grpc={internal['s3.grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",  # on by default: anonymous cluster statistics to the vendor
        "-admin.ui=false",  # a web admin without a password by default; nothing here needs it
        f"-bucket={settings.bucket}",
    ]
    for name in WEED_INTERNAL:
        command += [f"-{name}.port={internal[name]}", f"-{name}.port.grpc={internal[name + '.grpc']}"]
    return Service(
        name="s3",
        port=settings.s3_port,
        url=f"http://{host}:{settings.s3_port}",
        health_url=f"http://{host}:{settings.s3_port}/healthz",
        command=command,
        env=s3_env(settings),
        state_dir=state,
        extra_ports=tuple(internal.values()),
    )


def _mlflow(settings: Settings) -> Service:
    state, host, port = settings.state_dir.resolve(), settings.host, settings.mlflow_port
    return Service(
        name="mlflow",
        port=port,
        url=f"http://{host}:{port}",
        health_url=f"http://{host}:{port}/health",
        command=[
            console_script("mlflow"),
            "server",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            _mlflow_store(settings),
            "--artifacts-destination",
            f"s3://{settings.bucket}/mlflow",
            # Beyond loopback: its basic-auth app, and the Host headers it answers (MLflow's DNS-rebinding guard
            # allows loopback and private ranges only unless told)
            *(["--app-name", "basic-auth", "--allowed-hosts", _mlflow_hosts(settings)] if settings.exposed else []),
        ],
        env=s3_env(settings)
        | _mlflow_auth_env(settings)
        | _database_env(settings)
        | {
            "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{settings.s3_port}",
            # The job runner (GenAI features we do not use) starts 7 huey workers, ~1.7 GB in all.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        },
        state_dir=state,
    )


def _mlflow_store(settings: Settings) -> str:
    if stack_postgres.backend(settings) == "postgresql":
        return stack_postgres.url(settings, "mlflow")
    return f"sqlite:///{settings.state_dir.resolve() / 'mlflow' / 'mlflow.db'}"


def _database_env(settings: Settings) -> dict[str, str]:
    """The PostgreSQL password for the servers that connect to it (libpq's PGPASSWORD), none on SQLite."""
    return stack_postgres.client_env(settings) if stack_postgres.backend(settings) == "postgresql" else {}


def _prefect_database(settings: Settings, prefect_dir: Path) -> str:
    if stack_postgres.backend(settings) == "postgresql":
        return stack_postgres.url(settings, "prefect", driver="asyncpg")
    return f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}"


MLFLOW_AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = {user}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def _mlflow_hosts(settings: Settings) -> str:
    port = settings.mlflow_port
    return ",".join([f"{settings.host}:{port}", settings.host, f"127.0.0.1:{port}", f"localhost:{port}"])


def _mlflow_auth_env(settings: Settings) -> dict[str, str]:
    """MLflow's basic-auth app beyond loopback.

    Its user store lives in the state folder; the stack's user is its admin (MLflow creates it with
    MLOPS_STACK_PASSWORD at the first start).
    """
    if not settings.exposed:
        return {}
    folder = settings.state_dir.resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    wanted = MLFLOW_AUTH_INI.format(database=folder / "auth.db", user=settings.stack_user)
    if not config.exists() or config.read_text() != wanted:  # `services()` is built by status and down too
        config.write_text(wanted)
    password = settings.stack_password.get_secret_value() if settings.stack_password else ""
    # Its CSRF protection signs with a key that must stay the same across restarts: made once, kept private.
    key_file = folder / "flask_secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(32))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text().strip(),
    }


def _prefect(settings: Settings) -> Service:
    state, host, port = settings.state_dir.resolve(), settings.host, settings.prefect_port
    prefect_dir = state / "prefect"
    return Service(
        name="prefect",
        port=port,
        url=f"http://{host}:{port}",
        health_url=f"http://{host}:{port}/api/health",
        command=[console_script("prefect"), "server", "start", "--host", host, "--port", str(port), "--analytics-off"],
        env={
            "PREFECT_HOME": str(prefect_dir),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": _prefect_database(settings, prefect_dir),
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        | _prefect_auth_env(settings)
        | _database_env(settings),
        state_dir=state,
    )


def _prefect_auth_env(settings: Settings) -> dict[str, str]:
    """Prefect's API auth string (basic auth on every API call and in the UI) beyond loopback."""
    if not settings.exposed or settings.stack_password is None:
        return {}
    return {"PREFECT_SERVER_API_AUTH_STRING": f"{settings.stack_user}:{settings.stack_password.get_secret_value()}"}


def _worker(settings: Settings) -> Service:
    state, host = settings.state_dir.resolve(), settings.host
    return Service(
        name="worker",
        port=settings.worker_port,
        url=f"pool {settings.work_pool}",
        health_url=f"http://{host}:{settings.worker_port}/health",
        command=[
            console_script("prefect"),
            "worker",
            "start",
            "--pool",
            settings.work_pool,
            "--type",
            "process",
            "--name",
            f"mlops-worker-{settings.prefect_port}",
            "--with-healthcheck",
        ],
        env=client_env(settings)
        | {
            "PREFECT_HOME": str(state / "prefect"),
            "PREFECT_WORKER_WEBSERVER_HOST": host,
            "PREFECT_WORKER_WEBSERVER_PORT": str(settings.worker_port),
            # Its flow runs send a heartbeat every 30 s (Prefect's minimum); when they stop without a final
            # state, the `mlops-crash-zombie-runs` automation marks the run Crashed.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        }
        | worker_env(settings),
        state_dir=state,
        cwd=PROJECT_ROOT,
    )


def _serving(settings: Settings) -> Service:
    return Service(
        name="serving",
        port=settings.serving_port,
        url=settings.local_serving_url,
        health_url=f"{settings.local_serving_url}/health",
        # Worker processes: MLOPS_SERVING_WORKERS, 0 (the default) for one per core.
        command=[console_script("mlops"), "serve", "--workers", str(settings.serving_workers)],
        env=client_env(settings),
        state_dir=settings.state_dir.resolve(),
        cwd=PROJECT_ROOT,
    )


def dask_services(settings: Settings) -> list[Service]:
    """The local Dask cluster: a scheduler and `dask_workers` workers (none when 0), all on loopback.

    Every listening socket is on `settings.host` (127.0.0.1): `dask scheduler` and `dask worker` open their
    HTTP dashboards on 0.0.0.0 unless told otherwise. The workers are nanny-managed processes (a killed
    worker is restarted by its nanny, which also sets OpenMP/BLAS threads to 1), one thread each, with a
    memory limit; they run the project's code from this environment (the package is installed in it).
    """
    if settings.dask_workers == 0:
        return []
    return [_dask_scheduler(settings), _dask_workers(settings)]


# An idle local cluster (scheduler, nanny, two workers) used 13 % of a core, most of it the workers' statistical
# profiler sampling every thread's stack every 10 ms and the 20 ms event-loop tick. The stack's cluster runs
# without the profiler (the dashboard's Profile page stays empty), with a 1 s tick and a 2 s system monitor;
# a DASK_* variable of the user's own (Dask's config names) wins over these.
DASK_QUIET = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
}


def _dask_env() -> dict[str, str]:
    return {key: os.environ.get(key, value) for key, value in DASK_QUIET.items()}


def _dask_scheduler(settings: Settings) -> Service:
    host, dashboard_port = dask_host(settings), settings.dask_dashboard_port
    return Service(
        name="dask-scheduler",
        port=settings.dask_scheduler_port,
        url=f"{dask_address(settings)}  dashboard {dask_dashboard_url(settings)}",
        health_url=f"http://{host}:{dashboard_port}/health",
        command=[
            console_script("dask"),
            "scheduler",
            "--host",
            host,
            "--port",
            str(settings.dask_scheduler_port),
            "--dashboard-address",
            f"{host}:{dashboard_port}",
        ],
        env=_dask_env(),
        state_dir=settings.state_dir.resolve(),
        extra_ports=(dashboard_port,),
    )


def _dask_workers(settings: Settings) -> Service:
    state, host, count = settings.state_dir.resolve(), dask_host(settings), settings.dask_workers
    return Service(
        name="dask-workers",
        port=0,  # no port of their own: they listen on free ports of `host` and join the scheduler
        url=f"{count} x (1 thread, {settings.dask_worker_memory}) on {dask_address(settings)}",
        health_url=f"http://{host}:{settings.dask_dashboard_port}/json/counts.json",
        command=[
            console_script("dask"),
            "worker",
            dask_address(settings),
            "--nworkers",
            str(count),
            "--nthreads",
            "1",
            "--nanny",
            "--memory-limit",
            settings.dask_worker_memory,
            "--host",
            host,
            "--dashboard-address",
            f"{host}:0",
            "--name",
            f"mlops-{settings.dask_scheduler_port}",
            "--local-directory",
            str(state / "dask"),  # spilled data stays with the stack's state
        ],
        # Trials are Prefect task runs: the workers report to this stack's Prefect server and log like flows.
        env=client_env(settings) | _dask_env(),
        state_dir=state,
        cwd=PROJECT_ROOT,
        ready=lambda: (dask_worker_count(settings) or 0) >= settings.dask_workers,
    )
