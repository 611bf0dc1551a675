"""The Dask cluster heavy steps run on (issue 14): which scheduler, and the S3 options its workers read with.

`cluster_address` is `MLOPS_DASK_ADDRESS` when set (an existing cluster anywhere), else the local stack's
scheduler when one listens on `MLOPS_DASK_SCHEDULER_PORT` (`mlops stack up` starts it), else None: no
cluster, and every step runs in the flow's own process.
"""

from __future__ import annotations

import socket
from typing import Any

from adapters.settings import Settings


def _listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cluster_address(settings: Settings) -> str | None:
    """The scheduler to use, or None when there is no cluster."""
    if settings.dask_address:
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
