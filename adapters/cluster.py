"""The Dask cluster heavy steps run on: which scheduler, its clients, and the S3 options its workers read with.

`cluster_address` is `MLOPS_DASK_ADDRESS` when set (an existing cluster anywhere), else the local stack's
scheduler when one listens on `MLOPS_DASK_SCHEDULER_PORT` (`mlops stack up` starts it), else None: no
cluster, and every step runs in the flow's own process. `dask_client` keeps one client per scheduler for
the process (a loopback `LocalCluster` when there is none); `connect` opens a client for one run's work.
Nothing here runs at import; a client is made on first use.
"""

from __future__ import annotations

import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from adapters.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = "20s"

_clients: dict[str, Any] = {}  # one client per scheduler address for the process (made on first use)


def _listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ClusterError(RuntimeError):
    """The configured Dask cluster cannot be reached, or has no worker to run on."""


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        raise ClusterError(f"MLOPS_DASK_ADDRESS={address!r} is not a scheduler address: use tcp://host:port")
    return parts.hostname, parts.port


def cluster_address(settings: Settings) -> str | None:
    """The scheduler to use, or None when there is no cluster.

    Raises:
        ClusterError: MLOPS_DASK_ADDRESS is set but nothing listens there (never a silent fallback to no cluster).
    """
    if settings.dask_address:
        host, port = _host_port(settings.dask_address)
        if not _listening(host, port, timeout=5.0):
            raise ClusterError(
                f"the Dask scheduler at MLOPS_DASK_ADDRESS={settings.dask_address} does not answer on {host}:{port}: "
                "start the cluster, or unset MLOPS_DASK_ADDRESS to use the local stack's"
            )
        return settings.dask_address
    if settings.dask_workers > 0 and _listening(settings.host, settings.dask_scheduler_port):
        return f"tcp://{settings.host}:{settings.dask_scheduler_port}"
    return None


def s3_storage_options(settings: Settings) -> dict[str, Any]:
    """fsspec/s3fs options for the configured S3 endpoint (dask.dataframe and pyarrow datasets read with these).

    The secret is passed as a value, never logged; workers get it inside the task graph, so a cluster
    outside this machine must be trusted with it (as the Prefect workers are).
    """
    return {
        "key": settings.aws_access_key_id,
        "secret": settings.aws_secret_access_key.get_secret_value(),
        "client_kwargs": {"endpoint_url": settings.s3_endpoint_url, "region_name": settings.aws_region},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }


def require_workers(address: str, timeout: float = 60.0) -> int:
    """Wait until the scheduler at `address` has a worker; returns how many it has.

    Raises:
        ClusterError: The scheduler cannot be reached, or no worker joined it within `timeout` seconds
            (work sent there would wait forever).
    """
    from distributed import Client

    try:
        with Client(address, timeout="10s", set_as_default=False) as client:
            client.wait_for_workers(1, timeout=timeout)
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"the Dask cluster at {address} has no worker to run on ({exc})") from exc


def dask_client(settings: Settings) -> Any:
    """A client of the configured cluster, or of a local one (`dask_workers` processes, loopback) when none is set."""
    from distributed import Client, LocalCluster

    address = cluster_address(settings) or "local"
    client = _clients.get(address)
    if client is not None and client.status == "running":
        return client
    if address == "local":
        cluster = LocalCluster(
            n_workers=max(settings.dask_workers, 1),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=settings.dask_worker_memory,
        )
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(address, set_as_default=False)
    _clients[address] = client
    log.info("Dask cluster %s: %d worker(s)", address, len(client.scheduler_info()["workers"]))
    return client


def connect(address: str) -> Any:
    """A new client of the scheduler at `address` (a context manager: closed after the run's work)."""
    from distributed import Client

    return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
