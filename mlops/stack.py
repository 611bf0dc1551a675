"""The local stack: real S3 (SeaweedFS), MLflow and Prefect servers, a worker and the serving API, on loopback.

Each server runs as a detached process (its own process group) whose pid, log and data live under one
state folder (`settings.state_dir`, `.mlops/` by default). `up` is idempotent: a server that already
answers its health check is left alone; one that died (SIGKILL, crash) is started again at once: a
killed process that is still a zombie (PID 1 of a container may reap late) counts as dead, what is left
of its process group is killed, and the start waits for its ports to be free. Failures name the server,
the busy port or the log file to read. `down` stops the serving API first and waits for it (it uploads
its spooled predictions to S3), then the others.

This module starts, stops and reports the servers; what each one is lives in `mlops.stack_servers`, their
processes in `mlops.stack_processes`, the health checks in `mlops.stack_health` and the clients'
environment in `mlops.stack_env` (the names callers use are importable from here as well).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters.settings import Settings
from mlops.stack_env import CLIENT_DEFAULTS, client_env
from mlops.stack_health import dask_summary, healthy, port_in_use
from mlops.stack_processes import alive, clear_dead, process_state, read_pid, recorded_pid, stop_pid, tail
from mlops.stack_servers import Service, services

__all__ = [
    "CLIENT_DEFAULTS",
    "Service",
    "ServiceStatus",
    "StackError",
    "client_env",
    "dask_summary",
    "down",
    "port_in_use",
    "running",
    "services",
    "status",
    "up",
]

log = logging.getLogger(__name__)

# The names fault tests and benchmarks drive single servers with (from when this module held everything).
_healthy = healthy
_read_pid = read_pid
_state = process_state
_stop_pid = stop_pid


class StackError(RuntimeError):
    """A server of the local stack could not be started or reached."""


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


def status(settings: Settings) -> list[ServiceStatus]:
    """Report each server: its pid if it runs, and whether it answers its health check."""
    result = []
    for service in services(settings):
        pid = read_pid(service)
        result.append(
            ServiceStatus(
                name=service.name,
                url=service.url,
                running=pid is not None,
                healthy=service.is_healthy(),
                pid=pid,
                log_file=service.log_file,
            )
        )
    return result


def _start(service: Service, settings: Settings, timeout: float) -> None:
    pid = read_pid(service)
    if pid is not None and service.is_healthy():
        log.info("%s already running (pid %s)", service.name, pid)
        return
    if pid is not None and _wait_healthy(service, pid, timeout):  # starting elsewhere (another `up`)
        return
    # dead, or it died while we waited for it: start it again
    if recorded_pid(service) is not None:
        log.warning("%s died (pid file %s); starting it again", service.name, service.pid_file)
    clear_dead(service, settings)
    for port in (service.port, *service.extra_ports):
        if port_in_use(settings.host, port):
            raise StackError(
                f"{service.name}: port {port} on {settings.host} is busy (another process listens "
                f"there); stop it or choose other ports (MLOPS_*_PORT settings)"
            )
    owner = service.prepare() if service.prepare is not None else None
    proc = _spawn(service, owner)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(
                f"{service.name} exited with {proc.returncode} during start-up; see {service.log_file}:\n"
                f"{tail(service.log_file)}"
            )
        if service.is_healthy():
            return
        time.sleep(0.5)
    raise StackError(
        f"{service.name} did not become healthy at {service.health_url} within {timeout:.0f}s; "
        f"see {service.log_file}:\n{tail(service.log_file)}"
    )


def _spawn(service: Service, owner: tuple[int, int] | None = None) -> subprocess.Popen:
    """Start the server detached (its own process group), its output to its log, its pid to its pid file.

    `owner`: the (uid, gid) it runs as, when not this process's (PostgreSQL started by root).
    """
    service.log_file.parent.mkdir(parents=True, exist_ok=True)
    service.pid_file.parent.mkdir(parents=True, exist_ok=True)
    for sub in ("s3", "mlflow", "prefect"):
        (service.state_dir / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= service.env
    ids = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    with service.log_file.open("ab") as out:
        proc = subprocess.Popen(
            service.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=service.cwd or service.state_dir,
            start_new_session=True,
            **ids,
        )
    service.pid_file.write_text(str(proc.pid))
    log.info("started %s (pid %s), log: %s", service.name, proc.pid, service.log_file)
    return proc


def _wait_healthy(service: Service, pid: int, timeout: float) -> bool:
    """Wait for a running server that another `up` started; False when it dies before it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.is_healthy():
            return True
        if not alive(pid):
            return False
        time.sleep(0.5)
    raise StackError(
        f"{service.name} (pid {pid}) runs but did not become healthy at {service.health_url} within "
        f"{timeout:.0f}s; see {service.log_file}:\n{tail(service.log_file)}"
    )


