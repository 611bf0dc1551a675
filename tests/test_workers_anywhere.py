"""Workers anywhere: a worker in another folder, with its own environment and no access to this checkout, runs
every deployment.

The worker's environment is a new venv holding the project installed from a wheel built from a copy of the
sources; its third-party packages come from this venv's site-packages through a `.pth` path line (which does not
run the editable install's finder there, so the checkout's packages cannot be imported from it). It starts in a
temp folder with a clean environment (no PYTHONPATH) and serves a pool of its own, where `deploy_all` registers
the deployments of a catalog model of its own under a suffix (`training/anywhere-credit-risk-anywhere`, ...,
`features/features-anywhere`; no automations), so the session's deployments on the stack's pool stay as they
are.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from adapters.clients import mlflow_client
from mlops.stack import client_env
from tests.ports import free_port
from tests.serving_helpers import register_again
from tests.waiting import wait_for, wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "adapters", "dask_engine", "tasks", "services", "flows", "serving", "deployments", "mlops")
POOL = "mlops-anywhere"
SUFFIX = "-anywhere"
MODEL = "anywhere-credit-risk"

# Run in the worker's own interpreter, environment and folder: where the project's packages come from.
PROBE = """
import importlib.util, json, os, sys
print(json.dumps({
    "modules": {name: list(importlib.util.find_spec(name).submodule_search_locations) for name in sys.argv[1:]},
    "sys_path": sys.path,
    "cwd": os.getcwd(),
    "pythonpath": os.environ.get("PYTHONPATH"),
    "prefix": sys.prefix,
}))
"""


def _build_wheel(tmp: Path) -> Path:
    """A wheel of the project, built from a copy of its sources (the build writes nothing into the checkout)."""
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(CHECKOUT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            wheels,
            source,
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("prefect_mlops-*.whl")
    return wheel


def _own_venv(tmp: Path, wheel: Path) -> Path:
    """A new venv: the project from the wheel, the third-party packages of this venv through a .pth path line."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def remote_worker(stack, tmp_path_factory):
    """A process worker for POOL, started from the new venv in a temp folder; yields the probe's findings."""
    import json

    tmp = tmp_path_factory.mktemp("anywhere")
    python = _own_venv(tmp, _build_wheel(tmp))
    home = tmp / "worker-home"
    home.mkdir()
    env = client_env(stack) | {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),
        # asks for due runs every second (10 s by default): the runs here start as soon as they are created
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # its runs' logs reach the Prefect API like the stack worker's
        "PREFECT_LOGGING_EXTRA_LOGGERS": "mlops,core,adapters,dask_engine,services,tasks,flows",
    }
    env.pop("MLOPS_STATE_DIR", None)  # the stack's state folder is this machine's, not the worker's
    # No Dask cluster: the stack's workers run from this checkout's venv, so trials, refit and scoring sent there
    # would not be run by the worker's own environment. Without one, every step runs in the flow-run process.
    env.pop("MLOPS_DASK_ADDRESS", None)
    env["MLOPS_DASK_WORKERS"] = "0"
    probe = json.loads(subprocess.check_output([python, "-c", PROBE, *PACKAGES], env=env, cwd=home, text=True))
    log_path = tmp / "worker.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [python, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--with-healthcheck"],
            env=env,
            cwd=home,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield {"probe": probe, "venv": python.parent.parent, "log": log_path}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_the_worker_env_cannot_import_this_checkout(remote_worker):
    probe = remote_worker["probe"]
    venv = str(remote_worker["venv"])
    for name, locations in probe["modules"].items():
        assert locations and all(p.startswith(venv + "/") for p in locations), f"{name} imports from {locations}"
    # nothing on its path is the checkout or inside it, but for the third-party site-packages of deps.pth
    third_party = sysconfig.get_paths()["purelib"]
    inside = [
        p for p in probe["sys_path"] if p and (p == str(CHECKOUT) or p.startswith(f"{CHECKOUT}/")) and p != third_party
    ]
    assert inside == []
    assert probe["pythonpath"] is None and not probe["cwd"].startswith(str(CHECKOUT))


@pytest.fixture(scope="module")
def anywhere_entry(stack, default_data):
    """The bundled dataset config under a model of its own, in the catalog (the worker reads it from S3), with
    its search, monitoring and scoring in its operations; and the applicants' history the feature store
    materializes (as tests/test_features.py writes it)."""
    import yaml

    from core.data.dataset import bundled_config_text
    from mlops.datagen import write_applicant_history
    from tests.catalog import put_model
    from tests.conftest import TEST_MONTHS, TEST_ROWS_PER_MONTH

    write_applicant_history(stack, TEST_MONTHS, TEST_ROWS_PER_MONTH, seed=7)

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    return put_model(
        stack,
        raw,
        search={"families": ["logistic_regression"], "trials_per_family": 1, "cv_folds": 2},
        scoring_source=f"{default_data}month=2025-06/",
        prediction_log_days=0,
    )


