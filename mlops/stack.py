"""The local stack: real S3 (SeaweedFS), MLflow and Prefect servers, a worker and the serving API, on loopback.

Each server runs as a detached process (its own process group) whose pid, log and data live under one
state folder (`settings.state_dir`, `.mlops/` by default). `up` is idempotent: a server that already
answers its health check is left alone; one that died (SIGKILL, crash) is started again at once: a
killed process that is still a zombie (PID 1 of a container may reap late) counts as dead, what is left
of its process group is killed, and the start waits for its ports to be free. Failures name the server,
the busy port or the log file to read. `down` stops the serving API first and waits for it (it uploads
its spooled predictions to S3), then the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.settings import Settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# SeaweedFS `weed mini` opens several internal ports besides S3 (master, volume, filer, admin and a
# gRPC port for each). They are laid out from one base so a test can move all of them at once.
WEED_INTERNAL = ("master", "volume", "filer", "admin")
WEED_GRPC_OFFSET = 10


class StackError(RuntimeError):
    """A server of the local stack could not be started or reached."""


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

    @property
    def log_file(self) -> Path:
        """Where the server's output goes."""
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        """Where the server's pid is kept."""
        return self.state_dir / "run" / f"{self.name}.pid"


@dataclass(frozen=True)
class ServiceStatus:
    """What `status` reports for one server."""

    name: str
    url: str
    running: bool
    healthy: bool
    pid: int | None
    log_file: Path

    def describe(self) -> str:
        """One human line."""
        state = "healthy" if self.healthy else ("starting/unhealthy" if self.running else "stopped")
        pid = f" pid {self.pid}" if self.pid else ""
        return f"{self.name:8s} {state:18s} {self.url}{pid}  log: {self.log_file}"


