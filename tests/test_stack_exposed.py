"""A stack bound beyond loopback: it refuses the open defaults, and its MLflow and Prefect require credentials.

A real stack on this machine's own (non-loopback) address, in a temp state folder with its own ports:
without a password, S3 keys of its own and a serving token, `mlops stack up` refuses to start; with them,
MLflow (its basic-auth app) and Prefect (its API auth string) answer 401 to a client without credentials,
the project's clients (which send them) work, and the Dask cluster stays on loopback. (A whole training run
on such a stack was checked by hand: it registers its version; the suite keeps to the clients.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.ports import stack_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _own_address() -> str:
    """This machine's address on its default route (no packet is sent); 0.0.0.0 without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return "0.0.0.0"
    return "0.0.0.0" if address.startswith("127.") else address


def _env(state: Path, host: str, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "PREFECT_", "MLFLOW_", "AWS_"))}
    return clean | stack_ports() | {"MLOPS_STATE_DIR": str(state), "MLOPS_HOST": host} | extra


def _mlops(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(BIN / "mlops"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_an_exposed_stack_needs_credentials_and_its_servers_require_them(tmp_path):
    host = _own_address()
    # Given MLOPS_HOST beyond loopback with the local stack's open defaults: refused, nothing started
    bare = _env(tmp_path / "bare", host)
    refused = _mlops(bare, "stack", "up")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    for missing in ("MLOPS_STACK_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLOPS_SERVING_TOKEN"):
        assert missing in refused.stderr, refused.stderr
    assert not (tmp_path / "bare" / "run").exists() or not list((tmp_path / "bare" / "run").glob("*.pid"))
    # Given the credentials
    secrets = {
        "MLOPS_STACK_PASSWORD": "stack-pass-0123",
        "AWS_ACCESS_KEY_ID": "exposed-key",
        "AWS_SECRET_ACCESS_KEY": "exposed-secret-0123",
        "MLOPS_SERVING_TOKEN": "serving-token-0123",
    }
    env = _env(tmp_path / "stack", host, MLOPS_DASK_WORKERS="1", **secrets)
    try:
        up = _mlops(env, "stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        mlflow = f"http://{host}:{env['MLOPS_MLFLOW_PORT']}"
        prefect = f"http://{host}:{env['MLOPS_PREFECT_PORT']}/api"
        # then a client without credentials is refused by MLflow and by Prefect
        search = {"max_results": 1}
        assert httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/search", json=search).status_code == 401
        assert httpx.post(f"{prefect}/flows/filter", json={}).status_code == 401
        wrong = ("mlops", "wrong")
        assert httpx.post(f"{prefect}/flows/filter", json={}, auth=wrong).status_code == 401
        # and with them they answer
        good = ("mlops", secrets["MLOPS_STACK_PASSWORD"])
        assert httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/search", json=search, auth=good).status_code == 200
        assert httpx.post(f"{prefect}/flows/filter", json={}, auth=good).status_code == 200
        # and the project's own clients (their environment from the settings) send them
        script = (
            "import os\n"
            "from adapters.settings import Settings\n"
            "from mlops.stack_env import client_env\n"
            "os.environ.update(client_env(Settings()))\n"
            "from adapters.clients import mlflow_client\n"
            "from prefect.client.orchestration import get_client\n"
            "print(len(mlflow_client(Settings()).search_experiments()))\n"
            "with get_client(sync_client=True) as client:\n"
            "    print(client.read_work_pool('mlops-process').name)\n"
        )
        clients = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert clients.returncode == 0 and "mlops-process" in clients.stdout, clients.stdout + clients.stderr
        # and the Dask cluster (no password of its own) listens on loopback only
        status = _mlops(env, "stack", "status")
        assert f"tcp://127.0.0.1:{env['MLOPS_DASK_SCHEDULER_PORT']}" in status.stdout, status.stdout
        for secret in secrets.values():
            assert secret not in status.stdout + status.stderr + up.stdout + up.stderr
    finally:
        _mlops(env, "stack", "down")
