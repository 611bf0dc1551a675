"""The local stack's behaviour (idempotent start, busy ports) and the CLI's answers, on real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.settings import Settings
from mlops import stack as local_stack

pytestmark = pytest.mark.integration
MLOPS = str(Path(sys.executable).parent / "mlops")


def test_second_up_is_a_no_op(stack):
    before = {s.name: s.pid for s in local_stack.status(stack)}
    after = {s.name: (s.pid, s.healthy) for s in local_stack.up(stack)}
    assert {name: pid for name, (pid, _) in after.items()} == before
    assert all(healthy for _, healthy in after.values())


def test_busy_port_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(state_dir=tmp_path, s3_port=port)
        with pytest.raises(local_stack.StackError, match=f"s3: port {port} on 127.0.0.1 is busy"):
            local_stack.up(settings, timeout=5)
    assert not any(s.running for s in local_stack.status(settings))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_train_without_a_stack_says_how_to_start_it(tmp_path):
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "PREFECT_API", "MLFLOW_TRACK"))}
    env |= {"MLOPS_S3_PORT": str(port), "MLOPS_MLFLOW_PORT": str(port), "MLOPS_PREFECT_PORT": str(port)}
    result = subprocess.run(
        [MLOPS, "train"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert "the stack is not reachable" in result.stderr
    assert "mlops stack up" in result.stderr


def test_stack_status_reports_each_server(stack):
    result = subprocess.run([MLOPS, "stack", "status"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("s3", "mlflow", "prefect"):
        assert f"{name} " in result.stdout and "healthy" in result.stdout
    assert stack.aws_secret_access_key.get_secret_value() not in result.stdout


def test_s3_rejects_bad_credentials(stack):
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.aws_access_key_id,
        aws_secret_access_key="wrong",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        client.list_objects_v2(Bucket=stack.bucket)