def _bin(name: str) -> str:
    """Path of a console script installed beside the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def weed_ports(settings: Settings) -> dict[str, int]:
    """Internal SeaweedFS ports derived from `settings.weed_port_base`."""
    base = settings.weed_port_base
    ports = {name: base + i for i, name in enumerate(WEED_INTERNAL)}
    ports |= {f"{name}.grpc": base + WEED_GRPC_OFFSET + i for i, name in enumerate(WEED_INTERNAL)}
    ports["s3.grpc"] = base + WEED_GRPC_OFFSET + len(WEED_INTERNAL)
    return ports


def _s3_env(settings: Settings) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
    }


# Client settings for every process that runs flows (set before Prefect and MLflow load): our
# standard-library loggers go to the Prefect UI; analytics, telemetry and progress bars are off.
CLIENT_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mlops,core,adapters,services,tasks,flows",
    # The same loggers also run outside flows (`mlops rollback`, the serving API): log locally, no warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Bound MLflow's own HTTP retries (7 with long backoff by default); Prefect's task retries come on top.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def client_env(settings: Settings) -> dict[str, str]:
    """Environment that points a process (the CLI's runs, a worker and its flows) at this stack."""
    return (
        _s3_env(settings)
        | {
            "MLOPS_HOST": settings.host,
            "MLOPS_STATE_DIR": str(settings.state_dir.resolve()),
            "MLOPS_S3_PORT": str(settings.s3_port),
            "MLOPS_MLFLOW_PORT": str(settings.mlflow_port),
            "MLOPS_PREFECT_PORT": str(settings.prefect_port),
            "MLOPS_BUCKET": settings.bucket,
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
            "PREFECT_API_URL": settings.prefect_api_url,
            "MLOPS_SERVING_PORT": str(settings.serving_port),
            "MLOPS_SERVING_MODEL": settings.serving_model,
            # Training checks after a promotion that this serving API switched to the new champion.
            "MLOPS_SERVING_URL": settings.serving_url or settings.local_serving_url,
            # Flows find the local Dask scheduler on this port (adapters.cluster.cluster_address).
            "MLOPS_DASK_WORKERS": str(settings.dask_workers),
            "MLOPS_DASK_SCHEDULER_PORT": str(settings.dask_scheduler_port),
        }
        | CLIENT_DEFAULTS
    )


def services(settings: Settings) -> list[Service]:
    """The stack's servers, in start order (S3 first: MLflow stores its artifacts there)."""
    state = settings.state_dir.resolve()
    host = settings.host
    s3_dir = state / "s3"
    internal = weed_ports(settings)
    weed_cmd = [
        _bin("weed"),
        f"-logdir={state / 'logs'}",  # glog files; /tmp otherwise
        "mini",
        f"-dir={s3_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={settings.s3_port}",
        f"-s3.port.grpc={internal['s3.grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        f"-bucket={settings.bucket}",
    ]
    for name in WEED_INTERNAL:
        weed_cmd += [f"-{name}.port={internal[name]}", f"-{name}.port.grpc={internal[name + '.grpc']}"]

    mlflow_dir = state / "mlflow"
    mlflow_cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{settings.bucket}/mlflow",
    ]
    prefect_dir = state / "prefect"
    prefect_cmd = [
        _bin("prefect"),
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(settings.prefect_port),
        "--analytics-off",
    ]
    servers = [
        Service(
            name="s3",
            port=settings.s3_port,
            url=f"http://{host}:{settings.s3_port}",
            health_url=f"http://{host}:{settings.s3_port}/healthz",
            command=weed_cmd,
            env=_s3_env(settings),
            state_dir=state,
            extra_ports=tuple(internal.values()),
        ),
        Service(
            name="mlflow",
            port=settings.mlflow_port,
            url=f"http://{host}:{settings.mlflow_port}",
            health_url=f"http://{host}:{settings.mlflow_port}/health",
            command=mlflow_cmd,
            env=_s3_env(settings)
            | {
                "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{settings.s3_port}",
                # The job runner (GenAI features we do not use) starts 7 huey workers, ~1.7 GB in all.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            },
            state_dir=state,
        ),
        Service(
            name="prefect",
            port=settings.prefect_port,
            url=f"http://{host}:{settings.prefect_port}",
            health_url=f"http://{host}:{settings.prefect_port}/api/health",
            command=prefect_cmd,
            env={
                "PREFECT_HOME": str(prefect_dir),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}",
                "PREFECT_SERVER_API_HOST": host,
                "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
                "PREFECT_UI_API_URL": f"http://{host}:{settings.prefect_port}/api",
                "PREFECT_LOGGING_LEVEL": "WARNING",
            },
            state_dir=state,
        ),
        *dask_services(settings),
        Service(
            name="worker",
            port=settings.worker_port,
            url=f"pool {settings.work_pool}",
            health_url=f"http://{host}:{settings.worker_port}/health",
            command=[
                _bin("prefect"),
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
                "PREFECT_HOME": str(prefect_dir),
                "PREFECT_WORKER_WEBSERVER_HOST": host,
                "PREFECT_WORKER_WEBSERVER_PORT": str(settings.worker_port),
                # Its flow runs send a heartbeat every 30 s (Prefect's minimum); when they stop without a final
                # state, the `mlops-crash-zombie-runs` automation marks the run Crashed.
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            },
            state_dir=state,
            cwd=PROJECT_ROOT,
        ),
        Service(
            name="serving",
            port=settings.serving_port,
            url=settings.local_serving_url,
            health_url=f"{settings.local_serving_url}/health",
            # Worker processes: MLOPS_SERVING_WORKERS, 0 (the default) for one per core.
            command=[_bin("mlops"), "serve", "--workers", str(settings.serving_workers)],
            env=client_env(settings),
            state_dir=state,
            cwd=PROJECT_ROOT,
        ),
    ]
    return servers


def dask_address(settings: Settings) -> str:
    """The local Dask scheduler's address."""
    return f"tcp://{settings.host}:{settings.dask_scheduler_port}"


def dask_dashboard_url(settings: Settings) -> str:
    """The local Dask scheduler's dashboard (127.0.0.1 unless MLOPS_HOST says otherwise)."""
    return f"http://{settings.host}:{settings.dask_dashboard_port}/status"


def dask_worker_count(settings: Settings) -> int | None:
    """Workers connected to the local scheduler (from its HTTP JSON), or None when it does not answer."""
    try:
        response = httpx.get(f"http://{settings.host}:{settings.dask_dashboard_port}/json/counts.json", timeout=2.0)
        return int(response.json()["workers"]) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def dask_summary(settings: Settings) -> str:
    """One line for `stack status`: which Dask cluster flows use, its workers and its dashboard."""
    if settings.dask_address:
        return f"dask     flows use MLOPS_DASK_ADDRESS={settings.dask_address} (the local cluster is not used)"
    if settings.dask_workers == 0:
        return "dask     no local cluster (MLOPS_DASK_WORKERS=0): search trials run in the flow's process"
    connected = dask_worker_count(settings)
    workers = "scheduler not answering" if connected is None else f"{connected} of {settings.dask_workers} workers"
    return f"dask     {dask_address(settings)}  {workers}  dashboard {dask_dashboard_url(settings)}"