# The loopback stack's well-known default (the setting's), refused beyond it.
DEFAULT_S3_SECRET = Settings.model_fields["aws_secret_access_key"].default.get_secret_value()


def check_exposure(settings: Settings) -> None:
    """Beyond loopback, refuse the local stack's open defaults: no MLflow/Prefect password, the default S3 secret."""
    if not settings.exposed:
        return
    missing = []
    if settings.stack_password is None or not settings.stack_password.get_secret_value().strip():
        missing.append("MLOPS_STACK_PASSWORD (MLflow's and Prefect's servers then require it)")
    if settings.aws_secret_access_key.get_secret_value() == DEFAULT_S3_SECRET:
        missing.append("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of your own (the default ones are public)")
    if settings.serving_token is None and not settings.serving_insecure:
        missing.append("MLOPS_SERVING_TOKEN (the serving API refuses to start beyond loopback without it)")
    if missing:
        raise StackError(f"MLOPS_HOST={settings.host} binds beyond loopback; set " + "; ".join(missing))


def up(settings: Settings, timeout: float = 180.0) -> list[ServiceStatus]:
    """Start every server that is not already healthy, then wait for all of them.

    Beyond loopback (MLOPS_HOST), only with credentials (`check_exposure`).
    """
    check_exposure(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    for service in services(settings):
        _start(service, settings, timeout)
    return status(settings)


def down(settings: Settings, serving_timeout: float = 60.0) -> list[str]:
    """Stop the servers this state folder started; returns the names stopped, in order.

    The serving API first, alone, waited for up to `serving_timeout` seconds: on SIGTERM it finishes its
    requests and uploads its spooled predictions to S3, so S3 must still run. Then the others get
    SIGTERM at once (then SIGKILL after a grace period), so that part takes the slowest server's time.
    PostgreSQL last, once nothing writes to it, with its fast shutdown (SIGINT: a clean checkpoint).
    """
    running = [(service, read_pid(service)) for service in reversed(services(settings))]
    first = [(service, pid) for service, pid in running if service.name == "serving"]
    last = [(service, pid) for service, pid in running if service.name == "postgres"]
    rest = [(service, pid) for service, pid in running if service.name not in {"serving", "postgres"}]
    for service, pid in first:
        if pid is not None:
            log.info("stopping serving first: it uploads its spooled predictions to S3 before S3 stops")
            stop_pid(pid, timeout=serving_timeout)
        service.pid_file.unlink(missing_ok=True)
    with ThreadPoolExecutor(max_workers=len(rest)) as pool:
        list(pool.map(stop_pid, [pid for _, pid in rest if pid is not None]))
    for service, pid in last:  # after the servers that write to it; its fast shutdown (a clean checkpoint)
        if pid is not None:
            stop_pid(pid, timeout=60, sig=service.stop_signal)
    for service, _ in rest + last:
        service.pid_file.unlink(missing_ok=True)
    return [service.name for service, pid in first + rest + last if pid is not None]


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
        while not healthy(health_url):
            if proc.poll() is not None:
                raise StackError(f"{command[0]} exited with {proc.returncode}; see {log_file}:\n{tail(log_file)}")
            if time.monotonic() > deadline:
                raise StackError(f"{health_url} not healthy within {timeout:.0f}s; see {log_file}:\n{tail(log_file)}")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
