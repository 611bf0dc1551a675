"""Health checks of the local stack: an HTTP answer, a listening port, the Dask workers that joined."""

from __future__ import annotations

import socket

import httpx

from adapters.settings import Settings
from mlops.stack_env import dask_address, dask_dashboard_url, dask_host


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when `url` answers with a status below 500."""
    try:
        return httpx.get(url, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def dask_worker_count(settings: Settings) -> int | None:
    """Workers connected to the local scheduler (from its HTTP JSON), or None when it does not answer."""
    try:
        url = f"http://{dask_host(settings)}:{settings.dask_dashboard_port}/json/counts.json"
        response = httpx.get(url, timeout=2.0)
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