def test_a_worker_elsewhere_runs_every_deployment(stack, remote_worker, anywhere_entry):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from deployments.deploy import deploy_all, ensure_work_pool

    # Given a deployment made the way they were before (this checkout's folder as its code and working dir)
    ensure_work_pool(POOL)
    old = flow.from_source(source=str(CHECKOUT), entrypoint="flows/training.py:training")
    old.deploy(
        f"{MODEL}{SUFFIX}",
        work_pool_name=POOL,
        job_variables={"working_dir": str(CHECKOUT)},
        build=False,
        push=False,
        print_next_steps=False,
    )
    # when the deployments are registered on the worker's own pool: module entrypoints, no path, no pull step
    ids = deploy_all(work_pool=POOL, entries=[anywhere_entry], name_suffix=SUFFIX, automations=False)
    every = [f"{flow}/{MODEL}" for flow in ("training", "monitoring", "rollback", "scoring")] + ["features/features"]
    assert sorted(ids) == sorted(every)
    with get_client(sync_client=True) as client:
        for name, deployment_id in ids.items():
            deployment = client.read_deployment(deployment_id)
            assert deployment.name == name.split("/")[1] + SUFFIX and deployment.work_pool_name == POOL
            assert ":" not in deployment.entrypoint and deployment.entrypoint.startswith("flows.")
            assert not deployment.path and not deployment.pull_steps, (name, deployment.path, deployment.pull_steps)
            assert str(CHECKOUT) not in deployment.model_dump_json(), name
        wait_for(
            lambda: any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(POOL)),
            60,
            "the worker in its own environment to come online",
            interval=0.5,
        )

    def start(name: str, parameters: dict | None = None):
        return run_deployment(f"{name}{SUFFIX}", parameters=parameters or {}, timeout=0).id

    # When training and the feature store run on that worker
    first = wait_for_runs([start(f"training/{MODEL}"), start("features/features")], timeout=600)
    assert [r.state.type.value for r in first] == ["COMPLETED", "COMPLETED"], [r.state.message for r in first]
    client = mlflow_client(stack)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    # a second version (the same model registered again) for the rollback to go to
    second = register_again(stack, MODEL, champion.version)
    # then scoring, monitoring and rollback on the model it trained
    second_runs = wait_for_runs(
        [
            start(f"scoring/{MODEL}"),
            start(f"monitoring/{MODEL}"),
            start(
                f"rollback/{MODEL}",
                {
                    "params": {
                        "model_name": MODEL,
                        "reason": "workers anywhere test",
                        "to_version": second,
                        "force": True,
                        "serving_timeout_seconds": 1,
                    }
                },
            ),
        ],
        timeout=600,
    )
    # Then every run completed on the worker outside the checkout
    assert [r.state.type.value for r in second_runs] == ["COMPLETED"] * 3, [r.state.message for r in second_runs]
    # (its pool has no other worker; its log names each run it submitted)
    assert {r.work_pool_name for r in first + second_runs} == {POOL}
    worker_log = remote_worker["log"].read_text()
    assert all(str(r.id) in worker_log for r in first + second_runs), worker_log[-3000:]
    # (and the search's trial ran in the flow-run process of the worker's environment, whose console the worker
    # streams: a trial on a Dask worker would log to that worker's console, not here)
    assert "Task run 'trial logistic_regression-0' - Finished in state Completed()" in worker_log, worker_log[-3000:]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(second)


def test_deploy_to_kubernetes_names_how_to_create_its_pool(stack):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from typer.testing import CliRunner

    from deployments.deploy import KUBERNETES_POOL
    from mlops.cli import app

    # Given no Kubernetes pool on the server (no cluster here), when `mlops deploy --kubernetes` runs
    result = CliRunner().invoke(app, ["deploy", "--kubernetes"])
    # then it exits 2 naming the pool and how to create it, and registers nothing there
    assert result.exit_code == 2, result.output
    assert f"work pool {KUBERNETES_POOL!r} does not exist" in result.output
    assert "--base-job-template infra/k8s/base-job-template.json" in result.output
    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_work_pool(KUBERNETES_POOL)
