"""The local stack's behaviour (idempotent start, busy ports) and the CLI's answers, on real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
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
        settings = Settings(state_dir=tmp_path, s3_port=port, database="sqlite")  # S3 first: nothing starts
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
    for name in ("postgres", "s3", "mlflow", "prefect"):
        assert f"{name} " in result.stdout and "healthy" in result.stdout
    assert stack.aws_secret_access_key.get_secret_value() not in result.stdout
    assert f"database: PostgreSQL at 127.0.0.1:{stack.postgres_port}" in result.stdout


def test_prefect_and_mlflow_run_on_the_stacks_postgresql_and_its_password_is_nowhere(stack):
    import psycopg

    from adapters.clients import mlflow_client
    from mlops import stack_postgres

    password = stack_postgres.password(stack)
    # Given the stack's PostgreSQL, reached as its servers reach it
    with psycopg.connect(
        host="127.0.0.1", port=stack.postgres_port, user="mlops", password=password, dbname="postgres"
    ) as db:
        names = {row[0] for row in db.execute("SELECT datname FROM pg_database")}
        server = db.execute("SHOW server_version").fetchone()[0]
    assert {"prefect", "mlflow"} <= names and server.startswith("18.")
    # then MLflow's experiments and Prefect's flow runs are rows there (not in SQLite files)
    experiment = mlflow_client(stack).create_experiment(f"pg-check-{os.getpid()}")
    with psycopg.connect(
        host="127.0.0.1", port=stack.postgres_port, user="mlops", password=password, dbname="mlflow"
    ) as db:
        assert db.execute("SELECT count(*) FROM experiments WHERE experiment_id = %s", (int(experiment),)).fetchone()[0]
    with psycopg.connect(
        host="127.0.0.1", port=stack.postgres_port, user="mlops", password=password, dbname="prefect"
    ) as db:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    assert stack_postgres.sqlite_files(stack) == []
    # and a wrong password is refused (SCRAM on every connection, loopback included)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host="127.0.0.1", port=stack.postgres_port, user="mlops", password="wrong", dbname="postgres"
        ).close()
    # and the password is in no log, command line or pid file of the stack
    for path in stack.state_dir.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".pid", ".ini", ""} and path.name != "password":
            assert password not in path.read_text(errors="replace"), path
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                assert password not in (proc / "cmdline").read_text(errors="replace"), proc
            except OSError:
                continue


def test_postgresql_keeps_the_registry_across_a_restart(stack):
    import signal

    from adapters.clients import mlflow_client
    from mlops.stack_processes import stop_pid

    name = f"pg-restart-{os.getpid()}"
    experiment = mlflow_client(stack).create_experiment(name)
    [postgres] = [s for s in local_stack.services(stack) if s.name == "postgres"]
    # Given PostgreSQL stopped cleanly (its fast shutdown) and started again by `up`
    stop_pid(int(postgres.pid_file.read_text()), timeout=60, sig=signal.SIGINT)
    assert not postgres.is_healthy()
    local_stack.up(stack)
    # then MLflow, on its same connection pool, still has the experiment
    assert mlflow_client(stack).get_experiment_by_name(name).experiment_id == experiment


def test_seaweedfs_runs_without_telemetry_or_an_open_admin_page(stack):
    from mlops.stack_servers import weed_ports

    # its admin page answers 200 to anyone by default (no password); the stack turns the page off
    admin = f"http://{stack.host}:{weed_ports(stack)['admin']}"
    for path in ("/", "/admin"):
        try:
            status = httpx.get(admin + path, timeout=5).status_code
        except httpx.TransportError:
            continue
        assert status != 200, f"{admin}{path} answers {status}"
    # and anonymous statistics to the vendor are off (no network here to watch them: the flag is checked)
    pid = int((stack.state_dir / "run" / "s3.pid").read_text())
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-master.telemetry=false" in command and b"-admin.ui=false" in command


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


def test_the_stack_worker_asks_every_2_s_and_its_python_is_the_projects(stack):
    """Deployments start runs with `python -m prefect.engine`: the worker's PATH must find this interpreter."""
    import shutil

    [worker] = [s for s in local_stack.services(stack) if s.name == "worker"]
    pid = int(worker.pid_file.read_text())
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    assert environ["PREFECT_WORKER_QUERY_SECONDS"] == "2"  # Prefect's default is 10
    found = shutil.which("python", path=environ["PATH"])
    assert found is not None and Path(found).parent == Path(sys.executable).parent, (found, environ["PATH"])


