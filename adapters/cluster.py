"""The Dask cluster heavy steps run on: which scheduler, and the S3 options its workers read with.

`cluster_address` is `MLOPS_DASK_ADDRESS` when set (an existing cluster anywhere), else the local stack's
scheduler when one listens on `MLOPS_DASK_SCHEDULER_PORT` (`mlops stack up` starts it), else None: no
cluster, and every step runs in the flow's own process.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from adapters.settings import Settings


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