def dask_services(settings: Settings) -> list[Service]:
    """The local Dask cluster: a scheduler and `dask_workers` workers (none when 0), all on loopback.

    Every listening socket is on `settings.host` (127.0.0.1): `dask scheduler` and `dask worker` open their
    HTTP dashboards on 0.0.0.0 unless told otherwise. The workers are nanny-managed processes (a killed
    worker is restarted by its nanny, which also sets OpenMP/BLAS threads to 1), one thread each, with a
    memory limit; they run the project's code from this environment (the package is installed in it).
    """
    if settings.dask_workers == 0:
        return []
    state = settings.state_dir.resolve()
    host = settings.host
    dashboard = f"http://{host}:{settings.dask_dashboard_port}"
    scheduler = Service(
        name="dask-scheduler",
        port=settings.dask_scheduler_port,
        url=f"{dask_address(settings)}  dashboard {dask_dashboard_url(settings)}",
        health_url=f"{dashboard}/health",
        command=[
            _bin("dask"),
            "scheduler",
            "--host",
            host,
            "--port",
            str(settings.dask_scheduler_port),
            "--dashboard-address",
            f"{host}:{settings.dask_dashboard_port}",
        ],
        env={},
        state_dir=state,
        extra_ports=(settings.dask_dashboard_port,),
    )
    workers = Service(
        name="dask-workers",
        port=0,  # no port of their own: they listen on free ports of `host` and join the scheduler
        url=f"{settings.dask_workers} x (1 thread, {settings.dask_worker_memory}) on {dask_address(settings)}",
        health_url=f"{dashboard}/json/counts.json",
        command=[
            _bin("dask"),
            "worker",
            dask_address(settings),
            "--nworkers",
            str(settings.dask_workers),
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
        env=client_env(settings),
        state_dir=state,
        cwd=PROJECT_ROOT,
        ready=lambda: (dask_worker_count(settings) or 0) >= settings.dask_workers,
    )
    return [scheduler, workers]


def _alive(pid: int) -> bool:
    """True while the process runs; a zombie counts as gone.

    A child of ours is reaped here; another's zombie (a server whose starter exited, killed while PID 1
    has not reaped it yet: in a container that may take long) is recognised from /proc.
    """
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) not in {"Z", "X"}


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, Z, ...); None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _recorded_pid(service: Service) -> int | None:
    try:
        return int(service.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _read_pid(service: Service) -> int | None:
    """The server's pid while it runs; None when it died or the pid now belongs to another program."""
    pid = _recorded_pid(service)
    return pid if pid is not None and _alive(pid) and _runs(pid, service.command[0]) else None


def _runs(pid: int, program: str) -> bool:
    """False when /proc shows that `pid` runs something else than `program` (its number was reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return not command or Path(program).name.encode() in command


def _clear_dead(service: Service, settings: Settings, wait: float = 15.0) -> None:
    """After a server died: kill what is left of its process group, forget its pid, wait for its ports.

    A server started here leads its own process group (the pid is the group id), so children it left
    behind (e.g. uvicorn workers still holding the port after their parent was SIGKILLed) go with it.
    A port in TIME_WAIT does not block a restart (the servers bind with SO_REUSEADDR); a port another
    program holds stays busy and is reported by the caller.
    """
    pid = _recorded_pid(service)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            log.info("%s: SIGKILL to the dead server's process group %s (children it left)", service.name, pid)
        service.pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(
        port_in_use(settings.host, port) for port in (service.port, *service.extra_ports)
    ):
        time.sleep(0.2)


def _service_healthy(service: Service) -> bool:
    return service.ready() if service.ready is not None else _healthy(service.health_url)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def status(settings: Settings) -> list[ServiceStatus]:
    """Report each server: its pid if it runs, and whether it answers its health check."""
    result = []
    for service in services(settings):
        pid = _read_pid(service)
        result.append(
            ServiceStatus(
                name=service.name,
                url=service.url,
                running=pid is not None,
                healthy=_service_healthy(service),
                pid=pid,
                log_file=service.log_file,
            )
        )
    return result


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def _start(service: Service, settings: Settings, timeout: float) -> None:
    pid = _read_pid(service)
    if pid is not None and _service_healthy(service):
        log.info("%s already running (pid %s)", service.name, pid)
        return
    if pid is not None and _wait_healthy(service, pid, timeout):  # starting elsewhere (another `up`)
        return
    # dead, or it died while we waited for it: start it again
    if _recorded_pid(service) is not None:
        log.warning("%s died (pid file %s); starting it again", service.name, service.pid_file)
    _clear_dead(service, settings)
    for port in (service.port, *service.extra_ports):
        if port_in_use(settings.host, port):
            raise StackError(
                f"{service.name}: port {port} on {settings.host} is busy (another process listens "
                f"there); stop it or choose other ports (MLOPS_*_PORT settings)"
            )
    service.log_file.parent.mkdir(parents=True, exist_ok=True)
    service.pid_file.parent.mkdir(parents=True, exist_ok=True)
    for sub in ("s3", "mlflow", "prefect"):
        (service.state_dir / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= service.env
    with service.log_file.open("ab") as out:
        proc = subprocess.Popen(
            service.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=service.cwd or service.state_dir,
            start_new_session=True,
        )
    service.pid_file.write_text(str(proc.pid))
    log.info("started %s (pid %s), log: %s", service.name, proc.pid, service.log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(
                f"{service.name} exited with {proc.returncode} during start-up; see {service.log_file}:\n"
                f"{_tail(service.log_file)}"
            )
        if _service_healthy(service):
            return
        time.sleep(0.5)
    raise StackError(
        f"{service.name} did not become healthy at {service.health_url} within {timeout:.0f}s; "
        f"see {service.log_file}:\n{_tail(service.log_file)}"
    )


def _wait_healthy(service: Service, pid: int, timeout: float) -> bool:
    """Wait for a running server that another `up` started; False when it dies before it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _service_healthy(service):
            return True
        if not _alive(pid):
            return False
        time.sleep(0.5)
    raise StackError(
        f"{service.name} (pid {pid}) runs but did not become healthy at {service.health_url} within "
        f"{timeout:.0f}s; see {service.log_file}:\n{_tail(service.log_file)}"
    )


def up(settings: Settings, timeout: float = 180.0) -> list[ServiceStatus]:
    """Start every server that is not already healthy, then wait for all of them."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    for service in services(settings):
        _start(service, settings, timeout)
    return status(settings)


def _stop_pid(pid: int, timeout: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def down(settings: Settings, serving_timeout: float = 60.0) -> list[str]:
    """Stop the servers this state folder started; returns the names stopped, in order.

    The serving API first, alone, waited for up to `serving_timeout` seconds: on SIGTERM it finishes its
    requests and uploads its spooled predictions to S3, so S3 must still run. Then the others get
    SIGTERM at once (then SIGKILL after a grace period), so that part takes the slowest server's time.
    """
    running = [(service, _read_pid(service)) for service in reversed(services(settings))]
    first = [(service, pid) for service, pid in running if service.name == "serving"]
    rest = [(service, pid) for service, pid in running if service.name != "serving"]
    for service, pid in first:
        if pid is not None:
            log.info("stopping serving first: it uploads its spooled predictions to S3 before S3 stops")
            _stop_pid(pid, timeout=serving_timeout)
        service.pid_file.unlink(missing_ok=True)
    with ThreadPoolExecutor(max_workers=len(rest)) as pool:
        list(pool.map(_stop_pid, [pid for _, pid in rest if pid is not None]))
    for service, _ in rest:
        service.pid_file.unlink(missing_ok=True)
    return [service.name for service, pid in first + rest if pid is not None]


@contextlib.contextmanager
def running(
    command: list[str], health_url: str, env: dict[str, str], log_file: Path, timeout: float = 120.0
) -> Iterator[subprocess.Popen]:
    """Run one server for the duration of a `with` block (tests, benchmarks); waits for its health check.

    Raises StackError with the tail of its log when it exits or does not become healthy in time.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(health_url):
            if proc.poll() is not None:
                raise StackError(f"{command[0]} exited with {proc.returncode}; see {log_file}:\n{_tail(log_file)}")
            if time.monotonic() > deadline:
                raise StackError(f"{health_url} not healthy within {timeout:.0f}s; see {log_file}:\n{_tail(log_file)}")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