def test_the_stack_runs_a_dask_cluster_on_loopback_and_status_shows_it(stack, dask_cluster):
    import psutil

    result = subprocess.run([MLOPS, "stack", "status"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "healthy" in lines["dask-scheduler"] and "healthy" in lines["dask-workers"]
    assert lines["dask"].split()[1:5] == [dask_cluster, "2", "of", "2"]
    assert f"dashboard http://127.0.0.1:{stack.dask_dashboard_port}/status" in lines["dask"]
    # the scheduler, the nannies, the workers and all their dashboards listen on loopback only
    leaders = [
        int((stack.state_dir / "run" / f"{name}.pid").read_text()) for name in ("dask-scheduler", "dask-workers")
    ]
    processes = [psutil.Process(pid) for pid in leaders]
    processes += [child for p in processes for child in p.children(recursive=True)]
    listening = [c.laddr for p in processes for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 2 + 2 * 3  # scheduler + dashboard; per worker: nanny, worker, worker dashboard
    assert {address.ip for address in listening} == {"127.0.0.1"}


def test_no_dask_workers_means_no_local_cluster(tmp_path):
    settings = Settings(state_dir=tmp_path, dask_workers=0)
    assert [s.name for s in local_stack.services(settings) if s.name.startswith("dask")] == []
    assert "no local cluster (MLOPS_DASK_WORKERS=0)" in local_stack.dask_summary(settings)
    from adapters.cluster import cluster_address

    assert cluster_address(settings) is None
    names = [s.name for s in local_stack.services(Settings(state_dir=tmp_path, dask_workers=3))]
    assert names.index("dask-scheduler") < names.index("dask-workers") < names.index("worker")


def test_an_unreachable_dask_address_is_named(tmp_path):
    from adapters.cluster import ClusterError, cluster_address

    port = _closed_port()
    settings = Settings(state_dir=tmp_path, dask_address=f"tcp://127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=f"MLOPS_DASK_ADDRESS=tcp://127.0.0.1:{port} does not answer"):
        cluster_address(settings)
    with pytest.raises(ClusterError, match="is not a scheduler address"):
        cluster_address(Settings(state_dir=tmp_path, dask_address="nonsense"))


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from mlops.cli_common import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
idle = ThreadPoolExecutor(2)  # never shut down, its workers wait for work (as MLflow's download pool's do)
idle.submit(time.sleep, 0.1)
print("unflushed line", end="")
exit_now(eval(sys.argv[2]))
"""


@pytest.mark.parametrize(("code", "returncode"), [("3", 3), ("None", 0), ("'a message'", 1)])
def test_the_quick_exit_ends_as_python_would(tmp_path, code, returncode):
    """`mlops` ends with `exit_now`: threads joined, idle executors stopped, exit handlers run, output flushed, the
    same exit code (an executor's idle workers kept `mlops models trust` waiting forever when they were joined)."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == returncode, result.stderr
    assert result.stdout == "unflushed line"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    assert result.stderr == ("a message\n" if returncode == 1 else "")


def test_mlops_answers_through_its_quick_exit(tmp_path):
    """The console script and `python -m mlops` go through `main`: help is printed, a bad option exits 2."""
    for command in ([MLOPS], [sys.executable, "-m", "mlops"]):
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and "Usage: mlops" in done.stdout, done.stderr
        wrong = subprocess.run([*command, "--no-such-option"], capture_output=True, text=True, timeout=120, check=False)
        assert wrong.returncode == 2 and "No such option" in wrong.stderr
