"""The processes of the stack's servers: pid files, liveness, stopping a process group, what a dead one left.

Each server runs detached in its own process group (its pid is the group id), with its pid in a file under
the state folder. A pid counts as the server's only while it runs (a zombie counts as gone) and runs the
server's program (a reused pid does not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from adapters.settings import Settings
from mlops.stack_health import port_in_use
from mlops.stack_servers import Service

log = logging.getLogger("mlops.stack")  # its lines read as before the split: `mlops.stack: ...`


def alive(pid: int) -> bool:
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
    return process_state(pid) not in {"Z", "X"}


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, Z, ...); None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def recorded_pid(service: Service) -> int | None:
    """The pid in the server's pid file, whether or not it still runs."""
    try:
        return int(service.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_pid(service: Service) -> int | None:
    """The server's pid while it runs; None when it died or the pid now belongs to another program."""
    pid = recorded_pid(service)
    return pid if pid is not None and alive(pid) and _runs(pid, service.command[0]) else None


def _runs(pid: int, program: str) -> bool:
    """False when /proc shows that `pid` runs something else than `program` (its number was reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return not command or Path(program).name.encode() in command


def clear_dead(service: Service, settings: Settings, wait: float = 15.0) -> None:
    """After a server died: kill what is left of its process group, forget its pid, wait for its ports.

    A server started here leads its own process group (the pid is the group id), so children it left
    behind (e.g. uvicorn workers still holding the port after their parent was SIGKILLed) go with it.
    A port in TIME_WAIT does not block a restart (the servers bind with SO_REUSEADDR); a port another
    program holds stays busy and is reported by the caller.
    """
    pid = recorded_pid(service)
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


def stop_pid(pid: int, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM) to the process group, then SIGKILL when it still runs after `timeout` seconds."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"
