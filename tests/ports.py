"""Free loopback ports for the servers tests start."""

from __future__ import annotations

import os
import socket


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int, start: int = 20000, stop: int = 60000) -> int:
    """First port of `size` consecutive free ports (for SeaweedFS's internal ports)."""
    for base in range(start + (os.getpid() % 200) * 50, stop, size + 7):
        if all(_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports found")


def stack_ports(weed_start: int = 40000) -> dict[str, str]:
    """Free ports for a private stack of a test's own (S3, MLflow, Prefect, worker, serving, PostgreSQL, the Dask
    scheduler and its dashboard, SeaweedFS's block), as the `MLOPS_*` variables `mlops stack up` reads.

    Every port a stack binds: one left at its default collides with a developer's stack on the same machine
    (the model job's test failed on a busy 8786 while a dev stack ran).
    """
    names = ("S3", "MLFLOW", "PREFECT", "WORKER", "SERVING", "POSTGRES", "DASK_SCHEDULER", "DASK_DASHBOARD")
    ports = {name: free_port() for name in names}
    return {f"MLOPS_{name}_PORT": str(port) for name, port in ports.items()} | {
        "MLOPS_WEED_PORT_BASE": str(free_port_block(16, start=weed_start))
    }
