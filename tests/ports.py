"""Free loopback ports for the servers tests start.

A port is chosen some seconds before its server binds it (a session stack starts eight servers one after
another). A port the kernel hands out (`bind(("127.0.0.1", 0))`) comes from its ephemeral range, which every
other bind to port 0 (a Dask worker's or nanny's listener) and every outgoing connection's local port draw from
too: in between, one of them could take it, and the server found it busy (a clean-clone run of 2026-12-07 lost a
session stack so: something listened on its worker's port). So the ports come from below that range, where only
an explicit bind takes a port, and each pytest-xdist worker from its own slice of it, handed out in turn, so that
two workers, or two stacks of one worker, never choose the same port.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

LOWEST = 10_000  # below: well-known services' ports
WORKER_SLICES = 8  # workers gw0..gw7 each have their slice (gw8 shares gw0's, and so on)
_lock = threading.Lock()
_cursor: dict[str, int] = {}  # "next": the next port this process tries, within its slice


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _slice() -> range:
    """This process's ports: its pytest-xdist worker's share of the ports between LOWEST and the ephemeral range."""
    size = (_ephemeral_low() - LOWEST) // WORKER_SLICES
    if size < 500:
        raise RuntimeError(
            f"the kernel's ephemeral ports start at {_ephemeral_low()} (net.ipv4.ip_local_port_range): too few "
            f"ports below it for the tests' servers; raise its lower end above {LOWEST + 500 * WORKER_SLICES}"
        )
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % WORKER_SLICES if worker.isdigit() else 0
    start = LOWEST + index * size
    return range(start, start + size)


def _take(size: int) -> int:
    """The first of `size` consecutive free ports, the next ones in this process's slice after the last taken."""
    ports = _slice()
    with _lock:
        # two pytest runs at once on one machine start apart
        _cursor.setdefault("next", ports.start + (os.getpid() * 97) % len(ports))
        for _ in range(len(ports)):
            if _cursor["next"] + size > ports.stop:
                _cursor["next"] = ports.start
            base = _cursor["next"]
            _cursor["next"] = base + size
            if all(_free(base + i) for i in range(size)):
                return base
    raise RuntimeError(f"no {size} consecutive free ports in {ports.start}-{ports.stop - 1}")


def free_port() -> int:
    """A port nothing listens on now, and no outgoing connection will take (see the module's docstring)."""
    return _take(1)


def free_port_block(size: int) -> int:
    """First port of `size` consecutive free ports (for SeaweedFS's internal ports)."""
    return _take(size)


def stack_ports() -> dict[str, str]:
    """Free ports for a private stack of a test's own (S3, MLflow, Prefect, worker, serving, PostgreSQL, the Dask
    scheduler and its dashboard, SeaweedFS's block), as the `MLOPS_*` variables `mlops stack up` reads.

    Every port a stack binds: one left at its default collides with a developer's stack on the same machine
    (the model job's test failed on a busy 8786 while a dev stack ran).
    """
    names = ("S3", "MLFLOW", "PREFECT", "WORKER", "SERVING", "POSTGRES", "DASK_SCHEDULER", "DASK_DASHBOARD")
    ports = {name: free_port() for name in names}
    return {f"MLOPS_{name}_PORT": str(port) for name, port in ports.items()} | {
        "MLOPS_WEED_PORT_BASE": str(free_port_block(16))
    }
